"""Values shared by every part of kitci: repositories, PRs, refs, targets.

Everything here is an immutable msgspec struct or a pure function, so
values can cross threads and be used as dictionary keys.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from typing import Literal

import msgspec

from ._errors import InvalidNameError

_HASH_RE = re.compile(r"[0-9a-f]{40}")
# A PR number as written in paths and on the command line: ASCII digits only
# (`str.isdigit` also accepts characters such as "²" that `int` refuses).
_NUMBER_RE = re.compile(r"[0-9]+")
# What GitHub allows in user and repository names (Repo.parse checks names
# given by people; names read from a store are only checked to be paths).
_GITHUB_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


class Repo(msgspec.Struct, frozen=True, order=True):
    """A monitored repository, `user/name` on GitHub."""

    user: str
    name: str

    def __str__(self) -> str:
        return f"{self.user}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> Repo:
        """Parse `USER/REPO`, raising `InvalidNameError` naming the problem."""
        parts = text.split("/")
        if len(parts) != 2:
            raise InvalidNameError(f"repository {text!r} must look like USER/REPO")
        user, name = parts
        for what, value in (("user", user), ("repository", name)):
            if _GITHUB_NAME_RE.fullmatch(value) is None or value in (".", ".."):
                raise InvalidNameError(
                    f"{what} name {value!r} in {text!r} is not a valid name "
                    "(letters, digits, '.', '-' and '_' only)"
                )
        return cls(user, name)


class StatusState(enum.StrEnum):
    """The state of a GitHub commit status."""

    PENDING = "pending"
    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"


class PR(msgspec.Struct, frozen=True):
    """An open or closed pull request, as the bridge recorded it."""

    repo: Repo
    number: int
    head: str
    state: Literal["open", "closed"]
    title: str
    owner: str
    base: str = "master"

    @property
    def target(self) -> PRTarget:
        return PRTarget(self.repo, self.number)


class Ref(msgspec.Struct, frozen=True):
    """A branch (`heads/...`) or tag (`tags/...`) and its head commit."""

    repo: Repo
    name: tuple[str, ...]
    head: str

    @property
    def target(self) -> RefTarget:
        return RefTarget(self.repo, self.name)


class Status(msgspec.Struct, frozen=True):
    """One commit status: a context (split on `/`) with its state."""

    repo: Repo
    commit: str
    context: tuple[str, ...]
    state: StatusState
    description: str | None = None
    target_url: str | None = None


class PRTarget(msgspec.Struct, frozen=True, order=True, tag="pr"):
    """The identity of a PR target: repository and number."""

    repo: Repo
    number: int

    def __str__(self) -> str:
        return f"{self.repo}/pr/{self.number}"

    @property
    def kind(self) -> Literal["pr"]:
        return "pr"

    def to_arg(self) -> str:
        """Return the command-line form, `USER/REPO/prs/N`."""
        return f"{self.repo}/prs/{self.number}"


class RefTarget(msgspec.Struct, frozen=True, order=True, tag="ref"):
    """The identity of a ref target: repository and name parts."""

    repo: Repo
    name: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.repo}/ref/{'/'.join(self.name)}"

    @property
    def kind(self) -> Literal["tag", "branch"]:
        return "tag" if self.name[0] == "tags" else "branch"

    def to_arg(self) -> str:
        """Return the command-line form, `USER/REPO/heads/NAME`."""
        return f"{self.repo}/{'/'.join(self.name)}"


Target = PRTarget | RefTarget


def parse_target_arg(text: str) -> Target:
    """Parse a command-line target: `U/R/prs/N`, `U/R/heads/X` or `U/R/tags/X`.

    Raises `InvalidNameError` naming the part of `text` that is wrong.
    """
    parts = text.split("/")
    if len(parts) < 4:
        raise InvalidNameError(
            f"target {text!r} must look like USER/REPO/prs/N, "
            "USER/REPO/heads/NAME or USER/REPO/tags/NAME"
        )
    repo = Repo.parse("/".join(parts[:2]))
    kind, rest = parts[2], parts[3:]
    if kind == "prs":
        number = "/".join(rest)
        if _NUMBER_RE.fullmatch(number) is None or int(number) == 0:
            raise InvalidNameError(
                f"PR number {number!r} in target {text!r} is not a number from 1"
            )
        return PRTarget(repo, int(number))
    if kind in ("heads", "tags"):
        name = (kind, *rest)
        if not is_valid_ref_name(name):
            raise InvalidNameError(
                f"ref name {'/'.join(rest)!r} in target {text!r} is not a name "
                f"Git accepts: {_ref_name_problem(name)}"
            )
        return RefTarget(repo, name)
    raise InvalidNameError(
        f"{kind!r} in target {text!r} must be 'prs', 'heads' or 'tags'"
    )


def is_valid_hash(text: str) -> bool:
    """Say whether `text` is a full lower-case hexadecimal SHA-1."""
    return _HASH_RE.fullmatch(text) is not None


def is_valid_pr_number(text: str) -> bool:
    """Say whether `text` is a PR number as the metadata writes it.

    Only ASCII digits, without leading zeros (so `pr/7` and `pr/007` cannot
    both name PR 7), and not 0: GitHub numbers PRs from 1.
    """
    return (
        _NUMBER_RE.fullmatch(text) is not None
        and str(int(text)) == text
        and int(text) > 0
    )


def is_valid_path_component(part: str) -> bool:
    """Say whether `part` can be one directory name in the metadata tree."""
    return part not in ("", ".", "..") and "/" not in part and "\0" not in part


def is_valid_ref_name(name: tuple[str, ...]) -> bool:
    """Say whether `name` (e.g. `("heads", "main")`) is a ref Git accepts.

    Follows `git check-ref-format` for `refs/NAME`: the first part is
    `heads` or `tags`, no part is empty, starts with `.` or ends with
    `.lock`, the name has no `..`, `@{`, control character, space or any of
    `~^:?*[\\`, and it does not end with `.`.
    """
    return _ref_name_problem(name) is None


def _ref_name_problem(name: tuple[str, ...]) -> str | None:
    """Say what makes `name` an invalid ref name, or None if it is valid."""
    if len(name) < 2 or name[0] not in ("heads", "tags"):
        return "it must be heads/NAME or tags/NAME"
    for part in name:
        if not part:
            return "it has an empty part"
        if part.startswith("."):
            return f"part {part!r} starts with '.'"
        if part.endswith(".lock"):
            return f"part {part!r} ends with '.lock'"
        for bad in ("..", "@{"):
            if bad in part:
                return f"part {part!r} contains {bad!r}"
        for ch in part:
            if ch < " " or ch == "\x7f" or ch in " ~^:?*[\\":
                return f"part {part!r} contains {ch!r}"
    if name[-1].endswith("."):
        return "it ends with '.'"
    return None


# Status-branch names ---------------------------------------------------------

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")
# Git refuses a ref component longer than the file system allows (255 bytes
# on common ones) and needs room for ".lock"; stay well below.
_MAX_COMPONENT = 200


def escape_name(text: str, *, escape_dots: bool = False) -> str:
    """Escape every byte outside `[A-Za-z0-9.]` as `_` and two hex digits."""
    out: list[str] = []
    for byte in text.encode("utf-8"):
        if byte in _SAFE and not (escape_dots and byte == 0x2E):
            out.append(chr(byte))
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def unescape_name(text: str) -> str:
    """Reverse `escape_name`, raising `InvalidNameError` on a malformed escape."""
    data = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "_":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in "0123456789abcdef" for c in pair):
                raise InvalidNameError(f"bad escape {text[i : i + 3]!r} in {text!r}")
            data.append(int(pair, 16))
            i += 3
        elif ord(ch) < 128 and ord(ch) in _SAFE:
            data.append(ord(ch))
            i += 1
        else:
            raise InvalidNameError(f"unexpected {ch!r} in escaped name {text!r}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidNameError(f"escaped name {text!r} is not UTF-8") from exc


def _status_parts(target: Target, *, escape_dots: bool) -> list[str]:
    def esc(text: str) -> str:
        return escape_name(text, escape_dots=escape_dots)

    parts = ["status", esc(target.repo.user), esc(target.repo.name)]
    if isinstance(target, PRTarget):
        parts += ["pr", str(target.number)]
    else:
        parts += ["ref", esc(target.name[0]), esc("/".join(target.name[1:]))]
    return parts


def status_branch_name(target: Target) -> str:
    """Return the name of the branch that holds `target`'s history.

    The plain form is `status-U-R-pr-N` or `status-U-R-ref-K-REST`, each
    part escaped with `escape_name`. When that would not be a valid Git
    branch (a `..`, a `.` or `.lock` ending, or more than 200 bytes for one
    ref component), the long form is used instead: dots are escaped too,
    and `U-R-pr-N` or `U-R-ref-K-REST` is cut into chunks of 200 bytes
    after a first component `status-C`, C being the number of chunks. A
    plain name never contains `/` and always has more than one `-`, and two
    long names with the same first component have as many components, so
    no status branch is a directory of another. `parse_status_branch`
    reads both forms.

    Raises `InvalidNameError` for a target that no name could give back:
    a negative PR number, or a ref name with fewer than two parts or a
    part containing `/`.
    """
    _check_target(target)
    plain = "-".join(_status_parts(target, escape_dots=False))
    if len(plain) <= _MAX_COMPONENT and _is_valid_branch_component(plain):
        return plain
    body = "-".join(_status_parts(target, escape_dots=True)[1:])
    chunks = [body[i : i + _MAX_COMPONENT] for i in range(0, len(body), _MAX_COMPONENT)]
    return "/".join([f"status-{len(chunks)}", *chunks])


def status_sub_name(target: Target) -> str:
    """Return SUB, the target's own part of `status-U-R-SUB`.

    `pr-N` for a PR, `ref-K-REST` (escaped) for a ref, whatever the length:
    this is the name to use where the repository is already known, such as
    the commit index's `USER/REPO/commit/SOURCE/SUB`. `parse_status_sub`
    reverses it. Raises `InvalidNameError` like `status_branch_name`.
    """
    _check_target(target)
    return "-".join(_status_parts(target, escape_dots=False)[3:])


def parse_status_sub(repo: Repo, sub: str) -> Target:
    """Parse SUB as `status_sub_name` writes it, for a target of `repo`.

    Raises `InvalidNameError` naming `sub` when it is not one.
    """
    try:
        return _parse_sub(repo, sub.split("-"))
    except InvalidNameError as exc:
        raise InvalidNameError(f"{sub!r} is not a target of {repo}: {exc}") from None


def _parse_sub(repo: Repo, parts: list[str]) -> Target:
    if parts[0] == "pr" and len(parts) == 2:
        if _NUMBER_RE.fullmatch(parts[1]) is None:
            raise InvalidNameError(f"PR number {parts[1]!r} is not a number")
        return PRTarget(repo, int(parts[1]))
    if parts[0] == "ref" and len(parts) == 3:
        first = unescape_name(parts[1])
        rest = unescape_name(parts[2])
        return RefTarget(repo, (first, *rest.split("/")))
    raise InvalidNameError("it has neither pr-N nor ref-KIND-NAME")


def _check_target(target: Target) -> None:
    if isinstance(target, PRTarget):
        if target.number < 0:
            raise InvalidNameError(f"PR number {target.number} must be >= 0")
    elif len(target.name) < 2 or any("/" in part for part in target.name):
        raise InvalidNameError(
            f"ref name {target.name!r} must have at least two parts, none "
            "containing '/'"
        )


def _is_valid_branch_component(name: str) -> bool:
    return not (name.endswith((".", ".lock")) or ".." in name or name.startswith("."))


def parse_status_branch(branch: str) -> Target:
    """Parse a status-branch name (plain or long form) back into its target.

    Any spelling that decodes is accepted (`_2e` for `.`, a plain name
    longer than `status_branch_name` would make), so a name rebuilt by hand
    from a SUB parses too. Raises `InvalidNameError` naming the branch when
    it is not a status branch.
    """
    try:
        if "/" in branch:
            first, *chunks = branch.split("/")
            if first != f"status-{len(chunks)}" or not all(chunks):
                raise InvalidNameError(
                    "it has '/' but does not start with status-C/ followed by "
                    "C non-empty parts"
                )
            parts = ["status", *"".join(chunks).split("-")]
        else:
            parts = branch.split("-")
        if len(parts) < 5 or parts[0] != "status":
            raise InvalidNameError("it does not start with status-USER-REPO-")
        repo = Repo(unescape_name(parts[1]), unescape_name(parts[2]))
        return _parse_sub(repo, parts[3:])
    except InvalidNameError as exc:
        raise InvalidNameError(f"{branch!r} is not a status branch: {exc}") from None


def datakit_context(job: str) -> tuple[str, ...]:
    """Return the status context kitci uses for `job`: `ci/datakit/JOB`."""
    return ("ci", "datakit", job)


def trim_description(text: str, limit: int = 140) -> str:
    """Trim white space and cut to `limit` characters (never mid-character)."""
    text = text.strip()
    if len(text) > limit:
        text = text[:limit].rstrip()
    return text


def check_web_ui(text: str) -> str:
    """Return `text` if it can be the base of status target URLs.

    It must be an absolute http or https address with no query, fragment,
    white space or control characters (the job's path and query are added
    to it). Raises `ValueError` saying what is wrong.
    """
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError(f"{text!r} contains white space or control characters")
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{text!r} is not an absolute http:// or https:// address")
    if parsed.query or parsed.fragment or text.endswith(("?", "#")):
        raise ValueError(
            f"{text!r} has a query or fragment; give the address of the web UI only"
        )
    if parsed.username is not None or parsed.password is not None:
        raise ValueError(
            f"{text!r} has a user name or password, which every status's "
            "target_url would publish"
        )
    try:
        port = parsed.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{text!r} has an invalid port")
    return text
