"""The Git repository that holds all of kitci's state.

This is the only module that imports pygit2. Every pygit2 call runs on a
worker thread, one at a time (a `trio.CapacityLimiter` of one guards the
repository object), so no pygit2 object is ever used by two threads at once
and the event loop never blocks on Git I/O.

Branches move only by compare-and-swap: a commit names the head it was
built on, and libgit2 refuses to move the branch if it has moved since.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import pygit2
import trio

from ._errors import ConflictError, NotARepositoryError, StoreError
from ._packs import PackWriter, maybe_merge_packs

__all__ = [
    "Store",
    "Transaction",
    "TreeReader",
]

log = logging.getLogger("kitci.store")

T = TypeVar("T")

_BLOB = pygit2.enums.FileMode.BLOB
_TREE = pygit2.enums.FileMode.TREE
# A commit writing fewer objects than this writes them loose; more go
# into one pack file (see `_packs`).
_PACK_THRESHOLD = 64
_EMPTY_TREE = bytes.fromhex("4b825dc642cb6eb9a060e54bf8d69288fbee4904")
# A ref lock file older than this was left by a writer that died.
STALE_LOCK_SECONDS = 60.0
# The default cap on libgit2's (process-wide) object cache; see Store.open.
# Measured on a 10 000-target store: no cache saves 2.5 KB of resident
# memory per job (the cache churns through far more than it keeps) and
# costs no time, since every snapshot is parsed once into Python values.
DEFAULT_GIT_OBJECT_CACHE = 0
_SIGNATURE_NAME = "kitci"
_SIGNATURE_EMAIL = "kitci@localhost"


def _split(path: str) -> tuple[str, ...]:
    parts = tuple(path.strip("/").split("/"))
    if not path.strip("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid path {path!r} in the store")
    return parts


class TreeReader:
    """Read-only access to one commit's tree, used on the store's thread.

    Instances are handed to functions run by `Store.run_sync` and
    `Store.update_branch`; they must not be kept after the function returns.
    """

    def __init__(self, repo: pygit2.Repository, tree: pygit2.Tree | None) -> None:
        self.repo = repo
        self.tree = tree
        # Directories already loaded, by path: a large directory (say, 10 000
        # PRs) is decompressed once per reader, not once per lookup.
        self._dirs: dict[tuple[str, ...], pygit2.Tree] = {}

    def _lookup(self, path: str) -> pygit2.Object | None:
        if self.tree is None:
            return None
        parts = _split(path)
        obj: pygit2.Object = self.tree
        for depth, part in enumerate(parts, 1):
            if not isinstance(obj, pygit2.Tree) or part not in obj:
                return None
            if depth == len(parts):
                return obj[part]
            prefix = parts[:depth]
            cached = self._dirs.get(prefix)
            if cached is None:
                obj = obj[part]
                if isinstance(obj, pygit2.Tree):
                    self._dirs[prefix] = obj
            else:
                obj = cached
        return obj

    def read(self, path: str) -> bytes | None:
        """Return the bytes of the file at `path`, or None if there is none."""
        obj = self._lookup(path)
        return obj.data if isinstance(obj, pygit2.Blob) else None

    def exists(self, path: str) -> bool:
        """Say whether a file or directory is at `path`."""
        return self._lookup(path) is not None

    def listdir(self, path: str = "") -> list[str]:
        """Return the names in the directory at `path` (empty if none)."""
        obj = self.tree if not path.strip("/") else self._lookup(path)
        if not isinstance(obj, pygit2.Tree):
            return []
        return [entry.name for entry in obj if entry.name is not None]

    def subtree(self, path: str) -> pygit2.Tree | None:
        """Return the tree object at `path`, or None."""
        obj = self._lookup(path)
        return obj if isinstance(obj, pygit2.Tree) else None


_NO_CHILDREN: dict[str, _Node] = {}


class _Node:
    """One directory or file of a transaction's staged changes."""

    __slots__ = ("children", "data", "replace")

    def __init__(self) -> None:
        # Start from an empty directory here instead of the parent's content.
        self.replace = False
        # New file content, or None when this node is a directory.
        self.data: bytes | None = None
        # Shared and empty until a child is added: most nodes are files.
        self.children: dict[str, _Node] = _NO_CHILDREN

    def child(self, name: str) -> _Node:
        """Return the child node `name`, adding it if needed."""
        if self.children is _NO_CHILDREN:
            self.children = {}
        return self.children.setdefault(name, _Node())


class Transaction:
    """Staged writes and removals, to be committed on top of a parent commit.

    A transaction holds plain bytes and paths only; it is applied by
    `Store.commit`, which builds the new trees on the store's thread and
    rewrites only the directories on a changed path.
    """

    def __init__(self, parent: str | None) -> None:
        self.parent = parent
        self._root = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def write(self, path: str, data: bytes | str) -> None:
        """Stage `data` as the whole content of the file at `path`.

        A file staged or stored at a parent of `path` becomes a directory.
        """
        node = self._root
        for part in _split(path):
            if node.data is not None:
                # A file on the way: it becomes a new, empty directory.
                node.data = None
                node.replace = True
            node = node.child(part)
        node.data = data.encode("utf-8") if isinstance(data, str) else data
        node.children = _NO_CHILDREN
        node.replace = True
        self._count += 1

    def remove(self, path: str) -> None:
        """Stage the removal of the file or directory at `path`.

        Removing a path that does not exist changes nothing.
        """
        parts = _split(path)
        node = self._root
        for part in parts[:-1]:
            if node.data is not None:
                # The path lies under a file staged here: it is absent.
                self._count += 1
                return
            node = node.child(part)
        if node.data is None:
            gone = _Node()
            gone.replace = True
            if node.children is _NO_CHILDREN:
                node.children = {}
            node.children[parts[-1]] = gone
        self._count += 1

    def _apply(
        self, repo: pygit2.Repository, base: pygit2.Tree | None, pack: PackWriter
    ) -> bytes:
        """Add the new trees and blobs to `pack`; return the root tree's id."""
        written = _apply_node(repo, self._root, base, pack)
        if written is None:
            return pack.tree([])
        return written[0]


def _apply_node(
    repo: pygit2.Repository, node: _Node, base: pygit2.Object | None, pack: PackWriter
) -> tuple[bytes, int] | None:
    """Add the tree (or blob) for `node` over `base` to `pack`.

    Returns the object's binary id and file mode, or None for "absent".
    """
    if node.data is not None:
        return pack.blob(node.data), _BLOB
    tree = base if isinstance(base, pygit2.Tree) and not node.replace else None
    if not node.children:
        return (tree.id.raw, _TREE) if tree is not None else None
    entries: dict[bytes, tuple[int, bytes]] = {}
    if tree is not None:
        for entry in tree:
            if entry.raw_name is not None:
                entries[entry.raw_name] = (entry.filemode, entry.id.raw)
    for name, child in node.children.items():
        old = tree[name] if tree is not None and name in tree else None
        new = _apply_node(repo, child, old, pack)
        key = name.encode("utf-8")
        if new is None:
            entries.pop(key, None)
        else:
            entries[key] = (new[1], new[0])
    if not entries:
        if base is not None and tree is None and not node.replace:
            # Only removals under a file (or other non-directory): they find
            # nothing to remove, so the file stays as it was.
            return base.id.raw, base.filemode
        return None
    return pack.tree((n, mode, oid) for n, (mode, oid) in entries.items()), _TREE


class Store:
    """A Git repository used as kitci's database.

    Open one with `await Store.open(path)`. All methods are safe to call
    from any number of Trio tasks; Git work is serialised on a worker thread.
    """

    def __init__(
        self, path: Path, repo: pygit2.Repository, poll_interval: float
    ) -> None:
        self.path = path
        # The Git directory itself (`path`, or `path/.git` if not bare); read
        # here, before any other thread can use the repository.
        self.git_dir = Path(repo.path)
        self.poll_interval = poll_interval
        self._repo = repo
        self._limiter = trio.CapacityLimiter(1)
        # Set (and replaced) whenever this store moves a branch, so that
        # waiters wake at once instead of at the next poll.
        self._moved = trio.Event()

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        poll_interval: float = 0.25,
        git_object_cache: int | None = DEFAULT_GIT_OBJECT_CACHE,
    ) -> Store:
        """Open the Git repository at `path`, creating a bare one if asked.

        Raises `NotARepositoryError` naming the path when it exists but is
        not a Git repository, or when it does not exist and `create` is
        false. `poll_interval` bounds how long a change made by another
        process goes unnoticed by `wait_for_head`.

        `git_object_cache` caps libgit2's cache of parsed Git objects, in
        bytes (default: none). That cache is shared by the whole process
        (libgit2's default is 256 MiB); kitci reads each snapshot once and
        keeps what it needs as Python values, so the cache costs memory and
        saves no time. None leaves the process's setting as it is.
        """
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, not {poll_interval}")
        if git_object_cache is not None:
            if git_object_cache < 0:
                raise ValueError(
                    f"git_object_cache must be >= 0, not {git_object_cache}"
                )
            pygit2.settings.cache_max_size(git_object_cache)
        where = Path(path)
        try:
            repo = await trio.to_thread.run_sync(_open_repository, where, create)
        except (pygit2.GitError, OSError) as exc:
            raise StoreError(f"cannot open the store at {where}: {exc}") from exc
        return cls(where, repo, poll_interval)

    async def run_sync(self, fn: Callable[[pygit2.Repository], T]) -> T:
        """Run `fn(repository)` on the store's thread and return its result.

        pygit2 errors are raised as `StoreError`. Cancellation waits for
        `fn` to finish, so Git work is never abandoned half-way.
        """

        def guarded() -> T:
            try:
                return fn(self._repo)
            except (pygit2.GitError, OSError) as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc

        return await trio.to_thread.run_sync(guarded, limiter=self._limiter)

    async def head(self, branch: str) -> str | None:
        """Return the commit hash at the head of `branch`, or None."""
        return await self.run_sync(lambda repo: _branch_head(repo, branch))

    async def heads(self, prefix: str = "") -> dict[str, str]:
        """Return every branch whose name starts with `prefix`, with its head."""

        def read(repo: pygit2.Repository) -> dict[str, str]:
            out: dict[str, str] = {}
            for name in repo.raw_listall_references():
                ref = name.decode("utf-8", "replace")
                if ref.startswith("refs/heads/" + prefix):
                    head = _branch_head(repo, ref[len("refs/heads/") :])
                    if head is not None:
                        out[ref[len("refs/heads/") :]] = head
            return out

        return await self.run_sync(read)

    async def read(self, commit: str | None, fn: Callable[[TreeReader], T]) -> T:
        """Run `fn` on a reader of `commit`'s tree (empty if None)."""

        def call(repo: pygit2.Repository) -> T:
            return fn(TreeReader(repo, _commit_tree(repo, commit)))

        return await self.run_sync(call)

    async def commit(
        self,
        branch: str,
        transaction: Transaction,
        message: str,
        *,
        allow_empty: bool = False,
    ) -> str | None:
        """Commit `transaction` on `branch`, moving it from its parent.

        Returns the new commit's hash, or None when the tree would not change
        (and `allow_empty` is false). Raises `ConflictError` if the branch is
        no longer at `transaction.parent`; nothing is written then.
        """
        new = await self.run_sync(
            lambda repo: _commit(repo, branch, transaction, message, allow_empty)
        )
        if new is not None:
            self._notify()
        return new

    async def update_branch(
        self,
        branch: str,
        build: Callable[[TreeReader, Transaction], str | None],
        *,
        attempts: int = 10,
    ) -> str | None:
        """Commit the changes `build` stages on the current head of `branch`.

        `build(reader, transaction)` runs on the store's thread with the
        branch's current tree; it stages changes and returns the commit
        message, or None to commit nothing. If another writer moves the
        branch first (or holds its lock), `build` runs again on the new
        head after a short random pause, up to `attempts` times in all; the
        other writer's commit is never overwritten. Returns the new
        commit's hash, or None if nothing was committed; raises
        `ConflictError` when every attempt lost the race.
        """
        for attempt in range(1, attempts + 1):

            def run(repo: pygit2.Repository) -> str | None:
                parent = _branch_head(repo, branch)
                tx = Transaction(parent)
                message = build(TreeReader(repo, _commit_tree(repo, parent)), tx)
                if message is None:
                    return None
                return _commit(repo, branch, tx, message, allow_empty=False)

            try:
                new = await self.run_sync(run)
            except ConflictError as exc:
                if attempt == attempts:
                    raise
                log.debug("retrying commit on %s after conflict: %s", branch, exc)
                # Back off a little, at random, so that writers in step
                # (or one holding the lock) let each other through.
                await trio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.1)))
                continue
            if new is not None:
                self._notify()
            return new
        raise AssertionError("unreachable")  # pragma: no cover

    async def wait_for_head(self, branch: str, current: str | None) -> str | None:
        """Wait until `branch`'s head differs from `current`; return the new head.

        Commits made through this store wake the waiter at once; commits made
        by other processes are noticed within `poll_interval` seconds.
        """
        while True:
            moved = self._moved
            head = await self.head(branch)
            if head != current:
                return head
            with trio.move_on_after(self.poll_interval):
                await moved.wait()

    def _notify(self) -> None:
        self._moved.set()
        self._moved = trio.Event()

    def notify_external_change(self) -> None:
        """Wake `wait_for_head` waiters now (after a write outside the store)."""
        self._notify()


def _open_repository(path: Path, create: bool) -> pygit2.Repository:
    if path.is_file():
        raise NotARepositoryError(
            f"store path {path} is a file, not a Git repository; "
            "give the path of a directory"
        )
    if not path.exists():
        if not create:
            raise NotARepositoryError(
                f"store path {path} does not exist; create it with "
                f"`git init --bare {path}`"
            )
        log.info("creating a new store at %s", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return pygit2.init_repository(str(path), bare=True)
    try:
        discovered = pygit2.discover_repository(str(path))
    except pygit2.GitError:
        discovered = None
    if discovered is None or Path(discovered).resolve() not in (
        path.resolve(),
        (path / ".git").resolve(),
    ):
        if create and not any(path.iterdir()):
            log.info("creating a new store in the empty directory %s", path)
            return pygit2.init_repository(str(path), bare=True)
        raise NotARepositoryError(
            f"store path {path} is not a Git repository; create one with "
            f"`git init --bare {path}` or choose another path"
        )
    try:
        return pygit2.Repository(str(path))
    except pygit2.GitError as exc:
        raise NotARepositoryError(f"cannot open the store at {path}: {exc}") from exc


def _branch_head(repo: pygit2.Repository, branch: str) -> str | None:
    try:
        ref = repo.lookup_reference("refs/heads/" + branch)
    except KeyError:
        return None
    except pygit2.InvalidSpecError as exc:
        raise StoreError(f"invalid branch name {branch!r}: {exc}") from exc
    return str(ref.resolve().target)


def _commit_tree(repo: pygit2.Repository, commit: str | None) -> pygit2.Tree | None:
    if commit is None:
        return None
    try:
        obj = repo[commit]
    except (KeyError, ValueError) as exc:
        raise StoreError(f"commit {commit} is missing from the store") from exc
    try:
        return obj.peel(pygit2.Commit).tree
    except ValueError as exc:
        raise StoreError(f"object {commit} is not a commit") from exc


def _commit(
    repo: pygit2.Repository,
    branch: str,
    tx: Transaction,
    message: str,
    allow_empty: bool,
) -> str | None:
    with new_pack_writer(repo) as pack:
        oid = prepare_commit(repo, tx, message, allow_empty, pack)
        if oid is None:
            return None
        write_objects(repo, pack)
    move_branch(repo, branch, tx.parent, oid, message)
    return oid


def new_pack_writer(repo: pygit2.Repository) -> PackWriter:
    """Return a pack writer for `repo` (use it in a `with` block)."""
    return PackWriter(Path(repo.path) / "objects", keep=_PACK_THRESHOLD)


def prepare_commit(
    repo: pygit2.Repository,
    tx: Transaction,
    message: str,
    allow_empty: bool,
    pack: PackWriter,
) -> str | None:
    """Add `tx`'s objects and a commit of them to `pack`; return its hash.

    Returns None when the tree would not change (and not `allow_empty`).
    Nothing is written to the repository until `write_objects`.
    """
    base = _commit_tree(repo, tx.parent)
    tree = tx._apply(repo, base, pack)
    # An absent branch counts as an empty tree: creating it with nothing in
    # it is no change either.
    base_id = base.id.raw if base is not None else _EMPTY_TREE
    if tree == base_id and not allow_empty:
        return None
    parents = [bytes.fromhex(tx.parent)] if tx.parent else []
    oid = pack.commit(
        tree, parents, message, _SIGNATURE_NAME, _SIGNATURE_EMAIL, int(time.time())
    )
    return oid.hex()


def write_objects(repo: pygit2.Repository, pack: PackWriter) -> None:
    """Write `pack`'s objects: loose when they are few, else as one pack."""
    if not pack.streaming:
        for kind, data in pack.drain():
            repo.odb.write(kind, data)
        return
    git_dir = Path(repo.path)
    pack.write()
    maybe_merge_packs(git_dir)


def move_branch(
    repo: pygit2.Repository, branch: str, parent: str | None, oid: str, message: str
) -> None:
    """Move `branch` from `parent` to `oid`, or raise `ConflictError`."""
    ref_name = "refs/heads/" + branch
    target = pygit2.Oid(hex=oid)
    try:
        if parent is None:
            repo.create_reference_direct(ref_name, target, False)
        else:
            ref = repo.lookup_reference(ref_name)
            if str(ref.target) != parent:
                raise ConflictError(branch, parent, str(ref.target))
            # libgit2 moves the ref only if it still points at the target
            # this Reference object was read with (a lock-file CAS).
            ref.set_target(target, message.split("\n", 1)[0])
    except (pygit2.AlreadyExistsError, KeyError, pygit2.GitError, OSError) as exc:
        if _is_lock_error(exc) and _remove_stale_lock(repo, ref_name):
            move_branch(repo, branch, parent, oid, message)
            return
        actual = _branch_head(repo, branch)
        if actual != parent or _is_lock_error(exc):
            # Moved, or being moved by another process right now: either
            # way our commit must be rebuilt on whatever it leaves.
            raise ConflictError(branch, parent, actual) from exc
        raise StoreError(f"cannot move branch {branch!r}: {exc}") from exc


def _remove_stale_lock(repo: pygit2.Repository, ref_name: str) -> bool:
    """Remove `ref_name`'s lock file if a writer that died left it; say so.

    Git and libgit2 hold a ref's lock for milliseconds while moving it, so a
    lock older than `STALE_LOCK_SECONDS` belongs to a process that was
    killed mid-write, and would otherwise block the branch for good.
    """
    lock = Path(repo.path) / f"{ref_name}.lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    log.warning(
        "removing %s: a lock left %d s ago by a writer that did not finish",
        lock,
        age,
    )
    lock.unlink(missing_ok=True)
    return True


def _is_lock_error(exc: Exception) -> bool:
    """Say whether `exc` is libgit2 finding a ref's lock file taken.

    pygit2 raises these as plain `OSError`s with no code of their own, so
    the message is all there is to go by.
    """
    return isinstance(exc, OSError) and "lock" in str(exc)


def iter_blobs(
    repo: pygit2.Repository, tree: pygit2.Tree, prefix: str = ""
) -> Iterator[tuple[str, bytes]]:
    """Yield every file under `tree` as (path, content), depth first."""
    for entry in tree:
        name = f"{prefix}{entry.name}"
        try:
            obj = repo[entry.id]
        except KeyError as exc:
            raise StoreError(f"object {entry.id} ({name}) is missing") from exc
        if isinstance(obj, pygit2.Tree):
            yield from iter_blobs(repo, obj, name + "/")
        elif isinstance(obj, pygit2.Blob):
            yield name, obj.data


def read_files(
    repo: pygit2.Repository, tree: pygit2.Tree | None
) -> Mapping[str, bytes]:
    """Return every file of `tree` as a mapping path -> content."""
    return {} if tree is None else dict(iter_blobs(repo, tree))
