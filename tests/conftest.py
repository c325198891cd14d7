"""Shared fixtures: a real store, a fake bridge writing github-metadata, and
helpers to run an engine and wait for it."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pygit2
import pytest
import trio

from kitci import METADATA_BRANCH, Repo, Store, Transaction, TreeReader
from kitci._engine import Engine, MakeTerms
from kitci.builds import BuildCache, open_build_cache

ALICE = Repo("alice", "proj")


def sha(label: str) -> str:
    """Return a distinct 40-hex-digit commit hash for `label`."""
    return hashlib.sha1(label.encode()).hexdigest()


H1, H2, H3, H4, H5 = (sha(f"H{i}") for i in range(1, 6))


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    return await Store.open(tmp_path / "store", create=True, poll_interval=0.02)


@pytest.fixture
async def cache(store: Store) -> AsyncIterator[BuildCache]:
    """A build cache running on `store` for the test's duration."""
    async with open_build_cache(store) as running:
        yield running


Files = Mapping[str, str | bytes | None]


async def bridge(
    store: Store, files: Files, message: str = "bridge update"
) -> str | None:
    """Commit `files` to github-metadata as a bridge would.

    Text gets exactly one trailing newline; bytes are written as they are;
    None removes the file or directory.
    """

    def build(reader: TreeReader, tx: Transaction) -> str:
        for path, content in files.items():
            if content is None:
                tx.remove(path)
            elif isinstance(content, bytes):
                tx.write(path, content)
            else:
                tx.write(path, content.rstrip("\n") + "\n")
        return message

    return await store.update_branch(METADATA_BRANCH, build)


def pr(
    number: int,
    head: str,
    *,
    repo: Repo = ALICE,
    state: str = "open",
    title: str = "t",
    owner: str = "bob",
) -> dict[str, str | bytes | None]:
    base = f"{repo}/pr/{number}"
    return {
        f"{base}/head": head,
        f"{base}/state": state,
        f"{base}/title": title,
        f"{base}/owner": owner,
        f"{base}/base": "master",
    }


def ref(name: str, head: str, *, repo: Repo = ALICE) -> dict[str, str | bytes | None]:
    return {f"{repo}/ref/{name}/head": head}


def status_dir(head: str, job: str, repo: Repo = ALICE) -> str:
    return f"{repo}/commit/{head}/status/ci/datakit/{job}"


async def read(store: Store, branch: str, path: str) -> str | None:
    """Return the text of `path` at the head of `branch` (None if absent)."""
    head = await store.head(branch)
    data = await store.read(head, lambda r: r.read(path))
    return None if data is None else data.decode()


async def status(store: Store, head: str, job: str, repo: Repo = ALICE) -> str | None:
    """Return the state of kitci's status for `job` on `head`, stripped."""
    text = await read(store, METADATA_BRANCH, f"{status_dir(head, job, repo)}/state")
    return None if text is None else text.strip()


async def descr(store: Store, head: str, job: str, repo: Repo = ALICE) -> str | None:
    where = f"{status_dir(head, job, repo)}/description"
    text = await read(store, METADATA_BRANCH, where)
    return None if text is None else text.strip()


async def log(store: Store, branch: str) -> list[tuple[str, str]]:
    """Return (commit hash, message) of `branch`'s first-parent history,
    newest first."""

    def walk(repo: pygit2.Repository) -> list[tuple[str, str]]:
        try:
            ref = repo.lookup_reference(f"refs/heads/{branch}")
        except KeyError:
            return []
        out = []
        commit: pygit2.Commit | None = ref.peel(pygit2.Commit)
        while commit is not None:
            # Git ends a message with a newline; compare without it.
            message = commit.message
            out.append((str(commit.id), message.removesuffix("\n")))
            commit = commit.parents[0] if commit.parents else None
        return out

    return await store.run_sync(walk)


async def messages(store: Store, branch: str) -> list[str]:
    return [message for _, message in await log(store, branch)]


async def file_at(store: Store, commit: str, path: str) -> str | None:
    data = await store.read(commit, lambda r: r.read(path))
    return None if data is None else data.decode()


@asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[Engine]:
    """Run `engine` for the duration of the block, then cancel it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        try:
            yield engine
        finally:
            nursery.cancel_scope.cancel()


Condition = Callable[[], Awaitable[bool] | bool]


async def until(engine: Engine, condition: Condition, seconds: float = 10) -> None:
    """Wait, flush after flush, until `condition()` holds (at most `seconds`)."""
    with trio.fail_after(seconds):
        while True:
            seen = engine.flushes
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            while engine.flushes == seen:
                await engine.wait_flushed()


async def settled(engine: Engine, seconds: float = 10) -> None:
    """Wait until a flush has run with nothing left to do: it started after
    the newest github-metadata commit was handled, with no evaluation
    running or asked for, and the branch has not moved since."""

    async def quiet() -> bool:
        head = await engine.store.head(METADATA_BRANCH)
        return head is not None and engine.settled_commit == head

    await until(engine, quiet, seconds)


def make_engine(
    store: Store, projects: Mapping[Repo, MakeTerms], **options: Any
) -> Engine:
    """Return an engine with test-friendly delays (overridable)."""
    options.setdefault("flush_delay", 0.01)
    options.setdefault("retry_delay", 0.01)
    return Engine(store, projects, **options)


async def handled(engine: Engine, seconds: float = 10) -> None:
    """Wait until the engine's recalculation has taken in the newest
    github-metadata commit (for moments when no flush follows, such as
    while an evaluation blocks)."""
    with trio.fail_after(seconds):
        # The head is read on the store's thread, which no event reports.
        while engine.handled_commit != await engine.store.head(METADATA_BRANCH):  # noqa: ASYNC110
            await trio.sleep(0.005)
