"""Run external commands for build steps, streaming their output to a log.

Each command runs in a process group of its own, so that on timeout or
cancellation the whole group is terminated (SIGTERM), then killed (SIGKILL)
after a short grace period: no child is left behind. Commands are argument
lists, never shell strings.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from ._cache import BuildFailed
from ._live_log import LiveLog

__all__ = [
    "CommandFailed",
    "CompletedCommand",
    "run_process",
]

logger = logging.getLogger("kitci.process")

# How much of the output is kept for error messages (the live log has it all).
_TAIL_CHARS = 4096
_READ_SIZE = 65536
DEFAULT_KILL_GRACE = 2.0


@dataclass(frozen=True)
class CompletedCommand:
    """A command that ran to its end."""

    argv: tuple[str, ...]
    # The exit status, or minus the number of the signal that killed it.
    returncode: int
    # The end of its output (stdout and stderr together), for messages.
    tail: str


class CommandFailed(BuildFailed):
    """A command could not start, exited non-zero, was killed or timed out."""

    def __init__(
        self, message: str, argv: Sequence[str], returncode: int | None, tail: str
    ) -> None:
        super().__init__(message)
        self.argv = tuple(argv)
        # The exit status (negative: killed by that signal); None if the
        # command did not start or timed out.
        self.returncode = returncode
        self.tail = tail

    @property
    def last_line(self) -> str:
        """Return the last non-blank line of the command's output, if any."""
        lines = [line.strip() for line in self.tail.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def describe_command(argv: Sequence[str], limit: int = 200) -> str:
    """Return `argv` quoted as a shell would show it, cut to `limit` chars."""
    text = shlex.join(argv)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Output:
    """Where a command's output goes: the live log, and a short tail."""

    def __init__(self, live: LiveLog | None) -> None:
        self._live = live
        self._tail = ""

    def write(self, text: str) -> None:
        if self._live is not None and not self._live.finished:
            self._live.write(text)
        self._tail = (self._tail + text)[-_TAIL_CHARS:]

    @property
    def tail(self) -> str:
        return self._tail


async def run_process(
    argv: Sequence[str],
    *,
    log: LiveLog | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    # A limit that fails the command with its own message, unlike an
    # enclosing trio.fail_after: hence the parameter ASYNC109 warns about.
    timeout: float | None = None,  # noqa: ASYNC109
    kill_grace: float = DEFAULT_KILL_GRACE,
    check: bool = True,
    echo: bool = True,
) -> CompletedCommand:
    """Run `argv` and stream its output (stdout and stderr) into `log`.

    `env` is the command's whole environment (None: kitci's own). Invalid
    UTF-8 in the output is replaced. With `echo`, a line naming the command
    goes to `log` first.

    Raises `CommandFailed` when the command cannot start, runs longer than
    `timeout` seconds, or (with `check`) exits non-zero or is killed. On
    timeout or cancellation the command's process group gets SIGTERM, then
    SIGKILL after `kill_grace` seconds; this returns (or re-raises the
    cancellation) only once the command has exited. Any process the command
    left running in its group is killed when it exits.
    """
    if not argv:
        raise ValueError("argv must name a command")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0, not {timeout}")
    args = [os.fspath(arg) for arg in argv]
    shown = describe_command(args)
    output = _Output(log)
    if log is not None and echo:
        where = f" in {cwd}" if cwd is not None else ""
        log.log(f"Running {shown}{where}")

    try:
        proc = await trio.lowlevel.open_process(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=None if cwd is None else Path(cwd),
            env=None if env is None else dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"Cannot run {shown}: {exc.strerror or exc}{where}"
        raise CommandFailed(message, args, None, "") from exc
    logger.debug("started process %d: %s", proc.pid, shown)

    try:
        with trio.move_on_after(math.inf if timeout is None else timeout) as deadline:
            await _wait_and_drain(proc, output, kill_grace)
    finally:
        if proc.returncode is None:
            # Timed out, cancelled or failed: stop the whole group, and wait
            # for it even while being cancelled.
            with trio.CancelScope(shield=True):
                if log is not None and not log.finished:
                    why = "timed out" if deadline.cancelled_caught else "cancelled"
                    log.log(f"Command {why}: stopping process group {proc.pid}")
                await _terminate(proc, kill_grace)
        with trio.CancelScope(shield=True):
            assert proc.stdout is not None
            await proc.stdout.aclose()

    if deadline.cancelled_caught:
        raise CommandFailed(
            f"Command {shown} timed out after {timeout:g} s", args, None, output.tail
        )
    returncode = proc.returncode
    assert returncode is not None
    if check and returncode != 0:
        raise CommandFailed(
            f"Command {shown} {_exit_description(returncode)}",
            args,
            returncode,
            output.tail,
        )
    return CompletedCommand(tuple(args), returncode, output.tail)


async def _wait_and_drain(
    proc: trio.Process, output: _Output, kill_grace: float
) -> None:
    """Wait for `proc` to exit and for its output to be read to the end."""
    assert proc.stdout is not None
    stdout = proc.stdout
    drained = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, stdout, output.write, drained)
        await proc.wait()
        logger.debug("process %d exited with %s", proc.pid, proc.returncode)

        # Whatever the command left running in its group would hold the
        # output pipe open (and outlive the build): kill it.
        _signal_group(proc.pid, signal.SIGKILL)
        with trio.move_on_after(kill_grace):
            await drained.wait()
        nursery.cancel_scope.cancel()


async def _pump(
    stream: trio.abc.ReceiveStream, write: Callable[[str], None], drained: trio.Event
) -> None:
    """Copy `stream` to `write` as text until end of file."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while True:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                break
            text = decoder.decode(data)
            if text:
                write(text)
        text = decoder.decode(b"", final=True)
        if text:
            write(text)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        drained.set()


async def _terminate(proc: trio.Process, kill_grace: float) -> None:
    """Stop `proc`'s process group: SIGTERM, then SIGKILL after the grace."""
    logger.info("terminating process group %d", proc.pid)
    _signal_group(proc.pid, signal.SIGTERM)
    with trio.move_on_after(kill_grace):
        await proc.wait()
    if proc.returncode is None:
        logger.warning(
            "process %d did not exit %g s after SIGTERM; killing it",
            proc.pid,
            kill_grace,
        )
    # Kill the group whether or not its leader exited: children may ignore
    # SIGTERM or outlive their parent.
    _signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        logger.warning("cannot send %s to process group %d: %s", signum.name, pgid, exc)


def _exit_description(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = str(-returncode)
    return f"was killed by signal {name}"
