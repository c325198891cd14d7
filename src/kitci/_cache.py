"""Cached build steps: build a value for a key once, save it on its branch.

A `Builder` says how to build a value for a key and how to save and load
it. A `BuildCache` runs builds as tasks in its own nursery (so a build
outlives the job evaluation that started it and is shared by every job
that asks for the same key), shows each build's `LiveLog` while it runs,
and then commits the result on the key's own branch of the store:

- `log`: the whole log text;
- `failure`: the failure message, if the build failed;
- `value/...`: the files the builder's `save` returned;
- `rebuild-requested`: present once someone asked for a rebuild.

Later lookups, after a restart too, load the saved result instead of
building again, unless the branch holds `rebuild-requested`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Generic, Protocol, TypeVar

import trio

from ._errors import BuildError
from ._live_log import DEFAULT_MAX_CHARS, LiveLog, LiveLogs
from ._metrics import (
    BUILD_EXCEPTIONS,
    BUILD_TIME,
    BUILDS_FAILED,
    BUILDS_IN_PROGRESS,
    BUILDS_STARTED,
    BUILDS_SUCCEEDED,
)
from ._model import is_valid_ref_name
from ._results import LiveLogRef, SavedLog
from ._store import Store, Transaction, TreeReader, read_files
from ._terms import Failed, Ok, Pending, SlowAnswer, Term, of_slow

__all__ = [
    "BuildCache",
    "BuildFailed",
    "Builder",
    "open_build_cache",
]

log = logging.getLogger("kitci.cache")

K = TypeVar("K")
V = TypeVar("V")
K_contra = TypeVar("K_contra", contravariant=True)

LOG_FILE = "log"
FAILURE_FILE = "failure"
VALUE_DIR = "value"
REBUILD_FILE = "rebuild-requested"

# Longest branch component accepted: Git needs room for ".lock" below the
# file-system limit of 255 bytes.
_MAX_COMPONENT = 200


class BuildFailed(BuildError):
    """A build step failed; the message says why and becomes the result."""


class Builder(Protocol[K_contra, V]):
    """How to build, save and load the value of a cached step for a key."""

    @property
    def name(self) -> str:
        """Name the kind of step (the `name` label of the build metrics)."""
        ...

    def title(self, key: K_contra) -> str:
        """Return a one-line title for the build of `key`."""
        ...

    def branch(self, key: K_contra) -> str:
        """Return the branch `key`'s result is saved on (a valid Git branch).

        Every key of every builder sharing a cache needs its own branch.
        """
        ...

    async def build(self, log: LiveLog, key: K_contra) -> V:
        """Build the value of `key`, writing progress to `log`.

        Raise `BuildFailed(message)` (or any exception) to fail.
        """
        ...

    def save(self, value: V) -> Mapping[str, bytes]:
        """Return the files (path under `value/` -> content) that hold `value`."""
        ...

    def load(self, files: Mapping[str, bytes], key: K_contra) -> V:
        """Rebuild the value of `key` from the files `save` returned."""
        ...


class _Entry(Generic[K, V]):
    """What the cache knows about one branch: a build running, or its result."""

    def __init__(self, builder: Builder[K, V], key: K, branch: str, title: str) -> None:
        self.builder = builder
        self.key = key
        self.branch = branch
        self.title = title
        # The live log while the build runs; None once it has ended.
        self.log: LiveLog | None = None
        # The scope the build runs in, cancelled by the log or `abandon`.
        self.scope = trio.CancelScope()
        # Set by `abandon`: the build's result must not be saved.
        self.abandoned = False
        # The result once known (built or loaded); None while building.
        self.answer: SlowAnswer[V] | None = None
        # Set when this entry is dropped or replaced (a rebuild, a cancel),
        # so that jobs holding its result evaluate again.
        self.replaced = trio.Event()

    def current(self) -> SlowAnswer[V]:
        if self.answer is not None:
            return SlowAnswer(self.answer.outcome, self.answer.logs, self.replaced)
        assert self.log is not None
        return SlowAnswer(
            Pending(self.log.pending_reason),
            LiveLogRef(self.branch),
            ready=self.log.pending_changed,
        )


def branch_name_problem(branch: str) -> str | None:
    """Say why `branch` is not a valid Git branch name, or None if it is."""
    parts = tuple(branch.split("/"))
    if not is_valid_ref_name(("heads", *parts)):
        return "Git does not accept it as a branch name"
    if branch == "@" or branch.endswith("/"):
        return "Git does not accept it as a branch name"
    if any(len(part.encode("utf-8")) > _MAX_COMPONENT for part in parts):
        return f"a part of it is longer than {_MAX_COMPONENT} bytes"
    return None


class BuildCache:
    """Runs cached build steps and remembers their results.

    Start it as a service, `await nursery.start(cache.run)`, or use
    `open_build_cache`. Builds run in the cache's own nursery: cancelling
    the service cancels every build, and saves nothing for them.
    """

    def __init__(
        self,
        store: Store,
        *,
        live_logs: LiveLogs | None = None,
        max_log_chars: int = DEFAULT_MAX_CHARS,
        max_builds: int = 4,
    ) -> None:
        if max_builds < 1:
            raise ValueError(f"max_builds must be >= 1, not {max_builds}")
        self.store = store
        # Bounds how many builds run at once; the others wait, pending with
        # "Waiting for a build slot".
        self.build_slots = trio.CapacityLimiter(max_builds)
        self.live_logs = live_logs if live_logs is not None else LiveLogs()
        self._max_log_chars = max_log_chars
        # Branch -> the build running on it or its known result. Entries of
        # builds that were abandoned or cancelled with the service go away.
        # (Results no job asked for in a while could go: they reload.)
        # TODO: evict known results nobody asked for lately; today they stay.
        self._entries: dict[str, _Entry[Any, Any]] = {}
        # Branch -> lock held while a lookup reads the store or starts a
        # build for it, so concurrent lookups share one build.
        self._locks: dict[str, trio.Lock] = {}
        # The nursery builds run in, while the service runs.
        self._nursery: trio.Nursery | None = None

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the cache's builds until cancelled.

        Raises `BuildError` if the cache is already running. On
        cancellation, every build still running is cancelled and nothing is
        saved for it; a later lookup builds it again.
        """
        if self._nursery is not None:
            raise BuildError("this build cache is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def term(self, builder: Builder[K, V], key: K) -> Term[V]:
        """Return a term whose value is `builder`'s value for `key`.

        Each evaluation returns the known result, loads it from the store,
        or starts one build (shared by every job asking at the same time)
        and is pending until it ends. The result's logs are a `SavedLog`
        with a rebuild trigger, or a `LiveLogRef` while building (or when
        the log could not be saved).
        """
        return of_slow(functools.partial(self.lookup, builder, key))

    async def lookup(self, builder: Builder[K, V], key: K) -> SlowAnswer[V]:
        """Return the current answer for `key`, starting its build if needed.

        Raises `BuildError` if the builder's branch name is not valid, or if
        a build is needed while the cache is not running.
        """
        branch = builder.branch(key)
        entry = self._entries.get(branch)
        if entry is None:
            problem = branch_name_problem(branch)
            if problem is not None:
                raise BuildError(
                    f"builder {builder.name} gave the branch name {branch!r} "
                    f"for {builder.title(key)}, but {problem}"
                )
            async with self._lock(branch):
                entry = self._entries.get(branch)
                if entry is None:
                    entry = await self._load(builder, key, branch)
                    if entry is None:
                        entry = self._start_build(builder, key, branch)
                    self._entries[branch] = entry
        return entry.current()

    @asynccontextmanager
    async def _lock(self, branch: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(branch, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(branch, None)

    def is_building(self, branch: str) -> bool:
        """Say whether a build is running on `branch`."""
        entry = self._entries.get(branch)
        return entry is not None and entry.answer is None

    def abandon(self, branch: str) -> None:
        """Cancel the build running on `branch` without saving anything.

        The engine uses this when no open target needs the build any more;
        a later lookup builds again. Abandoning a branch with no build
        running, a build that is already saving its result, or abandoning
        again does nothing.
        """
        entry = self._entries.get(branch)
        if entry is None or entry.answer is not None or entry.abandoned:
            return
        entry.abandoned = True
        entry.scope.cancel()
        log.info("abandoning the build on %s", branch)

    async def rebuild(self, branch: str) -> None:
        """Mark `branch`'s result for rebuild and build it again.

        Writes `rebuild-requested` on the branch (commit `Marked for
        rebuild`) and starts a new build at once when the cache knows the
        step (else the next lookup builds). A rebuild asked for while the
        step is building is ignored. Raises `StoreError` if the mark cannot
        be written (the result then stays as it was).
        """
        async with self._lock(branch):
            entry = self._entries.get(branch)
            if entry is not None and entry.answer is None:
                log.info("ignoring a rebuild of %s: it is building already", branch)
                return
            if entry is None:
                # Not known here (yet): mark it, so the next lookup builds.
                if await self.store.head(branch) is None:
                    raise BuildError(
                        f"there is no result on branch {branch!r} to rebuild"
                    )
                await self._mark_for_rebuild(branch)
                return
            assert entry.answer is not None
            if isinstance(entry.answer.logs, SavedLog):
                await self._mark_for_rebuild(branch)
            del self._entries[branch]
            entry.replaced.set()
            if self._nursery is not None:
                self._entries[branch] = self._start_build(
                    entry.builder, entry.key, branch
                )

    async def _mark_for_rebuild(self, branch: str) -> None:
        def mark(reader: TreeReader, tx: Transaction) -> str | None:
            tx.write(REBUILD_FILE, b"")
            return "Marked for rebuild"

        await self.store.update_branch(branch, mark)
        log.info("marked %s for rebuild", branch)

    # Loading ---------------------------------------------------------------------

    async def _load(
        self, builder: Builder[K, V], key: K, branch: str
    ) -> _Entry[K, V] | None:
        """Return the entry of the result saved on `branch`, or None to build."""
        commit = await self.store.head(branch)
        if commit is None:
            return None

        def read(reader: TreeReader) -> tuple[bool, bytes | None, Mapping[str, bytes]]:
            if reader.exists(REBUILD_FILE):
                return True, None, {}
            failure = reader.read(FAILURE_FILE)
            if failure is not None:
                return False, failure, {}
            return False, None, read_files(reader.repo, reader.subtree(VALUE_DIR))

        rebuild_requested, failure, files = await self.store.read(commit, read)
        if rebuild_requested:
            log.info("%s is marked for rebuild", branch)
            return None
        entry = _Entry(builder, key, branch, builder.title(key))
        saved = self._saved_log(entry, commit, failed=failure is not None)
        if failure is not None:
            message = failure.decode("utf-8", "replace").rstrip("\n")
            entry.answer = SlowAnswer(Failed(message), saved)
        else:
            try:
                value = builder.load(files, key)
            except Exception as exc:
                log.error(
                    "cannot load the result saved on %s at %s (%s); building it again",
                    branch,
                    commit,
                    _describe(exc),
                    exc_info=exc,
                )
                return None
            entry.answer = SlowAnswer(Ok(value), saved)
        log.info("loaded the result saved on %s at %s", branch, commit)
        return entry

    def _saved_log(
        self, entry: _Entry[Any, Any], commit: str, *, failed: bool
    ) -> SavedLog:
        return SavedLog(
            entry.title,
            entry.branch,
            commit,
            failed,
            rebuild=functools.partial(self.rebuild, entry.branch),
        )

    # Building --------------------------------------------------------------------

    def _start_build(self, builder: Builder[K, V], key: K, branch: str) -> _Entry[K, V]:
        if self._nursery is None:
            raise BuildError(
                f"cannot build {builder.title(key)}: the build cache is not "
                "running (start it with `nursery.start(cache.run)`)"
            )
        entry = _Entry(builder, key, branch, builder.title(key))
        entry.log = self.live_logs.create(
            branch, entry.title, cancel_scope=entry.scope, max_chars=self._max_log_chars
        )
        self._nursery.start_soon(self._build, entry, name=f"build {branch}")
        log.info("building %s on %s", entry.title, branch)
        return entry

    async def _build(self, entry: _Entry[Any, V]) -> None:
        """Run one build, save its result and publish it (or drop it)."""
        name = entry.builder.name
        live = entry.log
        assert live is not None
        keep_log = False
        BUILDS_STARTED.labels(name).inc()
        started = trio.current_time()
        try:
            with BUILDS_IN_PROGRESS.labels(name).track_inprogress():
                live.heading(entry.title)
                live.log("Starting...")
                built = await self._run_builder(entry, live)
                live._detach_cancel_scope()
                if entry.abandoned:
                    live.log("Abandoned: nothing will be saved")
                    self._forget(entry)
                    return
                if isinstance(built, Ok):
                    live.log("Success")
                    BUILDS_SUCCEEDED.labels(name).inc()
                else:
                    live.log(f"Failed: {built.message}")
                    BUILDS_FAILED.labels(name).inc()
                entry.answer, keep_log = await self._save(entry, live, built)
                BUILD_TIME.labels(name).observe(trio.current_time() - started)
        except BaseException:
            # Cancelled with the service (or a bug): nothing was published,
            # so a later lookup builds again.
            if entry.answer is None:
                self._forget(entry)
            raise
        finally:
            entry.log = None
            live.finish(keep=keep_log)

    async def _run_builder(
        self, entry: _Entry[Any, V], live: LiveLog
    ) -> Ok[V] | Failed:
        """Run the builder in the entry's cancel scope; return what it gave."""
        built: Ok[V] | Failed | None = None
        with entry.scope:
            try:
                try:
                    self.build_slots.acquire_nowait()
                except trio.WouldBlock:
                    with live.pending("Waiting for a build slot"):
                        await self.build_slots.acquire()
                try:
                    built = Ok(await entry.builder.build(live, entry.key))
                finally:
                    self.build_slots.release()
            except BuildFailed as exc:
                built = Failed(_describe(exc))
            except Exception as exc:
                built = Failed(_describe(exc))
                BUILD_EXCEPTIONS.labels(entry.builder.name).inc()
                log.warning(
                    "the build on %s raised %s",
                    entry.branch,
                    built.message,
                    exc_info=exc,
                )
        # A cancelled build fails, even if the builder turned the
        # cancellation into an exception of its own.
        if live.cancel_reason is not None and not isinstance(built, Ok):
            return Failed(f"Build cancelled ({live.cancel_reason})")
        if built is None:
            return Failed("Build cancelled")
        return built

    async def _save(
        self, entry: _Entry[Any, V], live: LiveLog, built: Ok[V] | Failed
    ) -> tuple[SlowAnswer[V], bool]:
        """Commit the result on the entry's branch.

        Returns the answer to publish and whether to keep the live log (when
        the result could not be saved).
        """
        files: Mapping[str, bytes] = {}
        if isinstance(built, Ok):
            try:
                files = dict(entry.builder.save(built.value))
            except Exception as exc:
                built = Failed(f"Cannot save the value: {_describe(exc)}")
                live.log(f"Failed: {built.message}")
        failure = built.message if isinstance(built, Failed) else None
        text = live.contents()

        def stage(reader: TreeReader, tx: Transaction) -> str:
            for path in (REBUILD_FILE, VALUE_DIR, FAILURE_FILE):
                tx.remove(path)
            tx.write(LOG_FILE, text)
            for path, data in files.items():
                tx.write(f"{VALUE_DIR}/{path}", data)
            if failure is None:
                return "Cached successful result"
            tx.write(FAILURE_FILE, failure + "\n")
            return f"Cached failure: {failure}"

        try:
            commit = await self.store.update_branch(entry.branch, stage)
            if commit is None:
                # The branch already holds exactly this result.
                commit = await self.store.head(entry.branch)
            if commit is None:
                raise BuildError(f"branch {entry.branch!r} vanished while saving")
        except Exception as exc:
            BUILD_EXCEPTIONS.labels(entry.builder.name).inc()
            reason = _describe(exc)
            log.warning(
                "cannot save the result of %s on %s: %s; keeping its log in memory",
                entry.title,
                entry.branch,
                reason,
                exc_info=exc,
            )
            live.log(f"Cannot save this log: {reason}")
            if failure is None:
                message = (
                    f"Build succeeded, but its result could not be saved: {reason}"
                )
            else:
                message = f"{failure} (and the result could not be saved: {reason})"
            return SlowAnswer(Failed(message), LiveLogRef(entry.branch)), True
        log.info(
            "saved the result of %s on %s at %s", entry.title, entry.branch, commit
        )
        saved = self._saved_log(entry, commit, failed=failure is not None)
        return SlowAnswer(built, saved), False

    def _forget(self, entry: _Entry[Any, Any]) -> None:
        if self._entries.get(entry.branch) is entry:
            del self._entries[entry.branch]
        entry.replaced.set()


@asynccontextmanager
async def open_build_cache(
    store: Store,
    *,
    live_logs: LiveLogs | None = None,
    max_log_chars: int = DEFAULT_MAX_CHARS,
    max_builds: int = 4,
) -> AsyncIterator[BuildCache]:
    """Run a `BuildCache` on `store` for the duration of the block.

    Leaving the block cancels every build still running (saving nothing).
    """
    cache = BuildCache(
        store, live_logs=live_logs, max_log_chars=max_log_chars, max_builds=max_builds
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        try:
            yield cache
        finally:
            nursery.cancel_scope.cancel()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__
