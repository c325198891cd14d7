"""Cached build steps: one build per key, saved on its branch, rebuilt on request."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pygit2
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from kitci import (
    BuildError,
    PRTarget,
    Repo,
    Snapshot,
    Store,
    StoreError,
    Transaction,
    TreeReader,
)
from kitci._results import LiveLogRef, SavedLog
from kitci._terms import Context, Evaluated, Failed, Ok, Pending, Term
from kitci.builds import BuildCache, BuildFailed, LiveLog, open_build_cache
from support import settle

TARGET = PRTarget(Repo("alice", "proj"), 1)
_names = itertools.count()


class FakeBuilder:
    """A builder whose builds wait for `gate` (when set) and can fail."""

    def __init__(self, *, fail: str | None = None, gated: bool = False) -> None:
        self.name = f"fake{next(_names)}"
        self.fail = fail
        self.gate: trio.Event | None = trio.Event() if gated else None
        self.calls = 0
        self._called = trio.Event()
        self.cancelled = 0

    def title(self, key: str) -> str:
        return f"Fake {key}"

    def branch(self, key: str) -> str:
        return f"{self.name}-{key}"

    async def build(self, log: LiveLog, key: str) -> str:
        self.calls += 1
        log.write(f"building {key}\n")
        self._called.set()
        self._called = trio.Event()
        try:
            if self.gate is not None:
                await self.gate.wait()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise BuildFailed(self.fail)
        return f"value of {key}"

    def save(self, value: str) -> Mapping[str, bytes]:
        return {"v": value.encode(), "sub/dir": b"x"}

    def load(self, files: Mapping[str, bytes], key: str) -> str:
        return files["v"].decode()

    async def wait_calls(self, count: int) -> None:
        """Wait until `count` builds have started (and wait on the gate)."""
        with trio.fail_after(5):
            while self.calls < count:
                await self._called.wait()

    def open_gate(self) -> None:
        assert self.gate is not None
        self.gate.set()
        self.gate = trio.Event()


async def start_build(
    cache: BuildCache, builder: FakeBuilder, key: str = "k"
) -> tuple[Term[str], str]:
    """Ask for `key` once and wait until its build runs; return the term
    and the result branch."""
    term = cache.term(builder, key)
    await term.evaluate(context())
    await builder.wait_calls(1)
    return term, builder.branch(key)


def metric(name: str, builder: FakeBuilder) -> float:
    value = REGISTRY.get_sample_value(f"DataKitCI_cache_{name}", {"name": builder.name})
    return value or 0.0


def context() -> Context:
    return Context(Snapshot(None, {}), TARGET, "job")


async def files_at(store: Store, branch: str) -> dict[str, bytes]:
    head = await store.head(branch)

    def read_all(reader: TreeReader) -> dict[str, bytes]:
        out = {}
        for path in ("log", "failure", "rebuild-requested", "value/v", "value/sub/dir"):
            data = reader.read(path)
            if data is not None:
                out[path] = data
        return out

    return await store.read(head, read_all)


async def message_at(store: Store, branch: str) -> str:
    def read_message(repo: pygit2.Repository) -> str:
        ref = repo.lookup_reference(f"refs/heads/{branch}")
        return ref.peel(pygit2.Commit).message

    return await store.run_sync(read_message)


async def test_two_jobs_share_one_build_then_it_is_saved(
    store: Store, cache: BuildCache
) -> None:
    builder = FakeBuilder(gated=True)
    term = cache.term(builder, "k")
    branch = builder.branch("k")

    # Two jobs ask at the same moment: both wait on the one build.
    results: list[Evaluated[Any]] = []
    contexts = [context(), context()]

    async def ask(ctx: Context) -> None:
        results.append(await term.evaluate(ctx))

    async with trio.open_nursery() as nursery:
        for ctx in contexts:
            nursery.start_soon(ask, ctx)
    assert results == [(Pending("Building Fake k"), LiveLogRef(branch))] * 2
    await builder.wait_calls(1)
    await trio.testing.wait_all_tasks_blocked()
    assert builder.calls == 1
    assert metric("builds_started_total", builder) == 1
    assert metric("builds_in_progress", builder) == 1
    live = cache.live_logs.get(branch)
    assert live is not None
    assert "building k" in live.contents()

    # The build ends: both jobs are woken and see the saved value.
    builder.open_gate()
    with trio.fail_after(5):
        for ctx in contexts:
            await ctx.wake_events[0].wait()
    outcome, logs = await term.evaluate(context())
    assert outcome == Ok("value of k")
    head = await store.head(branch)
    assert head is not None
    assert logs == SavedLog("Fake k", branch, head, False)
    assert isinstance(logs, SavedLog)
    assert logs.rebuild is not None
    assert builder.calls == 1
    assert cache.live_logs.get(branch) is None
    assert metric("builds_succeeded_total", builder) == 1
    assert metric("builds_in_progress", builder) == 0
    assert metric("build_time_count", builder) == 1

    saved = await files_at(store, branch)
    assert saved["value/v"] == b"value of k"
    assert saved["value/sub/dir"] == b"x"
    assert "failure" not in saved
    text = saved["log"].decode()
    assert text.startswith("=== Fake k\n")
    assert "building k\n" in text
    assert "Success" in text
    assert await message_at(store, branch) == "Cached successful result"


async def test_a_failure_is_saved_with_its_message(
    store: Store, cache: BuildCache
) -> None:
    builder = FakeBuilder(fail="tests failed: 3")
    outcome, logs = await settle(cache.term(builder, "k"))
    assert outcome == Failed("tests failed: 3")
    assert isinstance(logs, SavedLog)
    assert logs.failed
    branch = builder.branch("k")
    saved = await files_at(store, branch)
    assert saved["failure"] == b"tests failed: 3\n"
    assert "Failed: tests failed: 3" in saved["log"].decode()
    assert "value/v" not in saved
    assert await message_at(store, branch) == "Cached failure: tests failed: 3"
    assert metric("builds_failed_total", builder) == 1
    assert metric("build_exceptions_total", builder) == 0


async def test_an_exception_fails_the_build_and_is_counted(cache: BuildCache) -> None:
    class Crashing(FakeBuilder):
        async def build(self, log: LiveLog, key: str) -> str:
            raise ValueError("no such file: setup.py")

    builder = Crashing()
    outcome, logs = await settle(cache.term(builder, "k"))
    assert outcome == Failed("no such file: setup.py")
    assert isinstance(logs, SavedLog)
    assert logs.failed
    assert metric("build_exceptions_total", builder) == 1
    assert metric("builds_failed_total", builder) == 1


async def test_a_restart_loads_saved_results_without_building(store: Store) -> None:
    good, bad = FakeBuilder(), FakeBuilder(fail="broken")
    async with open_build_cache(store) as first:
        ok_before = await settle(first.term(good, "k"))
        failed_before = await settle(first.term(bad, "k"))

    # A new cache on the same store: same answers, no build.
    good.calls = bad.calls = 0
    async with open_build_cache(store) as second:
        ok_after = await second.term(good, "k").evaluate(context())
        failed_after = await second.term(bad, "k").evaluate(context())
    assert ok_after == ok_before
    assert ok_after[0] == Ok("value of k")
    assert failed_after == failed_before
    assert failed_after[0] == Failed("broken")
    assert good.calls == bad.calls == 0
    assert metric("builds_started_total", good) == 1


async def test_rebuild_builds_again_and_ignores_repeats_while_building(
    store: Store, cache: BuildCache
) -> None:
    builder = FakeBuilder(gated=True)
    term, branch = await start_build(cache, builder)
    builder.open_gate()
    outcome, logs = await settle(term)
    assert isinstance(logs, SavedLog)
    assert logs.rebuild is not None
    first_commit = logs.commit

    # Rebuild: the branch is marked, and a new build starts at once.
    await logs.rebuild()
    assert (await files_at(store, branch)).get("rebuild-requested") == b""
    assert await message_at(store, branch) == "Marked for rebuild"
    assert cache.is_building(branch)
    await builder.wait_calls(2)

    # Asking again while it builds changes nothing.
    await logs.rebuild()
    await cache.rebuild(branch)
    builder.open_gate()
    outcome, logs = await settle(term)
    assert outcome == Ok("value of k")
    assert isinstance(logs, SavedLog)
    assert logs.commit != first_commit
    assert builder.calls == 2
    assert "rebuild-requested" not in await files_at(store, branch)


async def test_a_branch_marked_for_rebuild_is_built_again_after_a_restart(
    store: Store,
) -> None:
    builder = FakeBuilder()
    branch = builder.branch("k")
    async with open_build_cache(store) as first:
        await settle(first.term(builder, "k"))

    def mark(reader: TreeReader, tx: Transaction) -> str:
        tx.write("rebuild-requested", b"")
        return "Marked for rebuild"

    await store.update_branch(branch, mark)
    async with open_build_cache(store) as second:
        outcome, _ = await settle(second.term(builder, "k"))
    assert outcome == Ok("value of k")
    assert builder.calls == 2


async def test_cancel_through_the_live_log_saves_a_failure_that_can_be_rebuilt(
    store: Store, cache: BuildCache
) -> None:
    builder = FakeBuilder(gated=True)
    term, branch = await start_build(cache, builder)

    # The user cancels: the build fails, saying so, and is saved.
    cache.live_logs.cancel(branch)
    outcome, logs = await settle(term)
    assert isinstance(outcome, Failed)
    assert "cancelled" in outcome.message
    assert isinstance(logs, SavedLog)
    assert logs.failed
    assert logs.rebuild is not None
    assert builder.cancelled == 1
    saved = await files_at(store, branch)
    assert b"cancelled" in saved["failure"]
    assert "Cancelling: cancelled by request" in saved["log"].decode()

    # A rebuild runs the step again, and it can succeed.
    await logs.rebuild()
    await builder.wait_calls(2)
    builder.open_gate()
    outcome, _ = await settle(term)
    assert outcome == Ok("value of k")


async def test_abandon_cancels_without_saving(store: Store, cache: BuildCache) -> None:
    builder = FakeBuilder(gated=True)
    term = cache.term(builder, "k")
    branch = builder.branch("k")
    ctx = context()
    await term.evaluate(ctx)
    await builder.wait_calls(1)

    cache.abandon(branch)
    cache.abandon(branch)  # again: nothing more happens
    with trio.fail_after(5):
        await ctx.wake_events[0].wait()
    assert builder.cancelled == 1
    assert await store.head(branch) is None
    assert cache.live_logs.get(branch) is None
    assert not cache.is_building(branch)
    assert metric("builds_in_progress", builder) == 0

    # A later lookup builds again.
    await term.evaluate(context())
    await builder.wait_calls(2)
    builder.open_gate()
    outcome, _ = await settle(term)
    assert outcome == Ok("value of k")
    assert builder.calls == 2
    cache.abandon(branch)  # finished: nothing to abandon


async def test_stopping_the_cache_cancels_builds_and_saves_nothing(
    store: Store,
) -> None:
    builder = FakeBuilder(gated=True)
    async with open_build_cache(store) as cache:
        await cache.term(builder, "k").evaluate(context())
        await builder.wait_calls(1)
    assert builder.cancelled == 1
    assert await store.head(builder.branch("k")) is None
    assert cache.live_logs.get(builder.branch("k")) is None
    # A stopped cache cannot build.
    outcome, _ = await cache.term(builder, "other").evaluate(context())
    assert isinstance(outcome, Failed)
    assert "not running" in outcome.message


async def test_a_failed_save_fails_keeps_the_log_and_the_cache_runs_on(
    store: Store, cache: BuildCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = FakeBuilder()
    branch = builder.branch("k")
    real_update = store.update_branch

    async def broken_update(*args: Any, **kwargs: Any) -> str | None:
        raise StoreError("store /x: No space left on device")

    monkeypatch.setattr(store, "update_branch", broken_update)
    outcome, logs = await settle(cache.term(builder, "k"))
    assert isinstance(outcome, Failed)
    assert "could not be saved" in outcome.message
    assert "No space left on device" in outcome.message
    assert logs == LiveLogRef(branch)
    kept = cache.live_logs.get(branch)
    assert kept is not None
    assert kept.finished
    assert "building k" in kept.contents()
    assert "Cannot save this log" in kept.contents()
    assert metric("build_exceptions_total", builder) == 1
    # The result stays in memory: no build loop.
    assert (await cache.term(builder, "k").evaluate(context()))[0] == outcome

    # Once the disk works again, other builds save, and a rebuild retries.
    monkeypatch.setattr(store, "update_branch", real_update)
    assert (await settle(cache.term(builder, "other")))[0] == Ok("value of other")
    await cache.rebuild(branch)
    outcome, logs = await settle(cache.term(builder, "k"))
    assert outcome == Ok("value of k")
    assert isinstance(logs, SavedLog)


async def test_a_saved_value_that_cannot_be_loaded_is_built_again(store: Store) -> None:
    class Picky(FakeBuilder):
        def load(self, files: Mapping[str, bytes], key: str) -> str:
            raise KeyError("v")

    builder = Picky()
    async with open_build_cache(store) as first:
        await settle(first.term(builder, "k"))
    async with open_build_cache(store) as second:
        outcome, _ = await settle(second.term(builder, "k"))
    assert outcome == Ok("value of k")
    assert builder.calls == 2


async def test_a_bad_branch_name_fails_the_term(cache: BuildCache) -> None:
    class BadName(FakeBuilder):
        def branch(self, key: str) -> str:
            return f"bad..name {key}"

    outcome, _ = await cache.term(BadName(), "k").evaluate(context())
    assert isinstance(outcome, Failed)
    assert "'bad..name k'" in outcome.message


async def test_the_service_refuses_to_run_twice(store: Store) -> None:
    cache = BuildCache(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        with pytest.raises(BuildError, match="already running"):
            await cache.run()
        nursery.cancel_scope.cancel()


async def test_rebuild_of_an_unknown_branch(store: Store, cache: BuildCache) -> None:
    with pytest.raises(BuildError, match="no result on branch 'nothing-here'"):
        await cache.rebuild("nothing-here")


async def test_a_new_pending_reason_wakes_the_jobs(cache: BuildCache) -> None:
    class Queued(FakeBuilder):
        async def build(self, log: LiveLog, key: str) -> str:
            with log.pending("Waiting for a build slot"):
                return await super().build(log, key)

    builder = Queued(gated=True)
    term = cache.term(builder, "k")
    ctx = context()
    assert (await term.evaluate(ctx))[0] == Pending("Building Fake k")

    # The build waits for a slot: the job is told, and sees the new reason.
    with trio.fail_after(5):
        await ctx.wake_events[0].wait()
    ctx = context()
    assert (await term.evaluate(ctx))[0] == Pending("Waiting for a build slot")
    await builder.wait_calls(1)
    builder.open_gate()
    outcome, _ = await settle(term)
    assert outcome == Ok("value of k")


async def test_builds_beyond_the_limit_wait_for_a_slot(store: Store) -> None:
    """With one build slot, a second key's build waits, saying so."""
    async with open_build_cache(store, max_builds=1) as cache:
        builder = FakeBuilder(gated=True)
        first, second = cache.term(builder, "a"), cache.term(builder, "b")

        outcome, _ = await first.evaluate(context())
        assert outcome == Pending("Building Fake a")
        await builder.wait_calls(1)

        # The second build is started but cannot run yet: once its task has
        # looked for a slot, the job is told why it waits.
        ctx = context()
        await second.evaluate(ctx)
        with trio.fail_after(5):
            await ctx.wake_events[0].wait()
        outcome, logs = await second.evaluate(context())
        assert outcome == Pending("Waiting for a build slot")
        assert logs == LiveLogRef(builder.branch("b"))
        assert builder.calls == 1

        # Once the first finishes, the second runs.
        builder.open_gate()
        await builder.wait_calls(2)
        builder.open_gate()
        outcome, logs = await settle(second)
        assert outcome == Ok("value of b")
        assert logs == SavedLog(
            "Fake b",
            builder.branch("b"),
            await store.head(builder.branch("b")) or "",
            False,
        )
