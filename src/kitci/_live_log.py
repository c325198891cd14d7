"""Live logs: the in-memory log of a build step while it runs.

A `LiveLog` belongs to one result branch (the branch its build will be
saved on). It holds a title, text that grows while the step runs, a stack
of pending reasons saying what the step is waiting for, and the cancel
scope of the step, so a user can cancel it. Readers follow the text as it
grows with `LiveLog.follow()`.

`LiveLogs` is the registry of the logs in memory, by branch: at most one
unfinished log per branch at a time.
"""

from __future__ import annotations

import bisect
import collections
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from ._errors import BuildError

__all__ = [
    "DEFAULT_MAX_CHARS",
    "LiveLog",
    "LiveLogs",
]

log = logging.getLogger("kitci.cache")

# A log keeps at most this many characters of its text in memory; beyond
# it, output is dropped except for a tail that is kept and shown at the end.
DEFAULT_MAX_CHARS = 64 * 1024 * 1024
_TAIL_CHARS = 1024 * 1024
# Small writes are merged into the last chunk up to this size, so a step
# that prints one byte at a time does not cost one string object per byte.
_MERGE_CHARS = 8192


class LiveLog:
    """The growing log of one build step, saved later on `branch`.

    Create one with `LiveLogs.create` (or directly, for a log that no
    registry needs to find). Only the task running the step writes to it;
    any number of tasks may read or follow it.
    """

    def __init__(
        self,
        branch: str,
        title: str,
        *,
        pending: str | None = None,
        cancel_scope: trio.CancelScope | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
        _registry: LiveLogs | None = None,
    ) -> None:
        if max_chars < 2:
            raise ValueError(f"max_chars must be >= 2, not {max_chars}")
        self.branch = branch
        self.title = title
        self._registry = _registry
        self._max_chars = max_chars
        self._tail_chars = min(_TAIL_CHARS, max_chars // 2)
        # The kept text, as chunks, and the offset just past each chunk (so
        # a follower at any offset finds its chunk by bisection).
        self._chunks: list[str] = []
        self._ends: list[int] = []
        # Characters dropped once the log reached `max_chars`, and the last
        # of them (up to `_tail_chars`), appended when the log finishes.
        self._dropped = 0
        self._tail: collections.deque[str] = collections.deque()
        self._tail_size = 0
        # Set (and replaced) at every write and when the log finishes.
        self._grown = trio.Event()
        # The stack of pending reasons, each with a token identifying its
        # push; the last entry is the current reason.
        self._pending: list[tuple[object, str]] = [
            (object(), pending or f"Building {title}")
        ]
        # Set (and replaced) whenever the pending reason changes, and set
        # when the log finishes.
        self._pending_changed = trio.Event()
        # The scope of the step this log belongs to; None once the step can
        # no longer be cancelled.
        self._cancel_scope = cancel_scope
        # The reason given to `cancel`, once the step was cancelled.
        self.cancel_reason: str | None = None
        self.finished = False

    def __repr__(self) -> str:
        state = "finished" if self.finished else "live"
        return f"<LiveLog {self.branch!r} {state}, {len(self)} chars>"

    def __len__(self) -> int:
        """Return how many characters the log holds now."""
        return self._ends[-1] if self._ends else 0

    # Writing ---------------------------------------------------------------------

    def write(self, text: str) -> None:
        """Append `text` to the log and wake its followers.

        Raises `BuildError` if the log has finished. Past the log's size
        limit, text is dropped except for a tail kept for the end.
        """
        if self.finished:
            raise BuildError(f"the log on branch {self.branch!r} has finished")
        if not text:
            return
        room = self._max_chars - len(self)
        if room <= 0 or self._dropped:
            self._drop(text)
            return
        if len(text) > room:
            self._drop(text[room:])
            text = text[:room]
        if self._chunks and len(self._chunks[-1]) < _MERGE_CHARS:
            self._chunks[-1] += text
            self._ends[-1] += len(text)
        else:
            self._chunks.append(text)
            self._ends.append(len(self) + len(text))
        self._wake_followers()

    def _drop(self, text: str) -> None:
        self._dropped += len(text)
        self._tail.append(text)
        self._tail_size += len(text)
        while self._tail_size - len(self._tail[0]) >= self._tail_chars:
            self._tail_size -= len(self._tail.popleft())

    def log(self, message: str) -> None:
        """Append `message` as one line stamped with the local time."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write(f"[{stamp}] {message}\n")

    def heading(self, text: str) -> None:
        """Append `text` as a heading line, after a blank line if needed."""
        self.write(("\n" if len(self) else "") + f"=== {text}\n")

    def _wake_followers(self) -> None:
        self._grown.set()
        self._grown = trio.Event()

    def finish(self, *, keep: bool = False) -> None:
        """Mark the log complete: followers end and the pending reason stops.

        The log leaves its registry, unless `keep` is true: a kept log (one
        that could not be saved) stays readable with `LiveLogs.get` until a
        new log is created on its branch. Finishing again does nothing.
        """
        if self.finished:
            return
        if self._dropped:
            kept_tail = "".join(self._tail)[-self._tail_chars :]
            omitted = self._dropped - len(kept_tail)
            note = (
                f"\n[... {omitted} characters omitted: the log is over its limit "
                f"of {self._max_chars} characters ...]\n"
            )
            self._chunks.append(note + kept_tail)
            self._ends.append(len(self) + len(note) + len(kept_tail))
            self._tail.clear()
        self.finished = True
        self._cancel_scope = None
        if self._registry is not None and not keep:
            self._registry._remove(self)
        self._wake_followers()
        self._pending_changed.set()

    # Reading ---------------------------------------------------------------------

    def contents(self) -> str:
        """Return the whole text of the log so far."""
        if len(self._chunks) > 1:
            # Merge so that repeated reads do not join the chunks again.
            self._chunks = ["".join(self._chunks)]
            self._ends = [self._ends[-1]]
        return self._chunks[0] if self._chunks else ""

    def read_from(self, offset: int) -> str:
        """Return the text from character `offset` to the current end."""
        if offset >= len(self):
            return ""
        index = bisect.bisect_right(self._ends, offset)
        start = self._ends[index] - len(self._chunks[index])
        return self._chunks[index][offset - start :] + "".join(
            self._chunks[index + 1 :]
        )

    def follow(self) -> LogFollower:
        """Return an async iterator over the log's text as it grows.

        The first chunk is everything written so far; each next one is what
        was written since, waiting for more as needed. Iteration ends once
        the log has finished and everything was read.
        """
        return LogFollower(self)

    # Pending reasons -------------------------------------------------------------

    @property
    def pending_reason(self) -> str:
        """Return what the step is waiting for now (the top of the stack)."""
        return self._pending[-1][1]

    @property
    def pending_changed(self) -> trio.Event:
        """Return an event set at the next change of `pending_reason`.

        It is also set when the log finishes. Take it again after it fired.
        """
        return self._pending_changed

    @contextmanager
    def pending(self, reason: str) -> Iterator[None]:
        """Show `reason` as the pending reason while the block runs.

        Reasons nest: on leaving, the reason that was current before (or the
        one pushed since by someone else) is shown again.
        """
        token = object()
        self._pending.append((token, reason))
        self._notify_pending()
        try:
            yield
        finally:
            for index in range(len(self._pending) - 1, 0, -1):
                if self._pending[index][0] is token:
                    del self._pending[index]
                    break
            self._notify_pending()

    def _notify_pending(self) -> None:
        if self.finished:
            return
        self._pending_changed.set()
        self._pending_changed = trio.Event()

    # Cancellation ----------------------------------------------------------------

    @property
    def can_cancel(self) -> bool:
        """Say whether `cancel` would stop the step now."""
        return (
            not self.finished
            and self._cancel_scope is not None
            and self.cancel_reason is None
        )

    def cancel(self, reason: str = "cancelled by request") -> None:
        """Cancel the step this log belongs to, noting `reason` in the log.

        Cancelling again does nothing. Raises `BuildError` naming the branch
        if the step has finished or cannot be cancelled.
        """
        if self.cancel_reason is not None and not self.finished:
            return
        if self.finished:
            raise BuildError(
                f"the build on branch {self.branch!r} has already finished"
            )
        if self._cancel_scope is None:
            raise BuildError(f"the build on branch {self.branch!r} cannot be cancelled")
        self.cancel_reason = reason
        self.log(f"Cancelling: {reason}")
        log.info("cancelling the build on %s: %s", self.branch, reason)
        self._cancel_scope.cancel()

    def _detach_cancel_scope(self) -> None:
        """Stop `cancel` from reaching the step (it is past the cancellable part)."""
        self._cancel_scope = None


class LogFollower:
    """An async iterator over the chunks of a `LiveLog` as it grows."""

    def __init__(self, live_log: LiveLog) -> None:
        self._log = live_log
        self._offset = 0

    def __aiter__(self) -> LogFollower:
        return self

    async def __anext__(self) -> str:
        while True:
            # Take the event before reading, so no write can slip between.
            grown = self._log._grown
            data = self._log.read_from(self._offset)
            if data:
                self._offset += len(data)
                await trio.lowlevel.checkpoint()
                return data
            if self._log.finished:
                raise StopAsyncIteration
            await grown.wait()


class LiveLogs:
    """The live logs in memory, by branch: at most one unfinished per branch."""

    def __init__(self) -> None:
        # Branch -> its running log, or its finished log kept because it
        # could not be saved (until a new log replaces it).
        self._logs: dict[str, LiveLog] = {}

    def __contains__(self, branch: object) -> bool:
        return branch in self._logs

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._logs))

    def __len__(self) -> int:
        return len(self._logs)

    def create(
        self,
        branch: str,
        title: str,
        *,
        pending: str | None = None,
        cancel_scope: trio.CancelScope | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> LiveLog:
        """Create and register the live log of a step saving on `branch`.

        `pending` is the reason shown while nothing more specific is pushed
        (default `Building TITLE`); `cancel_scope`, if given, is cancelled by
        `LiveLog.cancel`. Replaces a finished log kept on `branch`. Raises
        `BuildError` naming the branch if an unfinished log is already there.
        """
        existing = self._logs.get(branch)
        if existing is not None and not existing.finished:
            raise BuildError(
                f"cannot start a second live log on branch {branch!r}: one is "
                f"already active ({existing.title})"
            )
        live = LiveLog(
            branch,
            title,
            pending=pending,
            cancel_scope=cancel_scope,
            max_chars=max_chars,
            _registry=self,
        )
        self._logs[branch] = live
        return live

    def get(self, branch: str) -> LiveLog | None:
        """Return the log in memory for `branch`, or None."""
        return self._logs.get(branch)

    def cancel(self, branch: str, reason: str = "cancelled by request") -> None:
        """Cancel the step running on `branch` (see `LiveLog.cancel`).

        Cancelling again does nothing. Raises `BuildError` naming the branch
        if no step is running there or it cannot be cancelled.
        """
        live = self._logs.get(branch)
        if live is None or live.finished:
            raise BuildError(f"no build is running on branch {branch!r}")
        live.cancel(reason)

    def _remove(self, live: LiveLog) -> None:
        if self._logs.get(live.branch) is live:
            del self._logs[live.branch]
