"""The engine: watch github-metadata, evaluate jobs, write statuses back.

`Engine.run` is a Trio service. Inside its nursery:

- the *monitor* task waits for the head of `github-metadata` to move and
  parses each new commit into a `Snapshot`;
- the *recalc* task compares the newest snapshot with the last one it
  handled, adds and drops targets, and starts an evaluation for every job
  whose inputs changed (or every job, in full mode). Each evaluation runs in
  its own cancel scope in the evaluation nursery, bounded by a
  `trio.CapacityLimiter`; a newer evaluation of the same job, or the
  target's closing, cancels it;
- the *flush* task records each target's history on its status branch,
  then writes the statuses of every dirty job in one commit.
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Protocol

import trio

from ._errors import KitciError, StoreError
from ._history import (
    EMPTY_STATE,
    HistoryState,
    load_states_sync,
    one_line,
    record_states_sync,
)
from ._metadata import (
    METADATA_BRANCH,
    ReadKey,
    Snapshot,
    SnapshotParser,
    changed_keys,
    status_files,
    write_monitor,
    write_status,
)
from ._metrics import (
    ACTIVE_TARGETS,
    CONNECTION_ATTEMPTS,
    CONNECTION_FAILURES,
    STATUS_UPDATES,
    UPDATE_NOTIFICATIONS,
)
from ._model import (
    PR,
    PRTarget,
    Ref,
    RefTarget,
    Repo,
    Status,
    Target,
    check_web_ui,
    datakit_context,
    is_valid_path_component,
    trim_description,
)
from ._results import Output, Result, iter_saved_logs, live_branches
from ._store import Store, Transaction, TreeReader
from ._terms import Context, Failed, Ok, Pending, Term

__all__ = ["Engine", "JobView", "MakeTerms", "TargetView"]

log = logging.getLogger("kitci.engine")

MakeTerms = Callable[[Target], Mapping[str, Term[str]]]


class BuildAbandoner(Protocol):
    """What the engine needs from a build cache: stop builds nobody needs."""

    def abandon(self, branch: str) -> None: ...


class _Job:
    """One job of one target: a small state machine around its term."""

    __slots__ = (
        "check_written",
        "done",
        "name",
        "output",
        "reads",
        "scope",
        "source",
        "target",
        "term",
    )

    def __init__(self, target: _Target, name: str, term: Term[str]) -> None:
        self.target = target
        self.name = name
        self.term = term
        # The head hash and output of the last finished evaluation (or those
        # restored from history); output is None before the first one.
        self.source: str | None = None
        self.output: Output | None = None
        # The snapshot keys the last finished evaluation read; None means
        # the job must be evaluated whatever changes.
        self.reads: tuple[ReadKey, ...] | None = None
        # The cancel scope of the evaluation in progress, and an event set
        # when that evaluation's task has finished.
        self.scope: trio.CancelScope | None = None
        self.done: trio.Event | None = None
        # Set until the first result: that one is compared with the status
        # actually in github-metadata rather than with `output`.
        self.check_written = True

    def __str__(self) -> str:
        return f"{self.target.id}:{self.name}"

    def cancel(self, reason: str) -> None:
        if self.scope is not None:
            log.debug("%s: cancelling evaluation (%s)", self, reason)
            self.scope.cancel()


class _Target:
    """A PR, branch or tag being tested, with its jobs."""

    __slots__ = ("history", "id", "jobs", "seq", "value")

    def __init__(self, value: PR | Ref, seq: int) -> None:
        self.id: Target = value.target
        # Creation order, so that flushes list targets in a stable order.
        self.seq = seq
        # The PR or ref as in the newest snapshot handled.
        self.value = value
        self.jobs: dict[str, _Job] = {}
        # The latest state recorded on the status branch.
        self.history: HistoryState = EMPTY_STATE

    @property
    def head(self) -> str:
        return self.value.head


class JobView:
    """A read-only view of a job for queries: name, head tested, output."""

    __slots__ = ("name", "output", "source")

    def __init__(self, name: str, source: str | None, output: Output | None) -> None:
        self.name = name
        self.source = source
        self.output = output

    def __repr__(self) -> str:
        descr = None if self.output is None else self.output.result
        return f"JobView({self.name!r}, {self.source!r}, {descr!r})"


class TargetView:
    """A read-only view of a target for queries."""

    __slots__ = ("jobs", "target", "value")

    def __init__(self, value: PR | Ref, jobs: Mapping[str, JobView]) -> None:
        self.target: Target = value.target
        self.value = value
        self.jobs = jobs


def _result_of(outcome: Ok[str] | Pending | Failed) -> Result:
    if isinstance(outcome, Ok):
        return Result("success", str(outcome.value))
    if isinstance(outcome, Pending):
        return Result("pending", outcome.reason)
    return Result("failure", outcome.message)


class Engine:
    """Run the jobs of `projects` on every open PR, branch and tag.

    `projects` maps each repository to a function giving the jobs (name ->
    term) of one of its targets. Start the engine with
    `await nursery.start(engine.run)`; it returns once the engine watches
    the store, and cancelling the surrounding scope stops everything.

    Arguments:
        store: the Git store holding `github-metadata`.
        web_ui: absolute http(s) address used to build status target URLs.
        canaries: if given, only these targets are tested.
        max_evaluations: how many job evaluations may run at once.
        retry_delay: seconds to wait after a store failure before retrying.
        incremental: re-evaluate only jobs whose inputs changed (the
            default); False re-evaluates every job on every snapshot, as
            DataKitCI did.
        flush_delay: longest time a finished result waits for other
            evaluations before being written.
        builds: a build cache, told to abandon builds that only closed
            targets needed.
    """

    def __init__(
        self,
        store: Store,
        projects: Mapping[Repo, MakeTerms],
        *,
        web_ui: str = "http://127.0.0.1:8080",
        canaries: Collection[Target] | None = None,
        max_evaluations: int = 50,
        retry_delay: float = 10.0,
        incremental: bool = True,
        flush_delay: float = 0.5,
        builds: BuildAbandoner | None = None,
    ) -> None:
        try:
            check_web_ui(web_ui)
        except ValueError as exc:
            raise ValueError(f"web_ui: {exc}") from None
        if max_evaluations < 1:
            raise ValueError(f"max_evaluations must be >= 1, not {max_evaluations}")
        if retry_delay < 0 or flush_delay < 0:
            raise ValueError("retry_delay and flush_delay must be >= 0")
        self.store = store
        self.projects = dict(projects)
        self.web_ui = web_ui.rstrip("/")
        self.canaries = None if canaries is None else frozenset(canaries)
        if self.canaries is not None:
            for target in self.canaries:
                if target.repo not in self.projects:
                    log.warning("canary %s is not in a monitored project", target)
        self.incremental = incremental
        self.retry_delay = retry_delay
        self.flush_delay = flush_delay
        self.builds = builds
        self._limiter = trio.CapacityLimiter(max_evaluations)
        self._parser = SnapshotParser()
        # The newest snapshot seen by the monitor, and the one recalc last
        # handled (diffed against the next).
        self._latest: Snapshot | None = None
        self._handled: Snapshot | None = None
        self._targets: dict[Target, _Target] = {}
        # Which jobs read each snapshot key, for incremental recalculation.
        # (Lists, not sets: a key has few readers, and a list is smaller.)
        self._readers: dict[ReadKey, list[_Job]] = {}
        self._targets_of_commit: dict[Repo, dict[str, list[Target]]] = {}
        # Every open PR and ref of the projects, the ones among them being
        # tested (canaries only, if given), and how many of those by kind.
        self._open: dict[Target, PR | Ref] = {}
        self._current: dict[Target, PR | Ref] = {}
        self._counts = dict.fromkeys(("pr", "branch", "tag"), 0)
        # Jobs whose slow term's event fired, or whose build was rebuilt.
        self._woken: set[_Job] = set()
        # Jobs whose status (as it would be written) differs from what was
        # last written, and targets whose jobs' outputs or head changed since
        # their history was recorded: what the next flush writes (dicts as
        # ordered sets; entries of dropped targets are skipped there).
        self._unflushed: dict[_Job, None] = {}
        self._unrecorded: dict[_Target, None] = {}
        self._created = 0
        # When the flush task should run again by itself (after a failure),
        # and the targets whose history the last flush could not record.
        self._retry_at = math.inf
        self._history_failed: set[Target] = set()
        # Set to ask the recalc task for a pass, and the flush task to run.
        self._recalc_needed = trio.Event()
        self._flush_needed = trio.Event()
        # Evaluations started and not yet finished; `_idle` is set whenever
        # that count drops to zero.
        self._running = 0
        self._idle = trio.Event()
        self._idle.set()
        # Counters for tests and benchmarks.
        self.evaluations = 0
        self.status_commits = 0
        self.history_commits = 0
        # Flushes finished, and the github-metadata commit handled when the
        # last one started if nothing was running or asked for then (None
        # otherwise): once that commit is still the head, all is written.
        self.flushes = 0
        self.settled_commit: str | None = None
        self._nursery: trio.Nursery | None = None
        self._flushed = trio.Event()

    # Service --------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the engine until cancelled.

        Makes sure every project's `.monitor` file exists, then calls
        `task_status.started()` and keeps the store's statuses up to date.
        """
        await self._retrying("start-up", self._enable_monitoring)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._retrying, "monitor", self._monitor_loop)
            nursery.start_soon(self._retrying, "recalc", self._recalc_loop)
            nursery.start_soon(self._retrying, "flush", self._flush_loop)
            log.info(
                "engine watching %s for %d projects",
                self.store.path,
                len(self.projects),
            )
            task_status.started()

    async def _retrying(self, label: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run `loop`, restarting it after store failures."""
        while True:
            CONNECTION_ATTEMPTS.inc()
            try:
                await loop()
                return
            except StoreError as exc:
                CONNECTION_FAILURES.inc()
                log.warning(
                    "%s: store failure: %s (will retry in %gs)",
                    label,
                    exc,
                    self.retry_delay,
                )
                await trio.sleep(self.retry_delay)

    async def _enable_monitoring(self) -> None:
        repos = sorted(self.projects)

        def build(reader: TreeReader, tx: Transaction) -> str | None:
            for repo in repos:
                if reader.read(f"{repo}/.monitor") is None:
                    write_monitor(tx, repo)
            return "Add .monitor files" if len(tx) else None

        await self.store.update_branch(METADATA_BRANCH, build)

    # Monitor -----------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        current = None if self._latest is None else self._latest.commit
        first = self._latest is None
        while True:
            if first:
                head = await self.store.head(METADATA_BRANCH)
                first = False
            else:
                head = await self.store.wait_for_head(METADATA_BRANCH, current)
            UPDATE_NOTIFICATIONS.inc()
            snapshot = await self._parser.parse(self.store, head)
            log.debug("new github-metadata snapshot %s", head)
            current = head
            self._latest = snapshot
            self._recalc_needed.set()

    # Recalculation ------------------------------------------------------------------

    async def _recalc_loop(self) -> None:
        # After a store failure, redo the pass that failed.
        self._recalc_needed.set()
        while True:
            await self._recalc_needed.wait()
            self._recalc_needed = trio.Event()
            snapshot = self._latest
            if snapshot is None:
                continue
            await self._recalculate(snapshot)

    async def _recalculate(self, snapshot: Snapshot) -> None:
        changed = (
            None if not self.incremental else changed_keys(self._handled, snapshot)
        )
        if changed is None:
            self._index_all(snapshot)
            touched: Collection[Target] = self._current
        else:
            touched = self._index_changes(snapshot, changed)
        current = self._current
        for kind, count in self._counts.items():
            ACTIVE_TARGETS.labels(kind).set(count)

        # Drop closed and vanished targets, cancelling their evaluations.
        dropped = [t for t in touched if t in self._targets and t not in current]
        abandoned: set[str] = set()
        for target_id in dropped:
            target = self._targets.pop(target_id)
            log.info("removing %s: it is closed or gone", target_id)
            for job in target.jobs.values():
                job.cancel("target closed")
                self._forget_reads(job)
                if job.output is not None:
                    abandoned.update(live_branches(job.output.logs))

        # Create jobs for new targets, restoring their state from history.
        new = [t for t in touched if t in current and t not in self._targets]
        if new:
            histories = await self.store.run_sync(
                lambda repo: load_states_sync(repo, new)
            )
        # Only now, so that a store failure above makes the retry see the
        # same changes again.
        self._handled = snapshot
        to_run: list[_Job] = []
        for target_id in list(new):
            value = current[target_id]
            self._created += 1
            target = _Target(value, self._created)
            target.history = histories[target_id]
            # Record at the first flush even if no output changed, so that
            # jobs the project no longer has are removed from the history.
            self._mark_history(target)
            try:
                terms = self.projects[target_id.repo](target_id)
            except Exception:
                log.exception("%s: make_terms failed; will try again", target_id)
                new.remove(target_id)
                continue
            for name, term in terms.items():
                if not is_valid_path_component(name) or name in _RESERVED_JOB_NAMES:
                    log.error(
                        "%s: skipping job %r: a job name must be one path "
                        "component, not state, description or target_url",
                        target_id,
                        name,
                    )
                    continue
                job = _Job(target, name, term)
                restored = target.history.jobs.get(name)
                if restored is not None:
                    job.source = target.history.source_commit
                    job.output = restored
                target.jobs[name] = job
                to_run.append(job)
            self._targets[target_id] = target
            log.info("monitoring %s (%d jobs)", target_id, len(target.jobs))

        # Decide which existing jobs to evaluate again: in full mode all of
        # them; otherwise those of targets whose PR or ref changed, those
        # that read a changed key, and those asking to be evaluated again.
        seen = {id(job) for job in to_run}

        def add(jobs: Iterable[_Job]) -> None:
            for job in jobs:
                if id(job) not in seen:
                    seen.add(id(job))
                    to_run.append(job)

        for target_id in touched:
            existing = self._targets.get(target_id)
            if existing is not None:
                existing.value = current[target_id]
                add(existing.jobs.values())
        if changed is not None:
            for key in changed:
                add(self._readers.get(key, ()))
        woken, self._woken = self._woken, set()
        add(job for job in woken if job.target.id in self._targets)

        if abandoned and self.builds is not None:
            for branch in abandoned - self._live_branches_in_use():
                log.info("abandoning build %s: no open target needs it", branch)
                self.builds.abandon(branch)

        for job in to_run:
            self._start_evaluation(job, snapshot)
        if not to_run and self._running == 0:
            self._flush_needed.set()

    def _consider(self, value: PR | Ref) -> bool:
        """Say whether `value` is a target to test (open, and a canary)."""
        if isinstance(value, PR) and value.state != "open":
            return False
        return self.canaries is None or value.target in self.canaries

    def _index_all(self, snapshot: Snapshot) -> None:
        """Rebuild the open targets, the head index and the counts."""
        self._open = {}
        self._current = {}
        self._counts = dict.fromkeys(("pr", "branch", "tag"), 0)
        for repo in self.projects:
            self._targets_of_commit[repo] = {}
            values: list[PR | Ref] = [
                *snapshot.prs(repo).values(),
                *snapshot.refs(repo).values(),
            ]
            for value in values:
                self._set_open(value.target, value)

    def _index_changes(self, snapshot: Snapshot, changed: set[ReadKey]) -> list[Target]:
        """Update the open targets from the PR and ref keys in `changed`.

        Returns the targets whose PR or ref changed (opened, closed, moved),
        in a stable order (the order jobs are created and flushed in).
        """
        touched: set[Target] = set()
        for key in changed:
            repo = key[1]
            if key[0] not in ("pr", "ref") or repo not in self.projects:
                continue
            target_id: Target
            value: PR | Ref | None
            if key[0] == "pr":
                target_id = PRTarget(repo, key[2])  # type: ignore[arg-type]  # from a "pr" key
                value = snapshot.pr(target_id.repo, target_id.number)
            else:
                target_id = RefTarget(repo, key[2])  # type: ignore[arg-type]  # from a "ref" key
                value = snapshot.ref(target_id.repo, target_id.name)
            self._set_open(target_id, value)
            touched.add(target_id)
        return sorted(touched, key=_target_order)

    def _set_open(self, target_id: Target, value: PR | Ref | None) -> None:
        """Record `target_id`'s new value (None: gone) in the indexes."""
        index = self._targets_of_commit.setdefault(target_id.repo, {})
        old = self._open.pop(target_id, None)
        if old is not None:
            heads = index.get(old.head, [])
            if target_id in heads:
                heads.remove(target_id)
                if not heads:
                    del index[old.head]
        if self._current.pop(target_id, None) is not None:
            self._counts[target_id.kind] -= 1
        if value is None or (isinstance(value, PR) and value.state != "open"):
            return
        self._open[target_id] = value
        index.setdefault(value.head, []).append(target_id)
        if self.canaries is None or target_id in self.canaries:
            self._current[target_id] = value
            self._counts[target_id.kind] += 1

    def _live_branches_in_use(self) -> set[str]:
        in_use: set[str] = set()
        for target in self._targets.values():
            for job in target.jobs.values():
                if job.output is not None:
                    in_use.update(live_branches(job.output.logs))
        return in_use

    def _forget_reads(self, job: _Job) -> None:
        if job.reads:
            for key in job.reads:
                readers = self._readers.get(key)
                if readers is not None and job in readers:
                    readers.remove(job)
                    if not readers:
                        del self._readers[key]
        job.reads = None

    def _start_evaluation(self, job: _Job, snapshot: Snapshot) -> None:
        assert self._nursery is not None
        self._woken.discard(job)
        if job.term.immediate and job.scope is None:
            # Nothing to wait for and nothing to cancel: evaluate in place,
            # which saves a task, a cancel scope and a limiter round trip.
            target = job.target
            ctx = Context(snapshot, target.id, job.name)
            self.evaluations += 1
            outcome, logs = job.term.evaluate_now(ctx)
            self._record_result(
                job, target.head, Output(_result_of(outcome), logs), ctx
            )
            self._flush_needed.set()
            return
        previous_done = job.done
        job.cancel("superseded by a newer evaluation")
        scope = trio.CancelScope()
        done = trio.Event()
        job.scope = scope
        job.done = done
        self._running += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        self._nursery.start_soon(
            self._evaluate, job, snapshot, scope, done, previous_done
        )

    async def _evaluate(
        self,
        job: _Job,
        snapshot: Snapshot,
        scope: trio.CancelScope,
        done: trio.Event,
        previous_done: trio.Event | None,
    ) -> None:
        counted = True
        try:
            with scope:
                # Never evaluate a job twice at once: let the cancelled
                # evaluation finish first.
                if previous_done is not None:
                    await previous_done.wait()
                async with self._limiter:
                    target = job.target
                    head = target.head
                    ctx = Context(snapshot, target.id, job.name)
                    self.evaluations += 1
                    outcome, logs = await job.term.evaluate(ctx)
                if job.scope is not scope or scope.cancel_called:
                    return
                self._record_result(job, head, Output(_result_of(outcome), logs), ctx)
                counted = False
                self._finished_one()
                wake_events = ctx.wake_events
                if wake_events:
                    # Wait (still inside this evaluation's scope, so a newer
                    # evaluation or the target's closing cancels the wait).
                    await _wait_any(wake_events)
                    self._woken.add(job)
                    self._recalc_needed.set()
        finally:
            if counted:
                self._finished_one()
            if job.scope is scope:
                job.scope = None
            done.set()

    def _finished_one(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()
        self._flush_needed.set()

    def _record_result(
        self, job: _Job, head: str, output: Output, ctx: Context
    ) -> None:
        old_source, old_output = job.source, job.output
        job.source, job.output = head, output
        # A tuple: it is only iterated, and is a third of a frozenset's size.
        reads = tuple(ctx.reads)
        if reads != job.reads:
            self._forget_reads(job)
            job.reads = reads
            for key in reads:
                self._readers.setdefault(key, []).append(job)
        # `==`, not `!=`: Output defines only __eq__, and the __ne__ it
        # inherits from msgspec compares identities.
        same = old_output is not None and old_output == output
        if old_source != head or not same:
            self._mark_history(job.target)
        # Read from an older snapshot: if any input has changed since,
        # evaluate again (no recalculation pass will, as the job's reads were
        # unknown or different when the change was handled).
        latest = self._handled
        if (
            latest is not None
            and latest is not ctx.snapshot
            and any(latest.value(key) != ctx.snapshot.value(key) for key in reads)
        ):
            self._woken.add(job)
            self._recalc_needed.set()
        if job.check_written:
            # A new job's first result: what counts is whether github-metadata
            # already says it (the history may be ahead or behind, or absent,
            # after a crash between recording history and writing statuses).
            job.check_written = False
            dirty = not self._written(job, head, output, ctx.snapshot)
        else:
            # The same result writes the same status; only a different one
            # needs comparing as written (descriptions are cut and trimmed).
            dirty = (
                old_output is None
                or old_source != head
                or (
                    old_output.result != output.result
                    and self._status_of(job, old_output) != self._status_of(job, output)
                )
            )
        if dirty:
            if job not in self._unflushed:
                log.debug("%s -> %s (marked for flush)", job, output.result.descr)
            self._unflushed[job] = None

    def _mark_history(self, target: _Target) -> None:
        self._unrecorded[target] = None

    def _is_current(self, target: _Target) -> bool:
        return self._targets.get(target.id) is target

    # Flush ---------------------------------------------------------------------

    def _status(self, job: _Job, output: Output, head: str) -> Status:
        target = job.target.id
        url = (
            f"{self.web_ui}/{urllib.parse.quote(target.repo.user, safe='')}"
            f"/{urllib.parse.quote(target.repo.name, safe='')}/commit/{head}?"
            + urllib.parse.urlencode({"test": job.name}, quote_via=urllib.parse.quote)
        )
        return Status(
            target.repo,
            head,
            datakit_context(job.name),
            output.result.github_state,
            output.result.descr,
            url,
        )

    def _written(
        self, job: _Job, head: str, output: Output, snapshot: Snapshot
    ) -> bool:
        """Say whether `snapshot` already has the status `output` gives."""
        want = self._status(job, output, head)
        have = snapshot.status(want.repo, head, want.context)
        return have is not None and (
            have.state,
            have.description or "",
            have.target_url,
        ) == (want.state, trim_description(want.description or ""), want.target_url)

    def _status_of(self, job: _Job, output: Output) -> tuple[object, ...]:
        """Return what would be written for `output`, for comparisons."""
        return tuple(status_files(self._status(job, output, "0" * 40)).values())

    async def _flush_loop(self) -> None:
        # After a store failure, flush again at once.
        self._flush_needed.set()
        while True:
            with trio.move_on_at(self._retry_at):
                await self._flush_needed.wait()
            self._retry_at = math.inf
            self._flush_needed = trio.Event()
            # Give evaluations still running a moment to finish, so that
            # their results share one commit.
            with trio.move_on_after(self.flush_delay):
                await self._idle.wait()
            await self.flush()

    async def flush(self) -> None:
        """Record history, then write every dirty job's status in one commit."""
        quiet = self._running == 0 and not self._recalc_needed.is_set()
        handled = None if self._handled is None else self._handled.commit
        await self._flush_history()
        await self._flush_statuses()
        self.flushes += 1
        self.settled_commit = handled if quiet else None
        self._flushed.set()
        self._flushed = trio.Event()

    async def _flush_history(self) -> None:
        self._history_failed = set()
        snapshot = self._handled
        if snapshot is None or snapshot.commit is None:
            return
        records = []
        pending = sorted(
            (t for t in self._unrecorded if self._is_current(t)),
            key=lambda t: t.seq,
        )
        self._unrecorded = dict.fromkeys(pending)
        for target in pending:
            outputs = {
                name: job.output for name, job in target.jobs.items() if job.output
            }
            if len(outputs) != len(target.jobs):
                continue  # record once every job has a result
            if any(job.source != target.head for job in target.jobs.values()):
                continue  # record once every job has tested the current head
            records.append(
                (target.id, target.history, target.head, snapshot.commit, outputs)
            )
        if not records:
            return
        written, failed = await self.store.run_sync(
            lambda repo: record_states_sync(repo, records)
        )
        # History comes first: the statuses of these wait for it too.
        self._history_failed = failed
        if failed:
            # Try those again after the retry delay, even if nothing else
            # asks for a flush by then.
            self._retry_at = trio.current_time() + self.retry_delay
        for target_id, _, _, _, outputs in records:
            still = self._targets.get(target_id)
            if still is None or target_id in failed:
                continue
            if target_id in written:
                still.history = written[target_id]
                self.history_commits += 1
            if all(
                still.jobs[n].output is o for n, o in outputs.items() if n in still.jobs
            ):
                self._unrecorded.pop(still, None)

    async def _flush_statuses(self) -> None:
        dirty: list[tuple[_Target, list[tuple[_Job, str, Output]]]] = []
        self._unflushed = {
            job: None for job in self._unflushed if self._is_current(job.target)
        }
        targets = {job.target: None for job in self._unflushed}
        for target in sorted(targets, key=lambda t: t.seq):
            if target.id in self._history_failed:
                continue
            jobs = [
                (job, job.source, job.output)
                for job in target.jobs.values()
                if job in self._unflushed
                and job.output is not None
                and job.source is not None
            ]
            if jobs:
                dirty.append((target, jobs))
        if not dirty:
            return
        landed: list[tuple[_Job, str, Output]] = []
        messages: list[str] = []

        def build(reader: TreeReader, tx: Transaction) -> str | None:
            landed.clear()
            messages.clear()
            for target, all_jobs in dirty:
                # A job whose result is for an older head waits for its
                # newer evaluation; the others are written.
                heads = {head for _, head, _ in all_jobs}
                live = {h for h in heads if _still_there(reader, target.id, h)}
                if heads - live:
                    # Expected while the bridge moves fast: the newer head's
                    # evaluation writes the statuses instead.
                    log.info(
                        "not writing statuses of %s for %s: it has moved or gone",
                        target.id,
                        ", ".join(sorted(heads - live)),
                    )
                jobs = [entry for entry in all_jobs if entry[1] in live]
                if not jobs:
                    continue
                if len(jobs) == 1:
                    job, head, output = jobs[0]
                    messages.append(f"Set {job} to {one_line(output.result.descr)}")
                else:
                    messages.append(f"Update {len(jobs)} jobs in {target.id}")
                for job, head, output in jobs:
                    write_status(tx, self._status(job, output, head))
                    landed.append((job, head, output))
            if not messages:
                return None
            for message in messages:
                log.info("flush: %s", message)
            if len(messages) == 1:
                return messages[0]
            return f"{len(messages)} updates\n\n" + "\n".join(messages)

        try:
            commit = await self.store.update_branch(METADATA_BRANCH, build)
        except StoreError as exc:
            log.warning(
                "failed to update statuses (will retry in %gs): %s\n%s",
                self.retry_delay,
                exc,
                "\n".join(messages),
            )
            await trio.sleep(self.retry_delay)
            self._flush_needed.set()
            return
        if commit is not None:
            self.status_commits += 1
        STATUS_UPDATES.inc(len(landed))
        for job, head, output in landed:
            if job.source == head and job.output is output:
                self._unflushed.pop(job, None)

    @property
    def handled_commit(self) -> str | None:
        """The github-metadata commit of the newest recalculation pass."""
        return None if self._handled is None else self._handled.commit

    async def wait_flushed(self) -> None:
        """Wait until the next flush has finished (for tests and tools)."""
        await self._flushed.wait()

    # Queries ------------------------------------------------------------------

    def targets(self) -> dict[Target, TargetView]:
        """Return every target being tested, with its jobs' latest states."""
        return {
            target_id: TargetView(
                target.value,
                {n: JobView(n, j.source, j.output) for n, j in target.jobs.items()},
            )
            for target_id, target in self._targets.items()
        }

    def prs(self) -> dict[Repo, dict[int, TargetView]]:
        """Return the open PRs of each project, with their jobs."""
        out: dict[Repo, dict[int, TargetView]] = {repo: {} for repo in self.projects}
        for target_id, view in self.targets().items():
            if isinstance(target_id, PRTarget):
                out[target_id.repo][target_id.number] = view
        return out

    def refs(self) -> dict[Repo, dict[tuple[str, ...], TargetView]]:
        """Return the branches and tags of each project, with their jobs."""
        out: dict[Repo, dict[tuple[str, ...], TargetView]] = {
            r: {} for r in self.projects
        }
        for target_id, view in self.targets().items():
            if isinstance(target_id, RefTarget):
                out[target_id.repo][target_id.name] = view
        return out

    def targets_of_commit(self, repo: Repo, commit: str) -> list[Target]:
        """Return the open targets of `repo` whose head is `commit`."""
        return list(self._targets_of_commit.get(repo, {}).get(commit, []))

    def latest_state(self, target: Target) -> HistoryState | None:
        """Return the latest recorded history of `target`, if it is tested."""
        found = self._targets.get(target)
        return None if found is None else found.history

    async def rebuild(self, branch_name: str) -> bool:
        """Rebuild every saved log on `branch_name`, then recalculate.

        Returns True once the rebuild started, or False if the step is
        still building (a rebuild asked for then is ignored). Raises
        `KitciError` if no job's output depends on that branch.
        """
        triggers = []
        jobs = []
        building = False
        for target in self._targets.values():
            for job in target.jobs.values():
                if job.output is None:
                    continue
                building = building or branch_name in live_branches(job.output.logs)
                for saved in iter_saved_logs(job.output.logs):
                    if saved.branch == branch_name and saved.rebuild is not None:
                        triggers.append(saved.rebuild)
                        jobs.append(job)
        if not triggers:
            if building:
                log.info(
                    "ignoring a rebuild of %s: it is building already", branch_name
                )
                return False
            raise KitciError(
                f"No job depends on {branch_name!r}, so can't rebuild anything"
            )
        for trigger in dict.fromkeys(triggers):
            await trigger()
        for job in jobs:
            self._woken.add(job)
        self._recalc_needed.set()
        return True


# Job names that would make kitci's status directory collide with the files
# of the status `ci/datakit` another system may have written.
_RESERVED_JOB_NAMES = frozenset({"state", "description", "target_url"})


def _target_order(target: Target) -> tuple[object, ...]:
    """Sort PRs by number, then refs by name, repository by repository."""
    if isinstance(target, PRTarget):
        return (target.repo, 0, target.number, ())
    return (target.repo, 1, 0, target.name)


def _still_there(reader: TreeReader, target: Target, head: str) -> bool:
    """Say whether `target` still exists at `head` in the branch being written."""
    if isinstance(target, PRTarget):
        base = f"{target.repo}/pr/{target.number}"
        state = reader.read(f"{base}/state")
        if state is None or state.strip() != b"open":
            return False
    else:
        base = f"{target.repo}/ref/{'/'.join(target.name)}"
    found = reader.read(f"{base}/head")
    return found is not None and found.strip() == head.encode()


async def _wait_any(events: Iterable[trio.Event]) -> None:
    """Return once any of `events` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)
