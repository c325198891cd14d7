"""Terms: typed descriptions of how to compute a job's value for a target.

A `Term[T]` evaluates, in a `Context`, to an outcome — `Ok(value)`,
`Pending(reason)` or `Failed(message)` — together with logs. Terms compose
with the combinators below, or are written as plain `async def` functions
decorated with `@term`, which `await` other terms:

    @term
    async def test() -> str:
        head = await github.head(target)
        await wait_for(ci_status_term, while_pending="...", on_failure="...")
        return f"tested {head}"

Awaiting a term that is pending or failed stops the function there, and
the whole term becomes that pending or failure, exactly as `bind` would.

Evaluation is cheap when it can be: terms that never await anything
(constants, reads of the snapshot and what is built from them) are marked
*immediate* and evaluated without creating tasks.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any, Generic, NoReturn, TypeVar, cast, overload

import trio

from ._errors import TermError
from ._metadata import ReadKey, Snapshot
from ._metrics import TERM_EVALS
from ._model import PR, Ref, Repo, Status, Target
from ._results import Logs, pair_logs

__all__ = [
    "Context",
    "Failed",
    "Ok",
    "Outcome",
    "Pending",
    "SlowAnswer",
    "Term",
    "apply",
    "catch",
    "current_context",
    "fail",
    "job_id",
    "join",
    "list_map_p",
    "of_slow",
    "of_state",
    "ok",
    "pair",
    "pending",
    "state",
    "term",
    "wait_for",
    "wait_for_all",
    "without_logs",
]

log = logging.getLogger("kitci.terms")

T = TypeVar("T")
U = TypeVar("U")
T_co = TypeVar("T_co", covariant=True)


class Ok(Generic[T_co]):
    """A successful outcome carrying `value`."""

    __slots__ = ("value",)
    __match_args__ = ("value",)

    def __init__(self, value: T_co) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ok) and bool(other.value == self.value)

    def __hash__(self) -> int:
        return hash(("ok", self.value))

    def __repr__(self) -> str:
        return f"Ok({self.value!r})"


class Pending:
    """An outcome that is expected to change by itself: `reason` says why."""

    __slots__ = ("reason",)
    __match_args__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pending) and other.reason == self.reason

    def __hash__(self) -> int:
        return hash(("pending", self.reason))

    def __repr__(self) -> str:
        return f"Pending({self.reason!r})"


class Failed:
    """A failure that stays until an input changes: `message` says what."""

    __slots__ = ("message",)
    __match_args__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Failed) and other.message == self.message

    def __hash__(self) -> int:
        return hash(("failed", self.message))

    def __repr__(self) -> str:
        return f"Failed({self.message!r})"


Outcome = Ok[T] | Pending | Failed
Evaluated = tuple[Ok[T] | Pending | Failed, Logs]


class Context:
    """What one evaluation of one job can see, and what it read.

    A new context is made for every evaluation. Terms read the snapshot only
    through the `read_*` methods, which record the keys they read in
    `reads`, so the engine can tell which jobs a new snapshot affects.
    """

    __slots__ = ("_wake_events", "job_name", "reads", "snapshot", "target")

    def __init__(self, snapshot: Snapshot, target: Target, job_name: str) -> None:
        # The github-metadata snapshot this evaluation reads.
        self.snapshot = snapshot
        self.target = target
        self.job_name = job_name
        # Every snapshot key read so far (see `kitci._metadata.ReadKey`).
        self.reads: set[ReadKey] = set()
        # Events that, once set, mean the job should be evaluated again.
        self._wake_events: list[trio.Event] = []

    @property
    def job_id(self) -> tuple[Target, str]:
        return (self.target, self.job_name)

    def __str__(self) -> str:
        return f"{self.target}:{self.job_name}"

    def read_pr(self, repo: Repo, number: int) -> PR | None:
        """Return PR `number` of `repo` (open or closed), recording the read."""
        self.reads.add(("pr", repo, number))
        return self.snapshot.pr(repo, number)

    def read_ref(self, repo: Repo, name: tuple[str, ...]) -> Ref | None:
        """Return the branch or tag `name` of `repo`, recording the read."""
        self.reads.add(("ref", repo, name))
        return self.snapshot.ref(repo, name)

    def read_status(
        self, repo: Repo, commit: str, context: tuple[str, ...]
    ) -> Status | None:
        """Return the status `context` of `commit`, recording the read."""
        self.reads.add(("status", repo, commit, context))
        return self.snapshot.status(repo, commit, context)

    def wake_on(self, event: trio.Event) -> None:
        """Ask for the job to be evaluated again once `event` is set.

        Only the evaluation in progress is woken: once a newer evaluation
        starts or the job is dropped, a late event asks for nothing.
        """
        self._wake_events.append(event)

    @property
    def wake_events(self) -> Sequence[trio.Event]:
        return tuple(self._wake_events)


_current: contextvars.ContextVar[Context] = contextvars.ContextVar("kitci_term_context")


def current_context() -> Context:
    """Return the context of the evaluation running in this task.

    Raises `TermError` outside an evaluation.
    """
    try:
        return _current.get()
    except LookupError:
        raise TermError("no term is being evaluated in this task") from None


SyncFn = Callable[[Context], Evaluated[T]]
AsyncFn = Callable[[Context], Awaitable[Evaluated[T]]]


class Term(Generic[T_co]):
    """A computation of a `T` for a target, evaluated by the engine.

    Terms are immutable and can be shared between jobs and targets. Inside
    a function decorated with `@term`, `await some_term` gives its value.
    """

    __slots__ = ("_async", "_sync")

    def __init__(
        self,
        *,
        sync: Callable[[Context], Evaluated[Any]] | None = None,
        run: Callable[[Context], Awaitable[Evaluated[Any]]] | None = None,
    ) -> None:
        if (sync is None) == (run is None):
            raise TypeError("give exactly one of sync= and run=")
        self._sync = sync
        self._async = run

    @property
    def immediate(self) -> bool:
        """True if evaluating this term never waits for anything."""
        return self._sync is not None

    async def _run(self, ctx: Context) -> Evaluated[T_co]:
        if self._sync is not None:
            return self._sync(ctx)
        assert self._async is not None
        return await self._async(ctx)

    async def evaluate(self, ctx: Context) -> Evaluated[T_co]:
        """Evaluate this term in `ctx`, as the engine does for a job.

        An exception raised by the term becomes a failure with its message;
        cancellation is never turned into a failure. Counts one evaluation.
        """
        TERM_EVALS.inc()
        token = _current.set(ctx)
        try:
            return await self._run(ctx)
        except Exception as exc:
            log.warning("%s: term raised %s", ctx, _describe(exc), exc_info=exc)
            return Failed(_describe(exc)), None
        finally:
            _current.reset(token)

    def evaluate_now(self, ctx: Context) -> Evaluated[T_co]:
        """Evaluate an immediate term without yielding to the scheduler.

        Behaves as `evaluate` does. Raises `TermError` if the term is not
        immediate (check `immediate` first).
        """
        if self._sync is None:
            raise TermError("evaluate_now needs an immediate term; use evaluate")
        TERM_EVALS.inc()
        token = _current.set(ctx)
        try:
            return self._sync(ctx)
        except Exception as exc:
            log.warning("%s: term raised %s", ctx, _describe(exc), exc_info=exc)
            return Failed(_describe(exc)), None
        finally:
            _current.reset(token)

    def map(self, fn: Callable[[T_co], U]) -> Term[U]:
        """Return a term whose value is `fn` of this term's value."""
        if self._sync is not None:
            sync = self._sync

            def mapped(ctx: Context) -> Evaluated[U]:
                outcome, logs = sync(ctx)
                if isinstance(outcome, Ok):
                    return Ok(fn(outcome.value)), logs
                return outcome, logs

            return Term(sync=mapped)

        async def mapped_async(ctx: Context) -> Evaluated[U]:
            outcome, logs = await self._run(ctx)
            if isinstance(outcome, Ok):
                return Ok(fn(outcome.value)), logs
            return outcome, logs

        return Term(run=mapped_async)

    def bind(self, fn: Callable[[T_co], Term[U]]) -> Term[U]:
        """Return a term that runs `fn(value)` after this one succeeds.

        The logs of both steps are kept; a pending or failed first step is
        the result, and `fn` is not called.
        """

        async def bound(ctx: Context) -> Evaluated[U]:
            outcome, logs = await self._run(ctx)
            if not isinstance(outcome, Ok):
                return outcome, logs
            second, second_logs = await fn(outcome.value)._run(ctx)
            return second, pair_logs(logs, second_logs)

        return Term(run=bound)

    def __await__(self) -> Generator[Any, None, T_co]:
        return _await_term(self).__await__()


def _describe(exc: BaseException) -> str:
    # A nursery in user code wraps what its tasks raised in a group, whose
    # own text ("Exceptions from Trio nursery ...") names no cause.
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    text = str(exc)
    return text if text else type(exc).__name__


# Constants ----------------------------------------------------------------------


def ok(value: T) -> Term[T]:
    """Return a term that succeeds with `value` (the original's `return`)."""
    evaluated: Evaluated[T] = (Ok(value), None)
    return Term(sync=lambda ctx: evaluated)


def fail(message: str) -> Term[NoReturn]:
    """Return a term that fails with `message`.

    It never has a value, so it fits wherever any `Term[T]` is expected, and
    code after `await fail(...)` in a `@term` function is unreachable.
    """
    evaluated: Evaluated[Any] = (Failed(message), None)
    return Term(sync=lambda ctx: evaluated)


def pending(reason: str) -> Term[NoReturn]:
    """Return a term that is pending with `reason` (it never has a value)."""
    evaluated: Evaluated[Any] = (Pending(reason), None)
    return Term(sync=lambda ctx: evaluated)


def of_state(outcome: Ok[T] | Pending | Failed) -> Term[T]:
    """Return a term whose outcome is `outcome`."""
    evaluated: Evaluated[T] = (outcome, None)
    return Term(sync=lambda ctx: evaluated)


def job_id() -> Term[tuple[Target, str]]:
    """Return a term giving the (target, job name) being evaluated."""
    return Term(sync=lambda ctx: (Ok(ctx.job_id), None))


# Structure ----------------------------------------------------------------------


def _combine(
    outcomes: Sequence[Ok[Any] | Pending | Failed], logs: Sequence[Logs]
) -> tuple[Ok[list[Any]] | Pending | Failed, Logs]:
    combined: Logs = None
    for entry in logs:
        combined = pair_logs(combined, entry)
    for outcome in outcomes:
        if not isinstance(outcome, Ok):
            return outcome, combined
    return Ok([cast(Ok[Any], o).value for o in outcomes]), combined


async def _run_all(terms: Sequence[Term[Any]], ctx: Context) -> list[Evaluated[Any]]:
    """Evaluate `terms` concurrently (sequentially if all are immediate)."""
    if all(t._sync is not None for t in terms):
        return [cast("SyncFn[Any]", t._sync)(ctx) for t in terms]
    results: list[Evaluated[Any] | None] = [None] * len(terms)

    async def one(index: int, t: Term[Any]) -> None:
        # An exception fails this branch alone, with its own message: left to
        # the nursery, it would cancel the siblings and reach `evaluate`
        # wrapped in an exception group whose message names no cause.
        try:
            results[index] = await t._run(ctx)
        except Exception as exc:
            log.warning("%s: term raised %s", ctx, _describe(exc), exc_info=exc)
            results[index] = (Failed(_describe(exc)), None)

    async with trio.open_nursery() as nursery:
        for index, t in enumerate(terms):
            nursery.start_soon(one, index, t)
    return cast(list[Evaluated[Any]], results)


def _gather(terms: Sequence[Term[Any]]) -> Term[list[Any]]:
    """Evaluate all `terms` in parallel; the first non-success in order wins."""
    if all(t._sync is not None for t in terms):
        syncs = [cast("SyncFn[Any]", t._sync) for t in terms]

        def gathered(ctx: Context) -> Evaluated[list[Any]]:
            results = [s(ctx) for s in syncs]
            return _combine([r[0] for r in results], [r[1] for r in results])

        return Term(sync=gathered)

    async def gathered_async(ctx: Context) -> Evaluated[list[Any]]:
        results = await _run_all(terms, ctx)
        return _combine([r[0] for r in results], [r[1] for r in results])

    return Term(run=gathered_async)


def pair(first: Term[T], second: Term[U]) -> Term[tuple[T, U]]:
    """Evaluate both terms in parallel and pair their values.

    If `first` is not successful the result is its outcome, else the
    outcome of `second`; the logs of both are kept.
    """
    return _gather([first, second]).map(lambda values: (values[0], values[1]))


def apply(fn: Term[Callable[[T], U]], arg: Term[T]) -> Term[U]:
    """Evaluate `fn` and `arg` in parallel and apply one to the other."""
    return pair(fn, arg).map(lambda both: both[0](both[1]))


def join(nested: Term[Term[T]]) -> Term[T]:
    """Evaluate the term that `nested` evaluates to."""
    return nested.bind(lambda inner: inner)


def list_map_p(fn: Callable[[T], Term[U]], items: Sequence[T]) -> Term[list[U]]:
    """Apply `fn` to every item and evaluate the terms in parallel.

    The result is the list of values, or the first non-success in order.
    """
    return _gather([fn(item) for item in items])


def state(inner: Term[T]) -> Term[Ok[T] | Pending | Failed]:
    """Return a term that always succeeds, with `inner`'s outcome as value."""
    if inner._sync is not None:
        sync = inner._sync
        return Term(sync=lambda ctx: _as_state(sync(ctx)))

    async def run(ctx: Context) -> Evaluated[Ok[T] | Pending | Failed]:
        return _as_state(await inner._run(ctx))

    return Term(run=run)


def _as_state(evaluated: Evaluated[Any]) -> Evaluated[Any]:
    outcome, logs = evaluated
    return Ok(outcome), logs


def catch(inner: Term[T]) -> Term[Ok[T] | Failed]:
    """Turn a failure of `inner` into a value; pending stays pending."""

    def convert(evaluated: Evaluated[Any]) -> Evaluated[Any]:
        outcome, logs = evaluated
        if isinstance(outcome, Pending):
            return outcome, logs
        return Ok(outcome), logs

    if inner._sync is not None:
        sync = inner._sync
        return Term(sync=lambda ctx: convert(sync(ctx)))

    async def run(ctx: Context) -> Evaluated[Ok[T] | Failed]:
        return convert(await inner._run(ctx))

    return Term(run=run)


def without_logs(inner: Term[T]) -> Term[T]:
    """Evaluate `inner` and drop its logs."""
    if inner._sync is not None:
        sync = inner._sync
        return Term(sync=lambda ctx: (sync(ctx)[0], None))

    async def run(ctx: Context) -> Evaluated[T]:
        return (await inner._run(ctx))[0], None

    return Term(run=run)


def wait_for(inner: Term[Any], *, while_pending: str, on_failure: str) -> Term[None]:
    """Succeed with None once `inner` succeeds.

    While `inner` is pending the result is pending with `while_pending`; if
    it fails, the result fails with `on_failure`. Its logs are kept.
    """

    def convert(evaluated: Evaluated[Any]) -> Evaluated[None]:
        outcome, logs = evaluated
        if isinstance(outcome, Ok):
            return Ok(None), logs
        if isinstance(outcome, Pending):
            return Pending(while_pending), logs
        return Failed(on_failure), logs

    if inner._sync is not None:
        sync = inner._sync
        return Term(sync=lambda ctx: convert(sync(ctx)))

    async def run(ctx: Context) -> Evaluated[None]:
        return convert(await inner._run(ctx))

    return Term(run=run)


def _names(names: list[str]) -> str:
    return f"{len(names)} tasks" if len(names) > 10 else ", ".join(names)


def wait_for_all(terms: Sequence[tuple[str, Term[Any]]]) -> Term[None]:
    """Succeed once every named term has succeeded.

    Otherwise fail with `A, B failed` when some failed and none is pending,
    or be pending with `Waiting for A, B` or
    `A failed (still waiting for B)`. Over 10 names read `N tasks`.
    """
    gathered = _gather([state(t) for _, t in terms])
    labels = [name for name, _ in terms]

    def verdict(states: list[Any]) -> Term[None]:
        waiting = [
            n for n, s in zip(labels, states, strict=True) if isinstance(s, Pending)
        ]
        failed = [
            n for n, s in zip(labels, states, strict=True) if isinstance(s, Failed)
        ]
        if not waiting and not failed:
            return ok(None)
        if not waiting:
            return fail(f"{_names(failed)} failed")
        if not failed:
            return pending(f"Waiting for {_names(waiting)}")
        return pending(f"{_names(failed)} failed (still waiting for {_names(waiting)})")

    if gathered._sync is not None:
        sync = gathered._sync

        def run_sync(ctx: Context) -> Evaluated[None]:
            outcome, logs = sync(ctx)
            assert isinstance(outcome, Ok)
            result, _ = cast("SyncFn[None]", verdict(outcome.value)._sync)(ctx)
            return result, logs

        return Term(sync=run_sync)
    return gathered.bind(verdict)


# Slow terms -------------------------------------------------------------------


class SlowAnswer(Generic[T]):
    """What a slow check answers: an outcome, logs, and maybe a ready event.

    When `ready` is given, the job is evaluated again once it is set: a
    pending answer's event says the wait is over, a final answer's that the
    answer no longer holds (say, a saved result being rebuilt).
    """

    __slots__ = ("logs", "outcome", "ready")

    def __init__(
        self,
        outcome: Ok[T] | Pending | Failed,
        logs: Logs = None,
        ready: trio.Event | None = None,
    ) -> None:
        self.outcome = outcome
        self.logs = logs
        self.ready = ready


def of_slow(check: Callable[[], Awaitable[SlowAnswer[T]]]) -> Term[T]:
    """Return a term that asks `check` for its state each evaluation.

    An answer with a `ready` event asks the engine to evaluate the job again
    when the event is set (and only while this evaluation is the job's
    latest).
    """

    async def run(ctx: Context) -> Evaluated[T]:
        answer = await check()
        if answer.ready is not None:
            ctx.wake_on(answer.ready)
        return answer.outcome, answer.logs

    return Term(run=run)


# async def terms ----------------------------------------------------------------


class _Accumulator:
    """The logs and first non-success of one `@term` function's awaits."""

    __slots__ = ("logs", "stopped")

    def __init__(self) -> None:
        self.logs: Logs = None
        self.stopped: Pending | Failed | None = None


_accumulator: contextvars.ContextVar[_Accumulator] = contextvars.ContextVar(
    "kitci_term_accumulator"
)


class _Stop(Exception):
    """Raised by `await term` when the term did not succeed."""


async def _await_term(t: Term[T]) -> T:
    ctx = current_context()
    try:
        acc = _accumulator.get()
    except LookupError:
        raise TermError(
            "await a term only inside a function decorated with @term"
        ) from None
    outcome, logs = await t._run(ctx)
    acc.logs = pair_logs(acc.logs, logs)
    if isinstance(outcome, Ok):
        return outcome.value
    if acc.stopped is None:
        acc.stopped = outcome
    raise _Stop(outcome)


@overload
def term(fn: Callable[[], Coroutine[Any, Any, T]]) -> Term[T]: ...
@overload
def term(fn: Callable[[Context], Coroutine[Any, Any, T]]) -> Term[T]: ...
def term(fn: Callable[..., Coroutine[Any, Any, T]]) -> Term[T]:
    """Make a term from an `async def` function that awaits other terms.

    The function takes no arguments, or the evaluation `Context`. Awaiting a
    pending or failed term stops it there and the term has that outcome
    (even if the function catches the exception); an exception it raises
    becomes a failure with the exception's message.
    """
    import inspect

    wants_context = bool(inspect.signature(fn).parameters)

    async def run(ctx: Context) -> Evaluated[T]:
        acc = _Accumulator()
        token = _accumulator.set(acc)
        try:
            value = await (fn(ctx) if wants_context else fn())
        except Exception as exc:
            if acc.stopped is not None:
                return acc.stopped, acc.logs
            log.warning("%s: term raised %s", ctx, _describe(exc), exc_info=exc)
            return Failed(_describe(exc)), acc.logs
        finally:
            _accumulator.reset(token)
        if acc.stopped is not None:
            return acc.stopped, acc.logs
        return Ok(value), acc.logs

    return Term(run=run)
