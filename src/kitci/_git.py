"""The Git plugin: fetch commits into a local clone and run commands on them.

A `GitRepo` keeps a bare clone of one source repository under a work
directory. `fetch_head` makes a commit available there (fetching the
remote's branches, tags and pull requests when it is missing), and
`run_command` runs an argument list on a checkout of a commit, with a
timeout, its output streamed into the step's live log. Both are cached
build steps (`BuildCache`), so each runs once per commit and its result is
kept in the store.

Fetched commits are pinned by refs `refs/kitci/commits/HASH` in the clone,
so a force-push upstream cannot make them vanish before their builds end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ._cache import BuildCache, BuildFailed
from ._live_log import LiveLog
from ._model import escape_name, is_valid_hash
from ._process import DEFAULT_KILL_GRACE, CommandFailed, CompletedCommand, run_process
from ._terms import Term, fail

__all__ = [
    "GitCommit",
    "GitRepo",
]

log = logging.getLogger("kitci.git")

# What a fetch brings in from the remote, kept apart from the clone's own refs.
_FETCH_REFSPECS = (
    "+refs/heads/*:refs/remotes/origin/heads/*",
    "+refs/tags/*:refs/remotes/origin/tags/*",
    "+refs/pull/*:refs/remotes/origin/pull/*",
)
_PIN_PREFIX = "refs/kitci/commits/"
# Variables that would point git at another repository than the one meant.
_GIT_REPO_VARIABLES = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
)
# Branch-name parts longer than this are cut and suffixed with a digest.
_MAX_PART = 80


@dataclass(frozen=True)
class GitCommit:
    """A commit of `repo`, available in its local clone."""

    repo: GitRepo
    hash: str

    def __str__(self) -> str:
        return self.hash


def _branch_part(text: str) -> str:
    """Escape `text` into a part of a branch name: `[A-Za-z0-9_]` only."""
    escaped = escape_name(text, escape_dots=True)
    if len(escaped) <= _MAX_PART:
        return escaped
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return f"{escaped[: _MAX_PART - 17]}_{digest}"


def _git_error(exc: CommandFailed) -> str:
    """Return git's first `fatal:` or `error:` line, else its last line."""
    for line in exc.tail.splitlines():
        if line.startswith(("fatal: ", "error: ")):
            return line.strip()
    return exc.last_line


def _clean_environment(base: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in _GIT_REPO_VARIABLES}
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


class GitRepo:
    """One source repository: its local clone and the steps run on it.

    Open one with `await GitRepo.open(cache, remote=..., work_dir=...)`.
    Give each `GitRepo` its own work directory.
    """

    def __init__(
        self,
        cache: BuildCache,
        *,
        name: str,
        remote: str,
        work_dir: Path,
        git_timeout: float,
        kill_grace: float,
    ) -> None:
        self.cache = cache
        self.name = name
        self.remote = remote
        self.work_dir = work_dir
        # The bare clone that fetches bring commits into.
        self.clone_dir = work_dir / "clone.git"
        # Where checkouts for commands are made (and removed).
        self.checkouts_dir = work_dir / "checkouts"
        self.git_timeout = git_timeout
        self.kill_grace = kill_grace
        self._git_env = _clean_environment(os.environ)
        # Held while fetching: two fetches into one clone fight over locks.
        self._fetch_lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<GitRepo {self.name} from {self.remote}>"

    @classmethod
    async def open(
        cls,
        cache: BuildCache,
        *,
        remote: str,
        work_dir: str | os.PathLike[str],
        name: str | None = None,
        git_timeout: float = 600.0,
        kill_grace: float = DEFAULT_KILL_GRACE,
    ) -> GitRepo:
        """Open (creating if missing) the local clone of `remote` in `work_dir`.

        `remote` is a URL or a local path; `name` (default: the last part
        of `remote`) names the repository in titles and branch names, so it
        must differ between repositories sharing `cache`. Leftover
        checkouts from an earlier run are removed. Raises `BuildError` if
        the clone cannot be created.
        """
        if not remote or remote.startswith("-"):
            raise ValueError(f"remote must be a URL or a path, not {remote!r}")

        def resolve() -> tuple[str, Path]:
            # A local path is made absolute: git runs in the clone directory.
            url = os.path.abspath(remote) if os.path.exists(remote) else remote
            return url, Path(work_dir).absolute()

        url, where = await trio.to_thread.run_sync(resolve)
        if name is None:
            name = os.path.basename(url.rstrip("/")).removesuffix(".git") or url
        repo = cls(
            cache,
            name=name,
            remote=url,
            work_dir=where,
            git_timeout=git_timeout,
            kill_grace=kill_grace,
        )
        await repo._prepare()
        return repo

    async def _prepare(self) -> None:
        def make_dirs() -> bool:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.checkouts_dir, ignore_errors=True)
            self.checkouts_dir.mkdir()
            return (self.clone_dir / "HEAD").exists()

        exists = await trio.to_thread.run_sync(make_dirs)
        if not exists:
            log.info("creating the clone of %s in %s", self.remote, self.clone_dir)
            await self._git(
                ["init", "--quiet", "--bare", str(self.clone_dir)], cwd=self.work_dir
            )
        await self._git(["config", "remote.origin.url", self.remote])
        # Pinned commits keep what builds need; never prune behind their back.
        await self._git(["config", "gc.auto", "0"])

    async def _git(
        self,
        args: Sequence[str],
        *,
        live: LiveLog | None = None,
        cwd: Path | None = None,
        check: bool = True,
        echo: bool = False,
    ) -> CompletedCommand:
        return await run_process(
            ["git", *args],
            log=live,
            echo=echo,
            cwd=self.clone_dir if cwd is None else cwd,
            env=self._git_env,
            timeout=self.git_timeout,
            kill_grace=self.kill_grace,
            check=check,
        )

    # Terms -----------------------------------------------------------------------

    def fetch_head(self, commit: str) -> Term[GitCommit]:
        """Return a term that makes `commit` available in the local clone.

        Fetches the remote's branches, tags and pull requests if the clone
        lacks the commit. Fails, saying why, if the commit is not a full
        hash, the remote cannot be fetched or does not have the commit (a
        saved failure: rebuild its log branch to try again).
        """
        if not is_valid_hash(commit):
            return fail(f"{commit!r} is not a full commit hash")
        return self.cache.term(_FetchBuilder(self), commit)

    def run_command(
        self,
        commit: GitCommit | str,
        label: str,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        fresh_clone: bool = False,
    ) -> Term[None]:
        """Return a term that runs `argv` on a checkout of `commit`, once.

        The result is cached per (repository, `label`, commit): `label`
        must identify the command. The command runs in a temporary checkout
        (a shared clone of the local one, or with `fresh_clone` a clone
        with its own objects), removed afterwards. `env` is its whole
        environment (default: kitci's own, without variables that point git
        elsewhere), plus `extra_env`. It fails with the exit status, or
        when it runs longer than `timeout` seconds (then, and on cancel, its
        process group is terminated, then killed).
        """
        if not label:
            raise ValueError("label must not be empty")
        if not argv:
            raise ValueError("argv must name a command")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {timeout}")
        hash_ = commit.hash if isinstance(commit, GitCommit) else commit
        if not is_valid_hash(hash_):
            return fail(f"{hash_!r} is not a full commit hash")
        full_env = dict(self._git_env if env is None else env)
        full_env.update(extra_env or {})
        builder = _CommandBuilder(
            self, label, tuple(argv), timeout, full_env, fresh_clone
        )
        return self.cache.term(builder, hash_)

    # Steps -----------------------------------------------------------------------

    async def _has_commit(self, commit: str) -> bool:
        done = await self._git(["cat-file", "-e", f"{commit}^{{commit}}"], check=False)
        return done.returncode == 0

    @asynccontextmanager
    async def _fetching(self, live: LiveLog) -> AsyncIterator[None]:
        """Hold the fetch lock, showing that the step waits for it."""
        if self._fetch_lock.locked():
            with live.pending(f"Waiting for another fetch from {self.name}"):
                await self._fetch_lock.acquire()
        else:
            await self._fetch_lock.acquire()
        try:
            yield
        finally:
            self._fetch_lock.release()

    async def ensure_commit(self, live: LiveLog, commit: str) -> None:
        """Make `commit` available (and pinned) in the clone, fetching if needed.

        Raises `BuildFailed` saying why when it cannot.
        """
        async with self._fetching(live):
            if await self._has_commit(commit):
                live.log(f"Commit {commit} is available locally, so not fetching")
            else:
                live.log(
                    f"Fetching the branches, tags and pull requests of {self.remote}"
                )
                log.info("fetching %s for %s", self.remote, commit)
                try:
                    await self._git(
                        ["fetch", "--no-tags", "origin", *_FETCH_REFSPECS],
                        live=live,
                        echo=True,
                    )
                except CommandFailed as exc:
                    detail = _git_error(exc) if exc.returncode is not None else ""
                    raise BuildFailed(
                        f"Cannot fetch {self.remote}: {detail or exc}"
                    ) from exc
                if not await self._has_commit(commit):
                    raise BuildFailed(
                        f"Commit {commit} is not in {self.remote} (not in any of "
                        "its branches, tags or pull requests)"
                    )
            await self._git(["update-ref", _PIN_PREFIX + commit, commit])

    @asynccontextmanager
    async def checkout(
        self, live: LiveLog, commit: str, *, fresh_clone: bool = False
    ) -> AsyncIterator[Path]:
        """Check `commit` out in a new temporary directory; remove it after.

        The commit must be available (see `ensure_commit`). The checkout is
        a clone sharing the local clone's objects, or with `fresh_clone` one
        with objects of its own.
        """
        path = Path(
            await trio.to_thread.run_sync(
                lambda: tempfile.mkdtemp(
                    prefix=f"{commit[:12]}-", dir=self.checkouts_dir
                )
            )
        )
        try:
            with live.pending(f"Checking out {commit[:12]}"):
                kind = "a fresh clone" if fresh_clone else "a shared clone"
                live.log(f"Checking out {commit} in {kind} at {path}")
                await self._git(["init", "--quiet", str(path)], live=live, cwd=path)
                if fresh_clone:
                    pin = _PIN_PREFIX + commit
                    fetch = ["fetch", "--quiet", "--no-tags", str(self.clone_dir), pin]
                    await self._git(fetch, live=live, cwd=path)
                else:
                    # What `git clone --shared` does, without its warning
                    # about cloning a repository with no branches.
                    alternates = path / ".git" / "objects" / "info" / "alternates"
                    line = f"{self.clone_dir / 'objects'}\n"
                    await trio.to_thread.run_sync(alternates.write_text, line)
                checkout = ["checkout", "--quiet", "--detach", commit]
                await self._git(checkout, live=live, cwd=path)
            yield path
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(
                    lambda: shutil.rmtree(path, ignore_errors=True)
                )


class _FetchBuilder:
    """Builds a `GitCommit` by making the commit available locally."""

    def __init__(self, repo: GitRepo) -> None:
        self.repo = repo
        self.name = f"git:{repo.name}"

    def title(self, key: str) -> str:
        return f"Fetch {key} from {self.repo.name}"

    def branch(self, key: str) -> str:
        return f"git-fetch-{_branch_part(self.repo.name)}-{key}"

    async def build(self, log: LiveLog, key: str) -> GitCommit:
        await self.repo.ensure_commit(log, key)
        return GitCommit(self.repo, key)

    def save(self, value: GitCommit) -> Mapping[str, bytes]:
        return {}

    def load(self, files: Mapping[str, bytes], key: str) -> GitCommit:
        # The commit may be gone from the clone (a new work directory):
        # commands fetch it again if so.
        return GitCommit(self.repo, key)


class _CommandBuilder:
    """Runs one command on a checkout of a commit."""

    def __init__(
        self,
        repo: GitRepo,
        label: str,
        argv: tuple[str, ...],
        timeout: float,
        env: Mapping[str, str],
        fresh_clone: bool,
    ) -> None:
        self.repo = repo
        self.label = label
        self.argv = argv
        self.timeout = timeout
        self.env = env
        self.fresh_clone = fresh_clone
        self.name = f"shell:{label}"

    def title(self, key: str) -> str:
        return f"Run {self.label} on {self.repo.name} {key}"

    def branch(self, key: str) -> str:
        return f"cmd-{_branch_part(self.label)}-{_branch_part(self.repo.name)}-{key}"

    async def build(self, log: LiveLog, key: str) -> None:
        await self.repo.ensure_commit(log, key)
        async with self.repo.checkout(log, key, fresh_clone=self.fresh_clone) as path:
            await run_process(
                self.argv,
                log=log,
                cwd=path,
                env=self.env,
                timeout=self.timeout,
                kill_grace=self.repo.kill_grace,
            )

    def save(self, value: None) -> Mapping[str, bytes]:
        return {}

    def load(self, files: Mapping[str, bytes], key: str) -> None:
        return None
