"""Tests of the Git store: opening, transactions, compare-and-swap, watching."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from kitci import (
    ConflictError,
    NotARepositoryError,
    Store,
    StoreError,
    Transaction,
    TreeReader,
)
from kitci._store import STALE_LOCK_SECONDS
from support import GIT_ENV, branch_head, git, git_bytes, git_commit_files

# Opening -------------------------------------------------------------------------


async def test_open_missing_path_says_how_to_create_it(tmp_path: Path) -> None:
    where = tmp_path / "no" / "store"
    with pytest.raises(NotARepositoryError) as info:
        await Store.open(where)
    assert str(where) in str(info.value)
    assert "git init --bare" in str(info.value)
    assert not where.exists()


async def test_open_file_is_refused(tmp_path: Path) -> None:
    where = tmp_path / "file"
    where.write_text("not a repository\n")
    with pytest.raises(NotARepositoryError, match="is a file") as info:
        await Store.open(where, create=True)
    assert str(where) in str(info.value)


async def test_open_directory_that_is_no_repository(tmp_path: Path) -> None:
    where = tmp_path / "plain"
    where.mkdir()
    (where / "notes.txt").write_text("hello\n")
    for create in (False, True):
        with pytest.raises(NotARepositoryError) as info:
            await Store.open(where, create=create)
        assert str(where) in str(info.value)
        assert "git init --bare" in str(info.value)


async def test_open_subdirectory_of_a_repository_is_refused(tmp_path: Path) -> None:
    await git(tmp_path, "init", "--quiet", "outer")
    inner = tmp_path / "outer" / "inner"
    inner.mkdir()
    with pytest.raises(NotARepositoryError, match="not a Git repository"):
        await Store.open(inner)


async def test_create_makes_a_bare_repository(tmp_path: Path) -> None:
    missing = tmp_path / "a" / "b"
    empty = tmp_path / "empty"
    empty.mkdir()
    for where in (missing, empty):
        store = await Store.open(where, create=True)
        assert store.path == where
        assert await git(where, "rev-parse", "--is-bare-repository") == "true"
        assert await store.heads() == {}


async def test_open_existing_repositories(tmp_path: Path) -> None:
    # A work-tree repository (by its top directory or its .git) and a bare one.
    await git(tmp_path, "init", "--quiet", "work")
    await git(tmp_path, "init", "--quiet", "--bare", "bare")
    for i, where in enumerate(
        (tmp_path / "work", tmp_path / "work" / ".git", tmp_path / "bare")
    ):
        store = await Store.open(where)
        tx = Transaction(None)
        tx.write("f", "x\n")
        head = await store.commit(f"b{i}", tx, "first")
        assert head is not None
        assert await branch_head(where, f"b{i}") == head


async def test_poll_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="poll_interval must be > 0"):
        await Store.open(tmp_path, create=True, poll_interval=0)


# Transactions ------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    return await Store.open(tmp_path / "store", create=True, poll_interval=0.05)


async def _files(store: Store, branch: str) -> dict[str, bytes]:
    """Return every file of `branch` as git itself lists it."""
    listing = await git(store.path, "ls-tree", "-r", "--name-only", branch)
    return {
        path: await git_bytes(store.path, "show", f"{branch}:{path}")
        for path in listing.split("\n")
        if path
    }


async def _commit(store: Store, branch: str, tx: Transaction) -> str:
    new = await store.commit(branch, tx, "test")
    assert new is not None
    return new


async def test_write_nested_files_and_read_them(store: Store) -> None:
    tx = Transaction(None)
    tx.write("a/b/c", b"deep\n")
    tx.write("a/d", "é\n")
    tx.write("top", b"")
    assert len(tx) == 3
    head = await _commit(store, "b", tx)

    assert await _files(store, "b") == {
        "a/b/c": b"deep\n",
        "a/d": "é\n".encode(),
        "top": b"",
    }

    def read(reader: TreeReader) -> tuple[object, ...]:
        return (
            reader.read("a/b/c"),
            reader.read("/a/d/"),
            reader.read("a"),
            reader.read("missing/file"),
            reader.read("a/d/under-a-file"),
            reader.exists("a/b"),
            reader.exists("a/x"),
            sorted(reader.listdir("a")),
            sorted(reader.listdir()),
            reader.listdir("top"),
        )

    assert await store.read(head, read) == (
        b"deep\n",
        "é\n".encode(),
        None,
        None,
        None,
        True,
        False,
        ["b", "d"],
        ["a", "top"],
        [],
    )


async def test_transaction_paths_must_be_plain(store: Store) -> None:
    tx = Transaction(None)
    for bad in ("", "/", "a//b", "a/../b", "./a"):
        with pytest.raises(ValueError, match="invalid path"):
            tx.write(bad, b"x")
        with pytest.raises(ValueError, match="invalid path"):
            tx.remove(bad)
    assert len(tx) == 0


async def test_remove_files_and_directories(store: Store) -> None:
    tx = Transaction(None)
    for path in ("keep", "d/x", "d/y", "e/f/g", "e/h"):
        tx.write(path, path)
    head = await _commit(store, "b", tx)

    # Removing the last file of a directory removes the directory too.
    tx = Transaction(head)
    tx.remove("d/x")
    tx.remove("e/f/g")
    tx.remove("absent/path")
    head = await _commit(store, "b", tx)
    assert await _files(store, "b") == {"d/y": b"d/y", "e/h": b"e/h", "keep": b"keep"}
    assert await git(store.path, "ls-tree", "--name-only", "b", "e/") == "e/h"

    # Removing a directory removes everything under it.
    tx = Transaction(head)
    tx.remove("e")
    tx.remove("d")
    await _commit(store, "b", tx)
    assert await _files(store, "b") == {"keep": b"keep"}


async def test_remove_then_write_and_write_then_remove(store: Store) -> None:
    tx = Transaction(None)
    tx.write("d/old", "old")
    tx.write("e/stays", "e")
    head = await _commit(store, "b", tx)

    tx = Transaction(head)
    # The directory is replaced by one holding only the new file.
    tx.remove("d")
    tx.write("d/new", "new")
    # A file written then removed in one transaction is not there.
    tx.write("e/gone", "x")
    tx.remove("e/gone")
    await _commit(store, "b", tx)
    assert await _files(store, "b") == {"d/new": b"new", "e/stays": b"e"}


async def test_files_and_directories_replace_each_other(store: Store) -> None:
    tx = Transaction(None)
    tx.write("f", "file")
    tx.write("d/x", "x")
    head = await _commit(store, "b", tx)

    # A stored file becomes a directory, a stored directory becomes a file.
    tx = Transaction(head)
    tx.write("f/inside", "now a directory")
    tx.write("d", "now a file")
    head = await _commit(store, "b", tx)
    assert await _files(store, "b") == {
        "d": b"now a file",
        "f/inside": b"now a directory",
    }

    # The same within one transaction: a staged file becomes a directory.
    tx = Transaction(head)
    tx.write("g", "file first")
    tx.write("g/h", "then under it")
    await _commit(store, "b", tx)
    files = await _files(store, "b")
    assert files["g/h"] == b"then under it"
    assert "g" not in files


async def test_removing_below_a_file_keeps_the_file(store: Store) -> None:
    tx = Transaction(None)
    tx.write("f", "file")
    head = await _commit(store, "b", tx)

    # There is nothing at f/x to remove: the file f stays, nothing changes.
    tx = Transaction(head)
    tx.remove("f/x")
    assert await store.commit("b", tx, "no-op") is None

    tx = Transaction(head)
    tx.write("staged", "file")
    tx.remove("staged/x")
    await _commit(store, "b", tx)
    assert await _files(store, "b") == {"f": b"file", "staged": b"file"}


async def test_commit_returns_none_when_the_tree_is_unchanged(store: Store) -> None:
    # Creating a branch with nothing in it is no change either.
    assert await store.commit("b", Transaction(None), "empty") is None
    assert await store.heads() == {}
    empty = await store.commit("b", Transaction(None), "empty", allow_empty=True)
    assert empty is not None

    tx = Transaction(empty)
    tx.write("f", "x")
    head = await _commit(store, "b", tx)

    # Writing the same bytes again, or removing what is absent, changes nothing.
    tx = Transaction(head)
    tx.write("f", b"x")
    tx.remove("g")
    assert await store.commit("b", tx, "same") is None
    assert await store.head("b") == head

    # Unless asked to commit anyway.
    again = await store.commit("b", tx, "same", allow_empty=True)
    assert again is not None
    assert await git(store.path, "rev-parse", f"{again}^") == head


async def test_commit_is_a_real_git_commit(store: Store) -> None:
    tx = Transaction(None)
    tx.write("f", "x")
    head = await _commit(store, "b", tx)
    tx = Transaction(head)
    tx.write("g", "y")
    second = await store.commit("b", tx, "Second\n\nWith a body.")
    assert second is not None
    assert await git(store.path, "log", "--format=%s|%an|%P", "b") == (
        f"Second|kitci|{head}\ntest|kitci|"
    )
    assert await git(store.path, "fsck", "--strict", "--no-dangling") == ""


async def test_stale_parent_raises_conflict(store: Store) -> None:
    tx = Transaction(None)
    tx.write("f", "ours")
    first = await _commit(store, "b", tx)

    # Another process moves the branch.
    theirs = await git_commit_files(store.path, "b", {"g": b"theirs"})

    tx = Transaction(first)
    tx.write("f", "ours again")
    with pytest.raises(ConflictError) as info:
        await store.commit("b", tx, "stale")
    assert (info.value.branch, info.value.expected, info.value.actual) == (
        "b",
        first,
        theirs,
    )
    assert "re-read" in str(info.value)

    # Their commit stays; nothing of ours was written.
    assert await branch_head(store.path, "b") == theirs
    assert await _files(store, "b") == {"f": b"ours", "g": b"theirs"}


async def test_creating_an_existing_branch_raises_conflict(store: Store) -> None:
    theirs = await git_commit_files(store.path, "b", {"g": b"theirs"})
    tx = Transaction(None)
    tx.write("f", "ours")
    with pytest.raises(ConflictError) as info:
        await store.commit("b", tx, "create")
    assert info.value.expected is None
    assert info.value.actual == theirs
    assert await branch_head(store.path, "b") == theirs


async def test_deleted_branch_raises_conflict(store: Store) -> None:
    tx = Transaction(None)
    tx.write("f", "ours")
    first = await _commit(store, "b", tx)
    await git(store.path, "update-ref", "-d", "refs/heads/b")
    tx = Transaction(first)
    tx.write("f", "again")
    with pytest.raises(ConflictError) as info:
        await store.commit("b", tx, "stale")
    assert info.value.actual is None
    assert await branch_head(store.path, "b") is None


async def test_update_branch_retries_on_the_new_head(store: Store) -> None:
    tx = Transaction(None)
    tx.write("count", "0")
    await _commit(store, "b", tx)
    seen: list[bytes | None] = []

    def build(reader: TreeReader, tx: Transaction) -> str:
        seen.append(reader.read("count"))
        if len(seen) == 1:
            # Another writer commits between our read and our commit.
            subprocess.run(
                [sys.executable, "-c", _GIT_BUMP, str(store.path)],
                check=True,
                env=GIT_ENV,
            )
        count = int(reader.read("count") or b"0")
        tx.write("count", str(count + 1))
        tx.write(f"by-us/{len(seen)}", "x")
        return "bump"

    head = await store.update_branch("b", build)
    assert head is not None
    # The second attempt read the other writer's value and kept its commit.
    assert seen == [b"0", b"1"]
    assert await _files(store, "b") == {"count": b"2", "by-us/2": b"x", "other": b"1"}
    assert await git(store.path, "log", "--format=%s", "b") == "bump\nother\ntest"


# Commits "other" on branch b with count + 1, through git alone.
_GIT_BUMP = """
import subprocess, sys
def git(*args, stdin=None):
    return subprocess.run(
        ["git", "-C", sys.argv[1], *args], input=stdin, check=True,
        capture_output=True,
    ).stdout.decode().strip()
parent = git("rev-parse", "refs/heads/b")
count = int(git("show", "b:count"))
index = {"GIT_INDEX_FILE": sys.argv[1] + "/bump-index"}
import os
os.environ.update(index)
git("read-tree", parent)
for path, data in (("count", str(count + 1)), ("other", "1")):
    blob = git("hash-object", "-w", "--stdin", stdin=data.encode())
    git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
tree = git("write-tree")
commit = git("commit-tree", tree, "-p", parent, "-m", "other")
git("update-ref", "refs/heads/b", commit, parent)
os.unlink(index["GIT_INDEX_FILE"])
"""


async def test_update_branch_gives_up_after_the_attempts(store: Store) -> None:
    tx = Transaction(None)
    tx.write("count", "0")
    await _commit(store, "b", tx)
    calls = 0

    def build(reader: TreeReader, tx: Transaction) -> str:
        nonlocal calls
        calls += 1
        subprocess.run(
            [sys.executable, "-c", _GIT_BUMP, str(store.path)], check=True, env=GIT_ENV
        )
        tx.write("ours", "x")
        return "never lands"

    with pytest.raises(ConflictError):
        await store.update_branch("b", build, attempts=3)
    assert calls == 3
    assert await git(store.path, "show", "b:count") == "3"
    assert "never lands" not in await git(store.path, "log", "--format=%s", "b")


async def test_update_branch_commits_nothing_when_asked(store: Store) -> None:
    assert await store.update_branch("b", lambda reader, tx: None) is None
    assert await store.update_branch("b", lambda reader, tx: "nothing staged") is None
    assert await store.heads() == {}


async def test_heads_lists_branches_by_prefix(store: Store) -> None:
    made = {}
    for branch in ("status-a", "status-b/long", "other"):
        tx = Transaction(None)
        tx.write("f", branch)
        made[branch] = await _commit(store, branch, tx)
    assert await store.heads("status-") == {
        "status-a": made["status-a"],
        "status-b/long": made["status-b/long"],
    }
    assert await store.heads() == made
    assert await store.head("missing") is None


async def test_run_sync_translates_git_errors(store: Store) -> None:
    with pytest.raises(StoreError, match="invalid branch name"):
        await store.head("bad..name")
    with pytest.raises(StoreError, match="missing"):
        await store.read("0" * 40, lambda reader: None)


async def test_missing_object_is_an_error_not_an_absent_file(store: Store) -> None:
    tx = Transaction(None)
    tx.write("d/f", b"precious")
    head = await _commit(store, "b", tx)
    blob = await git(store.path, "rev-parse", "b:d/f")
    os.unlink(store.path / "objects" / blob[:2] / blob[2:])

    # A fresh store, so no cached object hides the damage.
    fresh = await Store.open(store.path)
    with pytest.raises(StoreError):
        await fresh.read(head, lambda reader: reader.read("d/f"))
    # What is really absent is still read as absent.
    assert await fresh.read(head, lambda reader: reader.read("d/g")) is None


# Racing writers ------------------------------------------------------------------


def _count_commits(path: Path, branch: str) -> tuple[int, set[str]]:
    out = subprocess.run(
        ["git", "-C", str(path), "log", "--format=%P", branch],
        check=True,
        capture_output=True,
        env=GIT_ENV,
        text=True,
    ).stdout.split("\n")[:-1]
    # A straight line: every commit but the first has exactly one parent.
    assert all(len(parents.split()) == 1 for parents in out[:-1])
    files = subprocess.run(
        ["git", "-C", str(path), "ls-tree", "-r", "--name-only", branch],
        check=True,
        capture_output=True,
        env=GIT_ENV,
        text=True,
    ).stdout.split()
    return len(out), set(files)


async def _write_many(store: Store, writer: str, count: int) -> None:
    for i in range(count):

        def build(reader: TreeReader, tx: Transaction, i: int = i) -> str:
            tx.write(f"{writer}/{i}", f"{i}\n")
            # A shared file both writers change: a lost update would show.
            total = int(reader.read("total") or b"0")
            tx.write("total", f"{total + 1}\n")
            return f"{writer} {i}"

        assert await store.update_branch("race", build) is not None


def test_two_threads_racing_on_one_branch_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store"
    count = 40
    trio.run(partial(Store.open, path, create=True))
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    async def writer(name: str) -> None:
        store = await Store.open(path)
        await trio.to_thread.run_sync(start.wait)
        await _write_many(store, name, count)

    def run(name: str) -> None:
        try:
            trio.run(writer, name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    commits, files = _count_commits(path, "race")
    assert commits == 2 * count
    assert files == {"total"} | {
        f"{w}/{i}" for w in ("one", "two") for i in range(count)
    }
    total = subprocess.run(
        ["git", "-C", str(path), "show", "race:total"], capture_output=True, text=True
    ).stdout
    assert total == f"{2 * count}\n"


# Opens the store, says it is ready, waits for a line on stdin, then commits
# argv[3] times as writer argv[2] through update_branch.
_WRITER = """
import sys
import trio
from kitci import Store

async def main(path, name, count):
    store = await Store.open(path)
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)
    for i in range(count):
        def build(reader, tx, i=i):
            tx.write(f"{name}/{i}", f"{i}\\n")
            total = int(reader.read("total") or b"0")
            tx.write("total", f"{total + 1}\\n")
            return f"{name} {i}"
        assert await store.update_branch("race", build) is not None

trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""


def test_two_processes_racing_on_one_branch_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store"
    count = 40
    trio.run(partial(Store.open, path, create=True))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), name, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("one", "two")
    ]
    try:
        # Start both at once, once both are ready.
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.close()
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    commits, files = _count_commits(path, "race")
    assert commits == 2 * count
    assert files == {"total"} | {
        f"{w}/{i}" for w in ("one", "two") for i in range(count)
    }
    total = subprocess.run(
        ["git", "-C", str(path), "show", "race:total"], capture_output=True, text=True
    ).stdout
    assert total == f"{2 * count}\n"


# Watching a branch -----------------------------------------------------------------


async def test_wait_for_head_returns_at_once_when_already_moved(store: Store) -> None:
    assert await store.wait_for_head("b", "0" * 40) is None
    tx = Transaction(None)
    tx.write("f", "x")
    head = await _commit(store, "b", tx)
    with trio.fail_after(10):
        assert await store.wait_for_head("b", None) == head


async def test_wait_for_head_is_woken_by_a_commit_through_the_store(
    tmp_path: Path,
) -> None:
    # Polling once a minute: only the store's own wake-up can end this wait
    # within the bound.
    store = await Store.open(tmp_path / "store", create=True, poll_interval=60)
    tx = Transaction(None)
    tx.write("f", "x")
    first = await _commit(store, "b", tx)
    results: list[str | None] = []

    async def wait() -> None:
        results.append(await store.wait_for_head("b", first))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            tx = Transaction(first)
            tx.write("f", "y")
            second = await _commit(store, "b", tx)
    assert results == [second]


async def test_wait_for_head_notices_a_commit_by_another_process(store: Store) -> None:
    tx = Transaction(None)
    tx.write("f", "x")
    first = await _commit(store, "b", tx)
    results: list[str | None] = []

    async def wait() -> None:
        results.append(await store.wait_for_head("b", first))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            theirs = await git_commit_files(store.path, "b", {"g": b"theirs"})
    assert results == [theirs]


async def test_wait_for_head_notices_deletion(store: Store) -> None:
    tx = Transaction(None)
    tx.write("f", "x")
    first = await _commit(store, "b", tx)
    results: list[str | None] = []

    async def wait() -> None:
        results.append(await store.wait_for_head("b", first))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await git(store.path, "update-ref", "-d", "refs/heads/b")
    assert results == [None]


def _write_one(path: str, text: str) -> Callable[[TreeReader, Transaction], str]:
    def build(reader: TreeReader, tx: Transaction) -> str:
        tx.write(path, text)
        return f"write {path}"

    return build


async def test_a_lock_left_by_a_dead_writer_is_removed(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A ref lock older than a minute (a writer killed mid-write) no longer
    blocks the branch for good: it is removed, with a warning naming it."""
    await store.update_branch("b", _write_one("f", "1\n"))
    lock = store.path / "refs" / "heads" / "b.lock"
    lock.write_text("0" * 40 + "\n")
    old = lock.stat().st_mtime - STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))

    assert await store.update_branch("b", _write_one("f", "2\n")) is not None
    assert not lock.exists()
    assert await git(store.path, "show", "b:f") == "2"
    assert any(str(lock) in r.getMessage() for r in caplog.records)


async def test_a_fresh_lock_is_another_writer_at_work(store: Store) -> None:
    """A lock just taken is someone else moving the branch: a conflict,
    retried, and the lock is left alone."""
    await store.update_branch("b", _write_one("f", "1\n"))
    lock = store.path / "refs" / "heads" / "b.lock"
    lock.write_text("0" * 40 + "\n")
    with pytest.raises(ConflictError):
        await store.update_branch("b", _write_one("f", "2\n"), attempts=2)
    assert lock.exists()
