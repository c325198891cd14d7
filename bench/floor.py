"""The Git floor: the least work any engine must do, in plain pygit2.

Read every target's head and PR files and the other CI's statuses from
one `github-metadata` commit, compute the same statuses as the benchmark's
jobs, and write them (3 files each, SPEC §2) in one commit built with
TreeBuilder. A second figure also writes what kitci records besides: one
commit per target on its status branch and one `commit-index` commit.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pygit2

from kitci import METADATA_BRANCH, PRTarget, RefTarget, Repo, Target, status_branch_name

from .common import memory, progress, spread
from .workload import JOBS, OTHER_CI, describe, fake_hash, status_url

__all__ = ["run_floor"]

_TREE = pygit2.enums.FileMode.TREE
_BLOB = pygit2.enums.FileMode.BLOB
_SIGNATURE = pygit2.Signature("floor", "floor@localhost", 1_700_000_000, 0)

# Changes to write: name -> file content or the changes of a sub-directory.
_Changes = dict[str, "bytes | _Changes"]
# One target as read: its id, head and the state of the other CI (or None).
_Read = tuple[Target, str, str | None]


def _text(obj: pygit2.Object) -> str:
    assert isinstance(obj, pygit2.Blob)
    return obj.data.decode("utf-8").strip()


def _subtree(tree: pygit2.Tree | None, path: str) -> pygit2.Tree | None:
    """Return the directory at `path` under `tree`, or None."""
    if tree is None or path not in tree:
        return None
    found = tree / path
    return found if isinstance(found, pygit2.Tree) else None


def _other_state(commits: pygit2.Tree | None, head: str) -> str | None:
    """Read the other CI's status on `head` (all three files); return its state."""
    where = _subtree(_subtree(commits, head), "status/" + "/".join(OTHER_CI))
    if where is None or "state" not in where:
        return None
    for name in ("description", "target_url"):
        if name in where:
            _text(where[name])
    return _text(where["state"])


def _refs(
    tree: pygit2.Tree, name: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], str]]:
    for entry in tree:
        assert entry.name is not None
        if entry.name == "head" and entry.filemode == _BLOB and name:
            yield name, _text(entry)
        elif isinstance(entry, pygit2.Tree):
            yield from _refs(entry, (*name, entry.name))


def _read_repo(r: Repo, tree: pygit2.Tree) -> Iterator[_Read]:
    commits = _subtree(tree, "commit")
    prs = _subtree(tree, "pr")
    if prs is not None:
        for pr in prs:
            if not isinstance(pr, pygit2.Tree) or pr.name is None:
                continue
            files = {
                entry.name: _text(entry) for entry in pr if entry.filemode == _BLOB
            }
            if files.get("state") != "open" or "owner" not in files:
                continue
            head = files["head"]
            yield PRTarget(r, int(pr.name)), head, _other_state(commits, head)
    refs = _subtree(tree, "ref")
    if refs is not None:
        for name, head in _refs(refs, ()):
            yield RefTarget(r, name), head, _other_state(commits, head)


def _read_all(root: pygit2.Tree) -> list[_Read]:
    found: list[_Read] = []
    for user in root:
        if not isinstance(user, pygit2.Tree):
            continue
        for tree in user:
            if isinstance(tree, pygit2.Tree) and user.name and tree.name:
                found.extend(_read_repo(Repo(user.name, tree.name), tree))
    return found


def _put(changes: _Changes, path: tuple[str, ...], data: bytes) -> None:
    node = changes
    for part in path[:-1]:
        child = node.setdefault(part, {})
        assert isinstance(child, dict)
        node = child
    node[path[-1]] = data


def _write(
    repo: pygit2.Repository,
    base: pygit2.Tree | None,
    changes: _Changes,
    blobs: dict[bytes, pygit2.Oid],
) -> pygit2.Oid:
    """Write `base` with `changes` applied; return the new tree's id."""
    builder = repo.TreeBuilder(base) if base is not None else repo.TreeBuilder()
    for name, change in changes.items():
        if isinstance(change, dict):
            old = base[name] if base is not None and name in base else None
            sub = old if isinstance(old, pygit2.Tree) else None
            builder.insert(name, _write(repo, sub, change, blobs), _TREE)
        else:
            oid = blobs.get(change)
            if oid is None:
                oid = blobs[change] = repo.create_blob(change)
            builder.insert(name, oid, _BLOB)
    return builder.write()


def _commit(
    repo: pygit2.Repository, branch: str, parent: pygit2.Commit | None, tree: pygit2.Oid
) -> pygit2.Oid:
    """Commit `tree` on `branch`, moving it from `parent` by compare-and-swap."""
    parents = [parent.id] if parent is not None else []
    oid = repo.create_commit(None, _SIGNATURE, _SIGNATURE, "Floor", tree, parents)
    name = f"refs/heads/{branch}"
    if parent is None:
        repo.create_reference_direct(name, oid, False)
    else:
        ref = repo.lookup_reference(name)
        if ref.target != parent.id:
            raise RuntimeError(f"{branch} moved while the floor was writing it")
        ref.set_target(oid)
    return oid


def _status_changes(found: list[_Read]) -> _Changes:
    changes: _Changes = {}
    for target, head, other in found:
        base = (
            target.repo.user,
            target.repo.name,
            "commit",
            head,
            "status",
            "ci",
            "datakit",
        )
        for job in JOBS:
            where = (*base, job)
            _put(changes, (*where, "state"), b"success\n")
            _put(
                changes,
                (*where, "description"),
                f"{describe(job, head, other)}\n".encode(),
            )
            _put(
                changes,
                (*where, "target_url"),
                f"{status_url(target, head, job)}\n".encode(),
            )
    return changes


def _head_commit(repo: pygit2.Repository, branch: str) -> pygit2.Commit:
    return repo.lookup_reference(f"refs/heads/{branch}").peel(pygit2.Commit)


def _write_history(repo: pygit2.Repository, found: list[_Read], metadata: str) -> None:
    """Write one status-branch commit per target, then one commit-index commit."""
    index: _Changes = {}
    blobs: dict[bytes, pygit2.Oid] = {}
    for target, head, other in found:
        jobs = repo.TreeBuilder()
        for job in JOBS:
            result = {"status": "success", "descr": describe(job, head, other)}
            output = json.dumps({"result": result, "logs": None}, separators=(",", ":"))
            job_dir = repo.TreeBuilder()
            job_dir.insert("output", repo.create_blob(output.encode()), _BLOB)
            jobs.insert(job, job_dir.write(), _TREE)
        root = repo.TreeBuilder()
        root.insert("job", jobs.write(), _TREE)
        root.insert("source-commit", repo.create_blob(head.encode()), _BLOB)
        root.insert("metadata-commit", repo.create_blob(metadata.encode()), _BLOB)
        branch = status_branch_name(target)
        state = _commit(repo, branch, None, root.write())
        sub = branch.split("-", 3)[3]
        where = (target.repo.user, target.repo.name, "commit", head, sub)
        _put(index, where, str(state).encode())
    tree = _write(repo, None, index, blobs)
    _commit(repo, "commit-index", None, tree)


def _one_change(repo: pygit2.Repository, target: PRTarget, head: str) -> float:
    """Move `target`'s head (untimed, as the bridge), then time its statuses."""
    parent = _head_commit(repo, METADATA_BRANCH)
    where = (target.repo.user, target.repo.name, "pr", str(target.number), "head")
    moved = _write(repo, parent.tree, _put_one(where, f"{head}\n".encode()), {})
    _commit(repo, METADATA_BRANCH, parent, moved)

    start = time.perf_counter()
    parent = _head_commit(repo, METADATA_BRANCH)
    tree = _subtree(parent.tree, str(target.repo))
    pr = _subtree(tree, f"pr/{target.number}")
    assert pr is not None
    files = {entry.name: _text(entry) for entry in pr}
    commits = _subtree(tree, "commit")
    found: list[_Read] = [(target, files["head"], _other_state(commits, files["head"]))]
    new = _write(repo, parent.tree, _status_changes(found), {})
    _commit(repo, METADATA_BRANCH, parent, new)
    return time.perf_counter() - start


def _put_one(path: tuple[str, ...], data: bytes) -> _Changes:
    changes: _Changes = {}
    _put(changes, path, data)
    return changes


def run_floor(store: Path, size: int, repeats: int, *, history: bool) -> dict[str, Any]:
    """Measure the floor on the store of `size` targets at `store` (modifying it).

    With `history`, also write the status branches and commit index; then,
    or if `repeats` is 0, measure the cold start only.
    """
    mode = "floor+history" if history else "floor"
    label = f"{mode} N={size}"
    before = memory()
    repo = pygit2.Repository(str(store))

    progress(f"{label}: reading every target and writing its statuses")
    start = time.perf_counter()
    parent = _head_commit(repo, METADATA_BRANCH)
    found = _read_all(parent.tree)
    read = time.perf_counter()
    tree = _write(repo, parent.tree, _status_changes(found), {})
    new = _commit(repo, METADATA_BRANCH, parent, tree)
    written = time.perf_counter()
    if history:
        _write_history(repo, found, str(new))
    end = time.perf_counter()
    after = memory()
    result: dict[str, Any] = {
        "mode": mode,
        "targets": len(found),
        "statuses": len(found) * len(JOBS),
        "cold_s": end - start,
        "read_s": read - start,
        "write_s": written - read,
        "history_s": end - written,
        "rss_before": before["rss"],
        "rss_after": after["rss"],
        "peak_rss": after["peak"],
    }
    if history or not repeats:
        return result

    progress(f"{label}: {repeats} single-PR changes")
    chooser = random.Random(7)
    prs = [t for t, _, _ in found if isinstance(t, PRTarget)]
    times = []
    for i in range(repeats):
        target = chooser.choice(prs)
        times.append(_one_change(repo, target, fake_hash("floor-change", i)))
    result["change_s"] = spread(times)
    return result
