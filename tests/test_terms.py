"""Tests of kitci._terms: outcomes, combinators, @term functions, contexts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import trio
from prometheus_client import REGISTRY

from kitci import (
    PR,
    LiveLogRef,
    LogPair,
    Logs,
    PRTarget,
    Repo,
    Status,
    StatusState,
    github,
)
from kitci._errors import TermError
from kitci._metadata import RepoSnapshot, Snapshot
from kitci._terms import (
    Context,
    Evaluated,
    Failed,
    Ok,
    Outcome,
    Pending,
    SlowAnswer,
    Term,
    apply,
    catch,
    current_context,
    fail,
    job_id,
    join,
    list_map_p,
    of_slow,
    of_state,
    ok,
    pair,
    pending,
    state,
    term,
    wait_for,
    wait_for_all,
    without_logs,
)

T = TypeVar("T")

REPO = Repo("alice", "proj")
TARGET = PRTarget(REPO, 9)
HEAD = "1" * 40
LOG_A = LiveLogRef("log-a")
LOG_B = LiveLogRef("log-b")
LOG_C = LiveLogRef("log-c")


def make_context(snapshot: Snapshot | None = None) -> Context:
    return Context(snapshot or Snapshot(None, {}), TARGET, "test")


async def run(t: Term[T], ctx: Context | None = None) -> Evaluated[T]:
    return await t.evaluate(ctx or make_context())


def logged(outcome: Outcome[T], logs: Logs) -> Term[T]:
    """Return an immediate term with the given outcome and logs."""
    return Term(sync=lambda ctx: (outcome, logs))


def slow(outcome: Outcome[T], logs: Logs = None) -> Term[T]:
    """Return a term with the given outcome and logs that yields to Trio first."""

    async def check() -> SlowAnswer[T]:
        await trio.lowlevel.checkpoint()
        return SlowAnswer(outcome, logs)

    return of_slow(check)


# Both shapes of term, so each combinator is checked on its immediate path
# and on its task-based path.
SHAPES = [pytest.param(logged, id="immediate"), pytest.param(slow, id="slow")]
Shape = Callable[[Outcome[Any], Logs], Term[Any]]


# Constants ----------------------------------------------------------------------


async def test_constants_evaluate_to_their_outcome_without_logs() -> None:
    assert await run(ok(3)) == (Ok(3), None)
    assert await run(fail("broken")) == (Failed("broken"), None)
    assert await run(pending("later")) == (Pending("later"), None)


@pytest.mark.parametrize("outcome", [Ok("v"), Pending("p"), Failed("f")])
async def test_of_state_evaluates_to_the_given_outcome(outcome: Outcome[str]) -> None:
    assert await run(of_state(outcome)) == (outcome, None)


async def test_job_id_is_the_target_and_job_name_of_the_context() -> None:
    ctx = Context(Snapshot(None, {}), TARGET, "build")
    assert await run(job_id(), ctx) == (Ok((TARGET, "build")), None)


# map and bind -------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
async def test_map_applies_fn_to_a_value_and_keeps_logs(shape: Shape) -> None:
    assert await run(shape(Ok(2), LOG_A).map(lambda x: x * 10)) == (Ok(20), LOG_A)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("outcome", [Pending("p"), Failed("f")])
async def test_map_does_not_call_fn_after_a_non_success(
    shape: Shape, outcome: Outcome[int]
) -> None:
    calls: list[int] = []
    mapped = shape(outcome, LOG_A).map(calls.append)
    assert await run(mapped) == (outcome, LOG_A)
    assert calls == []


@pytest.mark.parametrize("first_shape", SHAPES)
@pytest.mark.parametrize("second_shape", SHAPES)
async def test_bind_runs_fn_on_the_value_and_keeps_the_logs_of_both(
    first_shape: Shape, second_shape: Shape
) -> None:
    bound = first_shape(Ok(2), LOG_A).bind(lambda x: second_shape(Ok(x + 1), LOG_B))
    assert await run(bound) == (Ok(3), LogPair(LOG_A, LOG_B))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("second", [Pending("p2"), Failed("f2")])
async def test_bind_result_is_the_second_steps_non_success(
    shape: Shape, second: Outcome[int]
) -> None:
    bound = shape(Ok(1), LOG_A).bind(lambda x: shape(second, LOG_B))
    assert await run(bound) == (second, LogPair(LOG_A, LOG_B))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("first", [Pending("p1"), Failed("f1")])
async def test_bind_does_not_call_fn_after_a_non_success(
    shape: Shape, first: Outcome[int]
) -> None:
    calls: list[int] = []

    def next_step(value: int) -> Term[int]:
        calls.append(value)
        return ok(value)

    assert await run(shape(first, LOG_A).bind(next_step)) == (first, LOG_A)
    assert calls == []


# pair ---------------------------------------------------------------------------


async def test_pair_evaluates_both_sides_concurrently(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Each side waits for the other to have started: evaluated one after
    # the other, the first side would wait forever.
    left_started, right_started = trio.Event(), trio.Event()

    @term
    async def left() -> str:
        left_started.set()
        await right_started.wait()
        return "left"

    @term
    async def right() -> str:
        right_started.set()
        await left_started.wait()
        return "right"

    with trio.fail_after(10):
        assert await run(pair(left, right)) == (Ok(("left", "right")), None)


ORDER_CASES = [
    (Ok(1), Ok(2), Ok((1, 2))),
    (Failed("a"), Pending("b"), Failed("a")),
    (Pending("a"), Failed("b"), Pending("a")),
    (Pending("a"), Pending("b"), Pending("a")),
    (Failed("a"), Failed("b"), Failed("a")),
    (Ok(1), Failed("b"), Failed("b")),
    (Ok(1), Pending("b"), Pending("b")),
    (Failed("a"), Ok(2), Failed("a")),
]


@pytest.mark.parametrize("first_shape", SHAPES)
@pytest.mark.parametrize("second_shape", SHAPES)
@pytest.mark.parametrize(("first", "second", "expected"), ORDER_CASES)
async def test_pair_result_is_the_first_non_success_in_order(
    first_shape: Shape,
    second_shape: Shape,
    first: Outcome[int],
    second: Outcome[int],
    expected: Outcome[tuple[int, int]],
) -> None:
    both = pair(first_shape(first, LOG_A), second_shape(second, LOG_B))
    # The logs of both sides are kept whatever the outcome.
    assert await run(both) == (expected, LogPair(LOG_A, LOG_B))


@pytest.mark.parametrize("shape", SHAPES)
async def test_pair_with_one_side_without_logs_has_the_others_logs(
    shape: Shape,
) -> None:
    assert await run(pair(shape(Ok(1), None), shape(Ok(2), LOG_B))) == (
        Ok((1, 2)),
        LOG_B,
    )
    assert await run(pair(shape(Failed("x"), LOG_A), shape(Ok(2), None))) == (
        Failed("x"),
        LOG_A,
    )
    assert await run(pair(shape(Ok(1), None), shape(Ok(2), None))) == (
        Ok((1, 2)),
        None,
    )


async def test_pair_of_immediate_terms_is_immediate() -> None:
    both = pair(ok(1), ok("x"))
    assert both.immediate
    assert await run(both) == (Ok((1, "x")), None)
    assert not pair(ok(1), slow(Ok(2))).immediate
    assert not pair(slow(Ok(1)), ok(2)).immediate


async def test_pair_side_raising_fails_with_its_own_message() -> None:
    def explode(value: int) -> int:
        raise ValueError(f"cannot use {value}")

    raising = slow(Ok(4)).map(explode)
    assert await run(pair(raising, slow(Ok(1)))) == (Failed("cannot use 4"), None)
    # An earlier non-success still wins over a later exception.
    assert await run(pair(slow(Pending("p")), raising)) == (Pending("p"), None)
    assert await run(pair(ok(1).map(explode), ok(2))) == (
        Failed("cannot use 1"),
        None,
    )


# apply, join, list_map_p ----------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
async def test_apply_calls_the_function_value_on_the_argument_value(
    shape: Shape,
) -> None:
    def add_one(x: int) -> int:
        return x + 1

    fn: Term[Callable[[int], int]] = shape(Ok(add_one), LOG_A)
    assert await run(apply(fn, shape(Ok(2), LOG_B))) == (Ok(3), LogPair(LOG_A, LOG_B))
    assert await run(apply(shape(Pending("f"), None), shape(Failed("x"), None))) == (
        Pending("f"),
        None,
    )
    assert await run(apply(fn, shape(Failed("x"), None))) == (Failed("x"), LOG_A)


@pytest.mark.parametrize("shape", SHAPES)
async def test_join_evaluates_the_inner_term(shape: Shape) -> None:
    inner_ok: Term[Term[int]] = shape(Ok(shape(Ok(5), LOG_B)), LOG_A)
    assert await run(join(inner_ok)) == (Ok(5), LogPair(LOG_A, LOG_B))
    inner_pending: Term[Term[int]] = shape(Ok(shape(Pending("p"), LOG_B)), None)
    assert await run(join(inner_pending)) == (Pending("p"), LOG_B)
    assert await run(join(shape(Failed("outer"), LOG_A))) == (Failed("outer"), LOG_A)


@pytest.mark.parametrize("shape", SHAPES)
async def test_list_map_p_gives_values_and_logs_in_input_order(shape: Shape) -> None:
    logs = {1: LOG_A, 2: LOG_B, 3: LOG_C}
    mapped = list_map_p(lambda n: shape(Ok(n * 2), logs[n]), [1, 2, 3])
    assert await run(mapped) == (Ok([2, 4, 6]), LogPair(LogPair(LOG_A, LOG_B), LOG_C))


@pytest.mark.parametrize("shape", SHAPES)
async def test_list_map_p_result_is_the_first_non_success_in_order(
    shape: Shape,
) -> None:
    outcomes: dict[int, Outcome[int]] = {
        1: Ok(1),
        2: Pending("two"),
        3: Failed("three"),
    }
    mapped = list_map_p(lambda n: shape(outcomes[n], None), [1, 2, 3])
    assert await run(mapped) == (Pending("two"), None)
    assert await run(list_map_p(lambda n: shape(outcomes[n], None), [3, 2])) == (
        Failed("three"),
        None,
    )


async def test_list_map_p_of_nothing_is_an_empty_list() -> None:
    assert await run(list_map_p(ok, [])) == (Ok([]), None)


async def test_list_map_p_evaluates_items_concurrently(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Every item waits until all three have started.
    started: set[int] = set()
    all_started = trio.Event()

    def item(n: int) -> Term[int]:
        @term
        async def body() -> int:
            started.add(n)
            if len(started) == 3:
                all_started.set()
            await all_started.wait()
            return n

        return body

    with trio.fail_after(10):
        assert await run(list_map_p(item, [1, 2, 3])) == (Ok([1, 2, 3]), None)


# state, catch, without_logs ---------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("outcome", [Ok(1), Pending("p"), Failed("f")])
async def test_state_always_succeeds_with_the_inner_outcome(
    shape: Shape, outcome: Outcome[int]
) -> None:
    assert await run(state(shape(outcome, LOG_A))) == (Ok(outcome), LOG_A)


@pytest.mark.parametrize("shape", SHAPES)
async def test_catch_turns_failure_into_a_value_and_keeps_pending(
    shape: Shape,
) -> None:
    assert await run(catch(shape(Failed("f"), LOG_A))) == (Ok(Failed("f")), LOG_A)
    assert await run(catch(shape(Ok(1), LOG_A))) == (Ok(Ok(1)), LOG_A)
    assert await run(catch(shape(Pending("p"), LOG_A))) == (Pending("p"), LOG_A)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("outcome", [Ok(1), Pending("p"), Failed("f")])
async def test_without_logs_drops_the_logs_only(
    shape: Shape, outcome: Outcome[int]
) -> None:
    assert await run(without_logs(shape(outcome, LOG_A))) == (outcome, None)


# wait_for and wait_for_all ----------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (Ok(1), Ok(None)),
        (Pending("inner reason"), Pending("Still building")),
        (Failed("inner message"), Failed("Build failed")),
    ],
)
async def test_wait_for_replaces_the_messages(
    shape: Shape, outcome: Outcome[int], expected: Outcome[None]
) -> None:
    waited = wait_for(
        shape(outcome, LOG_A),
        while_pending="Still building",
        on_failure="Build failed",
    )
    assert await run(waited) == (expected, LOG_A)


def named(spec: str, shape: Shape = logged) -> list[tuple[str, Term[int]]]:
    """Turn "A=ok B=pending" into named terms with those outcomes."""
    outcomes: dict[str, Outcome[int]] = {
        "ok": Ok(0),
        "pending": Pending("p"),
        "failed": Failed("f"),
    }
    pairs = [word.split("=") for word in spec.split()]
    return [(name, shape(outcomes[kind], None)) for name, kind in pairs]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", Ok(None)),
        ("A=ok B=ok", Ok(None)),
        ("A=failed B=ok C=failed", Failed("A, C failed")),
        ("C=failed A=failed B=failed", Failed("C, A, B failed")),
        ("C=pending A=pending B=pending", Pending("Waiting for C, A, B")),
        ("B=pending A=pending C=ok", Pending("Waiting for B, A")),
        ("A=failed B=pending", Pending("A failed (still waiting for B)")),
        ("C=pending B=ok A=pending", Pending("Waiting for C, A")),
        (
            "X=pending A=failed Y=pending B=failed Z=ok",
            Pending("A, B failed (still waiting for X, Y)"),
        ),
    ],
)
async def test_wait_for_all_names_pending_and_failed_in_input_order(
    shape: Shape, spec: str, expected: Outcome[None]
) -> None:
    assert await run(wait_for_all(named(spec, shape))) == (expected, None)


def names(count: int, kind: str) -> str:
    return " ".join(f"T{i}={kind}" for i in range(1, count + 1))


async def test_wait_for_all_lists_up_to_ten_names() -> None:
    listed = ", ".join(f"T{i}" for i in range(1, 11))
    assert await run(wait_for_all(named(names(10, "failed")))) == (
        Failed(f"{listed} failed"),
        None,
    )
    assert await run(wait_for_all(named(names(10, "pending")))) == (
        Pending(f"Waiting for {listed}"),
        None,
    )


@pytest.mark.parametrize("count", [11, 12])
async def test_wait_for_all_counts_more_than_ten_names(count: int) -> None:
    assert await run(wait_for_all(named(names(count, "failed")))) == (
        Failed(f"{count} tasks failed"),
        None,
    )
    assert await run(wait_for_all(named(names(count, "pending")))) == (
        Pending(f"Waiting for {count} tasks"),
        None,
    )
    # Failed and pending names are counted separately.
    mixed = named(names(count, "failed") + " P1=pending P2=pending")
    assert await run(wait_for_all(mixed)) == (
        Pending(f"{count} tasks failed (still waiting for P1, P2)"),
        None,
    )


async def test_wait_for_all_keeps_the_logs_of_every_term() -> None:
    terms = [
        ("A", logged(Ok(1), LOG_A)),
        ("B", slow(Pending("p"), LOG_B)),
        ("C", logged(Failed("f"), LOG_C)),
    ]
    assert await run(wait_for_all(terms)) == (
        Pending("C failed (still waiting for B)"),
        LogPair(LogPair(LOG_A, LOG_B), LOG_C),
    )


# @term functions -------------------------------------------------------------------


async def test_term_function_gets_the_values_it_awaits_and_their_logs() -> None:
    @term
    async def job() -> str:
        first = await logged(Ok("a"), LOG_A)
        second = await slow(Ok("b"), LOG_B)
        return first + second

    assert not job.immediate
    assert await run(job) == (Ok("ab"), LogPair(LOG_A, LOG_B))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("outcome", [Pending("not yet"), Failed("broken")])
async def test_term_function_stops_at_the_first_non_success(
    shape: Shape, outcome: Outcome[int]
) -> None:
    reached: list[str] = []

    @term
    async def job() -> int:
        value: int = await shape(outcome, LOG_A)
        reached.append("after")
        return value

    assert await run(job) == (outcome, LOG_A)
    assert reached == []


@pytest.mark.parametrize("outcome", [Pending("not yet"), Failed("broken")])
async def test_term_function_catching_the_stop_still_has_that_outcome(
    outcome: Outcome[int],
) -> None:
    @term
    async def job() -> str:
        # The catch-all a user may write (what SIM105 would reword).
        try:  # noqa: SIM105
            await slow(outcome, LOG_A)
        except Exception:
            pass
        # Neither a later success nor a later non-success changes it.
        await logged(Ok(1), LOG_B)
        try:  # noqa: SIM105
            await pending("second reason")
        except Exception:
            pass
        return "done"

    assert await run(job) == (outcome, LogPair(LOG_A, LOG_B))


async def test_term_function_catching_the_stop_and_raising_has_that_outcome() -> None:
    @term
    async def job() -> str:
        try:
            await pending("not yet")
        except Exception as exc:
            raise RuntimeError("converted") from exc

    assert await run(job) == (Pending("not yet"), None)


class Silent(Exception):
    pass


async def test_exception_in_a_term_is_a_failure_with_its_message() -> None:
    @term
    async def job() -> str:
        await logged(Ok(1), LOG_A)
        raise ValueError("disk full")

    assert await run(job) == (Failed("disk full"), LOG_A)

    @term
    async def silent() -> str:
        raise Silent

    assert await run(silent) == (Failed("Silent"), None)

    def explode(value: int) -> int:
        raise KeyError

    assert await run(ok(1).map(explode)) == (Failed("KeyError"), None)


async def test_exceptions_from_a_users_nursery_fail_with_their_messages() -> None:
    async def raise_value_error() -> None:
        raise ValueError("first broke")

    async def raise_os_error() -> None:
        raise OSError("second broke")

    @term
    async def one() -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raise_value_error)
        return "unreachable"

    @term
    async def two() -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raise_value_error)
            nursery.start_soon(raise_os_error)
        return "unreachable"

    assert await run(one) == (Failed("first broke"), None)
    # Both messages, in the order the tasks happened to run.
    outcome, _ = await run(two)
    assert isinstance(outcome, Failed)
    assert sorted(outcome.message.split("; ")) == ["first broke", "second broke"]


async def test_term_function_can_take_the_context() -> None:
    ctx = make_context()

    @term
    async def job(context: Context) -> str:
        assert context is ctx
        assert current_context() is ctx
        return context.job_name

    assert await run(job, ctx) == (Ok("test"), None)


async def test_current_context_outside_an_evaluation_is_an_error() -> None:
    with pytest.raises(TermError, match="no term is being evaluated"):
        current_context()


async def test_awaiting_a_term_outside_a_term_function_fails() -> None:
    async def check() -> SlowAnswer[int]:
        value: int = await ok(1)
        return SlowAnswer(Ok(value))

    outcome, _ = await run(of_slow(check))
    assert outcome == Failed("await a term only inside a function decorated with @term")


# Cancellation ---------------------------------------------------------------------


def only_cancelled(exc: BaseException) -> bool:
    """Say whether `exc` is trio.Cancelled or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


@pytest.mark.parametrize("in_pair", [False, True], ids=["alone", "in-pair"])
async def test_cancellation_is_never_turned_into_a_failure(in_pair: bool) -> None:
    """A cancelled evaluation raises Cancelled and returns no outcome."""
    escaped: list[BaseException] = []
    results: list[Evaluated[Any]] = []

    with trio.CancelScope() as scope:

        @term
        async def job() -> str:
            scope.cancel()
            try:
                await trio.lowlevel.checkpoint()
            except Exception:
                return "swallowed"
            return "not cancelled"

        try:
            results.append(await run(pair(job, ok(1)) if in_pair else job))
        except BaseException as exc:
            escaped.append(exc)
            raise

    assert scope.cancelled_caught
    assert results == []
    assert len(escaped) == 1
    assert only_cancelled(escaped[0])


# Evaluation counter -----------------------------------------------------------------


async def test_each_evaluation_counts_once() -> None:
    def evals() -> float:
        value = REGISTRY.get_sample_value("DataKitCI_term_evals_total")
        assert value is not None
        return value

    before = evals()
    await run(ok(1))
    assert evals() == before + 1

    # A composite term is still one evaluation, as is one that fails.
    composite = wait_for_all([("a", slow(Ok(1))), ("b", pair(ok(1), slow(Ok(2))))])
    await run(composite)
    await run(fail("x"))
    assert evals() == before + 3


# Reads of the snapshot ------------------------------------------------------------


def snapshot_with_pr() -> Snapshot:
    pr = PR(REPO, 9, HEAD, "open", "Fix it", "bob")
    status = Status(REPO, HEAD, ("ci", "other"), StatusState.SUCCESS, None, "http://x")
    repo = RepoSnapshot(
        REPO,
        "tree",
        True,
        {9: pr},
        {},
        {HEAD: {("ci", "other"): status}},
    )
    return Snapshot("c" * 40, {REPO: repo})


async def test_context_records_the_keys_that_github_terms_read() -> None:
    ctx = make_context(snapshot_with_pr())
    job = pair(
        github.ci_success_target_url("ci/other", TARGET),
        github.branch_head(REPO, "main"),
    )
    assert await run(job, ctx) == (
        Failed("Target alice/proj/ref/heads/main does not exist"),
        None,
    )
    # Absent things are recorded too: their appearance must wake the job.
    assert ctx.reads == {
        ("pr", REPO, 9),
        ("status", REPO, HEAD, ("ci", "other")),
        ("ref", REPO, ("heads", "main")),
    }


async def test_each_context_records_only_its_own_reads() -> None:
    first, second = make_context(snapshot_with_pr()), make_context(snapshot_with_pr())
    await run(github.head(TARGET), first)
    await run(ok(1), second)
    assert first.reads == {("pr", REPO, 9)}
    assert second.reads == set()


# Slow terms -------------------------------------------------------------------------


async def test_slow_pending_with_ready_event_asks_to_be_woken() -> None:
    ready = trio.Event()

    async def check() -> SlowAnswer[str]:
        return SlowAnswer(Pending("building"), LOG_A, ready)

    ctx = make_context()
    assert await run(of_slow(check), ctx) == (Pending("building"), LOG_A)
    assert ctx.wake_events == (ready,)


async def test_slow_term_without_an_event_asks_for_nothing() -> None:
    async def check() -> SlowAnswer[str]:
        return SlowAnswer(Pending("no event"))

    ctx = make_context()
    assert await run(of_slow(check), ctx) == (Pending("no event"), None)
    assert ctx.wake_events == ()


@pytest.mark.parametrize("outcome", [Ok("done"), Failed("broken")])
async def test_a_final_answer_can_ask_to_be_evaluated_when_it_expires(
    outcome: Ok[str] | Failed,
) -> None:
    """A saved result's event (set when it is rebuilt) wakes the job too."""
    expires = trio.Event()

    async def check() -> SlowAnswer[str]:
        return SlowAnswer(outcome, ready=expires)

    ctx = make_context()
    assert await run(of_slow(check), ctx) == (outcome, None)
    assert ctx.wake_events == (expires,)


async def test_wake_events_belong_to_the_evaluation_that_asked() -> None:
    """A cancelled evaluation gives no outcome and its newer one no old event.

    The engine acts on the outcome and wake events of the evaluation that
    returned last; "a late event asks for nothing" is its part of the deal.
    At term level this checks what the engine relies on: the cancelled
    evaluation raises Cancelled, and the wake events of a newer evaluation
    hold only what that evaluation asked for.
    """
    asked: list[trio.Event] = []
    answered = trio.Event()
    gate = trio.Event()

    async def check() -> SlowAnswer[str]:
        ready = trio.Event()
        asked.append(ready)
        answered.set()
        return SlowAnswer(Pending("building"), ready=ready)

    @term
    async def blocked() -> None:
        await gate.wait()

    job = pair(of_slow(check), blocked)

    # Evaluation 1 asks for a wake-up, then is cancelled while still running.
    first = make_context()
    returned: list[Evaluated[Any]] = []
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def evaluate_first() -> None:
            with scope:
                returned.append(await run(job, first))

        nursery.start_soon(evaluate_first)
        await answered.wait()
        scope.cancel()
    assert scope.cancelled_caught
    assert returned == []
    # The cancelled context still lists what it asked for before the cancel:
    # dropping that context along with its evaluation is the engine's part.
    assert first.wake_events == (asked[0],)

    # Evaluation 2 completes and asks only for its own event.
    gate.set()
    second = make_context()
    assert await run(job, second) == (Pending("building"), None)
    assert len(asked) == 2
    assert second.wake_events == (asked[1],)

    # The first evaluation's event firing late changes nothing the newer
    # evaluation asked for.
    asked[0].set()
    assert not any(event.is_set() for event in second.wake_events)


# Immediacy --------------------------------------------------------------------------


def test_terms_that_never_wait_are_immediate() -> None:
    immediate: list[Term[Any]] = [
        ok(1),
        fail("x"),
        pending("x"),
        of_state(Ok(1)),
        job_id(),
        github.target(TARGET),
        github.head(TARGET),
        github.branch_head(REPO, "main"),
        github.branch_head(REPO, "bad..name"),
        github.tag(REPO, "v1"),
        github.ci_status("ci/other", TARGET),
        github.ci_target_url("ci/other", TARGET),
        github.ci_success_target_url("ci/other", TARGET),
        ok(1).map(str),
        pair(github.head(TARGET), ok(1)),
        apply(ok(str), ok(1)),
        list_map_p(ok, [1, 2]),
        state(ok(1)),
        catch(ok(1)),
        without_logs(ok(1)),
        wait_for(ok(1), while_pending="p", on_failure="f"),
        wait_for_all([("a", ok(1)), ("b", fail("x"))]),
    ]
    assert all(t.immediate for t in immediate)

    waiting: list[Term[Any]] = [
        slow(Ok(1)),
        slow(Ok(1)).map(str),
        ok(1).bind(ok),
        state(slow(Ok(1))),
        catch(slow(Ok(1))),
        without_logs(slow(Ok(1))),
        wait_for(slow(Ok(1)), while_pending="p", on_failure="f"),
        wait_for_all([("a", ok(1)), ("b", slow(Ok(1)))]),
        list_map_p(lambda n: slow(Ok(n)), [1]),
    ]
    assert not any(t.immediate for t in waiting)


async def test_immediate_combinations_give_the_same_results_as_slow_ones() -> None:
    for make in (logged, slow):
        job = wait_for_all([("a", pair(make(Ok(1), None), make(Ok(2), None)).map(sum))])
        assert await run(job) == (Ok(None), None)
