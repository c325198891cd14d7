"""Live logs: growing text, followers, pending reasons, cancellation."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kitci import BuildError
from kitci.builds import LiveLog, LiveLogs


async def test_write_heading_and_timestamped_lines() -> None:
    live = LiveLog("b", "Title")
    live.heading("Title")
    live.log("Starting...")
    live.write("raw text")
    live.heading("Next")
    text = live.contents()
    assert text.startswith("=== Title\n[")
    assert "] Starting...\nraw text\n=== Next\n" in text
    assert len(live) == len(text)
    assert live.read_from(len(text) - 4) == "ext\n"


async def test_many_small_writes_are_merged() -> None:
    live = LiveLog("b", "t")
    for _ in range(100_000):
        live.write("x")
    # One chunk per 8 KiB, not one per write.
    assert len(live._chunks) < 20
    assert live.contents() == "x" * 100_000
    assert live.read_from(99_998) == "xx"


async def test_follow_sees_chunks_while_the_log_grows() -> None:
    live = LiveLog("b", "t")
    live.write("first ")
    seen: list[str] = []
    got_two = trio.Event()

    async def reader() -> None:
        async for chunk in live.follow():
            seen.append(chunk)
            if len(seen) == 2:
                got_two.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            # The reader gets what was there, then waits for more.
            await trio.testing.wait_all_tasks_blocked()
            assert seen == ["first "]
            live.write("second")
            await got_two.wait()
            assert seen == ["first ", "second"]
            # Finishing ends the iteration (the nursery can then close).
            live.write(" third")
            live.finish()
    assert "".join(seen) == "first second third"


async def test_follow_of_a_finished_log_reads_it_all_and_stops() -> None:
    live = LiveLog("b", "t")
    live.write("all")
    live.finish()
    assert [chunk async for chunk in live.follow()] == ["all"]
    with pytest.raises(BuildError, match="has finished"):
        live.write("more")


async def test_output_over_the_limit_keeps_the_head_and_a_tail() -> None:
    live = LiveLog("b", "t", max_chars=1000)
    live.write("a" * 900)
    live.write("b" * 5000)
    live.write("c" * 300)
    assert len(live) == 1000
    live.finish()
    text = live.contents()
    assert text.startswith("a" * 900 + "b" * 100)
    assert "characters omitted" in text
    # The tail (half the limit) is kept: the end of the output is shown.
    assert text.endswith("b" * 200 + "c" * 300)


async def test_pending_reasons_stack_and_announce_changes() -> None:
    live = LiveLog("b", "Compile")
    assert live.pending_reason == "Building Compile"
    first = live.pending_changed
    with live.pending("Waiting for a build slot"):
        assert first.is_set()
        assert live.pending_reason == "Waiting for a build slot"
        second = live.pending_changed
        assert not second.is_set()
        with live.pending("Waiting for a lock"):
            assert live.pending_reason == "Waiting for a lock"
        assert second.is_set()
        assert live.pending_reason == "Waiting for a build slot"
    assert live.pending_reason == "Building Compile"
    last = live.pending_changed
    live.finish()
    assert last.is_set()


async def test_pending_reasons_pop_their_own_entry_out_of_order() -> None:
    live = LiveLog("b", "t", pending="base")
    outer = live.pending("outer")
    inner = live.pending("inner")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert live.pending_reason == "inner"
    inner.__exit__(None, None, None)
    assert live.pending_reason == "base"


async def test_registry_refuses_two_live_logs_on_one_branch() -> None:
    logs = LiveLogs()
    live = logs.create("cmd-x", "Run x")
    assert logs.get("cmd-x") is live
    assert "cmd-x" in logs
    with pytest.raises(BuildError, match="cmd-x"):
        logs.create("cmd-x", "Run x again")
    live.finish()
    assert logs.get("cmd-x") is None
    assert len(logs) == 0
    # Once finished, a new log can start there.
    again = logs.create("cmd-x", "Run x again")
    assert list(logs) == ["cmd-x"]
    again.finish()


async def test_a_kept_log_stays_readable_until_replaced() -> None:
    logs = LiveLogs()
    live = logs.create("b", "t")
    live.write("could not be saved")
    live.finish(keep=True)
    assert logs.get("b") is live
    replacement = logs.create("b", "t")
    assert logs.get("b") is replacement
    # Finishing the old one again must not remove the new one.
    live.finish()
    assert logs.get("b") is replacement


def cancellable(live: LiveLog) -> bool:
    return live.can_cancel


async def test_cancel_cancels_the_steps_scope() -> None:
    logs = LiveLogs()
    scope = trio.CancelScope()
    live = logs.create("b", "t", cancel_scope=scope)
    assert cancellable(live)
    with scope:
        logs.cancel("b", "stop it")
        # Cancelling twice is harmless.
        live.cancel()
        await trio.sleep_forever()
    assert scope.cancelled_caught
    assert live.cancel_reason == "stop it"
    assert "Cancelling: stop it" in live.contents()
    assert not cancellable(live)
    live.finish()
    with pytest.raises(BuildError, match="no build is running on branch 'b'"):
        logs.cancel("b")
    with pytest.raises(BuildError, match="already finished"):
        live.cancel()


async def test_a_log_without_scope_cannot_be_cancelled() -> None:
    logs = LiveLogs()
    live = logs.create("b", "t")
    assert not cancellable(live)
    with pytest.raises(BuildError, match="cannot be cancelled"):
        logs.cancel("b")
    with pytest.raises(BuildError, match="no build is running on branch 'nope'"):
        logs.cancel("nope")
