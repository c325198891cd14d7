"""Tests of per-target history (kitci._history) on real stores."""

from __future__ import annotations

from collections.abc import Mapping

import pygit2
import pytest

from conftest import ALICE, H1, H2, file_at, log, messages, sha
from kitci import (
    LiveLogRef,
    LogPair,
    Output,
    PRTarget,
    RefTarget,
    Result,
    SavedLog,
    Store,
    StoreError,
    Target,
    status_branch_name,
)
from kitci._history import (
    EMPTY_STATE,
    INDEX_BRANCH,
    HistoryState,
    builds_of_commit,
    load_states_sync,
    record_states_sync,
)

PR1 = PRTarget(ALICE, 1)
MASTER = RefTarget(ALICE, ("heads", "master"))
META = sha("metadata")

OK = Output(Result.success("ok"))
BAD = Output(Result.failure("broken"))
SAVED_A = SavedLog("Build A", "log-a", sha("a"), False)
SAVED_B = SavedLog("Build B", "log-b", sha("b"), True)


async def load(store: Store, *targets: Target) -> dict[Target, HistoryState]:
    return await store.run_sync(lambda repo: load_states_sync(repo, list(targets)))


async def record(
    store: Store,
    target: Target,
    source: str,
    outputs: Mapping[str, Output],
    previous: HistoryState | None = None,
) -> HistoryState | None:
    if previous is None:
        previous = (await load(store, target))[target]
    entry = (target, previous, source, META, outputs)
    written, _ = await store.run_sync(lambda repo: record_states_sync(repo, [entry]))
    return written.get(target)


async def test_load_without_history_is_empty(store: Store) -> None:
    assert await load(store, PR1) == {PR1: EMPTY_STATE}


async def test_round_trip(store: Store) -> None:
    outputs = {
        "build": Output(Result.success("built"), LogPair(SAVED_A, SAVED_B)),
        "test": Output(Result.pending("testing"), LiveLogRef("log-live")),
        "lint": BAD,
    }
    state = await record(store, PR1, H1, outputs)
    assert state is not None
    branch = status_branch_name(PR1)
    assert branch == "status-alice-proj-pr-1"
    assert await store.head(branch) == state.commit
    loaded = (await load(store, PR1))[PR1]
    assert loaded.commit == state.commit
    assert loaded.source_commit == H1
    assert loaded.metadata_commit == META
    assert loaded.parents == ()
    assert loaded.jobs["build"] == outputs["build"]
    assert loaded.jobs["lint"] == BAD
    # A live log cannot be restored: it reads back as no log.
    assert loaded.jobs["test"] == Output(Result.pending("testing"))
    # The files, as `git show` would print them.
    assert state.commit is not None
    assert (await file_at(store, state.commit, "source-commit") or "").strip() == H1
    assert (await file_at(store, state.commit, "metadata-commit") or "").strip() == META
    assert await file_at(store, state.commit, "job/build/output") == (
        '{"result":{"status":"success","descr":"built"},"logs":['
        f'{{"title":"Build A","branch":"log-a","commit":"{sha("a")}","failed":false}},'
        f'{{"title":"Build B","branch":"log-b","commit":"{sha("b")}","failed":true}}]}}'
    )


async def test_messages(store: Store) -> None:
    branch = status_branch_name(PR1)
    # One change: the one line.
    await record(store, PR1, H1, {"test": OK})
    # Two changes: a count with the first, a blank line, then every change.
    await record(store, PR1, H1, {"test": BAD, "build": OK})
    # Nothing changed: no commit at all.
    assert await record(store, PR1, H1, {"test": BAD, "build": OK}) is None
    # Only the source commit changed: "Update".
    await record(store, PR1, H2, {"test": BAD, "build": OK})
    # A job disappeared.
    await record(store, PR1, H2, {"test": BAD})
    assert await messages(store, branch) == [
        "Remove old job build",
        "Update",
        "2 updates (build -> ok, ...)\n\nbuild -> ok\ntest -> broken",
        "test -> ok",
    ]
    loaded = (await load(store, PR1))[PR1]
    assert set(loaded.jobs) == {"test"}
    assert loaded.source_commit == H2


async def test_message_mixes_removals_and_changes(store: Store) -> None:
    await record(store, PR1, H1, {"a": OK, "b": OK})
    await record(store, PR1, H1, {"b": BAD})
    assert (await messages(store, status_branch_name(PR1)))[0] == (
        "2 updates (Remove old job a, ...)\n\nRemove old job a\nb -> broken"
    )


async def test_stale_previous_state_is_reread(store: Store) -> None:
    """A caller holding an old state never undoes a newer commit."""
    first = await record(store, PR1, H1, {"test": OK})
    assert first is not None
    await record(store, PR1, H1, {"test": BAD})
    # Recording OK again from the stale first state is a change from BAD.
    again = await record(store, PR1, H1, {"test": OK}, previous=first)
    assert again is not None
    hashes = [h for h, _ in await log(store, status_branch_name(PR1))]
    assert again.parents == (hashes[1],)
    assert len(hashes) == 3


async def test_commit_index_and_builds_of_commit(store: Store) -> None:
    pr_state = await record(store, PR1, H1, {"test": OK})
    ref_state = await record(store, MASTER, H1, {"test": OK})
    other = await record(store, PRTarget(ALICE, 2), H2, {"test": OK})
    assert pr_state is not None
    assert ref_state is not None
    assert other is not None
    index = await store.head(INDEX_BRANCH)
    assert index is not None
    base = f"alice/proj/commit/{H1}"
    assert (await file_at(store, index, f"{base}/pr-1") or "").strip() == (
        pr_state.commit
    )
    assert (await file_at(store, index, f"{base}/ref-heads-master") or "").strip() == (
        ref_state.commit
    )
    assert await builds_of_commit(store, ALICE, H1) == {
        PR1: pr_state.commit,
        MASTER: ref_state.commit,
    }
    assert await builds_of_commit(store, ALICE, H2) == {
        PRTarget(ALICE, 2): other.commit
    }
    assert await builds_of_commit(store, ALICE, sha("none")) == {}
    # A newer state of the same source replaces the entry.
    newer = await record(store, PR1, H1, {"test": BAD})
    assert newer is not None
    assert (await builds_of_commit(store, ALICE, H1))[PR1] == newer.commit
    assert (await messages(store, INDEX_BRANCH))[0] == (
        f"Update pr-1:{H1} -> {newer.commit}"
    )


async def test_one_index_commit_for_many_targets(store: Store) -> None:
    entries = [
        (t, EMPTY_STATE, H1, META, {"test": OK})
        for t in (PR1, MASTER, RefTarget(ALICE, ("tags", "v1")))
    ]
    written, _ = await store.run_sync(lambda repo: record_states_sync(repo, entries))
    assert set(written) == {PR1, MASTER, RefTarget(ALICE, ("tags", "v1"))}
    index_log = await messages(store, INDEX_BRANCH)
    assert len(index_log) == 1
    assert index_log[0].startswith("3 updates\n\n")
    assert len(await builds_of_commit(store, ALICE, H1)) == 3


async def test_bad_output_json_is_skipped_not_fatal(store: Store) -> None:
    await record(store, PR1, H1, {"test": OK, "lint": OK})

    def corrupt(repo: pygit2.Repository) -> None:
        from kitci import Transaction
        from kitci._store import _branch_head, _commit

        branch = status_branch_name(PR1)
        tx = Transaction(_branch_head(repo, branch))
        tx.write("job/lint/output", b"{not json")
        _commit(repo, branch, tx, "corrupt", False)

    await store.run_sync(corrupt)
    loaded = (await load(store, PR1))[PR1]
    assert set(loaded.jobs) == {"test"}


async def test_missing_state_commit_is_a_store_error(store: Store) -> None:
    state = await record(store, PR1, H1, {"test": OK})
    assert state is not None
    assert state.commit is not None
    loose = store.path / "objects" / state.commit[:2] / state.commit[2:]
    loose.unlink()
    fresh = await Store.open(store.path)
    with pytest.raises(StoreError, match="status-alice-proj-pr-1"):
        await load(fresh, PR1)


async def test_loading_fills_commit_index_gaps_left_by_a_crash(store: Store) -> None:
    """States recorded on status branches but never indexed (the writer
    stopped in between) are indexed when they are loaded again."""
    pr_state = await record(store, PR1, H1, {"test": OK})
    ref_state = await record(store, MASTER, H2, {"test": OK})
    assert pr_state is not None
    assert ref_state is not None
    # As if the process had died before writing commit-index at all.
    await store.run_sync(
        lambda repo: repo.references.delete(f"refs/heads/{INDEX_BRANCH}")
    )
    assert await builds_of_commit(store, ALICE, H1) == {}

    assert (await load(store, PR1, MASTER))[PR1] == pr_state
    assert await builds_of_commit(store, ALICE, H1) == {PR1: pr_state.commit}
    assert await builds_of_commit(store, ALICE, H2) == {MASTER: ref_state.commit}

    # Nothing is missing any more, so loading again writes nothing.
    index = await store.head(INDEX_BRANCH)
    await load(store, PR1, MASTER)
    assert await store.head(INDEX_BRANCH) == index
