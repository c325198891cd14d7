"""The Git plugin, on real repositories in temporary folders."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import REGISTRY

from kitci import PRTarget, Repo, Snapshot, Store
from kitci._results import LiveLogRef, SavedLog
from kitci._terms import Context, Evaluated, Failed, Ok, Pending
from kitci.builds import BuildCache, GitCommit, GitRepo, open_build_cache
from support import is_alive, settle, wait_dead

TARGET = PRTarget(Repo("alice", "proj"), 1)

SCRIPTS = {
    "pass.sh": "echo passing; cat data.txt\n",
    "fail.sh": "echo failing; exit 4\n",
    "slow.sh": "echo pid $$; sleep 30 & echo pid $!; echo ready; wait\n",
    "env.sh": 'echo "[$KITCI_TEST]"\n',
    "data.txt": "data of the first commit\n",
}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


class Origin:
    """A source repository: commit `main` on a branch, `pr` only on a PR ref."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        git(path, "init", "--quiet", "--initial-branch=master")
        for name, text in SCRIPTS.items():
            (path / name).write_text(text)
        git(path, "add", ".")
        git(path, "commit", "--quiet", "-m", "first")
        self.main = git(path, "rev-parse", "HEAD")
        (path / "data.txt").write_text("data of the PR\n")
        git(path, "commit", "--quiet", "-am", "pr")
        self.pr = git(path, "rev-parse", "HEAD")
        git(path, "update-ref", "refs/pull/1/head", self.pr)
        git(path, "reset", "--quiet", "--hard", self.main)


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path / "origin")


@pytest.fixture
async def repo(cache: BuildCache, origin: Origin, tmp_path: Path) -> GitRepo:
    return await GitRepo.open(
        cache, remote=str(origin.path), work_dir=tmp_path / "work", kill_grace=0.2
    )


def context() -> Context:
    return Context(Snapshot(None, {}), TARGET, "job")


def started(label: str) -> float:
    value = REGISTRY.get_sample_value(
        "DataKitCI_cache_builds_started_total", {"name": label}
    )
    return value or 0.0


async def saved_log(store: Store, logs: Any) -> str:
    assert isinstance(logs, SavedLog)
    data = await store.read(logs.commit, lambda reader: reader.read("log"))
    assert data is not None
    return data.decode()


async def test_fetch_head_fetches_branches_and_pull_requests(
    repo: GitRepo, origin: Origin, store: Store
) -> None:
    outcome, logs = await repo.fetch_head(origin.main).evaluate(context())
    assert isinstance(outcome, Pending)
    assert logs == LiveLogRef(f"git-fetch-origin-{origin.main}")
    outcome, logs = await settle(repo.fetch_head(origin.main))
    assert outcome == Ok(GitCommit(repo, origin.main))
    assert "Fetching the branches, tags and pull requests" in await saved_log(
        store, logs
    )

    # The PR's commit is on no branch, only on refs/pull/1/head.
    outcome, logs = await settle(repo.fetch_head(origin.pr))
    assert outcome == Ok(GitCommit(repo, origin.pr))
    assert "available locally, so not fetching" in await saved_log(store, logs)


async def test_a_commit_not_in_the_remote_fails(repo: GitRepo) -> None:
    missing = "0123456789abcdef0123456789abcdef01234567"
    outcome, logs = await settle(repo.fetch_head(missing))
    assert outcome == Failed(
        f"Commit {missing} is not in {repo.remote} (not in any of its branches, "
        "tags or pull requests)"
    )
    assert isinstance(logs, SavedLog)
    assert logs.failed
    outcome, _ = await repo.fetch_head("not-a-hash").evaluate(context())
    assert outcome == Failed("'not-a-hash' is not a full commit hash")


async def test_a_remote_that_cannot_be_fetched_fails(
    cache: BuildCache, origin: Origin, tmp_path: Path
) -> None:
    gone = await GitRepo.open(
        cache, remote=str(tmp_path / "no-such-repo"), work_dir=tmp_path / "w2"
    )
    outcome, logs = await settle(gone.fetch_head(origin.main))
    assert isinstance(outcome, Failed)
    assert outcome.message.startswith(f"Cannot fetch {tmp_path / 'no-such-repo'}: ")
    assert "fatal:" in outcome.message
    assert isinstance(logs, SavedLog)
    assert logs.failed


async def test_a_passing_command_runs_on_a_checkout_of_the_commit(
    repo: GitRepo, origin: Origin, store: Store
) -> None:
    commit = GitCommit(repo, origin.pr)
    term = repo.run_command(commit, "test", ["sh", "pass.sh"], timeout=30)
    outcome, logs = await settle(term)
    assert outcome == Ok(None)
    assert isinstance(logs, SavedLog)
    assert logs.branch == f"cmd-test-origin-{origin.pr}"
    assert logs.title == f"Run test on origin {origin.pr}"
    text = await saved_log(store, logs)
    assert "passing\ndata of the PR\n" in text
    # The temporary checkout is gone.
    assert list((repo.work_dir / "checkouts").iterdir()) == []


async def test_a_failing_command_fails_with_its_exit_status(
    repo: GitRepo, origin: Origin, store: Store
) -> None:
    term = repo.run_command(origin.main, "test", ["sh", "fail.sh"], timeout=30)
    outcome, logs = await settle(term)
    assert outcome == Failed("Command sh fail.sh exited with status 4")
    assert isinstance(logs, SavedLog)
    assert logs.failed
    assert "failing\n" in await saved_log(store, logs)


async def test_a_missing_command_fails(repo: GitRepo, origin: Origin) -> None:
    term = repo.run_command(origin.main, "missing", ["no-such-tool-kitci"], timeout=30)
    outcome, _ = await settle(term)
    assert isinstance(outcome, Failed)
    assert outcome.message.startswith("Cannot run no-such-tool-kitci: ")


async def test_a_command_that_runs_too_long_is_killed(
    repo: GitRepo, origin: Origin, store: Store
) -> None:
    term = repo.run_command(origin.main, "slow", ["sh", "slow.sh"], timeout=0.5)
    outcome, logs = await settle(term)
    assert outcome == Failed("Command sh slow.sh timed out after 0.5 s")
    text = await saved_log(store, logs)
    pids = [int(line[4:]) for line in text.splitlines() if line.startswith("pid ")]
    assert len(pids) == 2
    for pid in pids:
        await wait_dead(pid)


async def test_a_command_cancelled_mid_run_leaves_no_process(
    repo: GitRepo, origin: Origin, cache: BuildCache, store: Store
) -> None:
    term = repo.run_command(origin.main, "slow", ["sh", "slow.sh"], timeout=60)
    _, logs = await term.evaluate(context())
    assert isinstance(logs, LiveLogRef)
    live = cache.live_logs.get(logs.branch)
    assert live is not None

    # Wait (following the log) until the script runs, then cancel it.
    with trio.fail_after(10):
        async for _ in live.follow():
            if "\nready\n" in live.contents():
                break
    pids = [
        int(line[4:])
        for line in live.contents().splitlines()
        if line.startswith("pid ")
    ]
    cache.live_logs.cancel(logs.branch)
    outcome, logs = await settle(term)
    assert outcome == Failed("Build cancelled (cancelled by request)")
    assert isinstance(logs, SavedLog)
    assert logs.failed
    assert len(pids) == 2
    assert not is_alive(pids[0])
    await wait_dead(pids[1])
    assert list((repo.work_dir / "checkouts").iterdir()) == []


async def test_two_jobs_share_one_run(repo: GitRepo, origin: Origin) -> None:
    before = started("shell:shared")
    term = repo.run_command(origin.main, "shared", ["sh", "pass.sh"], timeout=30)
    results: list[Evaluated[Any]] = []

    async def job() -> None:
        results.append(await settle(term))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(job)
        nursery.start_soon(job)
    assert [outcome for outcome, _ in results] == [Ok(None), Ok(None)]
    assert results[0][1] == results[1][1]
    assert started("shell:shared") == before + 1


async def test_a_restart_loads_the_result_and_rebuild_runs_again(
    store: Store, origin: Origin, tmp_path: Path
) -> None:
    before = started("shell:again")
    async with open_build_cache(store) as first:
        repo = await GitRepo.open(
            first, remote=str(origin.path), work_dir=tmp_path / "w"
        )
        argv = ["sh", "pass.sh"]
        outcome, logs = await settle(
            repo.run_command(origin.main, "again", argv, timeout=30)
        )
    assert outcome == Ok(None)

    async with open_build_cache(store) as second:
        repo = await GitRepo.open(
            second, remote=str(origin.path), work_dir=tmp_path / "w"
        )
        term = repo.run_command(origin.main, "again", argv, timeout=30)
        outcome, reloaded = await term.evaluate(context())
        assert outcome == Ok(None)
        assert reloaded == logs
        assert started("shell:again") == before + 1

        # Rebuild: it runs once more.
        assert isinstance(reloaded, SavedLog)
        assert reloaded.rebuild is not None
        await reloaded.rebuild()
        outcome, rebuilt = await settle(term)
        assert outcome == Ok(None)
        assert isinstance(rebuilt, SavedLog)
        assert rebuilt.commit != reloaded.commit
        assert started("shell:again") == before + 2


async def test_a_fresh_clone_has_its_own_objects_and_env_is_passed(
    repo: GitRepo, origin: Origin, store: Store
) -> None:
    script = (
        "git rev-parse HEAD; test -e .git/objects/info/alternates || echo own objects;"
        " sh env.sh"
    )
    term = repo.run_command(
        origin.pr,
        "fresh",
        ["sh", "-c", script],
        timeout=30,
        extra_env={"KITCI_TEST": "from extra_env"},
        fresh_clone=True,
    )
    outcome, logs = await settle(term)
    assert outcome == Ok(None), outcome
    text = await saved_log(store, logs)
    assert f"\n{origin.pr}\nown objects\n[from extra_env]\n" in text
