"""Tests of the engine (kitci._engine) on real stores.

The test plays the bridge: it commits to `github-metadata` as another writer
would (through the same `Store` object, or a second one on the same path),
and reads what the engine wrote back with pygit2 and `git show`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pygit2
import pytest
import trio
from prometheus_client import REGISTRY

from conftest import (
    ALICE,
    H1,
    H2,
    H3,
    Files,
    bridge,
    descr,
    file_at,
    handled,
    log,
    make_engine,
    messages,
    pr,
    read,
    ref,
    running,
    settled,
    sha,
    status,
    status_dir,
    until,
)
from kitci import (
    METADATA_BRANCH,
    PR,
    KitciError,
    LiveLogRef,
    Output,
    PRTarget,
    Ref,
    RefTarget,
    Repo,
    Result,
    SavedLog,
    Store,
    StoreError,
    Target,
    github,
    status_branch_name,
)
from kitci._engine import Engine, MakeTerms
from kitci._history import EMPTY_STATE, INDEX_BRANCH, record_states_sync
from kitci._terms import (
    Context,
    Evaluated,
    Failed,
    Ok,
    Pending,
    SlowAnswer,
    Term,
    of_slow,
    pair,
)

BOB = Repo("bob", "fork")
PR1 = PRTarget(ALICE, 1)
PR2 = PRTarget(ALICE, 2)
MASTER = RefTarget(ALICE, ("heads", "master"))
MONITOR = {"alice/proj/.monitor": ""}


# Jobs -------------------------------------------------------------------------


def head_of(ctx: Context) -> str:
    """Read the head of the job's own target (recording the read)."""
    target = ctx.target
    value: PR | Ref | None
    if isinstance(target, PRTarget):
        value = ctx.read_pr(target.repo, target.number)
    else:
        value = ctx.read_ref(target.repo, target.name)
    assert value is not None
    return value.head


def sync_job(fn: Callable[[Context], str]) -> Term[str]:
    """A job that evaluates at once and succeeds with `fn(ctx)`."""

    def run(ctx: Context) -> Evaluated[str]:
        return Ok(fn(ctx)), None

    return Term(sync=run)


def head_job(counter: Counter[Target] | None = None) -> Term[str]:
    """A job succeeding with `tested HEAD`, counting its evaluations."""

    def describe(ctx: Context) -> str:
        if counter is not None:
            counter[ctx.target] += 1
        return f"tested {head_of(ctx)}"

    return sync_job(describe)


def same_jobs(**jobs: Term[str]) -> MakeTerms:
    return lambda target: dict(jobs)


async def count_commits(store: Store, branch: str) -> int:
    return len(await log(store, branch))


# Start-up -----------------------------------------------------------------------


async def test_monitor_files_written_once(store: Store) -> None:
    projects = {ALICE: same_jobs(), BOB: same_jobs()}
    engine = make_engine(store, projects)
    async with running(engine):
        await settled(engine)
    assert await messages(store, METADATA_BRANCH) == ["Add .monitor files"]
    assert await read(store, METADATA_BRANCH, "alice/proj/.monitor") is not None
    assert await read(store, METADATA_BRANCH, "bob/fork/.monitor") is not None
    # A restart changes nothing, so commits nothing.
    engine = make_engine(store, projects)
    async with running(engine):
        await settled(engine)
    assert await messages(store, METADATA_BRANCH) == ["Add .monitor files"]


async def test_monitor_files_only_missing_ones(store: Store) -> None:
    await bridge(store, MONITOR)
    engine = make_engine(store, {ALICE: same_jobs(), BOB: same_jobs()})
    async with running(engine):
        await settled(engine)
    history = await log(store, METADATA_BRANCH)
    assert [m for _, m in history] == ["Add .monitor files", "bridge update"]

    def changed_paths(repo: pygit2.Repository) -> list[str]:
        new = repo[history[0][0]].peel(pygit2.Commit)
        diff = new.parents[0].tree.diff_to_tree(new.tree)
        return [d.delta.new_file.path for d in diff if d is not None]

    assert await store.run_sync(changed_paths) == ["bob/fork/.monitor"]


# The original's scenarios --------------------------------------------------------


async def test_waits_for_other_ci_then_reruns_on_its_rebuild(store: Store) -> None:
    def make(target: Target) -> dict[str, Term[str]]:
        url = github.ci_success_target_url("ci/other", target)
        return {"test": url.map(lambda u: f"Tested after {u}")}

    other = f"alice/proj/commit/{H1}/status/ci/other"
    engine = make_engine(store, {ALICE: make})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1)})

        async def shows(state: str, description: str) -> bool:
            return (
                await status(store, H1, "test"),
                await descr(store, H1, "test"),
            ) == (
                state,
                description,
            )

        await until(
            engine, lambda: shows("pending", "Waiting for ci/other status to appear")
        )
        url = await read(store, METADATA_BRANCH, f"{status_dir(H1, 'test')}/target_url")
        assert url == f"http://127.0.0.1:8080/alice/proj/commit/{H1}?test=test\n"

        await bridge(store, {f"{other}/state": "pending", f"{other}/description": "b"})
        await until(
            engine, lambda: shows("pending", "Waiting for ci/other to complete (b)")
        )

        await bridge(
            store,
            {
                f"{other}/state": "success",
                f"{other}/target_url": "http://127.0.0.1/o/1",
            },
        )
        await until(
            engine, lambda: shows("success", "Tested after http://127.0.0.1/o/1")
        )

        # The other CI builds the same commit again, with a new URL.
        await bridge(store, {f"{other}/state": "pending"})
        await bridge(
            store,
            {
                f"{other}/state": "success",
                f"{other}/target_url": "http://127.0.0.1/o/2",
            },
        )
        await until(
            engine, lambda: shows("success", "Tested after http://127.0.0.1/o/2")
        )
        await settled(engine)
    # Our own status never moved to another commit or context.
    url = await read(store, METADATA_BRANCH, f"{status_dir(H1, 'test')}/target_url")
    assert url == f"http://127.0.0.1:8080/alice/proj/commit/{H1}?test=test\n"


async def test_branch_head_moves_twice(store: Store) -> None:
    engine = make_engine(store, {ALICE: same_jobs(test=head_job())})
    async with running(engine):
        for head in (H1, H2, H3):
            await bridge(store, {**MONITOR, **ref("heads/master", head)})
            await until(engine, partial(_is, store, head, "success", f"tested {head}"))
        await settled(engine)
    for head in (H1, H2, H3):
        assert await descr(store, head, "test") == f"tested {head}"
    branch = status_branch_name(MASTER)
    assert branch == "status-alice-proj-ref-heads-master"
    sources = [
        (await file_at(store, commit, "source-commit") or "").strip()
        for commit, _ in await log(store, branch)
    ]
    assert sources == [H3, H2, H1]
    state = engine.latest_state(MASTER)
    assert state is not None
    assert state.source_commit == H3


async def _is(store: Store, head: str, state: str, description: str) -> bool:
    return (await status(store, head, "test"), await descr(store, head, "test")) == (
        state,
        description,
    )


class FakeBuild:
    """A build step seen through a slow term: building, then a result."""

    def __init__(self) -> None:
        self.ready = trio.Event()
        self.outcome: Ok[str] | Pending | Failed = Pending("Building")
        self.logs: LiveLogRef | SavedLog = LiveLogRef("log-build")
        self.checks = 0

    async def check(self) -> SlowAnswer[str]:
        self.checks += 1
        if isinstance(self.outcome, Pending):
            return SlowAnswer(self.outcome, self.logs, self.ready)
        return SlowAnswer(self.outcome, self.logs)

    def finish(self, outcome: Ok[str] | Failed) -> None:
        self.outcome = outcome
        self.logs = SavedLog(
            "Build", "log-build", sha("log"), isinstance(outcome, Failed)
        )
        self.ready.set()
        self.ready = trio.Event()


async def test_cancelled_build_ends_in_failure(store: Store) -> None:
    build = FakeBuild()
    engine = make_engine(store, {ALICE: same_jobs(test=of_slow(build.check))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1)})
        await until(engine, lambda: _is(store, H1, "pending", "Building"))
        build.finish(Failed("Cancelled"))
        await until(engine, lambda: _is(store, H1, "failure", "Cancelled"))
        await settled(engine)
    state = engine.latest_state(PR1)
    assert state is not None
    assert state.jobs["test"].result == Result.failure("Cancelled")
    assert await messages(store, status_branch_name(PR1)) == [
        "test -> Cancelled",
        "test -> Building",
    ]


def logged(value: str) -> Term[str]:
    saved = SavedLog(f"Step {value}", f"log-{value}", sha(value), False)
    return Term(sync=lambda ctx: (Ok(value), saved))


async def test_parallel_logs_kept_in_output(store: Store) -> None:
    both = pair(logged("a"), logged("b")).map(lambda ab: f"{ab[0]} and {ab[1]}")
    engine = make_engine(store, {ALICE: same_jobs(test=both)})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1)})
        await until(engine, lambda: _is(store, H1, "success", "a and b"))
        await settled(engine)
    shown = await trio.run_process(
        [
            "git",
            "--git-dir",
            str(store.path),
            "show",
            "status-alice-proj-pr-1:job/test/output",
        ],
        capture_stdout=True,
    )
    assert shown.stdout.decode().strip() == (
        '{"result":{"status":"success","descr":"a and b"},"logs":['
        f'{{"title":"Step a","branch":"log-a","commit":"{sha("a")}","failed":false}},'
        f'{{"title":"Step b","branch":"log-b","commit":"{sha("b")}","failed":false}}]}}'
    )


# Commit messages ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jobs", "prs", "expected"),
    [
        (["test"], [1], "Set alice/proj/pr/1:test to ok"),
        (["a", "b"], [1], "Update 2 jobs in alice/proj/pr/1"),
        (
            ["test"],
            [1, 2],
            "2 updates\n\n"
            "Set alice/proj/pr/1:test to ok\nSet alice/proj/pr/2:test to ok",
        ),
        (
            ["a", "b"],
            [1, 2],
            "2 updates\n\nUpdate 2 jobs in alice/proj/pr/1\n"
            "Update 2 jobs in alice/proj/pr/2",
        ),
    ],
)
async def test_status_commit_messages(
    store: Store, jobs: list[str], prs: list[int], expected: str
) -> None:
    ok = sync_job(lambda ctx: "ok")
    engine = make_engine(store, {ALICE: same_jobs(**dict.fromkeys(jobs, ok))})
    files: dict[str, str | bytes | None] = dict(MONITOR)
    for number in prs:
        files.update(pr(number, sha(f"pr{number}")))
    async with running(engine):
        await bridge(store, files)
        await settled(engine)
    assert await messages(store, METADATA_BRANCH) == [
        expected,
        "bridge update",
        "Add .monitor files",
    ]
    for number in prs:
        for job in jobs:
            assert await status(store, sha(f"pr{number}"), job) == "success"


def titled(ctx: Context) -> str:
    target = ctx.target
    assert isinstance(target, PRTarget)
    value = ctx.read_pr(target.repo, target.number)
    assert value is not None
    return value.title


async def test_history_messages_and_commit_index(store: Store) -> None:
    jobs = {"a": sync_job(titled), "b": sync_job(lambda ctx: "fixed")}
    engine = make_engine(store, {ALICE: same_jobs(**jobs)})
    branch = status_branch_name(PR1)
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1, title="one")})
        await until(engine, lambda: _has(store, H1, "a", "one"))
        await settled(engine)
        await bridge(store, pr(1, H2, title="one"))
        await until(engine, lambda: _has(store, H2, "a", "one"))
        await settled(engine)
        await bridge(store, pr(1, H2, title="two"))
        await until(engine, lambda: _has(store, H2, "a", "two"))
        await settled(engine)
    # A restart where the project no longer has job b.
    engine = make_engine(store, {ALICE: same_jobs(a=sync_job(titled))})
    async with running(engine):
        await settled(engine)
    history = await log(store, branch)
    assert [m for _, m in history] == [
        "Remove old job b",
        "a -> two",
        "Update",
        "2 updates (a -> one, ...)\n\na -> one\nb -> fixed",
    ]
    sources = [
        (await file_at(store, c, "source-commit") or "").strip() for c, _ in history
    ]
    assert sources == [H2, H2, H2, H1]
    # commit-index lists the newest state of each source commit.
    index = await store.head(INDEX_BRANCH)
    assert index is not None
    entry = await file_at(store, index, f"alice/proj/commit/{H1}/pr-1")
    assert (entry or "").strip() == history[3][0]
    entry = await file_at(store, index, f"alice/proj/commit/{H2}/pr-1")
    assert (entry or "").strip() == history[0][0]
    # Nothing was removed from github-metadata for job b.
    assert await status(store, H2, "b") == "success"


async def _has(store: Store, head: str, job: str, description: str) -> bool:
    return await descr(store, head, job) == description


# Incremental recalculation -----------------------------------------------------------


async def test_only_jobs_whose_inputs_changed_are_evaluated(store: Store) -> None:
    counter: Counter[Target] = Counter()
    engine = make_engine(store, {ALICE: same_jobs(test=head_job(counter))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1), **pr(2, H2)})
        await settled(engine)
        assert counter == {PR1: 1, PR2: 1}
        # PR 2 moves: only its job runs again.
        await bridge(store, pr(2, H3))
        await until(engine, lambda: _is(store, H3, "success", f"tested {H3}"))
        await settled(engine)
        assert counter == {PR1: 1, PR2: 2}
        # Another CI's status on PR 1's head: nobody reads it.
        other = f"alice/proj/commit/{H1}/status/ci/other/state"
        await bridge(store, {other: "success"})
        await settled(engine)
        assert counter == {PR1: 1, PR2: 2}
        # An unrelated repository and PR 1's own writes change nothing either.
        await bridge(store, {"carol/x/pr/1/head": H1})
        await settled(engine)
        assert counter == {PR1: 1, PR2: 2}
        evaluations = engine.evaluations
    assert evaluations == 3


async def test_status_readers_are_evaluated_when_the_status_changes(
    store: Store,
) -> None:
    counter: Counter[str] = Counter()

    def make(target: Target) -> dict[str, Term[str]]:
        def run(ctx: Context) -> Evaluated[str]:
            counter[str(ctx.target)] += 1
            found = ctx.read_status(ALICE, head_of(ctx), ("ci", "other"))
            return Ok("seen " + ("nothing" if found is None else found.state)), None

        return {"test": Term(sync=run)}

    engine = make_engine(store, {ALICE: make})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1), **pr(2, H2)})
        await settled(engine)
        await bridge(
            store, {f"alice/proj/commit/{H2}/status/ci/other/state": "failure"}
        )
        await until(engine, lambda: _is(store, H2, "success", "seen failure"))
        await settled(engine)
    assert counter == {"alice/proj/pr/1": 1, "alice/proj/pr/2": 2}
    assert await descr(store, H1, "test") == "seen nothing"


async def test_full_mode_evaluates_everything(store: Store) -> None:
    counter: Counter[Target] = Counter()
    engine = make_engine(
        store, {ALICE: same_jobs(test=head_job(counter))}, incremental=False
    )
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1), **pr(2, H2)})
        await settled(engine)
        before = counter[PR1]
        assert before >= 1
        await bridge(store, pr(2, H3))
        await until(engine, lambda: _is(store, H3, "success", f"tested {H3}"))
        await settled(engine)
        assert counter[PR1] > before
    # Results are the same as in incremental mode.
    assert await descr(store, H1, "test") == f"tested {H1}"


async def test_result_read_from_an_old_snapshot_is_redone(store: Store) -> None:
    """A status that changes while the job reads it is not missed."""
    gate = trio.Event()
    started = trio.Event()
    seen: list[str] = []

    async def run(ctx: Context) -> Evaluated[str]:
        found = ctx.read_status(ALICE, H1, ("ci", "other"))
        state = "nothing" if found is None else str(found.state)
        seen.append(state)
        started.set()
        await gate.wait()
        return Ok(f"saw {state}"), None

    engine = make_engine(store, {ALICE: same_jobs(test=Term(run=run))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1)})
        with trio.fail_after(5):
            await started.wait()
        await bridge(
            store, {f"alice/proj/commit/{H1}/status/ci/other/state": "success"}
        )
        await handled(engine)
        gate.set()
        await until(engine, lambda: _is(store, H1, "success", "saw success"))
    assert seen == ["nothing", "success"]


# Concurrency --------------------------------------------------------------------


async def test_never_two_evaluations_of_a_job_at_once(store: Store) -> None:
    """A newer evaluation waits for the older one, even one that ignores
    cancellation, and the older one's late result is dropped."""
    release = trio.Event()
    started: dict[str, trio.Event] = {H1: trio.Event(), H2: trio.Event()}
    running_now = 0
    most = 0

    async def run(ctx: Context) -> Evaluated[str]:
        nonlocal running_now, most
        head = head_of(ctx)
        running_now += 1
        most = max(most, running_now)
        try:
            started[head].set()
            if head == H1:
                with trio.CancelScope(shield=True):
                    await release.wait()
                return Failed(f"late failure for {head}"), None
            return Ok(f"tested {head}"), None
        finally:
            running_now -= 1

    engine = make_engine(store, {ALICE: same_jobs(test=Term(run=run))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(3, H1)})
        with trio.fail_after(5):
            await started[H1].wait()
        await bridge(store, pr(3, H2))
        await handled(engine)
        assert not started[H2].is_set()
        release.set()
        await until(engine, lambda: _is(store, H2, "success", f"tested {H2}"))
        await settled(engine)
    assert most == 1
    assert await status(store, H1, "test") is None
    for _, message in await log(store, METADATA_BRANCH):
        assert "late failure" not in message


async def test_job_for_old_head_does_not_hold_back_others(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Statuses of jobs done for the new head are written while another job
    of the same target still has only a result for the old head; the
    history waits until every job has tested the new head."""
    other = await Store.open(store.path)  # the bridge's own connection
    slow_release = trio.Event()
    slow_started = trio.Event()

    async def slow(ctx: Context) -> Evaluated[str]:
        head = head_of(ctx)
        if head == H2:
            slow_started.set()
            await slow_release.wait()
        return Ok(f"slow {head}"), None

    fast = sync_job(lambda ctx: f"fast {head_of(ctx)}")
    engine = make_engine(store, {ALICE: same_jobs(a=Term(run=slow), b=fast)})

    # Hold the engine's first status commit until the head has moved.
    gate = trio.Event()
    holding = trio.Event()
    calls = 0
    real_update = store.update_branch

    async def held_update(branch: str, build: Callable[..., str | None]) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 2:
            holding.set()
            await gate.wait()
        return await real_update(branch, build)

    monkeypatch.setattr(store, "update_branch", held_update)
    async with running(engine):
        await bridge(other, {**MONITOR, **pr(1, H1)})
        with trio.fail_after(5):
            await holding.wait()
        await bridge(other, pr(1, H2))
        with trio.fail_after(5):
            await slow_started.wait()
        gate.set()
        await until(engine, lambda: _has(store, H2, "b", f"fast {H2}"))
        # Job a has not tested H2 yet: the history does not claim it did.
        state = engine.latest_state(PR1)
        assert state is not None
        assert state.source_commit == H1
        slow_release.set()
        await until(engine, lambda: _has(store, H2, "a", f"slow {H2}"))
        await settled(engine)
    history = await log(store, status_branch_name(PR1))
    sources = [
        (await file_at(store, c, "source-commit") or "").strip() for c, _ in history
    ]
    assert sources == [H2, H1]


# Restart --------------------------------------------------------------------------


async def test_restart_mid_run_converges_without_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = await Store.open(path, create=True)
    started = trio.Event()

    async def blocked(ctx: Context) -> Evaluated[str]:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    fast = sync_job(lambda ctx: "fast done")
    engine = make_engine(store, {ALICE: same_jobs(fast=fast, slow=Term(run=blocked))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1)})
        await until(engine, lambda: _has(store, H1, "fast", "fast done"))
        with trio.fail_after(5):
            await started.wait()
        # Stopped here, in the middle of the slow job.
    before = await count_commits(store, METADATA_BRANCH)
    assert await store.head(status_branch_name(PR1)) is None

    # A new process: a new store connection and a new engine.
    store = await Store.open(path)
    slow = sync_job(lambda ctx: "slow done")
    projects = {ALICE: same_jobs(fast=fast, slow=slow)}
    engine = make_engine(store, projects)
    async with running(engine):
        await until(engine, lambda: _has(store, H1, "slow", "slow done"))
        await settled(engine)
    assert engine.evaluations == 2
    new = await messages(store, METADATA_BRANCH)
    assert len(new) == before + 1
    assert new[0] == "Set alice/proj/pr/1:slow to slow done"
    heads = await store.heads()

    # Once more, with nothing changed: no commit anywhere.
    store = await Store.open(path)
    engine = make_engine(store, projects)
    async with running(engine):
        await settled(engine)
    assert await store.heads() == heads


async def test_restored_history_without_status_is_written(store: Store) -> None:
    """A crash between recording history and writing statuses loses nothing."""
    await bridge(store, {**MONITOR, **pr(1, H1)})
    entry = (PR1, EMPTY_STATE, H1, sha("m"), {"test": Output(Result.success("ok"))})
    await store.run_sync(lambda repo: record_states_sync(repo, [entry]))
    engine = make_engine(store, {ALICE: same_jobs(test=sync_job(lambda ctx: "ok"))})
    async with running(engine):
        await until(engine, lambda: _is(store, H1, "success", "ok"))
        await settled(engine)
    assert await count_commits(store, status_branch_name(PR1)) == 1


# Another writer --------------------------------------------------------------------


async def test_bridge_writing_200_commits_while_engine_flushes(store: Store) -> None:
    bridge_store = await Store.open(store.path)
    engine = make_engine(store, {ALICE: same_jobs(test=head_job())})
    final: dict[int, str] = {}

    async def converged() -> bool:
        for head in final.values():
            if await descr(store, head, "test") != f"tested {head}":
                return False
        return True

    async with running(engine):
        await bridge(
            bridge_store, {**MONITOR, **pr(1, H1), **pr(2, H1), **pr(3, H1)}, "setup"
        )
        for i in range(200):
            number = i % 3 + 1
            head = sha(f"bridge {i}")
            final[number] = head
            files = {f"alice/proj/pr/{number}/head": head}
            if i % 7 == 0:
                files[f"alice/proj/commit/{head}/status/ci/other/state"] = "pending"
            await _bridge_retrying(bridge_store, files, f"bridge {i}")
            if i % 50 == 49:
                # Now and then, let the engine catch up, so that its commits
                # are sure to land between the bridge's.
                await until(engine, converged, seconds=30)

        await until(engine, converged, seconds=30)
        await settled(engine, seconds=30)
    history = await messages(store, METADATA_BRANCH)
    assert sum(m.startswith("bridge ") for m in history) == 200
    # The engine's commits landed in between the bridge's, not only after.
    last_bridge = next(i for i, m in enumerate(history) if m.startswith("bridge "))
    during = history[last_bridge : history.index("setup")]
    assert any(not m.startswith("bridge ") for m in during)
    for number, head in final.items():
        assert await status(store, head, "test") == "success"
        state = engine.latest_state(PRTarget(ALICE, number))
        assert state is not None
        assert state.source_commit == head


async def _bridge_retrying(store: Store, files: Files, message: str) -> None:
    """Commit like a bridge: on losing the race too often, try again."""
    while True:
        try:
            await bridge(store, files, message)
            return
        except StoreError:
            await trio.sleep(0.001)


# Store failures --------------------------------------------------------------------


def failures() -> float:
    value = REGISTRY.get_sample_value("DataKitCI_engine_connection_failures_total")
    return value or 0.0


async def test_store_failures_are_retried(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kitci")
    real = store.run_sync
    failing = 0
    failed = trio.Event()

    async def flaky(fn: Callable[..., object]) -> object:
        nonlocal failing
        if failing:
            failing -= 1
            failed.set()
            raise StoreError("disk on fire")
        return await real(fn)

    monkeypatch.setattr(store, "run_sync", flaky)
    writer = await Store.open(store.path)  # the bridge's own connection
    engine = make_engine(store, {ALICE: same_jobs(test=head_job())}, retry_delay=0.05)
    before = failures()
    async with running(engine):
        await bridge(writer, {**MONITOR, **pr(1, H1)})
        await until(engine, lambda: _is(writer, H1, "success", f"tested {H1}"))
        failing = 5
        await bridge(writer, pr(1, H2))
        with trio.fail_after(5):
            await failed.wait()
        await until(engine, lambda: _is(writer, H2, "success", f"tested {H2}"))
        await settled(engine)
    assert failures() >= before + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("disk on fire" in m and "will retry" in m for m in warnings)
    state = engine.latest_state(PR1)
    assert state is not None
    assert state.source_commit == H2


@pytest.mark.parametrize(
    ("fails_in", "label"),
    [
        ("parse_sync", "monitor"),
        ("load_states_sync", "recalc"),
        ("record_states_sync", "flush"),
        ("_commit", "failed to update statuses"),
    ],
)
async def test_each_loop_recovers_from_store_failures(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fails_in: str,
    label: str,
) -> None:
    """Whichever step the store fails in, the work it was doing is redone."""
    caplog.set_level(logging.WARNING, logger="kitci")
    real = store.run_sync
    armed = False
    failing = 2

    async def flaky(fn: Callable[..., object]) -> object:
        nonlocal failing
        code = getattr(fn, "__code__", None)
        if armed and failing and code is not None and fails_in in code.co_names:
            failing -= 1
            raise StoreError(f"failure in {fails_in}")
        return await real(fn)

    monkeypatch.setattr(store, "run_sync", flaky)
    writer = await Store.open(store.path)  # the bridge's own connection
    engine = make_engine(store, {ALICE: same_jobs(test=head_job())})
    async with running(engine):
        await bridge(writer, MONITOR)
        await settled(engine)
        armed = True
        await bridge(writer, pr(1, H1))
        await until(engine, lambda: _is(writer, H1, "success", f"tested {H1}"), 5)
        await settled(engine)
    assert failing == 0
    state = engine.latest_state(PR1)
    assert state is not None
    assert state.source_commit == H1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        label in m and f"failure in {fails_in}" in m and "will retry" in m
        for m in warnings
    )


async def test_engine_stops_cleanly_while_waiting_to_retry(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(store, {ALICE: same_jobs(test=head_job())}, retry_delay=1000)
    real = store.run_sync
    broken = False
    failed = trio.Event()

    async def flaky(fn: Callable[..., object]) -> object:
        if broken:
            failed.set()
            raise StoreError("unreachable store")
        return await real(fn)

    monkeypatch.setattr(store, "run_sync", flaky)
    writer = await Store.open(store.path)  # the bridge's own connection
    with trio.fail_after(5):
        async with running(engine):
            await bridge(writer, {**MONITOR, **pr(1, H1)})
            await until(engine, lambda: _is(writer, H1, "success", f"tested {H1}"))
            broken = True
            await bridge(writer, pr(1, H2))
            await failed.wait()
        # Leaving the block cancelled the engine while it slept 1000 s.


async def test_store_failure_at_start_up_is_retried(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store.run_sync
    failing = 3

    async def flaky(fn: Callable[..., object]) -> object:
        nonlocal failing
        if failing:
            failing -= 1
            raise StoreError("not yet")
        return await real(fn)

    monkeypatch.setattr(store, "run_sync", flaky)
    engine = make_engine(store, {ALICE: same_jobs()})
    before = failures()
    async with running(engine):
        await settled(engine)
    assert failures() == before + 3
    assert await messages(store, METADATA_BRANCH) == ["Add .monitor files"]


# Rebuilds and queries -----------------------------------------------------------------


async def test_rebuild(store: Store) -> None:
    builds = 0

    async def trigger() -> None:
        nonlocal builds
        builds += 1

    def run(ctx: Context) -> Evaluated[str]:
        saved = SavedLog("Build", "log-x", sha(f"build {builds}"), False, trigger)
        return Ok(f"build {builds}"), saved

    engine = make_engine(store, {ALICE: same_jobs(test=Term(sync=run))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1)})
        await until(engine, lambda: _is(store, H1, "success", "build 0"))
        with pytest.raises(KitciError, match="No job depends on 'log-y'"):
            await engine.rebuild("log-y")
        await engine.rebuild("log-x")
        assert builds == 1
        await until(engine, lambda: _is(store, H1, "success", "build 1"))


async def test_rebuild_of_unrebuildable_log_is_an_error(store: Store) -> None:
    engine = make_engine(store, {ALICE: same_jobs(test=logged("a"))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1)})
        await settled(engine)
        with pytest.raises(KitciError, match="log-a"):
            await engine.rebuild("log-a")


async def test_queries_and_active_targets(store: Store) -> None:
    engine = make_engine(
        store, {ALICE: same_jobs(test=head_job()), BOB: same_jobs(test=head_job())}
    )
    files = {
        **MONITOR,
        **pr(1, H1),
        **pr(2, H2, state="closed"),
        **ref("heads/master", H1),
        **ref("heads/feature/x", H2),
        **ref("tags/v1", H3),
        **pr(7, H1, repo=BOB),
    }
    async with running(engine):
        await bridge(store, files)
        await settled(engine)
        assert set(engine.targets_of_commit(ALICE, H1)) == {PR1, MASTER}
        assert engine.targets_of_commit(BOB, H1) == [PRTarget(BOB, 7)]
        assert engine.targets_of_commit(ALICE, sha("nothing")) == []
        assert engine.targets_of_commit(Repo("carol", "x"), H1) == []
        prs = engine.prs()
        assert set(prs[ALICE]) == {1}
        assert set(prs[BOB]) == {7}
        view = prs[ALICE][1]
        assert view.target == PR1
        assert view.jobs["test"].source == H1
        output = view.jobs["test"].output
        assert output is not None
        assert output.result == Result.success(f"tested {H1}")
        refs = engine.refs()
        assert set(refs[ALICE]) == {
            ("heads", "master"),
            ("heads", "feature", "x"),
            ("tags", "v1"),
        }
        state = engine.latest_state(PR1)
        assert state is not None
        assert state.source_commit == H1
        assert state.commit == await store.head(status_branch_name(PR1))
        assert engine.latest_state(PR2) is None

        def gauge(kind: str) -> float | None:
            return REGISTRY.get_sample_value(
                "DataKitCI_engine_active_targets", {"type": kind}
            )

        assert (gauge("pr"), gauge("branch"), gauge("tag")) == (2.0, 2.0, 1.0)
        await bridge(store, {"alice/proj/ref/tags/v1": None, "alice/proj/pr/1": None})
        await settled(engine)
        assert (gauge("pr"), gauge("branch"), gauge("tag")) == (1.0, 2.0, 0.0)
        assert set(engine.prs()[ALICE]) == set()


async def test_canaries_limit_targets(store: Store) -> None:
    counter: Counter[Target] = Counter()
    engine = make_engine(
        store, {ALICE: same_jobs(test=head_job(counter))}, canaries=[PR2]
    )
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1), **pr(2, H2)})
        await settled(engine)
    assert counter == {PR2: 1}
    assert await status(store, H1, "test") is None
    assert await status(store, H2, "test") == "success"


# Faulty projects ---------------------------------------------------------------------


async def test_bad_job_names_and_failing_make_terms_are_skipped(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    ok = sync_job(lambda ctx: "ok")

    def make(target: Target) -> dict[str, Term[str]]:
        if target == PR2:
            raise RuntimeError("project bug")
        return {"a/b": ok, "state": ok, "..": ok, "good": ok}

    engine = make_engine(store, {ALICE: make})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1), **pr(2, H2)})
        await until(engine, lambda: _has(store, H1, "good", "ok"))
        await settled(engine)
    assert await messages(store, METADATA_BRANCH) == [
        "Set alice/proj/pr/1:good to ok",
        "bridge update",
        "Add .monitor files",
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("'a/b'" in m for m in errors)
    assert any("'state'" in m for m in errors)
    assert any("alice/proj/pr/2" in m and "make_terms" in m for m in errors)


async def test_job_raising_fails_with_its_message(store: Store) -> None:
    async def run(ctx: Context) -> Evaluated[str]:
        raise ValueError("kaboom")

    engine = make_engine(store, {ALICE: same_jobs(test=Term(run=run))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, H1)})
        await until(engine, lambda: _is(store, H1, "failure", "kaboom"))


async def test_bad_arguments() -> None:
    store = object()
    with pytest.raises(ValueError, match="web_ui"):
        Engine(store, {}, web_ui="ftp://x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_evaluations"):
        Engine(store, {}, max_evaluations=0)  # type: ignore[arg-type]


async def test_history_that_could_not_be_recorded_is_retried(store: Store) -> None:
    """A status branch held by another writer's lock is recorded once the
    lock goes, without any new snapshot to prompt it."""
    engine = make_engine(store, {ALICE: same_jobs(test=sync_job(lambda ctx: "ok"))})
    branch = status_branch_name(PR1)
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(1, sha("a"))})
        await until(engine, lambda: engine.latest_state(PR1) not in (None, EMPTY_STATE))
        first = await store.head(branch)

        # Another writer holds the branch's lock while the head moves: the
        # history cannot be recorded, and the statuses, which come after
        # the history, wait for it through several retries.
        lock = store.path / "refs" / "heads" / f"{branch}.lock"
        lock.write_text(f"{first}\n")
        await bridge(store, pr(1, sha("b")))
        await handled(engine)
        flushes = engine.flushes
        await until(engine, lambda: engine.flushes >= flushes + 3)
        assert await store.head(branch) == first
        assert await status(store, sha("b"), "test") is None

        # Once it is released, the retry records the new head, then the
        # statuses follow.
        lock.unlink()
        await until(engine, partial(status_is, store, sha("b"), "success"))

        async def recorded() -> bool:
            head = await store.head(branch)
            if head == first:
                return False
            return await file_at(store, head or "", "source-commit") == sha("b")

        with trio.fail_after(10):
            while not await recorded():
                await engine.wait_flushed()


async def status_is(store: Store, head: str, state: str) -> bool:
    return await status(store, head, "test") == state
