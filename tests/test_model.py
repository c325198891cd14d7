"""Tests of names and values: repositories, targets, status-branch names."""

from __future__ import annotations

from pathlib import Path

import pygit2
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kitci import (
    InvalidNameError,
    PRTarget,
    RefTarget,
    Repo,
    Store,
    Transaction,
    parse_status_branch,
    parse_target_arg,
    status_branch_name,
)
from kitci._model import (
    check_web_ui,
    escape_name,
    is_valid_pr_number,
    is_valid_ref_name,
    parse_status_sub,
    status_sub_name,
    trim_description,
    unescape_name,
)
from support import git

ALICE = Repo("alice", "proj")


# Repositories ----------------------------------------------------------------


def test_repo_parse_and_print() -> None:
    repo = Repo.parse("my-org/my.proj_2")
    assert repo == Repo("my-org", "my.proj_2")
    assert str(repo) == "my-org/my.proj_2"


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("alice", "'alice'"),
        ("alice/proj/x", "'alice/proj/x'"),
        ("/proj", "user name ''"),
        ("alice/", "repository name ''"),
        ("../proj", "user name '..'"),
        ("alice/.", "repository name '.'"),
    ],
)
def test_repo_parse_errors_name_the_bad_part(text: str, bad: str) -> None:
    with pytest.raises(InvalidNameError, match=bad.replace(".", r"\.")):
        Repo.parse(text)


# Command-line targets ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("alice/proj/prs/12", PRTarget(ALICE, 12)),
        ("alice/proj/heads/main", RefTarget(ALICE, ("heads", "main"))),
        (
            "alice/proj/heads/feature/login_v2",
            RefTarget(ALICE, ("heads", "feature", "login_v2")),
        ),
        ("alice/proj/tags/v1.0", RefTarget(ALICE, ("tags", "v1.0"))),
        ("alice/proj/heads/héllo", RefTarget(ALICE, ("heads", "héllo"))),
    ],
)
def test_parse_target_arg(text: str, target: PRTarget | RefTarget) -> None:
    parsed = parse_target_arg(text)
    assert parsed == target
    assert parsed.to_arg() == text


def test_target_printed_forms() -> None:
    assert str(PRTarget(ALICE, 3)) == "alice/proj/pr/3"
    ref = RefTarget(ALICE, ("heads", "feature", "x"))
    assert str(ref) == "alice/proj/ref/heads/feature/x"
    assert ref.kind == "branch"
    assert RefTarget(ALICE, ("tags", "v1")).kind == "tag"
    assert PRTarget(ALICE, 3).kind == "pr"


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        # Too short: the whole text is named.
        ("alice/proj", "'alice/proj'"),
        ("alice/proj/prs", "'alice/proj/prs'"),
        # Each part named on its own.
        ("alice/proj/pulls/1", "'pulls'"),
        ("alice/proj/pr/1", "'pr'"),
        ("alice/proj/prs/x1", "'x1'"),
        ("alice/proj/prs/-1", "'-1'"),
        ("alice/proj/prs/²", "'²'"),
        ("alice/proj/prs/\u0661\u0662", "'\u0661\u0662'"),
        ("alice/proj/prs/1/2", "'1/2'"),
        ("alice/proj/prs/", "''"),
        ("alice//prs/1", "repository name ''"),
        ("/proj/prs/1", "user name ''"),
        ("alice/proj/heads/a..b", "'a..b'"),
        ("alice/proj/heads/x.lock", "'x.lock'"),
        ("alice/proj/heads/a b", "'a b'"),
        ("alice/proj/tags/v1.", "'v1.'"),
        ("alice/proj/heads/", "empty part"),
        ("alice/proj/heads/a//b", "empty part"),
    ],
)
def test_parse_target_arg_errors_name_the_bad_part(text: str, bad: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        parse_target_arg(text)
    assert bad in str(info.value)


def test_pr_numbers_are_ascii_digits_without_leading_zeros() -> None:
    assert is_valid_pr_number("1")
    assert is_valid_pr_number("120")
    for bad in ("", "0", "007", "²", "\u0661", "+1", "-1", " 1", "1 "):
        assert not is_valid_pr_number(bad), bad


# Ref names agree with Git ------------------------------------------------------

# Pieces Git treats specially, mixed with ordinary ones.
_REF_PIECES = st.sampled_from([*"ab.-_@{}~^:?*[\\ \t\x7f\x00é", "lock", ".lock"])


@given(
    kind=st.sampled_from(["heads", "tags"]),
    rest=st.lists(
        st.lists(_REF_PIECES, max_size=6).map("".join), min_size=1, max_size=3
    ),
)
@example(kind="heads", rest=["a.", "b"])
@example(kind="heads", rest=["@"])
@example(kind="heads", rest=["x.lock"])
def test_is_valid_ref_name_agrees_with_libgit2(kind: str, rest: list[str]) -> None:
    name = (kind, *rest)
    full = "refs/" + "/".join(name)
    if "\x00" in full:
        # libgit2 cannot even be asked about a NUL byte.
        assert not is_valid_ref_name(name)
        return
    assert is_valid_ref_name(name) == pygit2.reference_is_valid_name(full), full


def test_is_valid_ref_name_needs_a_kind_and_a_name() -> None:
    assert not is_valid_ref_name(("heads",))
    assert not is_valid_ref_name(("pull", "1"))
    assert is_valid_ref_name(("tags", "v1.0"))


# Escaping ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plain", "escaped"),
    [
        ("my-proj", "my_2dproj"),
        ("login_v2", "login_5fv2"),
        ("feature/x", "feature_2fx"),
        ("héllo", "h_c3_a9llo"),
        ("v1.0", "v1.0"),
        ("", ""),
    ],
)
def test_escape_examples(plain: str, escaped: str) -> None:
    assert escape_name(plain) == escaped
    assert unescape_name(escaped) == plain


def test_escape_dots_on_request() -> None:
    assert escape_name("a..b", escape_dots=True) == "a_2e_2eb"
    assert unescape_name("a_2e_2eb") == "a..b"


@pytest.mark.parametrize("bad", ["_2", "_zz", "_2F", "a-b", "a/b", "é", "_ff", "a b"])
def test_unescape_rejects_malformed_names(bad: str) -> None:
    with pytest.raises(InvalidNameError):
        unescape_name(bad)


@given(st.text())
def test_escape_round_trips_and_uses_only_safe_characters(text: str) -> None:
    for escape_dots in (False, True):
        escaped = escape_name(text, escape_dots=escape_dots)
        assert unescape_name(escaped) == text
        allowed = "_0123456789abcdefABCDEFGHIJKLMNOPQRSTUVWXYZghijklmnopqrstuvwxyz"
        assert set(escaped) <= set(allowed + ("" if escape_dots else "."))


# Status-branch names -------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "branch"),
    [
        (
            RefTarget(Repo("alice", "my-proj"), ("heads", "feature", "x")),
            "status-alice-my_2dproj-ref-heads-feature_2fx",
        ),
        (
            RefTarget(ALICE, ("heads", "feature", "login_v2")),
            "status-alice-proj-ref-heads-feature_2flogin_5fv2",
        ),
        (
            RefTarget(ALICE, ("heads", "héllo")),
            "status-alice-proj-ref-heads-h_c3_a9llo",
        ),
        (PRTarget(Repo("my-org", "proj"), 1), "status-my_2dorg-proj-pr-1"),
        (RefTarget(ALICE, ("tags", "v1.0")), "status-alice-proj-ref-tags-v1.0"),
    ],
)
def test_status_branch_name_examples(target: PRTarget | RefTarget, branch: str) -> None:
    assert status_branch_name(target) == branch
    assert parse_status_branch(branch) == target


def _check_branch_name(target: PRTarget | RefTarget) -> str:
    """Check the promises about `target`'s status branch; return its name."""
    branch = status_branch_name(target)
    assert parse_status_branch(branch) == target
    assert parse_status_sub(target.repo, status_sub_name(target)) == target
    assert pygit2.reference_is_valid_name("refs/heads/" + branch), branch
    for component in branch.split("/"):
        assert len(component.encode("utf-8")) <= 250, branch
    return branch


# Any names at all: unicode, dots, `..`, `.lock`, and far beyond 255 bytes.
_NAMES = st.one_of(
    st.text(max_size=20),
    st.text(st.sampled_from(["."]), max_size=5),
    st.text(min_size=90, max_size=400),
)
_REF_PARTS = st.one_of(
    st.text(max_size=20),
    st.text(min_size=90, max_size=300),
).map(lambda s: s.replace("/", ""))


@given(
    user=_NAMES,
    name=_NAMES,
    kind=st.one_of(st.sampled_from(["heads", "tags"]), _REF_PARTS),
    rest=st.lists(_REF_PARTS, min_size=1, max_size=4),
    number=st.integers(min_value=0, max_value=10**30),
)
@example(user="..", name=".", kind="heads", rest=["x.lock"], number=0)
@example(user="a" * 300, name="é" * 300, kind="heads", rest=["."], number=1)
@example(user="alice", name="proj", kind="heads", rest=["a.."], number=1)
@example(user="alice", name="proj", kind="heads", rest=[""], number=1)
def test_status_branch_names_round_trip_and_are_valid(
    user: str, name: str, kind: str, rest: list[str], number: int
) -> None:
    repo = Repo(user, name)
    _check_branch_name(PRTarget(repo, number))
    _check_branch_name(RefTarget(repo, (kind, *rest)))


@given(
    user=_NAMES,
    name=_NAMES,
    kind=st.sampled_from(["heads", "tags"]),
    rest=st.lists(_REF_PARTS, min_size=1, max_size=4),
    other_rest=st.lists(_REF_PARTS, min_size=1, max_size=4),
)
def test_status_branches_are_unique_and_never_nested(
    user: str, name: str, kind: str, rest: list[str], other_rest: list[str]
) -> None:
    # Git stores a branch as a file: no branch can be a directory of another.
    one = status_branch_name(RefTarget(Repo(user, name), (kind, *rest)))
    two = status_branch_name(RefTarget(Repo(user, name), (kind, *other_rest)))
    if rest != other_rest:
        assert one != two
    assert not one.startswith(two + "/")
    assert not two.startswith(one + "/")


def test_long_names_use_slashes_and_plain_names_never_do() -> None:
    long_target = RefTarget(ALICE, ("heads", "x" * 300))
    branch = status_branch_name(long_target)
    first, *chunks = branch.split("/")
    assert first == f"status-{len(chunks)}"
    assert len(chunks) == 2
    assert "/" not in status_branch_name(RefTarget(ALICE, ("heads", "x" * 100)))


async def test_long_and_prefix_names_coexist_in_a_real_store(tmp_path: Path) -> None:
    # A name whose plain form just fits, and a longer one that starts the
    # same way: both branches must be creatable side by side.
    store = await Store.open(tmp_path / "store", create=True)
    prefix = "status-alice-proj-ref-heads-"
    fits = RefTarget(ALICE, ("heads", "x" * (200 - len(prefix))))
    longer = RefTarget(ALICE, ("heads", "x" * 500))
    dotted = RefTarget(ALICE, ("heads", "é" * 100 + ".lock"))
    odd_user = PRTarget(Repo("..", "a" * 260), 7)
    targets: list[PRTarget | RefTarget] = [fits, longer, dotted, odd_user]
    for target in targets:
        tx = Transaction(None)
        tx.write("target", str(target))
        assert await store.commit(status_branch_name(target), tx, "first") is not None

    # Git itself lists every one, and each parses back to its target.
    listed = await git(tmp_path / "store", "branch", "--format=%(refname:short)")
    assert sorted(listed.split("\n")) == sorted(status_branch_name(t) for t in targets)
    assert {parse_status_branch(b) for b in (await store.heads("status-"))} == set(
        targets
    )


def test_parse_status_branch_accepts_other_spellings() -> None:
    assert parse_status_branch("status-al_2eice-proj-pr-007") == PRTarget(
        Repo("al.ice", "proj"), 7
    )
    long = RefTarget(ALICE, ("heads", "x" * 300))
    rebuilt = "status-alice-proj-" + status_sub_name(long)
    assert rebuilt != status_branch_name(long)
    assert parse_status_branch(rebuilt) == long
    assert parse_status_branch("status-1/alice-proj-pr-1") == PRTarget(ALICE, 1)


def test_status_sub_names() -> None:
    # The part after `status-U-R-`, the same for plain and long names.
    assert status_sub_name(PRTarget(ALICE, 12)) == "pr-12"
    feature = RefTarget(ALICE, ("heads", "feature", "login_v2"))
    assert status_sub_name(feature) == "ref-heads-feature_2flogin_5fv2"
    long = RefTarget(ALICE, ("heads", "a.b" * 100))
    assert status_sub_name(long) == "ref-heads-" + "a.b" * 100
    assert parse_status_sub(ALICE, status_sub_name(long)) == long
    for bad in ("pr-x", "pr-1-2", "ref-heads", "issue-1", "ref-heads-_zz", ""):
        with pytest.raises(InvalidNameError, match="is not a target of alice/proj"):
            parse_status_sub(ALICE, bad)


@pytest.mark.parametrize(
    "branch",
    [
        "master",
        "status",
        "status-alice-proj",
        "status-alice-proj-pr-x",
        "status-alice-proj-pr-1-2",
        "status-alice-proj-issue-1",
        "status-alice-proj-ref-heads",
        "status-alice-pr_zz-pr-1",
        "status-2/alice-proj-pr-1",
        "status-2/alice-proj-pr-1/",
        "status-x/alice/proj-pr-1",
    ],
)
def test_parse_status_branch_rejects_other_branches(branch: str) -> None:
    with pytest.raises(InvalidNameError, match="is not a status branch"):
        parse_status_branch(branch)


@pytest.mark.parametrize(
    "target",
    [
        PRTarget(ALICE, -1),
        RefTarget(ALICE, ("heads",)),
        RefTarget(ALICE, ("heads", "a/b")),
    ],
)
def test_status_branch_name_refuses_targets_it_cannot_give_back(
    target: PRTarget | RefTarget,
) -> None:
    with pytest.raises(InvalidNameError):
        status_branch_name(target)


# Descriptions --------------------------------------------------------------------


def test_trim_description_strips_and_cuts_at_a_character_boundary() -> None:
    text = "  " + "é" * 300 + "  \n"
    trimmed = trim_description(text)
    assert trimmed == "é" * 140
    # Valid UTF-8 of exactly 140 characters (280 bytes), nothing cut in half.
    assert trimmed.encode("utf-8").decode("utf-8") == trimmed
    assert len(trimmed.encode("utf-8")) == 280


def test_trim_description_keeps_short_text_and_drops_trailing_space_at_cut() -> None:
    assert trim_description("  fine \n") == "fine"
    assert trim_description("") == ""
    assert trim_description("a" * 139 + " b") == "a" * 139
    assert trim_description("ab", limit=1) == "a"


@given(st.text())
def test_trim_description_never_exceeds_the_limit(text: str) -> None:
    trimmed = trim_description(text)
    assert len(trimmed) <= 140
    assert trimmed == trimmed.strip()
    assert text.strip().startswith(trimmed)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://h/", "not an absolute http"),
        ("http:///path", "not an absolute http"),
        ("http://h/?q=1", "query or fragment"),
        ("http://h/#top", "query or fragment"),
        ("http://h/\nX", "white space or control"),
        ("http://h x/", "white space or control"),
        ("http://h:notaport/", "invalid port"),
        ("http://h:0/", "invalid port"),
        ("http://user:secret@h/", "user name or password"),
    ],
)
def test_bad_web_ui_addresses_are_refused(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_web_ui(url)


@pytest.mark.parametrize(
    "url", ["http://h", "https://h:8443/ci/", "http://[::1]:8080/", "http://127.0.0.1"]
)
def test_good_web_ui_addresses_are_kept(url: str) -> None:
    assert check_web_ui(url) == url
