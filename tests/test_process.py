"""Running commands: output into the live log, failures, timeouts, cleanup."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from kitci.builds import CommandFailed, LiveLog, run_process
from support import wait_dead


async def wait_for_text(live: LiveLog, text: str) -> None:
    with trio.fail_after(5):
        async for _ in live.follow():
            if text in live.contents():
                return
    raise AssertionError(f"{text!r} never appeared")


def pids_in(text: str) -> list[int]:
    """Return the pids the scripts below print on lines `pid N`."""
    return [int(line[4:]) for line in text.splitlines() if line.startswith("pid ")]


async def test_a_passing_command_streams_stdout_and_stderr() -> None:
    live = LiveLog("b", "t")
    done = await run_process(["sh", "-c", "echo out; echo err >&2"], log=live)
    assert done.returncode == 0
    text = live.contents()
    assert "Running sh -c 'echo out; echo err >&2'" in text
    assert "out\nerr\n" in text


async def test_a_failing_command_says_its_exit_status() -> None:
    live = LiveLog("b", "t")
    with pytest.raises(CommandFailed, match="exited with status 3") as caught:
        await run_process(["sh", "-c", "echo oops; exit 3"], log=live)
    assert caught.value.returncode == 3
    assert caught.value.last_line == "oops"
    done = await run_process(["sh", "-c", "exit 3"], check=False)
    assert done.returncode == 3


async def test_a_missing_command_fails_clearly() -> None:
    with pytest.raises(CommandFailed, match="Cannot run /no/such/command") as caught:
        await run_process(["/no/such/command", "--flag"])
    assert "No such file or directory" in str(caught.value)
    assert caught.value.returncode is None


async def test_invalid_utf8_is_replaced() -> None:
    live = LiveLog("b", "t")
    script = "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe end \\xc3\\xa9\\n')"
    await run_process([sys.executable, "-c", script], log=live, echo=False)
    assert live.contents() == "ok \ufffd\ufffd end \u00e9\n"


async def test_megabytes_of_output_are_kept() -> None:
    live = LiveLog("b", "t")
    script = "import sys\nfor i in range(100000): sys.stdout.write('%049d\\n' % i)"
    await run_process([sys.executable, "-c", script], log=live, echo=False)
    text = live.contents()
    assert len(text) == 5_000_000
    assert text.endswith(f"{99999:049d}\n")


async def test_environment_is_the_one_given() -> None:
    live = LiveLog("b", "t")
    env = {"PATH": os.environ["PATH"], "KITCI_TEST": "value from env"}
    await run_process(["sh", "-c", 'echo "[$KITCI_TEST][$HOME]"'], log=live, env=env)
    assert "[value from env][]" in live.contents()


async def test_a_timeout_kills_the_command_and_its_children() -> None:
    live = LiveLog("b", "t")
    script = "echo pid $$; sleep 30 & echo pid $!; wait"
    with pytest.raises(CommandFailed, match=r"timed out after 0\.5 s"):
        await run_process(["sh", "-c", script], log=live, timeout=0.5)
    pids = pids_in(live.contents())
    assert len(pids) == 2
    for pid in pids:
        await wait_dead(pid)


async def test_cancelling_kills_even_a_command_that_ignores_sigterm() -> None:
    live = LiveLog("b", "t")
    script = "trap '' TERM; echo pid $$; sleep 30 & echo pid $!; echo ready; wait"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_process(["sh", "-c", script], log=live, kill_grace=0.2)
            )
            await wait_for_text(live, "\nready\n")
            nursery.cancel_scope.cancel()
    text = live.contents()
    assert "Command cancelled: stopping process group" in text
    pids = pids_in(text)
    assert len(pids) == 2
    for pid in pids:
        await wait_dead(pid)


async def test_children_left_running_are_killed_when_the_command_exits() -> None:
    live = LiveLog("b", "t")
    with trio.fail_after(10):
        await run_process(["sh", "-c", "sleep 30 & echo pid $!"], log=live, echo=False)
    (pid,) = pids_in(live.contents())
    await wait_dead(pid)


async def test_output_reaches_followers_before_the_command_ends(tmp_path: Path) -> None:
    live = LiveLog("b", "t")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = f"echo first; read line < '{fifo}'; echo \"second $line\""

    async def release() -> None:
        def write() -> None:
            with open(fifo, "w") as pipe:
                pipe.write("go\n")

        await trio.to_thread.run_sync(write)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await run_process(["sh", "-c", script], log=live, echo=False)
                live.finish()

            nursery.start_soon(run)
            chunks = []
            async for chunk in live.follow():
                chunks.append(chunk)
                # The command is blocked on the fifo: let it go on.
                if chunk == "first\n":
                    nursery.start_soon(release)
    assert chunks[0] == "first\n"
    assert "".join(chunks) == "first\nsecond go\n"
