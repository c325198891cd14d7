"""Per-target history: status branches and the commit index.

Each target's jobs and their outputs are recorded on the target's status
branch (see `status_branch_name`); each new state commit is listed on the
`commit-index` branch under `USER/REPO/commit/SOURCE/SUB`, so the builds of
a source commit can be found.

The functions ending in `_sync` run on the store's thread (inside
`Store.run_sync`), so a whole flush's history is written in one hop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import msgspec
import pygit2

from ._errors import ConflictError, DecodeError, InvalidNameError, StoreError
from ._model import (
    Repo,
    Target,
    parse_status_sub,
    status_branch_name,
    status_sub_name,
    trim_description,
)
from ._results import Output, decode_output, encode_output
from ._store import (
    Store,
    Transaction,
    TreeReader,
    _branch_head,
    _commit,
    _commit_tree,
    move_branch,
    new_pack_writer,
    prepare_commit,
    write_objects,
)

__all__ = [
    "INDEX_BRANCH",
    "HistoryState",
    "builds_of_commit",
    "load_states_sync",
    "one_line",
    "record_states_sync",
]

log = logging.getLogger("kitci.history")

INDEX_BRANCH = "commit-index"


class HistoryState(msgspec.Struct, frozen=True):
    """One recorded state of a target: what was tested and each job's output."""

    # The status-branch commit holding this state (None if never recorded).
    commit: str | None
    source_commit: str | None
    metadata_commit: str | None
    jobs: Mapping[str, Output]
    parents: tuple[str, ...] = ()


EMPTY_STATE = HistoryState(None, None, None, {})


def _read_state(repo: pygit2.Repository, branch: str) -> HistoryState:
    try:
        return _read_state_or_fail(repo, branch)
    except (KeyError, ValueError) as exc:
        if isinstance(exc, DecodeError):
            raise
        # A missing object: the store is broken, the history is not absent.
        raise StoreError(f"cannot read the history on {branch}: {exc!r}") from exc


def _read_state_or_fail(repo: pygit2.Repository, branch: str) -> HistoryState:
    head = _branch_head(repo, branch)
    if head is None:
        return EMPTY_STATE
    commit = repo[head].peel(pygit2.Commit)
    reader = TreeReader(repo, commit.tree)

    def text(path: str) -> str | None:
        data = reader.read(path)
        return None if data is None else data.decode("utf-8", "replace").strip()

    jobs: dict[str, Output] = {}
    for job in reader.listdir("job"):
        data = reader.read(f"job/{job}/output")
        if data is None:
            continue
        try:
            jobs[job] = decode_output(data, f"branch {branch}, file job/{job}/output")
        except DecodeError as exc:
            log.warning("%s; treating the job as never evaluated", exc)
    return HistoryState(
        head,
        text("source-commit"),
        text("metadata-commit"),
        jobs,
        tuple(str(p) for p in commit.parent_ids),
    )


def load_states_sync(
    repo: pygit2.Repository, targets: Sequence[Target]
) -> dict[Target, HistoryState]:
    """Read the latest recorded state of each target (empty if none).

    Also lists on `commit-index` any of these states it lacks: a writer
    stopped between recording a state and indexing it leaves such a gap,
    and nothing else would fill it while the state stays unchanged.
    """
    states = {t: _read_state(repo, status_branch_name(t)) for t in targets}
    index = TreeReader(repo, _commit_tree(repo, _branch_head(repo, INDEX_BRANCH)))
    missing = []
    for target, state in states.items():
        if state.commit is None or state.source_commit is None:
            continue
        path = f"{target.repo}/commit/{state.source_commit}/{status_sub_name(target)}"
        if index.read(path) is None:
            missing.append((target, state.source_commit, state.commit))
    if missing:
        log.warning(
            "adding %d states missing from %s (a writer stopped before it "
            "indexed them), first %s",
            len(missing),
            INDEX_BRANCH,
            missing[0][0],
        )
        _write_index(repo, missing)
    return states


def one_line(descr: str) -> str:
    """Return `descr` as it goes in a commit message: on one line (white space
    runs become one space) and cut to 140 characters, like a status."""
    return trim_description(" ".join(descr.split()))


def _message(changes: list[str]) -> str:
    if not changes:
        return "Update"
    if len(changes) == 1:
        return changes[0]
    lines = "\n".join(changes)
    return f"{len(changes)} updates ({changes[0]}, ...)\n\n{lines}"


def record_states_sync(
    repo: pygit2.Repository,
    records: Sequence[tuple[Target, HistoryState, str, str, Mapping[str, Output]]],
) -> tuple[dict[Target, HistoryState], set[Target]]:
    """Record new states; return the states now on the status branches, and
    the targets whose branch could not be moved (to try again later).

    Each record is (target, previous state, source commit, metadata commit,
    outputs by job). A commit is written only when an output changed, a job
    appeared or disappeared, or the source commit changed. All new state
    commits are then listed on `commit-index` in one commit.
    """
    written: dict[Target, HistoryState] = {}
    # Every new state commit goes into one pack, written once, before any
    # branch moves: a flush of thousands of targets is one file write.
    with new_pack_writer(repo) as pack:
        prepared: list[tuple[Target, str | None, str, HistoryState, str]] = []
        for target, previous, source, metadata, outputs in records:
            branch = status_branch_name(target)
            changes: list[str] = []
            tx = Transaction(_branch_head(repo, branch))
            old_jobs = (
                previous.jobs
                if previous.commit == tx.parent
                else _read_state(repo, branch).jobs
            )
            for job in sorted(old_jobs.keys() - outputs.keys()):
                changes.append(f"Remove old job {job}")
                tx.remove(f"job/{job}")
            for job, output in sorted(outputs.items()):
                data = encode_output(output)
                old = old_jobs.get(job)
                if old is None or encode_output(old) != data:
                    changes.append(f"{job} -> {one_line(output.result.descr)}")
                    tx.write(f"job/{job}/output", data)
            if (
                not changes
                and previous.source_commit == source
                and previous.commit == tx.parent
            ):
                continue
            tx.write("source-commit", source)
            tx.write("metadata-commit", metadata)
            message = _message(changes)
            new = prepare_commit(repo, tx, message, True, pack)
            assert new is not None
            state = HistoryState(
                new, source, metadata, dict(outputs), (tx.parent,) if tx.parent else ()
            )
            prepared.append((target, tx.parent, new, state, message))
        write_objects(repo, pack)

    index_entries: list[tuple[Target, str, str]] = []
    failed: set[Target] = set()
    for target, parent, new, state, message in prepared:
        try:
            move_branch(repo, status_branch_name(target), parent, new, message)
        except ConflictError as exc:
            # Only kitci writes status branches; if another writer did, leave
            # this target for a later flush, which re-reads the branch.
            log.warning("%s: history not recorded (will retry): %s", target, exc)
            failed.add(target)
            continue
        log.info("%s: recorded %s", target, message.split("\n", 1)[0])
        written[target] = state
        index_entries.append((target, state.source_commit or "", new))
    if index_entries:
        _write_index(repo, index_entries)
    return written, failed


def _write_index(
    repo: pygit2.Repository, entries: list[tuple[Target, str, str]]
) -> None:
    for attempt in range(10):
        tx = Transaction(_branch_head(repo, INDEX_BRANCH))
        lines: list[str] = []
        for target, source, state_commit in entries:
            sub = status_sub_name(target)
            tx.write(f"{target.repo}/commit/{source}/{sub}", state_commit)
            lines.append(f"Update {sub}:{source} -> {state_commit}")
        message = (
            lines[0]
            if len(lines) == 1
            else (f"{len(lines)} updates\n\n" + "\n".join(lines))
        )
        try:
            _commit(repo, INDEX_BRANCH, tx, message, allow_empty=False)
            return
        except ConflictError:
            if attempt == 9:
                raise


async def builds_of_commit(store: Store, repo: Repo, commit: str) -> dict[Target, str]:
    """Return, for each target that tested `commit`, its state commit."""

    def read(r: pygit2.Repository) -> dict[Target, str]:
        reader = TreeReader(r, _commit_tree(r, _branch_head(r, INDEX_BRANCH)))
        out: dict[Target, str] = {}
        base = f"{repo}/commit/{commit}"
        for sub in reader.listdir(base):
            data = reader.read(f"{base}/{sub}")
            if data is None:
                continue
            try:
                target = parse_status_sub(repo, sub)
            except InvalidNameError:
                log.warning(
                    "skipping %s/%s on %s: not a target", base, sub, INDEX_BRANCH
                )
                continue
            out[target] = data.decode().strip()
        return out

    return await store.run_sync(read)
