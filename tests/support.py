"""Helpers shared by the tests: real Git repositories driven by real `git`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import trio

from kitci import PRTarget, Repo, Snapshot, Target
from kitci._terms import Context, Evaluated, Pending, Term

# The target that evaluations outside an engine are made for.
TARGET = PRTarget(Repo("alice", "proj"), 1)

# Run `git` without the user's or the system's configuration, with a fixed
# identity, so tests behave the same on every machine.
GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Test Writer",
    "GIT_AUTHOR_EMAIL": "writer@example.invalid",
    "GIT_COMMITTER_NAME": "Test Writer",
    "GIT_COMMITTER_EMAIL": "writer@example.invalid",
}


async def git_bytes(
    repo: Path,
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> bytes:
    """Run `git -C repo ARGS` and return its raw output; fail if git fails."""
    result = await trio.run_process(
        ["git", "-C", str(repo), *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        env={**GIT_ENV, **(env or {})},
    )
    out: bytes = result.stdout
    return out


async def git(
    repo: Path,
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run `git -C repo ARGS` and return its output without surrounding space."""
    out = await git_bytes(repo, *args, stdin=stdin, env=env)
    return out.decode("utf-8").strip()


async def branch_head(repo: Path, branch: str) -> str | None:
    """Return the commit at `branch` as git sees it, or None."""
    result = await trio.run_process(
        [
            "git",
            "-C",
            str(repo),
            "rev-parse",
            "--verify",
            "--quiet",
            f"refs/heads/{branch}",
        ],
        capture_stdout=True,
        check=False,
        env=GIT_ENV,
    )
    out: bytes = result.stdout
    return out.decode().strip() or None


async def git_commit_files(
    repo: Path,
    branch: str,
    files: dict[str, bytes],
    message: str = "written by git",
    *,
    gitlinks: dict[str, str] | None = None,
) -> str:
    """Commit `files` on top of `branch` (or as its first commit) with plain git.

    Works on bare repositories, through a temporary index: a writer entirely
    outside kitci, like a bridge in another process. `gitlinks` adds
    submodule entries (path -> commit hash of another repository). The branch moves by
    compare-and-swap from the head read here.
    """
    env = {"GIT_INDEX_FILE": str(repo / "kitci-test-index")}
    parent = await branch_head(repo, branch)
    if parent:
        await git(repo, "read-tree", parent, env=env)
    else:
        await git(repo, "read-tree", "--empty", env=env)
    for path, data in files.items():
        blob = await git(repo, "hash-object", "-w", "--stdin", stdin=data)
        await git(
            repo,
            "update-index",
            "--add",
            "--cacheinfo",
            f"100644,{blob},{path}",
            env=env,
        )
    for path, commit in (gitlinks or {}).items():
        # A submodule entry: it names a commit of another repository.
        await git(
            repo,
            "update-index",
            "--add",
            "--cacheinfo",
            f"160000,{commit},{path}",
            env=env,
        )
    tree = await git(repo, "write-tree", env=env)
    parents = ["-p", parent] if parent else []
    commit = await git(repo, "commit-tree", tree, *parents, "-m", message)
    await git(repo, "update-ref", f"refs/heads/{branch}", commit, parent or "0" * 40)
    os.unlink(env["GIT_INDEX_FILE"])
    return commit


def is_alive(pid: int) -> bool:
    """Say whether process `pid` still runs (an unreaped zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_dead(pid: int) -> None:
    """Wait until `pid` has exited: a killed process takes a moment to go."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    assert not is_alive(pid)


async def settle(
    term: Term[Any], target: Target = TARGET, seconds: float = 20
) -> Evaluated[Any]:
    """Evaluate `term` for `target`, again each time it asks to, until it is
    not pending; return that outcome and its logs."""
    with trio.fail_after(seconds):
        while True:
            ctx = Context(Snapshot(None, {}), target, "job")
            outcome, logs = await term.evaluate(ctx)
            if not isinstance(outcome, Pending):
                return outcome, logs
            assert ctx.wake_events, "a pending term must give an event"
            await ctx.wake_events[0].wait()


async def run_kitci(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run `python -m kitci ARGS` in `cwd`; return status, stdout, stderr.

    A command that should stop by itself but runs on (a service that
    started when it should have refused) fails the test instead of hanging.
    """
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "kitci", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
            env=GIT_ENV,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()
