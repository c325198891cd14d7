"""The `github-metadata` branch: read it into snapshots, write statuses.

A `Snapshot` is an immutable view of one commit of the branch, parsed in
one hop on the store's thread. Parsing is incremental: a `SnapshotParser`
remembers what each Git tree parsed to, so unchanged PRs, refs and commits
(which keep their tree ids from one commit to the next) are not read again,
and `changed_keys` compares two snapshots cheaply.

Malformed entries never abort a snapshot: each is skipped (or read as the
contract says) with one log line naming its path. A store that cannot be
read (a missing object) raises `StoreError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Literal, TypeVar, cast

import pygit2

from ._errors import InvalidStatusError, StoreError
from ._model import (
    PR,
    Ref,
    Repo,
    Status,
    StatusState,
    is_valid_hash,
    is_valid_path_component,
    is_valid_pr_number,
    is_valid_ref_name,
    trim_description,
)
from ._store import Store, Transaction

__all__ = [
    "METADATA_BRANCH",
    "ReadKey",
    "RepoSnapshot",
    "Snapshot",
    "SnapshotParser",
    "changed_keys",
    "write_monitor",
    "write_status",
]

log = logging.getLogger("kitci.metadata")

METADATA_BRANCH = "github-metadata"

# What an evaluation can read from a snapshot, as a hashable key:
# ("pr", repo, number), ("ref", repo, name) or
# ("status", repo, commit, context).
ReadKey = tuple[object, ...]

_EMPTY: Mapping[object, object] = {}


class RepoSnapshot:
    """The PRs, refs and statuses of one repository in one snapshot."""

    __slots__ = ("commits", "monitored", "prs", "refs", "repo", "tree_id")

    def __init__(
        self,
        repo: Repo,
        tree_id: str | None,
        monitored: bool,
        prs: Mapping[int, PR],
        refs: Mapping[tuple[str, ...], Ref],
        commits: Mapping[str, Mapping[tuple[str, ...], Status]],
    ) -> None:
        self.repo = repo
        # The Git tree id of USER/REPO, shared by snapshots where it is
        # unchanged; None when the directory is absent.
        self.tree_id = tree_id
        self.monitored = monitored
        # Every PR, open and closed, by number.
        self.prs = prs
        # Every branch and tag, by name parts ("heads", "main").
        self.refs = refs
        # Statuses by commit hash, then by context parts.
        self.commits = commits


class Snapshot:
    """One commit of `github-metadata`, parsed. Treat it as read-only."""

    __slots__ = ("commit", "repos")

    def __init__(self, commit: str | None, repos: Mapping[Repo, RepoSnapshot]) -> None:
        self.commit = commit
        self.repos = repos

    def _repo(self, repo: Repo) -> RepoSnapshot | None:
        return self.repos.get(repo)

    def monitored_repos(self) -> list[Repo]:
        """Return the repositories that have a `.monitor` file."""
        return sorted(r for r, s in self.repos.items() if s.monitored)

    def prs(self, repo: Repo) -> Mapping[int, PR]:
        """Return every PR of `repo`, open and closed."""
        snap = self._repo(repo)
        return snap.prs if snap else cast(Mapping[int, PR], _EMPTY)

    def open_prs(self, repo: Repo) -> dict[int, PR]:
        """Return the open PRs of `repo`."""
        return {n: pr for n, pr in self.prs(repo).items() if pr.state == "open"}

    def refs(self, repo: Repo) -> Mapping[tuple[str, ...], Ref]:
        """Return every branch and tag of `repo`."""
        snap = self._repo(repo)
        return snap.refs if snap else cast(Mapping[tuple[str, ...], Ref], _EMPTY)

    def pr(self, repo: Repo, number: int) -> PR | None:
        return self.prs(repo).get(number)

    def ref(self, repo: Repo, name: tuple[str, ...]) -> Ref | None:
        return self.refs(repo).get(name)

    def statuses(self, repo: Repo, commit: str) -> Mapping[tuple[str, ...], Status]:
        """Return the statuses of `commit` in `repo`, by context."""
        snap = self._repo(repo)
        if snap is None:
            return cast(Mapping[tuple[str, ...], Status], _EMPTY)
        return snap.commits.get(commit, cast(Mapping[tuple[str, ...], Status], _EMPTY))

    def status(
        self, repo: Repo, commit: str, context: tuple[str, ...]
    ) -> Status | None:
        return self.statuses(repo, commit).get(context)

    def value(self, key: ReadKey) -> object:
        """Return what `key` reads in this snapshot (None if absent)."""
        kind, repo = key[0], cast(Repo, key[1])
        if kind == "pr":
            return self.pr(repo, cast(int, key[2]))
        if kind == "ref":
            return self.ref(repo, cast(tuple[str, ...], key[2]))
        if kind == "status":
            return self.status(repo, cast(str, key[2]), cast(tuple[str, ...], key[3]))
        raise ValueError(f"unknown read key {key!r}")


def changed_keys(old: Snapshot | None, new: Snapshot) -> set[ReadKey] | None:
    """Return the keys whose values differ between `old` and `new`.

    Returns None (meaning "everything") when there is no old snapshot.
    Unchanged repositories and commits are skipped by identity, so the cost
    is proportional to what changed.
    """
    if old is None:
        return None
    changed: set[ReadKey] = set()
    for repo in old.repos.keys() | new.repos.keys():
        before, after = old.repos.get(repo), new.repos.get(repo)
        if before is after or (before and after and before.tree_id == after.tree_id):
            continue
        b_prs = before.prs if before else {}
        a_prs = after.prs if after else {}
        if b_prs is not a_prs:
            for number in _diff_mapping(b_prs, a_prs):
                changed.add(("pr", repo, number))
        b_refs = before.refs if before else {}
        a_refs = after.refs if after else {}
        if b_refs is not a_refs:
            for name in _diff_mapping(b_refs, a_refs):
                changed.add(("ref", repo, name))
        b_commits = before.commits if before else {}
        a_commits = after.commits if after else {}
        if b_commits is not a_commits:
            for commit in _diff_mapping(b_commits, a_commits, deep=False):
                b_st = b_commits.get(commit, {})
                a_st = a_commits.get(commit, {})
                for context in _diff_mapping(b_st, a_st):
                    changed.add(("status", repo, commit, context))
    return changed


K = TypeVar("K")


def _diff_mapping(
    before: Mapping[K, object], after: Mapping[K, object], *, deep: bool = True
) -> Iterator[K]:
    for key, value in after.items():
        old = before.get(key)
        if old is not value and (not deep or old != value):
            yield key
    for key in before.keys() - after.keys():
        yield key


V = TypeVar("V")


class _Entry:
    """What one subtree of the last snapshot parsed to."""

    __slots__ = ("below", "tree_id", "value")

    def __init__(
        self, tree_id: bytes, value: object, below: dict[object, _Entry]
    ) -> None:
        # The raw Git id of the subtree (bytes, so no pygit2 object is kept).
        self.tree_id = tree_id
        self.value = value
        # The entries of the subtrees parsed to build `value`, by name.
        self.below = below


_NO_ENTRIES: dict[object, _Entry] = {}


class _Level:
    """The cache entries under one subtree: the last parse's and this one's."""

    __slots__ = ("new", "old")

    def __init__(self, old: dict[object, _Entry]) -> None:
        self.old = old
        self.new: dict[object, _Entry] = {}

    def cached(
        self, name: object, tree_id: pygit2.Oid, compute: Callable[[_Level], V]
    ) -> V:
        """Return what subtree `name` parses to, parsing it only if it changed.

        `compute` gets the level of the entries under the subtree, so that
        its own unchanged parts are reused in turn.
        """
        entry = self.old.get(name)
        if entry is None or entry.tree_id != tree_id.raw:
            below = _Level(entry.below if entry is not None else _NO_ENTRIES)
            # Most subtrees (a PR, a commit's statuses) have no entries of
            # their own: share one empty mapping instead of one each.
            entry = _Entry(tree_id.raw, compute(below), below.new or _NO_ENTRIES)
        self.new[name] = entry
        return cast(V, entry.value)


class SnapshotParser:
    """Parse `github-metadata` commits, reusing what unchanged trees gave.

    Only the store's thread may use a parser (through `parse` below). The
    parser keeps, for each subtree of the last snapshot (a repository, a
    PR, a directory of refs or of statuses), its Git tree id and what it
    parsed to. A subtree whose id did not change gives back the very same
    objects as before (the same `RepoSnapshot`, `PR`, `Ref` and `Status`),
    without being read, so comparing by identity is enough to skip it.
    """

    def __init__(self) -> None:
        # The entries of the last snapshot's repositories, by name;
        # replaced on each parse, so it never holds more than one snapshot.
        self._repos: dict[object, _Entry] = {}

    async def parse(self, store: Store, commit: str | None) -> Snapshot:
        """Read the snapshot at `commit` (an empty one for None).

        Raises `StoreError` when the commit or an object under it is
        missing or cannot be read; malformed entries are skipped and logged.
        """
        return await store.run_sync(lambda repo: self.parse_sync(repo, commit))

    def parse_sync(self, repo: pygit2.Repository, commit: str | None) -> Snapshot:
        """Like `parse`, on the store's thread (for use inside `run_sync`)."""
        level = _Level(self._repos)
        repos: dict[Repo, RepoSnapshot] = {}
        if commit is not None:
            root = _commit_root(repo, commit)
            for user, user_id in _subtrees(repo, root, ""):
                user_tree = _tree(repo, user_id)
                for name, repo_id in _subtrees(repo, user_tree, user, warn=True):
                    if not (
                        is_valid_path_component(user) and is_valid_path_component(name)
                    ):
                        continue
                    r = Repo(user, name)
                    repos[r] = level.cached(
                        r, repo_id, partial(_parse_repo, repo, r, repo_id)
                    )
        self._repos = level.new
        return Snapshot(commit, repos)


def _parse_repo(
    repo: pygit2.Repository, r: Repo, tree_id: pygit2.Oid, level: _Level
) -> RepoSnapshot:
    tree = _tree(repo, tree_id)
    base = str(r)
    monitored = False
    if ".monitor" in tree:
        monitored = tree[".monitor"].filemode in _FILE_MODES
        if monitored:
            _get(repo, tree[".monitor"].id)  # a missing object is an error
        else:
            log.warning(
                "%s/.monitor is %s, not a file; ignoring it",
                base,
                _kind(tree[".monitor"].filemode),
            )

    # Each directory is cached as a whole as well as entry by entry: an
    # unchanged `pr` or `commit` directory costs one comparison, a changed
    # one a walk over its entries' ids, and only changed entries are read.
    prs: Mapping[int, PR] = {}
    pr_tree = _child_tree(repo, tree, "pr", base)
    if pr_tree is not None:
        prs = level.cached(("pr",), pr_tree.id, partial(_parse_prs, repo, r, pr_tree))

    refs: Mapping[tuple[str, ...], Ref] = {}
    ref_tree = _child_tree(repo, tree, "ref", base)
    if ref_tree is not None:
        refs = level.cached(
            ("ref",), ref_tree.id, partial(_parse_refs, repo, r, ref_tree.id, ())
        )

    commits: Mapping[str, Mapping[tuple[str, ...], Status]] = {}
    commit_tree = _child_tree(repo, tree, "commit", base)
    if commit_tree is not None:
        commits = level.cached(
            ("commit",), commit_tree.id, partial(_parse_commits, repo, r, commit_tree)
        )
    return RepoSnapshot(r, str(tree.id), monitored, prs, refs, commits)


def _parse_prs(
    repo: pygit2.Repository, r: Repo, tree: pygit2.Tree, level: _Level
) -> Mapping[int, PR]:
    base = str(r)
    prs: dict[int, PR] = {}
    for number_text, sub_id in _subtrees(repo, tree, f"{base}/pr", warn=True):
        path = f"{base}/pr/{number_text}"
        if not is_valid_pr_number(number_text):
            _warn_once(level, path, sub_id, "PR directory name is not a PR number")
            continue
        number = int(number_text)
        pr = level.cached(
            number, sub_id, partial(_parse_pr_at, repo, r, number, sub_id, path)
        )
        if pr is not None:
            prs[number] = pr
    return prs


def _warn_once(level: _Level, path: str, tree_id: pygit2.Oid, why: str) -> None:
    """Log that `path` is skipped, unless the last parse already did.

    The decision is cached like any parse, so a malformed entry is logged
    once, not again each time its directory changes for another reason.
    """

    def warn(below: _Level) -> None:
        log.warning("skipping %s: %s", path, why)

    level.cached(("skipped", path), tree_id, warn)


def _parse_pr_at(
    repo: pygit2.Repository,
    r: Repo,
    number: int,
    tree_id: pygit2.Oid,
    path: str,
    level: _Level,
) -> PR | None:
    return _parse_pr(repo, r, number, _tree(repo, tree_id), path, level)


def _parse_commits(
    repo: pygit2.Repository, r: Repo, tree: pygit2.Tree, level: _Level
) -> Mapping[str, Mapping[tuple[str, ...], Status]]:
    where = f"{r}/commit"
    commits: dict[str, Mapping[tuple[str, ...], Status]] = {}
    for hash_text, sub_id in _subtrees(repo, tree, where, warn=True):
        path = f"{where}/{hash_text}"
        if not is_valid_hash(hash_text):
            _warn_once(level, path, sub_id, "not a commit hash")
            continue
        statuses = level.cached(
            hash_text, sub_id, partial(_parse_commit, repo, r, hash_text, sub_id, path)
        )
        if statuses:
            commits[hash_text] = statuses
    return commits


def _parse_commit(
    repo: pygit2.Repository,
    r: Repo,
    commit: str,
    tree_id: pygit2.Oid,
    path: str,
    level: _Level,
) -> Mapping[tuple[str, ...], Status]:
    status_tree = _child_tree(repo, _tree(repo, tree_id), "status", path)
    if status_tree is None:
        return {}
    # A commit's statuses are few: they are parsed again as a whole when
    # any of them changes, which keeps no cache entry per context.
    return _parse_statuses(repo, r, commit, status_tree.id, ())


def _parse_refs(
    repo: pygit2.Repository,
    r: Repo,
    tree_id: pygit2.Oid,
    name: tuple[str, ...],
    level: _Level,
) -> Mapping[tuple[str, ...], Ref]:
    """Return the refs at and under `ref/NAME`, one cache entry per level."""
    tree = _tree(repo, tree_id)
    where = "/".join((str(r), "ref", *name))
    refs: dict[tuple[str, ...], Ref] = {}
    ref = _parse_ref(repo, r, tree, name, where) if name else None
    if ref is not None:
        refs[name] = ref
    for child, sub in _subtrees(repo, tree, where):
        below = (*name, child)
        refs.update(level.cached(child, sub, partial(_parse_refs, repo, r, sub, below)))
    return refs


def _parse_statuses(
    repo: pygit2.Repository,
    r: Repo,
    commit: str,
    tree_id: pygit2.Oid,
    context: tuple[str, ...],
) -> Mapping[tuple[str, ...], Status]:
    """Return the statuses at and under `commit/HASH/status/CONTEXT`."""
    tree = _tree(repo, tree_id)
    where = "/".join((str(r), "commit", commit, "status", *context))
    statuses: dict[tuple[str, ...], Status] = {}
    status = _parse_status(repo, r, commit, tree, context, where) if context else None
    if status is not None:
        statuses[context] = status
    for child, sub in _subtrees(repo, tree, where):
        below = (*context, child)
        statuses.update(_parse_statuses(repo, r, commit, sub, below))
    return statuses


def _commit_root(repo: pygit2.Repository, commit: str) -> pygit2.Tree:
    """Return the root tree of `commit`; a missing one is a store error."""
    try:
        return repo[commit].peel(pygit2.Tree)
    except KeyError as exc:
        raise StoreError(f"commit {commit} is missing from the store") from exc
    except ValueError as exc:
        raise StoreError(f"{commit!r} is not a commit in the store: {exc}") from exc


def _get(repo: pygit2.Repository, oid: pygit2.Oid) -> pygit2.Object:
    """Look up an object; a missing one is a store error, not an absence."""
    try:
        return repo[oid]
    except KeyError as exc:
        raise StoreError(f"object {oid} is missing from the store") from exc


def _child_tree(
    repo: pygit2.Repository, tree: pygit2.Tree, name: str, path: str
) -> pygit2.Tree | None:
    """Return the directory `name` of `tree` (at `path`), or None.

    A file there is logged as malformed and read as no directory.
    """
    if name not in tree:
        return None
    entry = tree[name]
    if entry.filemode == _TREE_MODE:
        obj = _get(repo, entry.id)
        if isinstance(obj, pygit2.Tree):
            return obj
    log.warning("skipping %s/%s: a file where a directory is expected", path, name)
    return None


def _subtrees(
    repo: pygit2.Repository, tree: pygit2.Tree, path: str, *, warn: bool = False
) -> Iterator[tuple[str, pygit2.Oid]]:
    """Yield the name and id of each sub-directory of `tree` (at `path`).

    The sub-directories are not loaded: unchanged ones are never read. With
    `warn`, where only directories belong, each file is logged.
    """
    for entry in tree:
        name = entry.name
        if name is None:
            continue
        if entry.filemode != pygit2.enums.FileMode.TREE:
            if warn:
                log.warning(
                    "skipping %s/%s: a file where a directory is expected",
                    path,
                    name,
                )
            continue
        yield name, entry.id


def _tree(repo: pygit2.Repository, oid: pygit2.Oid) -> pygit2.Tree:
    """Load the directory `oid` (a missing object is a `StoreError`)."""
    obj = _get(repo, oid)
    if not isinstance(obj, pygit2.Tree):
        raise StoreError(f"object {oid} is not a directory")
    return obj


_TREE_MODE = pygit2.enums.FileMode.TREE
_FILE_MODES = frozenset(
    {pygit2.enums.FileMode.BLOB, pygit2.enums.FileMode.BLOB_EXECUTABLE}
)


def _kind(mode: int) -> str:
    """Name what a tree entry that is not a plain file is."""
    return "a directory" if mode == _TREE_MODE else "a submodule link"


def _read_text(
    repo: pygit2.Repository,
    tree: pygit2.Tree,
    name: str,
    path: str,
    *,
    strict: bool = True,
    optional: bool = False,
) -> str | None:
    """Return the stripped text of file `name` in `tree`, None when absent.

    Raises `_Malformed` when the file is a directory (unless `optional`:
    then it is read as absent, since a sub-directory of that name can
    belong to something else) or, if `strict`, not UTF-8; with `strict`
    false, bad bytes are replaced.
    """
    if name not in tree:
        return None
    entry = tree[name]
    if entry.filemode not in _FILE_MODES:
        # A directory, or a submodule link (which points outside the store,
        # so reading it would look like a missing object).
        if optional:
            return None
        raise _Malformed(f"{path}/{name} is {_kind(entry.filemode)}, not a file")
    obj = _get(repo, entry.id)
    if not isinstance(obj, pygit2.Blob):
        raise _Malformed(f"{path}/{name} is not a file")
    try:
        return obj.data.decode("utf-8").strip()
    except UnicodeDecodeError:
        if strict:
            raise _Malformed(f"{path}/{name} is not valid UTF-8") from None
        log.warning(
            "%s/%s is not valid UTF-8; reading it with replacements", path, name
        )
        return obj.data.decode("utf-8", "replace").strip()


class _Malformed(Exception):
    pass


def _parse_pr(
    repo: pygit2.Repository,
    r: Repo,
    number: int,
    tree: pygit2.Tree,
    path: str,
    level: _Level | None = None,
) -> PR | None:
    """Return the PR in `tree`, or None (logged) when it is malformed.

    `level` is not used: a PR is parsed whole, with no cached parts.
    """
    try:
        head = _read_text(repo, tree, "head", path)
        state = _read_text(repo, tree, "state", path)
        owner = _read_text(repo, tree, "owner", path)
        title = _read_text(repo, tree, "title", path, strict=False) or ""
        base = _read_text(repo, tree, "base", path, strict=False) or "master"
    except _Malformed as exc:
        log.warning("skipping PR %s: %s", path, exc)
        return None
    if head is None or state is None or owner is None:
        missing = [
            file
            for file, value in (("head", head), ("state", state), ("owner", owner))
            if value is None
        ]
        log.warning("skipping PR %s: no %s file", path, " or ".join(missing))
        return None
    if not is_valid_hash(head):
        log.warning("skipping PR %s: head %r is not a commit hash", path, head[:80])
        return None
    if state not in ("open", "closed"):
        log.error("PR %s has unknown state %r; treating it as closed", path, state[:80])
        state = "closed"
    return PR(
        r, number, head, cast(Literal["open", "closed"], state), title, owner, base
    )


def _parse_ref(
    repo: pygit2.Repository,
    r: Repo,
    tree: pygit2.Tree,
    name: tuple[str, ...],
    where: str,
) -> Ref | None:
    """Return the ref whose `head` file is in `tree`, or None (logged)."""
    if "head" not in tree or tree["head"].filemode == pygit2.enums.FileMode.TREE:
        # No ref here, only the directory of longer names (`heads/a/b`).
        return None
    try:
        head = _read_text(repo, tree, "head", where)
    except _Malformed as exc:
        log.warning("skipping ref %s: %s", where, exc)
        return None
    if head is None:
        return None
    if not is_valid_ref_name(name):
        log.warning("skipping ref %s: not a valid Git ref name", where)
        return None
    if not is_valid_hash(head):
        log.warning("skipping ref %s: head %r is not a commit hash", where, head[:80])
        return None
    return Ref(r, name, head)


def _parse_status(
    repo: pygit2.Repository,
    r: Repo,
    commit: str,
    tree: pygit2.Tree,
    context: tuple[str, ...],
    where: str,
) -> Status | None:
    """Return the status whose `state` file is in `tree`, or None (logged)."""
    if "state" not in tree or tree["state"].filemode == pygit2.enums.FileMode.TREE:
        # No status here, only the directory of longer contexts.
        return None
    try:
        state = _read_text(repo, tree, "state", where)
        descr = _read_text(
            repo, tree, "description", where, strict=False, optional=True
        )
        url = _read_text(repo, tree, "target_url", where, strict=False, optional=True)
    except _Malformed as exc:
        log.warning("skipping status %s: %s", where, exc)
        return None
    if state is None:
        return None
    try:
        value = StatusState(state)
    except ValueError:
        log.warning("skipping status %s: unknown state %r", where, state[:80])
        return None
    return Status(r, commit, context, value, descr, url or None)


# Writing ----------------------------------------------------------------------


def _status_dir(status: Status) -> str:
    repo = status.repo
    if not (is_valid_path_component(repo.user) and is_valid_path_component(repo.name)):
        raise InvalidStatusError(
            f"cannot write a status for repository {repo.user!r}/{repo.name!r}: "
            "its user and name must be non-empty and contain no '/'"
        )
    if not is_valid_hash(status.commit):
        raise InvalidStatusError(
            f"cannot write a status for {status.repo}: {status.commit!r} "
            "is not a 40-digit lower-case commit hash"
        )
    if not status.context or not all(
        is_valid_path_component(p) for p in status.context
    ):
        raise InvalidStatusError(
            f"cannot write a status for {status.repo} commit {status.commit}: "
            f"context {'/'.join(status.context)!r} is empty or has an empty, "
            "'.' or '..' part"
        )
    return "/".join(
        (str(status.repo), "commit", status.commit, "status", *status.context)
    )


def status_files(status: Status) -> dict[str, bytes | None]:
    """Return the files `write_status` would write (None: remove)."""
    where = _status_dir(status)
    try:
        state = StatusState(status.state)
    except ValueError:
        raise InvalidStatusError(
            f"cannot write a status for {status.repo} commit {status.commit}: "
            f"{status.state!r} is not one of pending, success, failure, error"
        ) from None
    descr = None if status.description is None else trim_description(status.description)
    return {
        f"{where}/state": f"{state.value}\n".encode(),
        f"{where}/description": None if descr is None else f"{descr}\n".encode(),
        f"{where}/target_url": None
        if status.target_url is None
        else f"{status.target_url.strip()}\n".encode(),
    }


def write_status(tx: Transaction, status: Status) -> None:
    """Stage `status` in `tx`, with the description trimmed to 140 characters.

    Raises `InvalidStatusError` before staging anything when the repository,
    the commit hash, the context or the state is not valid.
    """
    for path, data in status_files(status).items():
        if data is None:
            tx.remove(path)
        else:
            tx.write(path, data)


def write_monitor(tx: Transaction, repo: Repo) -> None:
    """Stage the empty `.monitor` file that marks `repo` as monitored."""
    tx.write(f"{repo}/.monitor", b"")
