"""Tests of the github-metadata layout: parsing snapshots, writing statuses."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping

import pytest

from kitci import (
    METADATA_BRANCH,
    PR,
    InvalidStatusError,
    Ref,
    Repo,
    Snapshot,
    SnapshotParser,
    Status,
    StatusState,
    Store,
    StoreError,
    Transaction,
    write_monitor,
    write_status,
)
from kitci._metadata import changed_keys
from support import git, git_bytes, git_commit_files

ALICE = Repo("alice", "proj")
BOB = Repo("bob", "other")


def sha(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


H1, H2, H3, H4, H5 = (sha(f"H{i}") for i in range(1, 6))

Files = Mapping[str, str | bytes | None]


async def put(store: Store, files: Files) -> str:
    """Commit `files` on github-metadata (str: one newline added; None: remove)."""
    tx = Transaction(await store.head(METADATA_BRANCH))
    for path, content in files.items():
        if content is None:
            tx.remove(path)
        elif isinstance(content, bytes):
            tx.write(path, content)
        else:
            tx.write(path, content + "\n")
    new = await store.commit(METADATA_BRANCH, tx, "metadata")
    assert new is not None
    return new


def pr_files(
    number: int, head: str, *, repo: Repo = ALICE, state: str = "open", **more: str
) -> dict[str, str | bytes | None]:
    base = f"{repo}/pr/{number}"
    files: dict[str, str | bytes | None] = {
        f"{base}/head": head,
        f"{base}/state": state,
        f"{base}/owner": "bob",
        f"{base}/title": f"PR {number}",
    }
    files.update({f"{base}/{name}": value for name, value in more.items()})
    return files


def status_files(
    head: str, context: str, state: str, repo: Repo = ALICE, **more: str
) -> dict[str, str | bytes | None]:
    base = f"{repo}/commit/{head}/status/{context}"
    files: dict[str, str | bytes | None] = {f"{base}/state": state}
    files.update({f"{base}/{name}": value for name, value in more.items()})
    return files


async def snapshot(store: Store, commit: str | None = None) -> Snapshot:
    if commit is None:
        commit = await store.head(METADATA_BRANCH)
    return await SnapshotParser().parse(store, commit)


# Reading -------------------------------------------------------------------------


def test_empty_snapshot() -> None:
    snap = Snapshot(None, {})
    assert snap.monitored_repos() == []
    assert snap.prs(ALICE) == {}
    assert snap.statuses(ALICE, H1) == {}


async def test_parse_none_is_empty(store: Store) -> None:
    snap = await SnapshotParser().parse(store, None)
    assert snap.commit is None
    assert snap.repos == {}


async def test_prs_refs_statuses_and_monitor_round_trip(store: Store) -> None:
    files: dict[str, str | bytes | None] = {
        f"{ALICE}/.monitor": b"",
        **pr_files(2, H1, title="Fix the thing"),
        **pr_files(3, H2, state="closed", base="dev"),
        **pr_files(1, H3, repo=BOB),
        f"{ALICE}/ref/heads/master/head": H1,
        f"{ALICE}/ref/heads/feature/login_v2/head": H2,
        f"{ALICE}/ref/heads/feature/head": H3,
        f"{ALICE}/ref/heads/héllo/head": H4,
        f"{ALICE}/ref/tags/v1.0/head": H5,
        # Contexts that are prefixes of each other.
        **status_files(
            H1,
            "continuous-integration/travis-ci",
            "success",
            description="Travis passed",
            target_url="https://ci.example/1",
        ),
        **status_files(H1, "continuous-integration/travis-ci/pr", "failure"),
        **status_files(H1, "ci/datakit", "pending", description=""),
        **status_files(H1, "ci/datakit/test", "error"),
    }
    commit = await put(store, files)
    snap = await snapshot(store, commit)

    assert snap.commit == commit
    assert snap.monitored_repos() == [ALICE]
    assert set(snap.repos) == {ALICE, BOB}
    assert snap.prs(ALICE) == {
        2: PR(ALICE, 2, H1, "open", "Fix the thing", "bob", "master"),
        3: PR(ALICE, 3, H2, "closed", "PR 3", "bob", "dev"),
    }
    assert snap.open_prs(ALICE) == {2: snap.prs(ALICE)[2]}
    assert snap.pr(BOB, 1) == PR(BOB, 1, H3, "open", "PR 1", "bob")
    assert snap.pr(ALICE, 1) is None
    assert snap.refs(ALICE) == {
        ("heads", "master"): Ref(ALICE, ("heads", "master"), H1),
        ("heads", "feature", "login_v2"): Ref(
            ALICE, ("heads", "feature", "login_v2"), H2
        ),
        ("heads", "feature"): Ref(ALICE, ("heads", "feature"), H3),
        ("heads", "héllo"): Ref(ALICE, ("heads", "héllo"), H4),
        ("tags", "v1.0"): Ref(ALICE, ("tags", "v1.0"), H5),
    }
    assert snap.refs(BOB) == {}
    travis = ("continuous-integration", "travis-ci")
    assert snap.statuses(ALICE, H1) == {
        travis: Status(
            ALICE,
            H1,
            travis,
            StatusState.SUCCESS,
            "Travis passed",
            "https://ci.example/1",
        ),
        (*travis, "pr"): Status(ALICE, H1, (*travis, "pr"), StatusState.FAILURE),
        ("ci", "datakit"): Status(
            ALICE, H1, ("ci", "datakit"), StatusState.PENDING, ""
        ),
        ("ci", "datakit", "test"): Status(
            ALICE, H1, ("ci", "datakit", "test"), StatusState.ERROR
        ),
    }
    assert snap.statuses(ALICE, H2) == {}
    assert snap.value(("pr", ALICE, 2)) == snap.pr(ALICE, 2)
    assert snap.value(("ref", ALICE, ("tags", "v1.0"))) == snap.ref(
        ALICE, ("tags", "v1.0")
    )
    assert snap.value(("status", ALICE, H1, travis)) == snap.status(ALICE, H1, travis)
    assert snap.value(("pr", ALICE, 9)) is None
    with pytest.raises(ValueError, match="unknown read key"):
        snap.value(("issue", ALICE, 1))


async def test_written_by_git_reads_the_same(store: Store) -> None:
    # A bridge in another process, writing with plain git.
    files = {
        f"{ALICE}/.monitor": b"",
        f"{ALICE}/pr/2/head": f"{H1}\n".encode(),
        f"{ALICE}/pr/2/state": b"open\n",
        f"{ALICE}/pr/2/owner": b"bob\n",
        f"{ALICE}/ref/heads/a/b/head": f"{H2}\n".encode(),
    }
    commit = await git_commit_files(store.path, METADATA_BRANCH, files)
    snap = await snapshot(store, commit)
    assert snap.monitored_repos() == [ALICE]
    assert snap.prs(ALICE) == {2: PR(ALICE, 2, H1, "open", "", "bob")}
    assert snap.refs(ALICE) == {
        ("heads", "a", "b"): Ref(ALICE, ("heads", "a", "b"), H2)
    }


# Writing ------------------------------------------------------------------------


async def test_write_status_files_end_in_one_newline(store: Store) -> None:
    long = "  Build failed:\n" + "é" * 200 + "\n  "
    status = Status(
        ALICE,
        H1,
        ("ci", "datakit", "test"),
        StatusState.FAILURE,
        long,
        " https://ci.example/alice/proj/commit/x?test=test \n",
    )
    tx = Transaction(None)
    write_status(tx, status)
    write_monitor(tx, ALICE)
    await store.commit(METADATA_BRANCH, tx, "status")

    where = f"{METADATA_BRANCH}:{ALICE}/commit/{H1}/status/ci/datakit/test"
    state = await git_bytes(store.path, "show", f"{where}/state")
    descr = await git_bytes(store.path, "show", f"{where}/description")
    url = await git_bytes(store.path, "show", f"{where}/target_url")
    assert state == b"failure\n"
    expected = ("Build failed:\n" + "é" * 200)[:140]
    assert descr == f"{expected}\n".encode()
    assert len(descr.decode("utf-8").rstrip("\n")) == 140
    assert url == b"https://ci.example/alice/proj/commit/x?test=test\n"
    monitor = await git_bytes(store.path, "show", f"{METADATA_BRANCH}:{ALICE}/.monitor")
    assert monitor == b""

    # Read back: the trimmed description, everything else as written.
    snap = await snapshot(store)
    assert snap.status(ALICE, H1, ("ci", "datakit", "test")) == Status(
        ALICE,
        H1,
        ("ci", "datakit", "test"),
        StatusState.FAILURE,
        expected,
        "https://ci.example/alice/proj/commit/x?test=test",
    )


async def test_write_status_without_description_removes_the_old_one(
    store: Store,
) -> None:
    context = ("ci", "datakit", "test")
    tx = Transaction(None)
    write_status(tx, Status(ALICE, H1, context, StatusState.PENDING, "running", "u"))
    first = await store.commit(METADATA_BRANCH, tx, "one")

    tx = Transaction(first)
    write_status(tx, Status(ALICE, H1, context, StatusState.SUCCESS))
    await store.commit(METADATA_BRANCH, tx, "two")
    listing = await git(
        store.path,
        "ls-tree",
        "--name-only",
        f"{METADATA_BRANCH}:{ALICE}/commit/{H1}/status/ci/datakit/test",
    )
    assert listing == "state"

    # An empty description is still written, as one newline.
    tx = Transaction(await store.head(METADATA_BRANCH))
    write_status(tx, Status(ALICE, H1, context, StatusState.SUCCESS, "   "))
    await store.commit(METADATA_BRANCH, tx, "three")
    where = f"{METADATA_BRANCH}:{ALICE}/commit/{H1}/status/ci/datakit/test"
    assert await git_bytes(store.path, "show", f"{where}/description") == b"\n"


async def test_writing_a_status_leaves_other_contexts_byte_for_byte(
    store: Store,
) -> None:
    await put(
        store,
        {
            **status_files(H1, "continuous-integration/travis-ci", "success"),
            **status_files(H1, "continuous-integration/travis-ci/pr", "failure"),
            **status_files(H1, "ci/datakit", "pending", description="theirs"),
        },
    )
    status_tree = f"{METADATA_BRANCH}:{ALICE}/commit/{H1}/status"
    before = await git(store.path, "ls-tree", "-r", status_tree)

    tx = Transaction(await store.head(METADATA_BRANCH))
    write_status(tx, Status(ALICE, H1, ("ci", "datakit", "test"), StatusState.SUCCESS))
    await store.commit(METADATA_BRANCH, tx, "ours")

    after = await git(store.path, "ls-tree", "-r", status_tree)
    assert set(before.split("\n")) < set(after.split("\n"))
    assert len(after.split("\n")) == len(before.split("\n")) + 1


@pytest.mark.parametrize(
    "status",
    [
        Status(ALICE, H1.upper(), ("ci",), StatusState.SUCCESS),
        Status(ALICE, H1[:39], ("ci",), StatusState.SUCCESS),
        Status(ALICE, "", ("ci",), StatusState.SUCCESS),
        Status(ALICE, H1, (), StatusState.SUCCESS),
        Status(ALICE, H1, ("ci", ""), StatusState.SUCCESS),
        Status(ALICE, H1, ("ci", ".."), StatusState.SUCCESS),
        Status(ALICE, H1, ("ci/datakit",), StatusState.SUCCESS),
        Status(Repo("alice", ""), H1, ("ci",), StatusState.SUCCESS),
        Status(Repo("a/b", "c"), H1, ("ci",), StatusState.SUCCESS),
        Status(ALICE, H1, ("ci",), "merged"),  # type: ignore[arg-type]  # a bad state on purpose
    ],
)
def test_invalid_status_is_refused_before_staging(status: Status) -> None:
    tx = Transaction(None)
    with pytest.raises(InvalidStatusError, match="cannot write a status"):
        write_status(tx, status)
    assert len(tx) == 0


# Malformed metadata -------------------------------------------------------------


def _logged(caplog: pytest.LogCaptureFixture, level: int, *words: str) -> bool:
    return any(
        record.levelno == level
        and record.name == "kitci.metadata"
        and all(word in record.getMessage() for word in words)
        for record in caplog.records
    )


async def test_malformed_metadata_is_skipped_and_logged(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kitci.metadata")
    big_title = "t" * 100_000
    await put(
        store,
        {
            f"{ALICE}/.monitor": b"",
            # No head.
            f"{ALICE}/pr/11/state": "open",
            f"{ALICE}/pr/11/owner": "bob",
            # An unknown state.
            **pr_files(12, H2, state="merged"),
            # Not a number.
            f"{ALICE}/pr/abc/head": H3,
            # Surrounding white space, and no base.
            f"{ALICE}/pr/13/head": f" {H4}\n".encode(),
            f"{ALICE}/pr/13/state": b"open\n\n",
            f"{ALICE}/pr/13/owner": b"bob",
            # A 100 KB title.
            **pr_files(14, H5, title=big_title),
            # Leading zeros would make a second PR 7.
            **pr_files(7, H1),
            f"{ALICE}/pr/007/head": H2,
            f"{ALICE}/pr/007/state": "open",
            f"{ALICE}/pr/007/owner": "eve",
            # A head that is not a hash.
            **pr_files(15, "not-a-hash"),
            # A file where a PR directory is expected.
            f"{ALICE}/pr/16": "open",
            # A directory where the head file is expected.
            f"{ALICE}/pr/17/head/x": H1,
            f"{ALICE}/pr/17/state": "open",
            f"{ALICE}/pr/17/owner": "bob",
            # A title that is not UTF-8 is read with replacements.
            **pr_files(18, H1, title="x"),
            f"{ALICE}/pr/18/title": b"caf\xe9\n",
            # Refs: a head that is not UTF-8, names Git refuses.
            f"{ALICE}/ref/heads/x/head": b"\xff\xfe" + H1.encode(),
            f"{ALICE}/ref/heads/a b/head": H1,
            f"{ALICE}/ref/heads/a..b/head": H1,
            f"{ALICE}/ref/heads/y.lock/head": H1,
            f"{ALICE}/ref/pull/1/head": H1,
            f"{ALICE}/ref/heads/bad-head/head": "HEAD",
            f"{ALICE}/ref/heads/good/head": f"\n {H3} \n",
            # Statuses: an unknown state, a directory that is no commit.
            **status_files(H1, "ci/a", "great"),
            **status_files(H1, "ci/b", "success"),
            f"{ALICE}/commit/not-a-hash/status/ci/state": "success",
            # Files where directories are expected.
            f"{BOB}/pr": "nothing",
            f"{BOB}/ref": "nothing",
            f"{BOB}/commit": "nothing",
            f"{BOB}/.monitor/x": "a directory",
            f"{ALICE}/commit/{H2}/status": "nothing",
            "carol/README": "a file where a repository is expected",
        },
    )
    snap = await snapshot(store)
    error = logging.ERROR
    warning = logging.WARNING

    # PR 11: skipped, its path named.
    assert snap.pr(ALICE, 11) is None
    assert _logged(caplog, warning, "alice/proj/pr/11", "no head")
    # PR 12: closed, with an error.
    assert snap.pr(ALICE, 12) == PR(ALICE, 12, H2, "closed", "PR 12", "bob")
    assert _logged(caplog, error, "alice/proj/pr/12", "merged")
    # pr/abc and pr/007: skipped with a warning, nothing else lost.
    assert _logged(caplog, warning, "alice/proj/pr/abc", "not a PR number")
    assert _logged(caplog, warning, "alice/proj/pr/007", "not a PR number")
    assert snap.pr(ALICE, 7) == PR(ALICE, 7, H1, "open", "PR 7", "bob")
    # PR 13: white space trimmed, base master.
    assert snap.pr(ALICE, 13) == PR(ALICE, 13, H4, "open", "", "bob", "master")
    # PR 14: read normally.
    pr14 = snap.pr(ALICE, 14)
    assert pr14 is not None
    assert pr14.title == big_title
    # PR 15, 16, 17: skipped, named.
    assert snap.pr(ALICE, 15) is None
    assert _logged(caplog, warning, "alice/proj/pr/15", "not a commit hash")
    assert _logged(caplog, warning, "alice/proj/pr/16", "directory is expected")
    assert snap.pr(ALICE, 17) is None
    assert _logged(caplog, warning, "alice/proj/pr/17/head", "is a directory")
    # PR 18: kept, with a warning.
    assert snap.pr(ALICE, 18) == PR(ALICE, 18, H1, "open", "caf\ufffd", "bob")
    assert _logged(caplog, warning, "alice/proj/pr/18/title", "UTF-8")
    assert sorted(snap.prs(ALICE)) == [7, 12, 13, 14, 18]

    # Refs: only the good one.
    assert snap.refs(ALICE) == {("heads", "good"): Ref(ALICE, ("heads", "good"), H3)}
    for path, why in (
        ("alice/proj/ref/heads/x", "UTF-8"),
        ("alice/proj/ref/heads/a b", "ref name"),
        ("alice/proj/ref/heads/a..b", "ref name"),
        ("alice/proj/ref/heads/y.lock", "ref name"),
        ("alice/proj/ref/pull/1", "ref name"),
        ("alice/proj/ref/heads/bad-head", "not a commit hash"),
    ):
        assert _logged(caplog, warning, path, why), path

    # Statuses.
    assert set(snap.statuses(ALICE, H1)) == {("ci", "b")}
    assert _logged(caplog, warning, f"alice/proj/commit/{H1}/status/ci/a", "great")
    assert _logged(caplog, warning, "alice/proj/commit/not-a-hash", "not a commit")
    assert _logged(caplog, warning, f"alice/proj/commit/{H2}/status", "directory")
    assert snap.statuses(ALICE, H2) == {}

    # Files where directories are expected.
    for path in ("bob/other/pr", "bob/other/ref", "bob/other/commit", "carol/README"):
        assert _logged(caplog, warning, path, "directory is expected"), path
    assert _logged(caplog, warning, "bob/other/.monitor", "directory")
    assert snap.monitored_repos() == [ALICE]
    assert snap.prs(BOB) == {}


async def test_subcontext_named_like_a_status_file(store: Store) -> None:
    # Contexts `x` and `x/description`: the directory named `description`
    # belongs to the second one and is no description of the first.
    await put(
        store,
        {
            **status_files(H1, "x", "success", target_url="u"),
            **status_files(H1, "x/description", "failure", description="d"),
        },
    )
    snap = await snapshot(store)
    assert snap.statuses(ALICE, H1) == {
        ("x",): Status(ALICE, H1, ("x",), StatusState.SUCCESS, None, "u"),
        ("x", "description"): Status(
            ALICE, H1, ("x", "description"), StatusState.FAILURE, "d"
        ),
    }


async def _remove_object(store: Store, spec: str) -> None:
    oid = await git(store.path, "rev-parse", spec)
    os.unlink(store.path / "objects" / oid[:2] / oid[2:])


@pytest.mark.parametrize(
    "lost",
    [
        f"{ALICE}/pr/2/head",
        f"{ALICE}/pr/2",
        f"{ALICE}/ref/heads/main/head",
        f"{ALICE}/commit/{H1}/status/ci/state",
        f"{ALICE}/.monitor",
        f"{ALICE}",
    ],
)
async def test_missing_object_is_a_store_error(store: Store, lost: str) -> None:
    commit = await put(
        store,
        {
            f"{ALICE}/.monitor": b"",
            **pr_files(2, H1),
            f"{ALICE}/ref/heads/main/head": H2,
            **status_files(H1, "ci", "success"),
        },
    )
    await _remove_object(store, f"{METADATA_BRANCH}:{lost}")

    # A fresh store and parser, so that no cache hides the damage.
    fresh = await Store.open(store.path)
    with pytest.raises(StoreError):
        await SnapshotParser().parse(fresh, commit)


async def test_missing_commit_is_a_store_error(store: Store) -> None:
    with pytest.raises(StoreError, match="missing"):
        await SnapshotParser().parse(store, H1)


# Changes between snapshots ------------------------------------------------------


async def test_changed_keys(store: Store) -> None:
    parser = SnapshotParser()
    await put(
        store,
        {
            **pr_files(2, H1),
            **pr_files(3, H2),
            f"{ALICE}/ref/heads/main/head": H1,
            f"{ALICE}/ref/heads/dev/head": H2,
            **status_files(H1, "ci/a", "success"),
            **pr_files(1, H3, repo=BOB),
        },
    )
    s1 = await parser.parse(store, await store.head(METADATA_BRANCH))
    assert changed_keys(None, s1) is None
    assert changed_keys(s1, s1) == set()

    async def step(files: Files) -> Snapshot:
        return await parser.parse(store, await put(store, files))

    # A PR's head moves.
    s2 = await step({f"{ALICE}/pr/2/head": H3})
    assert changed_keys(s1, s2) == {("pr", ALICE, 2)}

    # A status for a new context at a commit that has others.
    s3 = await step(status_files(H1, "ci/b", "pending"))
    assert changed_keys(s2, s3) == {("status", ALICE, H1, ("ci", "b"))}

    # A status at a new commit; a status changes.
    s4 = await step(
        {**status_files(H2, "ci/a", "success"), **status_files(H1, "ci/a", "failure")}
    )
    assert changed_keys(s3, s4) == {
        ("status", ALICE, H2, ("ci", "a")),
        ("status", ALICE, H1, ("ci", "a")),
    }

    # Only the other repository changes: nothing about alice/proj.
    s5 = await step({f"{BOB}/pr/1/state": "closed"})
    assert changed_keys(s4, s5) == {("pr", BOB, 1)}

    # A ref moves, a ref and a PR go away, a commit's statuses go away.
    s6 = await step(
        {
            f"{ALICE}/ref/heads/main/head": H3,
            f"{ALICE}/ref/heads/dev": None,
            f"{ALICE}/pr/3": None,
            f"{ALICE}/commit/{H2}": None,
        }
    )
    assert changed_keys(s5, s6) == {
        ("ref", ALICE, ("heads", "main")),
        ("ref", ALICE, ("heads", "dev")),
        ("pr", ALICE, 3),
        ("status", ALICE, H2, ("ci", "a")),
    }

    # A whole repository goes away.
    s7 = await step({f"{BOB}": None})
    assert changed_keys(s6, s7) == {("pr", BOB, 1)}

    # A change that is no change to any value: a file nobody reads.
    s8 = await step({f"{ALICE}/notes": "hello"})
    assert changed_keys(s7, s8) == set()

    # Comparing snapshots from two parsers gives the same answers.
    other = SnapshotParser()
    t1 = await other.parse(store, s1.commit)
    t6 = await other.parse(store, s6.commit)
    assert changed_keys(t1, t6) == changed_keys(s1, s6)


async def test_parser_reuses_values_of_unchanged_subtrees(store: Store) -> None:
    parser = SnapshotParser()
    c1 = await put(
        store,
        {
            **pr_files(2, H1),
            **pr_files(3, H2),
            f"{ALICE}/ref/heads/main/head": H1,
            f"{ALICE}/ref/heads/feature/a/head": H2,
            f"{ALICE}/ref/heads/feature/b/head": H3,
            **status_files(H1, "ci/a", "success"),
            **status_files(H2, "ci/a", "success"),
            **pr_files(1, H3, repo=BOB),
        },
    )
    s1 = await parser.parse(store, c1)

    # Only bob/other changes: alice/proj is the very same object.
    s2 = await parser.parse(store, await put(store, {f"{BOB}/pr/1/head": H4}))
    assert s2.repos[ALICE] is s1.repos[ALICE]
    assert s2.repos[BOB] is not s1.repos[BOB]

    # Then one PR of alice/proj changes: everything else in it is reused,
    # although the previous parse did not need to look inside it.
    s3 = await parser.parse(store, await put(store, {f"{ALICE}/pr/2/head": H5}))
    assert s3.repos[ALICE] is not s1.repos[ALICE]
    assert s3.pr(ALICE, 2) == PR(ALICE, 2, H5, "open", "PR 2", "bob")
    assert s3.pr(ALICE, 3) is s1.pr(ALICE, 3)
    assert s3.refs(ALICE) is s1.refs(ALICE)
    assert s3.statuses(ALICE, H1) is s1.statuses(ALICE, H1)
    assert s3.repos[BOB] is s2.repos[BOB]

    # One branch moves: the refs beside it are the same objects.
    s4 = await parser.parse(
        store, await put(store, {f"{ALICE}/ref/heads/feature/a/head": H4})
    )
    assert s4.ref(ALICE, ("heads", "feature", "a")) == Ref(
        ALICE, ("heads", "feature", "a"), H4
    )
    for name in (("heads", "main"), ("heads", "feature", "b")):
        assert s4.ref(ALICE, name) is s1.ref(ALICE, name)

    # One commit gets a status: the other commit's statuses are reused.
    s5 = await parser.parse(
        store, await put(store, status_files(H1, "ci/b", "failure"))
    )
    assert s5.statuses(ALICE, H2) is s1.statuses(ALICE, H2)
    # The changed commit's statuses are parsed again as a whole (they are
    # few); its unchanged one reads the same, so no change is reported.
    assert s5.status(ALICE, H1, ("ci", "a")) == s1.status(ALICE, H1, ("ci", "a"))
    changed = changed_keys(s4, s5)
    assert changed is not None
    assert ("status", ALICE, H1, ("ci", "a")) not in changed

    # Going back to an old commit gives equal values (from a cache or not).
    again = await parser.parse(store, c1)
    fresh = await SnapshotParser().parse(store, c1)
    for snap in (again, fresh):
        for repo in (ALICE, BOB):
            assert snap.prs(repo) == s1.prs(repo)
            assert snap.refs(repo) == s1.refs(repo)
        assert snap.statuses(ALICE, H1) == s1.statuses(ALICE, H1)


async def test_submodule_links_are_skipped_not_read(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A submodule link where a file or directory belongs names a commit of
    another repository: it is malformed metadata, skipped with a warning
    naming its path, never a store failure that stops the snapshot."""
    outside = "3" * 40
    await git_commit_files(
        store.path,
        METADATA_BRANCH,
        {
            f"{ALICE}/.monitor": b"",
            f"{BOB}/.monitor": b"",
            **{p: f"{v}\n".encode() for p, v in _pr_texts(1, H1).items()},
            **{
                p: f"{v}\n".encode()
                for p, v in _pr_texts(9, H2).items()
                if "head" not in p
            },
            f"{ALICE}/commit/{H1}/status/ci/other/description": b"d\n",
            f"{ALICE}/commit/{H1}/status/ci/mine/state": b"success\n",
            f"{BOB}/ref/heads/main/head": f"{H1}\n".encode(),
        },
        gitlinks={
            f"{ALICE}/pr/9/head": outside,
            f"{ALICE}/commit/{H1}/status/ci/other/state": outside,
            f"{ALICE}/ref/heads/x/head": outside,
            f"{BOB}/pr": outside,
        },
    )
    caplog.set_level(logging.WARNING, "kitci.metadata")
    snap = await snapshot(store)

    assert set(snap.prs(ALICE)) == {1}
    assert snap.refs(ALICE) == {}
    assert set(snap.statuses(ALICE, H1)) == {("ci", "mine")}
    assert snap.prs(BOB) == {}
    assert set(snap.refs(BOB)) == {("heads", "main")}
    for path in (
        f"{ALICE}/pr/9/head",
        f"{ALICE}/commit/{H1}/status/ci/other/state",
        f"{ALICE}/ref/heads/x/head",
        f"{BOB}/pr",
    ):
        assert any(path in r.getMessage() for r in caplog.records), path


def _pr_texts(number: int, head: str) -> dict[str, str]:
    base = f"{ALICE}/pr/{number}"
    return {
        f"{base}/head": head,
        f"{base}/state": "open",
        f"{base}/owner": "bob",
        f"{base}/title": "t",
    }


async def test_a_malformed_entry_is_logged_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Parsing again after another PR changed does not repeat the warning."""
    caplog.set_level(logging.WARNING, "kitci.metadata")
    parser = SnapshotParser()
    first = await put(store, {**pr_files(1, H1), f"{ALICE}/pr/abc/head": H2})
    await parser.parse(store, first)
    second = await put(store, pr_files(1, H2))
    snap = await parser.parse(store, second)
    assert snap.pr(ALICE, 1) is not None
    warnings = [r for r in caplog.records if "alice/proj/pr/abc" in r.getMessage()]
    assert len(warnings) == 1
