"""Tests of the local bridge (kitci._bridge) against real Git repositories."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pygit2
import pytest
import trio

from kitci import (
    METADATA_BRANCH,
    PR,
    Ref,
    Repo,
    Snapshot,
    SnapshotParser,
    Status,
    StatusState,
    Store,
    Transaction,
    TreeReader,
    write_status,
)
from kitci._bridge import LocalBridge

ALICE = Repo("alice", "proj")
BOB = Repo("bob", "lib")

_GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_COMMITTER_NAME": "Committer",
    "GIT_COMMITTER_EMAIL": "committer@example.com",
}


class Source:
    """A real Git repository made with the `git` command."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")

    def git(
        self, *args: str, author: tuple[str, str] | None = None, stdin: str = ""
    ) -> str:
        env = dict(_GIT_ENV)
        name, email = author or ("Alice Smith", "alice@example.com")
        env["GIT_AUTHOR_NAME"] = name
        env["GIT_AUTHOR_EMAIL"] = email
        done = subprocess.run(
            ["git", "-C", str(self.path), *args],
            input=stdin,
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        return done.stdout.strip()

    def commit(self, message: str, author: tuple[str, str] | None = None) -> str:
        self.git("commit", "-q", "--allow-empty", "-m", message, author=author)
        return self.rev("HEAD")

    def rev(self, what: str) -> str:
        return self.git("rev-parse", what)

    def write_loose_ref(self, name: bytes, commit: str) -> None:
        """Write a ref file directly, bypassing Git's name checks."""
        path = os.path.join(os.fsencode(self.path / ".git"), name)
        with open(path, "w") as f:
            f.write(commit + "\n")


MakeSource = Callable[[str], Source]


@pytest.fixture
def make_source(tmp_path: Path) -> MakeSource:
    def make(name: str) -> Source:
        return Source(tmp_path / "sources" / name)

    return make


async def snapshot(store: Store) -> Snapshot:
    head = await store.head(METADATA_BRANCH)
    return await SnapshotParser().parse(store, head)


async def read_file(store: Store, path: str) -> bytes | None:
    head = await store.head(METADATA_BRANCH)
    return await store.read(head, lambda reader: reader.read(path))


async def commit_message(store: Store, commit: str) -> str:
    return await store.run_sync(lambda repo: repo[commit].peel(pygit2.Commit).message)


async def test_mirrors_branches_tags_and_prs(
    store: Store, make_source: MakeSource
) -> None:
    src = make_source("proj")
    main = src.commit("Initial commit")
    src.git("tag", "v0")
    src.git("tag", "-a", "v1", "-m", "Release 1")
    src.git("tag", "-a", "tree-tag", "-m", "Not a commit", "HEAD^{tree}")
    src.git("checkout", "-q", "-b", "feature/x")
    feature = src.commit("Feature work")
    pr_head = src.commit(
        "  Add the thing  \n\nA longer body.\n", author=("José Q. Público", "jq@x.org")
    )
    src.git("checkout", "-q", "main")
    src.git("update-ref", "refs/pull/7/head", pr_head)
    src.git("update-ref", "refs/pull/7/merge", main)
    src.git("update-ref", "refs/pull/8/head", feature)

    bridge = LocalBridge(store, {ALICE: src.path})
    new = await bridge.sync_once()
    assert new is not None
    assert new == await store.head(METADATA_BRANCH)

    snap = await snapshot(store)
    assert snap.monitored_repos() == [ALICE]
    assert dict(snap.refs(ALICE)) == {
        ("heads", "main"): Ref(ALICE, ("heads", "main"), main),
        ("heads", "feature", "x"): Ref(ALICE, ("heads", "feature", "x"), pr_head),
        ("tags", "v0"): Ref(ALICE, ("tags", "v0"), main),
        # The annotated tag is peeled to its commit; the tree tag is skipped.
        ("tags", "v1"): Ref(ALICE, ("tags", "v1"), main),
    }
    assert dict(snap.prs(ALICE)) == {
        7: PR(ALICE, 7, pr_head, "open", "Add the thing", "Jose-Q-Publico", "main"),
        8: PR(ALICE, 8, feature, "open", "Feature work", "Alice-Smith", "main"),
    }
    # Every file ends with exactly one newline; .monitor is empty.
    assert await read_file(store, "alice/proj/.monitor") == b""
    assert await read_file(store, "alice/proj/pr/7/title") == b"Add the thing\n"
    assert await read_file(store, "alice/proj/pr/7/state") == b"open\n"
    assert await read_file(store, "alice/proj/pr/7/base") == b"main\n"
    assert await read_file(store, "alice/proj/ref/tags/v1/head") == f"{main}\n".encode()
    message = await commit_message(store, new)
    assert message.startswith("Sync local repositories\n\n")
    assert "alice/proj: monitored, 4 refs added, PRs 7, 8 opened" in message


async def test_second_sync_commits_nothing(
    store: Store, make_source: MakeSource
) -> None:
    src = make_source("proj")
    head = src.commit("One")
    src.git("update-ref", "refs/pull/1/head", head)
    bridge = LocalBridge(store, {ALICE: src.path})
    first = await bridge.sync_once()
    assert first is not None
    assert await bridge.sync_once() is None
    # A new bridge (a restart) finds nothing to change either.
    assert await LocalBridge(store, {ALICE: src.path}).sync_once() is None
    assert await store.head(METADATA_BRANCH) == first


async def test_vanished_targets_are_removed(
    store: Store, make_source: MakeSource
) -> None:
    src = make_source("proj")
    main = src.commit("One")
    src.git("branch", "gone")
    src.git("branch", "deep/gone")
    src.git("tag", "-a", "t1", "-m", "tag")
    src.git("update-ref", "refs/pull/1/head", main)
    src.git("update-ref", "refs/pull/2/head", main)
    bridge = LocalBridge(store, {ALICE: src.path})
    await bridge.sync_once()

    src.git("branch", "-D", "gone", "deep/gone")
    src.git("tag", "-d", "t1")
    src.git("update-ref", "-d", "refs/pull/1/head")
    newer = src.commit("Two")
    src.git("update-ref", "refs/pull/2/head", newer)
    new = await bridge.sync_once()
    assert new is not None

    snap = await snapshot(store)
    assert dict(snap.refs(ALICE)) == {
        ("heads", "main"): Ref(ALICE, ("heads", "main"), newer),
    }
    assert dict(snap.prs(ALICE)) == {
        2: PR(ALICE, 2, newer, "open", "Two", "Alice-Smith", "main"),
    }
    head = await store.head(METADATA_BRANCH)
    assert not await store.read(head, lambda r: r.exists("alice/proj/pr/1"))
    assert not await store.read(head, lambda r: r.exists("alice/proj/ref/heads/deep"))
    assert not await store.read(head, lambda r: r.exists("alice/proj/ref/tags"))
    message = await commit_message(store, new)
    assert "alice/proj: ref heads/main updated, 3 refs removed" in message
    assert "PR 2 updated, PR 1 closed" in message


async def test_statuses_and_other_files_survive(
    store: Store, make_source: MakeSource
) -> None:
    src = make_source("proj")
    main = src.commit("One")
    src.git("branch", "old")
    src.git("update-ref", "refs/pull/1/head", main)
    bridge = LocalBridge(store, {ALICE: src.path})
    await bridge.sync_once()

    status = Status(ALICE, main, ("ci", "datakit", "test"), StatusState.SUCCESS, "ok")

    def other_writer(reader: TreeReader, tx: Transaction) -> str:
        write_status(tx, status)
        tx.write("alice/proj/notes/readme", b"kept\n")
        tx.write("carol/other/ref/heads/x/head", f"{main}\n")
        tx.write("carol/other/pr/3/head", f"{main}\n")
        tx.write("alice/proj/pr/not-a-number/head", b"kept\n")
        return "Another writer"

    await store.update_branch(METADATA_BRANCH, other_writer)
    src.git("branch", "-D", "old")
    src.git("update-ref", "-d", "refs/pull/1/head")
    assert await bridge.sync_once() is not None

    snap = await snapshot(store)
    assert snap.status(ALICE, main, ("ci", "datakit", "test")) == status
    assert set(snap.refs(ALICE)) == {("heads", "main")}
    assert dict(snap.prs(ALICE)) == {}
    assert await read_file(store, "alice/proj/notes/readme") == b"kept\n"
    assert await read_file(store, "alice/proj/pr/not-a-number/head") == b"kept\n"
    assert (
        await read_file(store, "carol/other/ref/heads/x/head") == f"{main}\n".encode()
    )
    assert await read_file(store, "carol/other/pr/3/head") == f"{main}\n".encode()


async def test_two_repos_at_once(store: Store, make_source: MakeSource) -> None:
    one, two = make_source("proj"), make_source("lib")
    a = one.commit("A")
    b = two.commit("B")
    two.git("checkout", "-q", "-b", "develop")
    two.git("symbolic-ref", "HEAD", "refs/heads/develop")
    two.git("update-ref", "refs/pull/4/head", b)
    bridge = LocalBridge(store, {ALICE: one.path, BOB: two.path})
    new = await bridge.sync_once()
    assert new is not None

    snap = await snapshot(store)
    assert snap.monitored_repos() == [ALICE, BOB]
    assert set(snap.refs(ALICE)) == {("heads", "main")}
    assert snap.ref(ALICE, ("heads", "main")) == Ref(ALICE, ("heads", "main"), a)
    assert set(snap.refs(BOB)) == {("heads", "main"), ("heads", "develop")}
    # The PR's base is the source's default branch (HEAD's target).
    assert snap.pr(BOB, 4) == PR(BOB, 4, b, "open", "B", "Alice-Smith", "develop")
    message = await commit_message(store, new)
    assert "alice/proj: monitored, ref heads/main added" in message
    assert "bob/lib: monitored, 2 refs added, PR 4 opened" in message


async def test_many_pull_requests(store: Store, make_source: MakeSource) -> None:
    src = make_source("proj")
    heads = [src.commit(f"Change {i}") for i in range(3)]
    commands = "".join(
        f"create refs/pull/{n}/head {heads[n % 3]}\n" for n in range(1, 301)
    )
    src.git("update-ref", "--stdin", stdin=commands)
    bridge = LocalBridge(store, {ALICE: src.path})
    with trio.fail_after(10):
        new = await bridge.sync_once()
    assert new is not None
    prs = (await snapshot(store)).open_prs(ALICE)
    assert len(prs) == 300
    assert prs[299] == PR(
        ALICE, 299, heads[2], "open", "Change 2", "Alice-Smith", "main"
    )
    assert "alice/proj: monitored, ref heads/main added, 300 PRs opened" in (
        await commit_message(store, new)
    )
    assert await bridge.sync_once() is None


async def test_detached_head_gives_master_base(
    store: Store, make_source: MakeSource
) -> None:
    src = make_source("proj")
    head = src.commit("One")
    src.git("checkout", "-q", "--detach")
    src.git("update-ref", "refs/pull/1/head", head)
    await LocalBridge(store, {ALICE: src.path}).sync_once()
    snap = await snapshot(store)
    pr = snap.pr(ALICE, 1)
    assert pr is not None
    assert pr.base == "master"


async def test_invalid_ref_names_are_skipped(
    store: Store, make_source: MakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    src = make_source("proj")
    head = src.commit("One")
    # Git refuses to create these, so write the loose ref files directly.
    for bad in (b"bad name", b"a..b", b"caf\xe9"):
        src.write_loose_ref(b"refs/heads/" + bad, head)
    # Git accepts this one, but it is no PR number kitci can round-trip.
    src.git("update-ref", "refs/pull/01/head", head)
    caplog.set_level(logging.WARNING, logger="kitci.bridge")
    await LocalBridge(store, {ALICE: src.path}).sync_once()
    snap = await snapshot(store)
    assert set(snap.refs(ALICE)) == {("heads", "main")}
    assert dict(snap.prs(ALICE)) == {}
    text = caplog.text
    assert "skipping ref refs/heads/bad name" in text
    assert "skipping ref refs/heads/a..b" in text
    assert "not a valid ref name" in text
    assert "its name is not UTF-8" in text
    assert "'01' is not a PR number" in text


async def test_missing_source_warns_and_is_retried(
    store: Store,
    make_source: MakeSource,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = make_source("proj")
    good.commit("One")
    missing = tmp_path / "sources" / "not-yet"
    caplog.set_level(logging.WARNING, logger="kitci.bridge")
    bridge = LocalBridge(store, {ALICE: good.path, BOB: missing})
    assert await bridge.sync_once() is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(missing) in warnings[0].getMessage()
    assert "does not exist" in warnings[0].getMessage()
    assert (await snapshot(store)).monitored_repos() == [ALICE]

    # A directory that is not a repository is reported too.
    missing.mkdir()
    caplog.clear()
    assert await bridge.sync_once() is None
    assert "is not a Git repository" in caplog.text

    # While running, the bridge picks the repository up once it appears.
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: bridge.run(interval=0.01, task_status=task_status)
        )
        before = await store.head(METADATA_BRANCH)
        # Build it aside, then move it in place in one step.
        late = Source(tmp_path / "aside")
        commit = late.commit("Late")
        missing.rmdir()
        (tmp_path / "aside").rename(missing)
        with trio.fail_after(10):
            await store.wait_for_head(METADATA_BRANCH, before)
        nursery.cancel_scope.cancel()
    snap = await snapshot(store)
    assert snap.monitored_repos() == [ALICE, BOB]
    assert snap.ref(BOB, ("heads", "main")) == Ref(BOB, ("heads", "main"), commit)


async def test_run_notices_a_new_branch(store: Store, make_source: MakeSource) -> None:
    one, two = make_source("proj"), make_source("lib")
    head = one.commit("One")
    two.commit("Two")
    bridge = LocalBridge(store, {ALICE: one.path, BOB: two.path})
    calls: list[str] = []
    real_update = store.update_branch

    async def counting_update(*args: object, **kwargs: object) -> str | None:
        calls.append("update")
        return await real_update(*args, **kwargs)  # type: ignore[arg-type]

    store.update_branch = counting_update  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: bridge.run(interval=0.01, task_status=task_status)
        )
        first = await store.head(METADATA_BRANCH)
        assert first is not None
        one.git("branch", "pushed", head)
        with trio.fail_after(10):
            second = await store.wait_for_head(METADATA_BRANCH, first)
        nursery.cancel_scope.cancel()
    snap = await SnapshotParser().parse(store, second)
    assert snap.ref(ALICE, ("heads", "pushed")) == Ref(ALICE, ("heads", "pushed"), head)
    # Polls that found no change in the refs did not touch the store.
    assert calls == ["update", "update"]
    assert second is not None
    message = await commit_message(store, second)
    assert message == "Sync local repositories\n\nalice/proj: ref heads/pushed added"


async def test_run_rejects_a_bad_interval(store: Store) -> None:
    with pytest.raises(ValueError, match="interval"):
        await LocalBridge(store, {}).run(interval=0)
