"""Tests of results, logs and outputs, and their JSON form."""

from __future__ import annotations

import pytest

import kitci
from kitci import (
    LiveLogRef,
    LogPair,
    Output,
    Result,
    SavedLog,
    StatusState,
    decode_output,
    encode_output,
)
from kitci._results import pair_logs

SAVED = SavedLog("Build", "log-1", "c" * 40, False)
FAILED = SavedLog("Test", "log-2", "d" * 40, True)
SAVED_JSON = (
    '{"title":"Build","branch":"log-1",'
    '"commit":"cccccccccccccccccccccccccccccccccccccccc","failed":false}'
)
FAILED_JSON = (
    '{"title":"Test","branch":"log-2",'
    '"commit":"dddddddddddddddddddddddddddddddddddddddd","failed":true}'
)


async def _rebuild() -> None:
    raise AssertionError("never called")


@pytest.mark.parametrize(
    ("output", "json"),
    [
        (
            Output(Result.success("All tests passed")),
            '{"result":{"status":"success","descr":"All tests passed"},"logs":null}',
        ),
        (
            Output(Result.pending("Building"), LiveLogRef("b")),
            '{"result":{"status":"pending","descr":"Building"},"logs":{"branch":"b"}}',
        ),
        (
            Output(Result.failure("Tests failed"), SAVED),
            '{"result":{"status":"failure","descr":"Tests failed"},"logs":'
            + SAVED_JSON
            + "}",
        ),
        (
            Output(Result.failure("x"), LogPair(SAVED, FAILED)),
            '{"result":{"status":"failure","descr":"x"},"logs":['
            + SAVED_JSON
            + ","
            + FAILED_JSON
            + "]}",
        ),
        # A pair with an empty side is written as the other side alone.
        (
            Output(Result.success("ok"), LogPair(None, SAVED)),
            '{"result":{"status":"success","descr":"ok"},"logs":' + SAVED_JSON + "}",
        ),
        (
            Output(Result.success("ok"), LogPair(LiveLogRef("b"), LogPair(None, None))),
            '{"result":{"status":"success","descr":"ok"},"logs":{"branch":"b"}}',
        ),
        (
            Output(Result.success('é " \\ \n')),
            '{"result":{"status":"success","descr":"é \\" \\\\ \\n"},"logs":null}',
        ),
    ],
)
def test_encode_output_exactly(output: Output, json: str) -> None:
    assert encode_output(output) == json.encode("utf-8")


@pytest.mark.parametrize(
    "output",
    [
        Output(Result.success("All tests passed")),
        Output(Result.failure("Tests failed"), SAVED),
        Output(Result.failure("x"), LogPair(SAVED, FAILED)),
        Output(Result.failure("x"), LogPair(SAVED, LogPair(FAILED, SAVED))),
        Output(Result.pending(""), None),
    ],
)
def test_decode_reverses_encode(output: Output) -> None:
    data = encode_output(output)
    decoded = decode_output(data, "status-x:job/test/output")
    assert decoded == output
    assert encode_output(decoded) == data
    assert decode_output(data.decode("utf-8")) == output


def test_live_log_reads_back_as_empty() -> None:
    data = '{"result":{"status":"pending","descr":"Building"},"logs":{"branch":"b"}}'
    assert decode_output(data) == Output(Result.pending("Building"), None)
    pair = (
        '{"result":{"status":"failure","descr":"x"},"logs":[{"branch":"b"},'
        + SAVED_JSON
        + "]}"
    )
    # The live side of a pair is dropped: the pair becomes its other side.
    assert decode_output(pair) == Output(Result.failure("x"), SAVED)
    assert decode_output(pair).logs == SAVED


def test_missing_logs_field_reads_as_empty() -> None:
    assert decode_output('{"result":{"status":"success","descr":"ok"}}') == Output(
        Result.success("ok")
    )


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "invalid JSON"),
        (b"{", "invalid JSON"),
        (b"\xff\xfe", "invalid JSON"),
        (b"[]", "'result'"),
        (b'{"logs":null}', "'result'"),
        (b'{"result":"success"}', "'result' must be an object"),
        (b'{"result":{"status":"error","descr":"x"}}', "unknown result status"),
        (b'{"result":{"status":"success"}}', "'descr'"),
        (b'{"result":{"status":"success","descr":1}}', "'descr'"),
        (b'{"result":{"status":"success","descr":""},"logs":1}', "logs must be"),
        (b'{"result":{"status":"success","descr":""},"logs":[null]}', "2 entries"),
        (
            b'{"result":{"status":"success","descr":""},"logs":{"title":"t"}}',
            "no 'branch' field",
        ),
        (
            b'{"result":{"status":"success","descr":""},"logs":'
            b'{"title":"t","branch":"b","commit":"c","failed":"no"}}',
            "wrong types",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_output_is_a_decode_error_naming_where(data: bytes, why: str) -> None:
    where = "status-alice-proj-pr-1:job/test/output"
    with pytest.raises(kitci.DecodeError) as info:
        decode_output(data, where)
    message = str(info.value)
    assert message.startswith(where + ": ")
    assert why in message
    # Our own error, with no decoder error chained to it.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


@pytest.mark.parametrize("depth", [10, 900, 990, 1000, 5000])
def test_deeply_nested_pairs_never_crash(depth: int) -> None:
    data = (
        b'{"result":{"status":"success","descr":""},"logs":'
        + b"[" * depth
        + b"null"
        + b',{"branch":"b"}]' * depth
        + b"}"
    )
    outcome: Output | kitci.DecodeError
    try:
        outcome = decode_output(data, "deep")
    except kitci.DecodeError as exc:
        outcome = exc
    if isinstance(outcome, kitci.DecodeError):
        assert str(outcome) == "deep: JSON nested too deeply"
    else:
        # Every side is empty or live: nothing is left.
        assert outcome == Output(Result.success(""))


def test_saved_log_equality_ignores_the_rebuild_trigger() -> None:
    with_trigger = SavedLog("Build", "log-1", "c" * 40, False, rebuild=_rebuild)
    assert with_trigger == SAVED
    assert hash(with_trigger) == hash(SAVED)
    assert with_trigger != SavedLog("Build", "log-1", "c" * 40, True)
    assert with_trigger != SavedLog("Other", "log-1", "c" * 40, False)
    assert {with_trigger, SAVED} == {SAVED}
    assert Output(Result.success("x"), with_trigger) == Output(
        Result.success("x"), SAVED
    )
    # The trigger is not part of the JSON.
    assert encode_output(Output(Result.success("x"), with_trigger)) == encode_output(
        Output(Result.success("x"), SAVED)
    )


def test_outputs_are_equal_when_their_json_is() -> None:
    ok = Result.success("ok")
    assert Output(ok, LogPair(None, SAVED)) == Output(ok, SAVED)
    assert Output(ok, LogPair(SAVED, None)) == Output(ok, SAVED)
    assert hash(Output(ok, LogPair(None, SAVED))) == hash(Output(ok, SAVED))
    assert Output(ok, LogPair(None, None)) == Output(ok)
    assert Output(ok, LogPair(SAVED, FAILED)) != Output(ok, LogPair(FAILED, SAVED))
    assert Output(ok, LiveLogRef("b")) != Output(ok)
    assert Output(ok) != Output(Result.failure("ok"))
    assert Output(ok) != Output(Result.success("ok "))
    assert Output(ok).__eq__("not an output") is NotImplemented


def test_pair_logs_drops_empty_sides() -> None:
    assert pair_logs(None, None) is None
    assert pair_logs(None, SAVED) is SAVED
    assert pair_logs(SAVED, None) is SAVED
    assert pair_logs(SAVED, FAILED) == LogPair(SAVED, FAILED)


def test_github_state_of_results() -> None:
    assert Result.success("").github_state is StatusState.SUCCESS
    assert Result.pending("").github_state is StatusState.PENDING
    assert Result.failure("").github_state is StatusState.FAILURE
    assert Output(Result.failure("broken")).descr == "broken"


def test_not_equal_follows_equal() -> None:
    """`!=` agrees with `==` for outputs and saved logs (msgspec's would not)."""
    saved = SavedLog("t", "b", "c" * 40, False)
    same = Output(Result.success("ok"), saved)
    assert (same != Output(Result.success("ok"), saved)) is False
    assert Output(Result.success("ok")) != Output(Result.failure("ok"))
    assert (saved != SavedLog("t", "b", "c" * 40, False)) is False
    assert saved != SavedLog("t", "b", "c" * 40, True)
