"""The local bridge: mirror local Git repositories into `github-metadata`.

A `LocalBridge` makes one or more ordinary Git repositories on this machine
look to kitci as if they were on GitHub: their branches, tags and
`refs/pull/N/head` refs are written to the store's `github-metadata` branch
with the layout of SPEC §2, and kept up to date by polling.

The bridge owns, for each bridged repository `USER/REPO`, the files
`.monitor`, `ref/heads/...`, `ref/tags/...` and the numbered directories
under `pr/`. It never touches statuses (`commit/...`) or anything else,
and it stages only real differences, so a sync with nothing new commits
nothing.

Source repositories are read with pygit2 on a worker thread, one hop per
repository per poll: the thread opens the repository, lists its refs,
compares their fingerprint with the last one and only then reads commits.
No pygit2 object leaves that thread; it hands back plain Python values.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pygit2
import trio

from ._errors import StoreError
from ._metadata import METADATA_BRANCH
from ._model import Repo, is_valid_pr_number, is_valid_ref_name
from ._store import Store, Transaction, TreeReader

__all__ = ["LocalBridge"]

log = logging.getLogger("kitci.bridge")

_COMMIT_TITLE = "Sync local repositories"
# How many numbers to name in a commit message line before just counting.
_MAX_LISTED = 5
# GitHub logins are at most 39 characters.
_MAX_LOGIN = 39
_NOT_LOGIN = re.compile(r"[^A-Za-z0-9]+")
# The files the bridge writes in each PR's directory.
_PR_FILES = frozenset(("head", "state", "title", "owner", "base"))


class _SourceError(Exception):
    """A source repository could not be read; the message names its path."""


@dataclass(frozen=True)
class _PullRequest:
    head: str
    title: str
    owner: str


@dataclass(frozen=True)
class _Source:
    """What one source repository holds, as plain values."""

    fingerprint: str
    default_branch: str
    # Branches and tags by name parts ("heads", "main"), with commit hashes.
    refs: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    prs: Mapping[int, _PullRequest] = field(default_factory=dict)


class LocalBridge:
    """Mirror local Git repositories into the store's `github-metadata` branch.

    `repos` maps each repository name kitci should see (`Repo("alice",
    "proj")`) to the path of a local Git repository (bare or not).
    """

    def __init__(
        self, store: Store, repos: Mapping[Repo, str | os.PathLike[str]]
    ) -> None:
        for repo in repos:
            if not isinstance(repo, Repo):
                raise TypeError(f"expected a Repo as key, not {repo!r}")
        self.store = store
        self.repos: dict[Repo, Path] = {r: Path(p) for r, p in repos.items()}
        # The last successful read of each source repository.
        self._sources: dict[Repo, _Source] = {}
        # The fingerprint of each source as last mirrored into the store.
        self._synced: dict[Repo, str] = {}
        # The last error reported for each unreadable source, so a source
        # that stays broken is reported once, not at every poll.
        self._errors: dict[Repo, str] = {}

    async def sync_once(self) -> str | None:
        """Mirror every source repository into `github-metadata` now.

        Compares each readable source with the branch's current content and
        commits the differences. Returns the new commit's hash, or None when
        nothing changed. A source that cannot be read is logged as a warning
        and left as it was in the store. Raises `StoreError` when the store
        cannot be written.
        """
        return await self._sync(force=True)

    async def run(
        self,
        *,
        interval: float = 1.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Sync once, report started, then poll every `interval` seconds.

        Each poll compares a fingerprint of every source's refs with the one
        last mirrored and writes only the repositories that changed. Errors
        (an unreadable source, a store failure) are logged and retried at the
        next poll. Runs until cancelled.
        """
        if interval <= 0:
            raise ValueError(f"interval must be > 0, not {interval}")
        await self._sync_logged(force=True)
        task_status.started()
        while True:
            await trio.sleep(interval)
            await self._sync_logged(force=False)

    async def _sync_logged(self, *, force: bool) -> None:
        try:
            await self._sync(force=force)
        except StoreError as exc:
            log.warning("cannot sync local repositories into the store: %s", exc)

    async def _sync(self, *, force: bool) -> str | None:
        changed: dict[Repo, _Source] = {}
        for repo, path in self.repos.items():
            source = await self._read(repo, path)
            if source is None:
                continue
            if force or self._synced.get(repo) != source.fingerprint:
                changed[repo] = source
        if not changed:
            return None
        new = await self.store.update_branch(METADATA_BRANCH, _builder(changed))
        for repo, source in changed.items():
            self._synced[repo] = source.fingerprint
        return new

    async def _read(self, repo: Repo, path: Path) -> _Source | None:
        """Read one source (reusing the last read if its refs are unchanged)."""
        known = self._sources.get(repo)
        try:
            fresh = await trio.to_thread.run_sync(
                _read_source, repo, path, known.fingerprint if known else None
            )
        except _SourceError as exc:
            message = str(exc)
            if self._errors.get(repo) != message:
                log.warning(
                    "cannot read local repository %s (bridged as %s): %s; "
                    "retrying at every poll",
                    path,
                    repo,
                    message,
                )
            else:
                log.debug("local repository %s is still unreadable: %s", path, message)
            self._errors[repo] = message
            return None
        if self._errors.pop(repo, None) is not None:
            log.info(
                "local repository %s (bridged as %s) is readable again", path, repo
            )
        if fresh is None:
            # The refs have the fingerprint of the last read.
            assert known is not None
            return known
        self._sources[repo] = fresh
        return fresh


# Reading a source repository (on a worker thread) ----------------------------


def _read_source(repo_name: Repo, path: Path, known: str | None) -> _Source | None:
    """Read the repository at `path`; None if its refs' fingerprint is `known`.

    Runs on a worker thread; opens and frees its own pygit2 repository.
    """
    try:
        if not path.exists():
            raise _SourceError(f"{path} does not exist")
        repo = pygit2.Repository(str(path), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
    except (pygit2.GitError, OSError, ValueError) as exc:
        raise _SourceError(f"{path} is not a Git repository ({exc})") from exc
    try:
        return _read_refs(repo_name, repo, path, known)
    except (pygit2.GitError, OSError, KeyError, ValueError) as exc:
        raise _SourceError(f"cannot read the refs of {path}: {exc}") from exc
    except Exception as exc:
        # Never let a surprise in one repository stop the bridge.
        log.debug("unexpected error reading %s", path, exc_info=True)
        raise _SourceError(
            f"cannot read the refs of {path}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        repo.free()


def _read_refs(
    repo_name: Repo, repo: pygit2.Repository, path: Path, known: str | None
) -> _Source | None:
    listed: list[tuple[bytes, bytes]] = []
    for ref in repo.references.iterator():
        target = ref.raw_target
        listed.append(
            (
                ref.raw_name,
                target if isinstance(target, bytes) else str(target).encode(),
            )
        )
    listed.sort()
    head = repo.lookup_reference("HEAD").raw_target
    head_text = head if isinstance(head, bytes) else b"detached " + str(head).encode()
    digest = hashlib.sha256(head_text + b"\n")
    for raw_name, raw_target in listed:
        digest.update(raw_name + b" " + raw_target + b"\n")
    fingerprint = digest.hexdigest()
    if fingerprint == known:
        return None

    names = {raw_name for raw_name, _ in listed}
    default_branch = "master"
    if isinstance(head, bytes) and head.startswith(b"refs/heads/") and head in names:
        default_branch = head[len(b"refs/heads/") :].decode("utf-8", "replace")

    refs: dict[tuple[str, ...], str] = {}
    prs: dict[int, _PullRequest] = {}
    for raw_name, _ in listed:
        if not raw_name.startswith((b"refs/heads/", b"refs/tags/", b"refs/pull/")):
            continue
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            log.warning(
                "skipping ref %r in %s (bridged as %s): its name is not UTF-8",
                raw_name,
                path,
                repo_name,
            )
            continue
        if name.startswith("refs/pull/"):
            pr = _read_pull(repo, repo_name, path, name)
            if pr is not None:
                prs[pr[0]] = pr[1]
            continue
        parts = tuple(name[len("refs/") :].split("/"))
        if not is_valid_ref_name(parts):
            log.warning(
                "skipping ref %s in %s (bridged as %s): not a valid ref name",
                name,
                path,
                repo_name,
            )
            continue
        obj = _peel(repo, name)
        if isinstance(obj, pygit2.Commit):
            refs[parts] = str(obj.id)
        elif parts[0] == "tags":
            log.info(
                "skipping tag %s in %s (bridged as %s): it does not point at a commit",
                name,
                path,
                repo_name,
            )
        else:
            log.warning(
                "skipping branch %s in %s (bridged as %s): "
                "it does not point at a commit",
                name,
                path,
                repo_name,
            )
    return _Source(fingerprint, default_branch, refs, prs)


def _read_pull(
    repo: pygit2.Repository, repo_name: Repo, path: Path, name: str
) -> tuple[int, _PullRequest] | None:
    """Read `refs/pull/N/head` as PR N; other pull refs give None."""
    parts = name.split("/")
    if len(parts) != 4 or parts[3] != "head":
        return None
    number = parts[2]
    if not is_valid_pr_number(number):
        log.warning(
            "skipping ref %s in %s (bridged as %s): %r is not a PR number",
            name,
            path,
            repo_name,
            number,
        )
        return None
    obj = _peel(repo, name)
    if not isinstance(obj, pygit2.Commit):
        log.warning(
            "skipping PR ref %s in %s (bridged as %s): it does not point at a commit",
            name,
            path,
            repo_name,
        )
        return None
    message = obj.raw_message.decode("utf-8", "replace").strip()
    title = message.splitlines()[0].strip() if message else ""
    author = obj.author
    owner = _login(
        author.raw_name.decode("utf-8", "replace"),
        author.raw_email.decode("utf-8", "replace"),
    )
    return int(number), _PullRequest(str(obj.id), title, owner)


def _peel(repo: pygit2.Repository, name: str) -> object:
    """Return the object `name` points at, following symbolic refs and tags.

    Returns None when the ref is dangling or an object is missing.
    """
    try:
        target = repo.lookup_reference(name).resolve().target
    except (KeyError, ValueError, pygit2.GitError):
        return None
    obj: object = repo.get(target)
    for _ in range(100):
        if not isinstance(obj, pygit2.Tag):
            break
        obj = repo.get(obj.target)
    return obj


def _login(name: str, email: str) -> str:
    """Make a GitHub-login-like string from an author's name or e-mail."""
    for candidate in (name, email.split("@", 1)[0]):
        ascii_text = (
            unicodedata.normalize("NFKD", candidate).encode("ascii", "ignore").decode()
        )
        login = _NOT_LOGIN.sub("-", ascii_text).strip("-")[:_MAX_LOGIN].strip("-")
        if login:
            return login
    return "unknown"


# Writing the metadata (on the store's thread) --------------------------------


def _builder(
    sources: Mapping[Repo, _Source],
) -> Callable[[TreeReader, Transaction], str | None]:
    """Return the `update_branch` function that mirrors `sources`."""

    def build(reader: TreeReader, tx: Transaction) -> str | None:
        lines: list[str] = []
        for repo in sorted(sources):
            changes = _stage_repo(reader, tx, repo, sources[repo])
            if changes:
                lines.append(f"{repo}: {', '.join(changes)}")
        if len(tx) == 0:
            return None
        return "\n".join([_COMMIT_TITLE, "", *lines])

    return build


def _stage_repo(
    reader: TreeReader, tx: Transaction, repo: Repo, source: _Source
) -> list[str]:
    """Stage the differences between the store and `source`; describe them."""
    base = str(repo)
    changes: list[str] = []
    if not reader.exists(f"{base}/.monitor"):
        tx.write(f"{base}/.monitor", b"")
        changes.append("monitored")

    existing = _existing_refs(reader, base)
    added: list[str] = []
    updated: list[str] = []
    for name in sorted(source.refs):
        data = _line(source.refs[name])
        old = existing.get(name)
        if old != data:
            tx.write(f"{base}/ref/{'/'.join(name)}/head", data)
            (added if old is None else updated).append("/".join(name))
    removed = sorted(existing.keys() - source.refs.keys())
    for name in removed:
        tx.remove(f"{base}/ref/{'/'.join(name)}/head")
    for names, verb in (
        (added, "added"),
        (updated, "updated"),
        (["/".join(n) for n in removed], "removed"),
    ):
        if len(names) == 1:
            changes.append(f"ref {names[0]} {verb}")
        elif names:
            changes.append(f"{len(names)} refs {verb}")

    existing_prs = _existing_prs(reader, base)
    opened: list[int] = []
    changed: list[int] = []
    for number in sorted(source.prs):
        pr = source.prs[number]
        where = f"{base}/pr/{number}"
        old_files = existing_prs.get(str(number))
        files = {
            "head": pr.head,
            "state": "open",
            "title": pr.title,
            "owner": pr.owner,
            "base": source.default_branch,
        }
        differs = False
        for file, text in files.items():
            data = _line(text)
            if old_files is None or old_files.get(file) != data:
                tx.write(f"{where}/{file}", data)
                differs = True
        if old_files is None:
            opened.append(number)
        elif differs:
            changed.append(number)
    closed = sorted(
        int(n)
        for n in existing_prs
        if is_valid_pr_number(n) and int(n) not in source.prs
    )
    for number in closed:
        tx.remove(f"{base}/pr/{number}")
    for numbers, verb in ((opened, "opened"), (changed, "updated"), (closed, "closed")):
        if numbers:
            changes.append(_describe_prs(numbers, verb))
    return changes


def _existing_prs(reader: TreeReader, base: str) -> dict[str, dict[str, bytes]]:
    """Return the entries under `pr/` with the bridge's files in each.

    Reads the directory in one pass: looking each file up from the root
    would cost time proportional to the number of PRs for every file.
    """
    found: dict[str, dict[str, bytes]] = {}
    tree = reader.subtree(f"{base}/pr")
    if tree is None:
        return found
    for entry in tree:
        name = entry.name
        if name is None:
            continue
        files: dict[str, bytes] = {}
        found[name] = files
        sub = reader.repo[entry.id]
        if not isinstance(sub, pygit2.Tree):
            continue
        for file_entry in sub:
            if file_entry.name in _PR_FILES:
                blob = reader.repo[file_entry.id]
                if isinstance(blob, pygit2.Blob):
                    files[file_entry.name] = blob.data
    return found


def _existing_refs(reader: TreeReader, base: str) -> dict[tuple[str, ...], bytes]:
    """Return the `head` files under `ref/heads` and `ref/tags`, by name."""
    found: dict[tuple[str, ...], bytes] = {}

    def walk(tree: pygit2.Tree, name: tuple[str, ...]) -> None:
        for entry in tree:
            child = entry.name
            if child is None:
                continue
            obj = reader.repo[entry.id]
            if isinstance(obj, pygit2.Tree):
                walk(obj, (*name, child))
            elif child == "head" and isinstance(obj, pygit2.Blob) and len(name) >= 2:
                found[name] = obj.data

    for kind in ("heads", "tags"):
        tree = reader.subtree(f"{base}/ref/{kind}")
        if tree is not None:
            walk(tree, (kind,))
    return found


def _describe_prs(numbers: list[int], verb: str) -> str:
    if len(numbers) == 1:
        return f"PR {numbers[0]} {verb}"
    if len(numbers) <= _MAX_LISTED:
        return f"PRs {', '.join(map(str, numbers))} {verb}"
    return f"{len(numbers)} PRs {verb}"


def _line(text: str) -> bytes:
    return f"{text}\n".encode()
