"""Results, logs and outputs of jobs, and their JSON form.

The JSON is exactly DataKitCI's, so stores written by either can be read:

    {"result":{"status":"success","descr":"All tests passed"},"logs":null}
    logs: null | {"branch":B} | {"title":T,"branch":B,"commit":C,"failed":false}
          | [A, B]
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec

from ._errors import DecodeError
from ._model import StatusState

__all__ = [
    "LiveLogRef",
    "LogPair",
    "Logs",
    "Output",
    "Result",
    "SavedLog",
    "decode_output",
    "encode_output",
    "pair_logs",
]

ResultStatus = Literal["success", "pending", "failure"]


class Result(msgspec.Struct, frozen=True):
    """The outcome of a job: success, pending or failure, with a description."""

    status: ResultStatus
    descr: str

    @classmethod
    def success(cls, descr: str) -> Result:
        return cls("success", descr)

    @classmethod
    def pending(cls, descr: str) -> Result:
        return cls("pending", descr)

    @classmethod
    def failure(cls, descr: str) -> Result:
        return cls("failure", descr)

    @property
    def github_state(self) -> StatusState:
        """Return the GitHub status state this result is reported as."""
        return StatusState(self.status)


class LiveLogRef(msgspec.Struct, frozen=True):
    """A log still being written; it will be saved on `branch`."""

    branch: str


RebuildTrigger = Callable[[], Awaitable[None]]


class SavedLog(msgspec.Struct, frozen=True, eq=False):
    """A log saved as commit `commit` on branch `branch`.

    `rebuild`, when set, marks the branch for rebuild and starts building
    again; it is not part of the JSON, and equality ignores it.
    """

    title: str
    branch: str
    commit: str
    failed: bool
    rebuild: RebuildTrigger | None = None

    def _key(self) -> tuple[str, str, str, bool]:
        return (self.title, self.branch, self.commit, self.failed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SavedLog):
            return NotImplemented
        return self._key() == other._key()

    def __ne__(self, other: object) -> bool:
        # msgspec's own __ne__ would not follow the __eq__ above.
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self._key())


class LogPair(msgspec.Struct, frozen=True):
    """Two logs, kept side by side (from two parallel steps)."""

    first: Logs
    second: Logs


Logs = LiveLogRef | SavedLog | LogPair | None


def pair_logs(first: Logs, second: Logs) -> Logs:
    """Combine two logs, dropping an empty side."""
    if first is None:
        return second
    if second is None:
        return first
    return LogPair(first, second)


def live_branches(logs: Logs) -> list[str]:
    """Return the branches of the live logs inside `logs`, first to last."""
    if isinstance(logs, LiveLogRef):
        return [logs.branch]
    if isinstance(logs, LogPair):
        return live_branches(logs.first) + live_branches(logs.second)
    return []


def iter_saved_logs(logs: Logs) -> list[SavedLog]:
    """Return the saved logs inside `logs`, first to last."""
    if isinstance(logs, SavedLog):
        return [logs]
    if isinstance(logs, LogPair):
        return iter_saved_logs(logs.first) + iter_saved_logs(logs.second)
    return []


class Output(msgspec.Struct, frozen=True, eq=False):
    """A job's result with its logs.

    Two outputs are equal when their JSON is: a pair with an empty side
    equals its other side, and rebuild triggers are ignored.
    """

    result: Result
    logs: Logs = None

    @property
    def descr(self) -> str:
        return self.result.descr

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Output):
            return NotImplemented
        if self.result != other.result:
            return False
        if self.logs is None and other.logs is None:
            return True
        return encode_output(self) == encode_output(other)

    def __ne__(self, other: object) -> bool:
        # msgspec's own __ne__ would not follow the __eq__ above.
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(encode_output(self))


def _logs_to_builtins(logs: Logs) -> Any:
    if logs is None:
        return None
    if isinstance(logs, LiveLogRef):
        return {"branch": logs.branch}
    if isinstance(logs, SavedLog):
        return {
            "title": logs.title,
            "branch": logs.branch,
            "commit": logs.commit,
            "failed": logs.failed,
        }
    first = _logs_to_builtins(logs.first)
    second = _logs_to_builtins(logs.second)
    if first is None:
        return second
    if second is None:
        return first
    return [first, second]


_encoder = msgspec.json.Encoder()


def encode_output(output: Output) -> bytes:
    """Return the compact JSON of `output` (no trailing newline)."""
    return _encoder.encode(
        {
            "result": {"status": output.result.status, "descr": output.result.descr},
            "logs": _logs_to_builtins(output.logs),
        }
    )


def _logs_from_builtins(value: Any, where: str) -> Logs:
    if value is None:
        return None
    if isinstance(value, list):
        if len(value) != 2:
            raise DecodeError(
                f"{where}: a log pair must have 2 entries, not {len(value)}"
            )
        return pair_logs(
            _logs_from_builtins(value[0], where), _logs_from_builtins(value[1], where)
        )
    if isinstance(value, dict):
        if set(value) == {"branch"}:
            # A live log cannot be restored: its process is gone.
            return None
        try:
            title, branch, commit, failed = (
                value["title"],
                value["branch"],
                value["commit"],
                value["failed"],
            )
        except KeyError as exc:
            raise DecodeError(
                f"{where}: saved log has no {exc.args[0]!r} field"
            ) from None
        if not (
            isinstance(title, str)
            and isinstance(branch, str)
            and isinstance(commit, str)
            and isinstance(failed, bool)
        ):
            raise DecodeError(f"{where}: saved log fields have the wrong types")
        return SavedLog(title, branch, commit, failed)
    raise DecodeError(f"{where}: logs must be null, an object or a pair, not {value!r}")


def decode_output(data: bytes | str, where: str = "output") -> Output:
    """Parse an output's JSON; `where` names its branch and file in errors.

    Raises `DecodeError` saying what was wrong.
    """
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"{where}: invalid JSON: {exc}") from None
    except RecursionError:
        raise DecodeError(f"{where}: JSON nested too deeply") from None
    if not isinstance(raw, dict) or "result" not in raw:
        raise DecodeError(f"{where}: expected an object with a 'result' field")
    result = raw["result"]
    if not isinstance(result, dict):
        raise DecodeError(f"{where}: 'result' must be an object")
    status, descr = result.get("status"), result.get("descr")
    if status not in ("success", "pending", "failure"):
        raise DecodeError(f"{where}: unknown result status {status!r}")
    if not isinstance(descr, str):
        raise DecodeError(f"{where}: result 'descr' must be a string")
    try:
        logs = _logs_from_builtins(raw.get("logs"), where)
    except RecursionError:
        raise DecodeError(f"{where}: log pairs nested too deeply") from None
    return Output(Result(status, descr), logs)
