"""Tests of kitci's command line, run as real processes (`python -m kitci`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import trio

from kitci import (
    METADATA_BRANCH,
    Output,
    PRTarget,
    RefTarget,
    Repo,
    Result,
    SavedLog,
    Store,
    Target,
    Transaction,
    TreeReader,
)
from kitci._history import EMPTY_STATE, HistoryState, record_states_sync
from kitci._service import (
    PIPELINE_ERROR_JOB,
    _guarded,
    _metrics_arg,
    _respond,
    load_pipeline,
)
from kitci._terms import Context, Failed, ok
from support import GIT_ENV, git_commit_files, run_kitci

ALICE = Repo("alice", "proj")
H1 = "1" * 40
H2 = "2" * 40
H3 = "3" * 40
META = "a" * 40

GOOD_PIPELINE = (
    "from kitci._terms import ok\n"
    "projects = {'alice/proj': lambda target: {'build': ok('fine')}}\n"
)


def listing(folder: Path) -> list[str]:
    """Return the sorted names in `folder`."""
    return sorted(p.name for p in folder.iterdir())


def write_files(folder: Path, files: Mapping[str, str]) -> None:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)


def one_error_line(stderr: str) -> str:
    """Return the single `kitci: error: ...` line of `stderr`."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("kitci: error: "), stderr
    return lines[0]


# --help ---------------------------------------------------------------------------


async def test_help(tmp_path: Path) -> None:
    code, out, err = await run_kitci("--help", cwd=tmp_path)
    assert (code, err) == (0, "")
    assert "serve" in out
    assert "status" in out

    code, out, err = await run_kitci("serve", "--help", cwd=tmp_path)
    assert (code, err) == (0, "")
    for option in (
        "--store",
        "--pipeline",
        "--work-dir",
        "--repo USER/REPO=PATH",
        "--web-ui",
        "--canary",
        "--max-evaluations",
        "--metrics",
        "--poll-interval",
        "--bridge-interval",
        "--log-level",
        "examples:",
        "kitci serve --pipeline",
        "async def setup(context)",
    ):
        assert option in out, option

    code, out, err = await run_kitci("status", "--help", cwd=tmp_path)
    assert (code, err) == (0, "")
    for text in ("--store", "--json", "status_branch", "up_to_date", "examples:"):
        assert text in out, text
    assert not (tmp_path / "_kitci").exists()


# Bad input ------------------------------------------------------------------------

# Each case: (files to write in the test folder, arguments after `serve`, a
# piece of the expected error line). "STORE" stands for the store path.
BAD_SERVE: list[tuple[str, dict[str, str], list[str], str]] = [
    ("missing pipeline", {}, ["--pipeline", "nope.py"], "nope.py does not exist"),
    (
        "pipeline raises",
        {"p.py": "x = 1\n1 / 0\n"},
        ["--pipeline", "p.py"],
        "line 2: ZeroDivisionError: division by zero",
    ),
    (
        "pipeline syntax error",
        {"p.py": "projects = {\n"},
        ["--pipeline", "p.py"],
        "SyntaxError",
    ),
    (
        "pipeline imports a missing module",
        {"p.py": "import kitci_no_such_module\n"},
        ["--pipeline", "p.py"],
        "ModuleNotFoundError: No module named 'kitci_no_such_module'",
    ),
    ("pipeline is a folder", {"d/x": ""}, ["--pipeline", "d"], "d is not a file"),
    (
        "no projects",
        {"p.py": "jobs = {}\n"},
        ["--pipeline", "p.py"],
        "defines no module-level `projects`",
    ),
    (
        "projects not a mapping",
        {"p.py": "projects = ['alice/proj']\n"},
        ["--pipeline", "p.py"],
        "`projects` must be a mapping",
    ),
    (
        "empty projects",
        {"p.py": "projects = {}\n"},
        ["--pipeline", "p.py"],
        "`projects` is empty",
    ),
    (
        "bad repo key",
        {"p.py": "projects = {'alice': lambda t: {}}\n"},
        ["--pipeline", "p.py"],
        "bad key in `projects`: repository 'alice' must look like USER/REPO",
    ),
    (
        "key not a string",
        {"p.py": "projects = {3: lambda t: {}}\n"},
        ["--pipeline", "p.py"],
        "key 3 in `projects`",
    ),
    (
        "value not callable",
        {"p.py": "projects = {'alice/proj': 'make'}\n"},
        ["--pipeline", "p.py"],
        "the value for alice/proj in `projects` must be a function",
    ),
    (
        "setup not async",
        {"p.py": GOOD_PIPELINE + "def setup(context): pass\n"},
        ["--pipeline", "p.py"],
        "`setup` must be an `async def setup(context)` function",
    ),
    (
        "store is a file",
        {"p.py": GOOD_PIPELINE, "afile": "precious\n"},
        ["--pipeline", "p.py", "--store", "afile"],
        "store path afile is a file",
    ),
    (
        "store under a file",
        {"p.py": GOOD_PIPELINE, "afile": "precious\n"},
        ["--pipeline", "p.py", "--store", "afile/store"],
        "afile is a file",
    ),
    (
        "repo without =",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--repo", "alice/proj"],
        "argument --repo: 'alice/proj' must look like USER/REPO=PATH",
    ),
    (
        "repo with a bad name",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--repo", "alice=src"],
        "argument --repo: repository 'alice' must look like USER/REPO",
    ),
    (
        "repo path missing",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--repo", "alice/proj=nowhere"],
        "--repo alice/proj=nowhere: nowhere does not exist",
    ),
    (
        "repo not a git repository",
        {"p.py": GOOD_PIPELINE, "src/x": ""},
        ["--pipeline", "p.py", "--repo", "alice/proj=src"],
        "--repo alice/proj=src: src is not a Git repository",
    ),
    (
        "repo name with a space",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--repo", "al ice/proj=src"],
        "user name 'al ice'",
    ),
    (
        "web ui with a fragment",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--web-ui", "http://host/?q=1#frag"],
        "has a query or fragment",
    ),
    (
        "web ui with a newline",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--web-ui", "http://host/\nX"],
        "white space or control characters",
    ),
    (
        "web ui with a bad port",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--web-ui", "http://host:notaport/"],
        "invalid port",
    ),
    (
        "canary outside the projects",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--canary", "bob/other/prs/1"],
        "bob/other is not a project of the pipeline",
    ),
    (
        "canary PR 0",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--canary", "alice/proj/prs/0"],
        "alice/proj/prs/0",
    ),
    (
        "metrics host name",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--metrics", "localhost:0"],
        "is not an IP address",
    ),
    (
        "poll interval too small",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--poll-interval", "1e-300"],
        "must be between 0.01 and 3600 seconds",
    ),
    (
        "work dir under a file",
        {"p.py": GOOD_PIPELINE, "afile": "precious\n"},
        ["--pipeline", "p.py", "--work-dir", "afile/work"],
        "cannot create --work-dir afile/work: afile is a file",
    ),
    (
        "repo twice",
        {"p.py": GOOD_PIPELINE, "src/x": ""},
        ["--pipeline", "p.py", "--repo", "alice/proj=src", "--repo", "alice/proj=src"],
        "--repo names alice/proj twice",
    ),
    (
        "unknown option",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--frobnicate"],
        "unrecognized arguments: --frobnicate (see 'kitci serve --help')",
    ),
    (
        "web-ui not http",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--web-ui", "ftp://ci.example.org"],
        "argument --web-ui: 'ftp://ci.example.org' is not an absolute http",
    ),
    (
        "web-ui not absolute",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--web-ui", "ci.example.org/x"],
        "argument --web-ui: 'ci.example.org/x' is not an absolute http",
    ),
    (
        "bad canary",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--canary", "alice/proj/pulls/3"],
        "argument --canary: 'pulls' in target 'alice/proj/pulls/3' must be",
    ),
    (
        "bad canary number",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--canary", "alice/proj/prs/x"],
        "PR number 'x'",
    ),
    (
        "zero evaluations",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--max-evaluations", "0"],
        "argument --max-evaluations: 0 must be at least 1",
    ),
    (
        "bad metrics",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--metrics", "9090"],
        "argument --metrics: '9090' must look like ADDR:PORT",
    ),
    (
        "bad poll interval",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--poll-interval", "0"],
        "argument --poll-interval: '0' must be between 0.01 and 3600 seconds",
    ),
    (
        "bad log level",
        {"p.py": GOOD_PIPELINE},
        ["--pipeline", "p.py", "--log-level", "LOUD"],
        "argument --log-level: 'LOUD' is not one of",
    ),
    ("no pipeline", {}, [], "the following arguments are required: --pipeline"),
]


@pytest.mark.parametrize(
    ("files", "args", "expected"),
    [case[1:] for case in BAD_SERVE],
    ids=[case[0] for case in BAD_SERVE],
)
async def test_serve_bad_input(
    tmp_path: Path, files: dict[str, str], args: list[str], expected: str
) -> None:
    write_files(tmp_path, files)
    before = listing(tmp_path)
    code, out, err = await run_kitci("serve", *args, cwd=tmp_path)
    assert code == 2
    assert out == ""
    assert expected in one_error_line(err)
    # Nothing was created: not the default store, not anything else.
    assert listing(tmp_path) == before
    if "afile" in files:
        assert (tmp_path / "afile").read_text() == "precious\n"


async def test_serve_bad_store_directory(tmp_path: Path) -> None:
    """A non-empty folder that is not a Git repository is refused as is."""
    (tmp_path / "p.py").write_text(GOOD_PIPELINE)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x\n")
    code, _, err = await run_kitci(
        "serve", "--pipeline", "p.py", "--store", "notes", "--metrics", "none",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 2
    assert "store path notes is not a Git repository" in one_error_line(err)
    assert listing(tmp_path / "notes") == ["todo.txt"]


async def test_serve_setup_failure_exits_1(tmp_path: Path) -> None:
    (tmp_path / "p.py").write_text(
        GOOD_PIPELINE + "async def setup(context):\n    raise RuntimeError('boom')\n"
    )
    code, _, err = await run_kitci(
        "serve", "--pipeline", "p.py", "--store", "s", "--metrics", "none",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 1
    last = err.splitlines()[-1]
    assert last.startswith("kitci: error: the setup of pipeline ")
    assert last.endswith("failed: line 4: RuntimeError: boom")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "choose a command: serve, status, rebuild or cancel"),
        (["build"], "invalid choice: 'build'"),
        (["status", "--verbose"], "unrecognized arguments: --verbose"),
        (["status", "--store", "missing"], "store missing does not exist"),
        (["status", "--store", "afile"], "store path afile is a file"),
    ],
)
async def test_other_bad_input(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "afile").write_text("x\n")
    code, out, err = await run_kitci(*args, cwd=tmp_path)
    assert code == 2
    assert out == ""
    assert expected in one_error_line(err)
    assert listing(tmp_path) == ["afile"]


# kitci status ---------------------------------------------------------------------


async def prepare_store(path: Path) -> None:
    """Write github-metadata and status branches as a running kitci would."""
    store = await Store.open(path, create=True)
    files = {
        "alice/proj/.monitor": "",
        "alice/proj/pr/1/head": H1,
        "alice/proj/pr/1/state": "open",
        "alice/proj/pr/1/title": "Add | pipes",
        "alice/proj/pr/1/owner": "bob",
        "alice/proj/pr/2/head": H2,
        "alice/proj/pr/2/state": "closed",
        "alice/proj/pr/2/owner": "bob",
        "alice/proj/ref/heads/main/head": H2,
        "alice/proj/ref/tags/v1/head": H3,
        # Not monitored: not listed.
        "carol/other/ref/heads/main/head": H1,
    }

    def build(reader: TreeReader, tx: Transaction) -> str:
        for name, text in files.items():
            tx.write(name, text + "\n" if text else "")
        return "Bridge"

    await store.update_branch(METADATA_BRANCH, build)
    saved = SavedLog("Run tests", "cmd-test-proj-" + H1, "c" * 40, failed=True)
    records: list[tuple[Target, HistoryState, str, str, Mapping[str, Output]]] = [
        (
            PRTarget(ALICE, 1),
            EMPTY_STATE,
            H1,
            META,
            {
                "test": Output(Result("failure", "Tests failed:\nexit 3"), saved),
                "lint": Output(Result("success", "Clean")),
            },
        ),
        (
            RefTarget(ALICE, ("heads", "main")),
            EMPTY_STATE,
            H1,  # tested an older head
            META,
            {"test": Output(Result("pending", "Building"))},
        ),
    ]
    await store.run_sync(lambda repo: record_states_sync(repo, records))


async def test_status_table(tmp_path: Path) -> None:
    await prepare_store(tmp_path / "store")
    code, out, err = await run_kitci("status", "--store", "store", cwd=tmp_path)
    assert code == 0, err
    assert err == ""
    lines = out.splitlines()
    assert re.fullmatch(r"TARGET\s+HEAD\s+JOB\s+STATE\s+DESCRIPTION", lines[0])
    assert re.fullmatch(r"alice/proj/pr/1\s+1111111\s+lint\s+success\s+Clean", lines[1])
    assert re.fullmatch(r"\s+test\s+failure\s+Tests failed: exit 3", lines[2])
    assert re.fullmatch(
        r"alice/proj/ref/heads/main\s+2222222\s+test\s+pending\s+Building", lines[3]
    )
    assert re.fullmatch(
        r"alice/proj/ref/tags/v1\s+3333333\s+-\s+-\s+\(no jobs recorded yet\)", lines[4]
    )
    assert "pr/2" not in out
    assert "carol" not in out
    history = lines[
        lines.index("Newest history entry of each target's status branch:") :
    ]
    assert re.fullmatch(r"TARGET\s+COMMIT\s+SOURCE\s+MESSAGE", history[1])
    assert re.fullmatch(
        r"alice/proj/pr/1\s+[0-9a-f]{7}\s+1111111\s+"
        r"2 updates \(lint -> Clean, \.\.\.\)",
        history[2],
    )
    assert re.fullmatch(
        r"alice/proj/ref/heads/main\s+[0-9a-f]{7}\s+1111111 \(old head\)\s+"
        r"test -> Building",
        history[3],
    )
    assert re.fullmatch(
        r"alice/proj/ref/tags/v1\s+-\s+-\s+\(nothing recorded yet\)", history[4]
    )


async def test_status_json(tmp_path: Path) -> None:
    await prepare_store(tmp_path / "store")
    code, out, err = await run_kitci(
        "status", "--store", "store", "--json", cwd=tmp_path
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [row["target"] for row in rows] == [
        "alice/proj/pr/1",
        "alice/proj/ref/heads/main",
        "alice/proj/ref/tags/v1",
    ]
    pr, main, tag = rows
    assert set(pr) == {
        "target", "arg", "repo", "kind", "number", "ref", "title", "head",
        "status_branch", "jobs", "history", "up_to_date",
    }  # fmt: skip
    assert pr["arg"] == "alice/proj/prs/1"
    assert (pr["kind"], pr["number"], pr["ref"]) == ("pr", 1, None)
    assert pr["title"] == "Add | pipes"
    assert pr["head"] == H1
    assert pr["status_branch"] == "status-alice-proj-pr-1"
    assert pr["jobs"] == [
        {"name": "lint", "state": "success", "description": "Clean", "logs": None},
        {
            "name": "test",
            "state": "failure",
            "description": "Tests failed:\nexit 3",
            "logs": {
                "title": "Run tests",
                "branch": "cmd-test-proj-" + H1,
                "commit": "c" * 40,
                "failed": True,
            },
        },
    ]
    assert pr["history"]["source_commit"] == H1
    assert pr["history"]["metadata_commit"] == META
    assert pr["history"]["message"] == "2 updates (lint -> Clean, ...)"
    assert re.fullmatch(r"[0-9a-f]{40}", pr["history"]["commit"])
    assert pr["up_to_date"] is True
    assert (main["kind"], main["ref"], main["arg"]) == (
        "branch",
        "heads/main",
        "alice/proj/heads/main",
    )
    assert main["up_to_date"] is False
    assert (tag["kind"], tag["jobs"], tag["history"], tag["up_to_date"]) == (
        "tag",
        [],
        None,
        False,
    )


async def test_status_of_an_empty_store(tmp_path: Path) -> None:
    await Store.open(tmp_path / "store", create=True)
    code, out, _ = await run_kitci("status", "--store", "store", cwd=tmp_path)
    assert code == 0
    assert out == "No open pull requests, branches or tags in the store.\n"
    code, out, _ = await run_kitci("status", "--store", "store", "--json", cwd=tmp_path)
    assert code == 0
    assert json.loads(out) == []


# In-process checks of the pieces ----------------------------------------------------


def test_load_pipeline_accepts_repo_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.py"
    path.write_text(
        "from kitci import Repo\n"
        "from kitci._terms import ok\n"
        "async def setup(context):\n    pass\n"
        "projects = {Repo('alice', 'proj'): lambda t: {'x': ok('y')}}\n"
    )
    pipeline = load_pipeline(str(path))
    assert list(pipeline.projects) == [ALICE]
    assert pipeline.setup is not None


async def evaluate_jobs(make: Callable[[Target], object]) -> object:
    from kitci._metadata import Snapshot

    jobs = _guarded(ALICE, make)(PRTarget(ALICE, 1))
    assert list(jobs) == [PIPELINE_ERROR_JOB]
    outcome, _ = await jobs[PIPELINE_ERROR_JOB].evaluate(
        Context(Snapshot(None, {}), PRTarget(ALICE, 1), PIPELINE_ERROR_JOB)
    )
    assert isinstance(outcome, Failed)
    return outcome.message


async def test_a_broken_jobs_function_fails_one_job() -> None:
    def raises(target: Target) -> Mapping[str, object]:
        raise KeyError("nope")

    assert await evaluate_jobs(raises) == "Pipeline error: KeyError: 'nope'"
    assert await evaluate_jobs(lambda t: {"a/b": ok("x")}) == (
        "Pipeline error: job name 'a/b' is not a valid name (no '/', not empty)"
    )
    assert await evaluate_jobs(lambda t: {"a": "x"}) == (
        "Pipeline error: job a is a str, not a Term"
    )
    good = _guarded(ALICE, lambda t: {"a": ok("x")})(PRTarget(ALICE, 1))
    assert list(good) == ["a"]


def test_metrics_addresses() -> None:
    assert _metrics_arg("none") is None
    assert _metrics_arg("127.0.0.1:0") == ("127.0.0.1", 0)
    assert _metrics_arg("[::1]:9090") == ("::1", 9090)
    for bad in ("9090", ":9090", "127.0.0.1:", "127.0.0.1:99999", "[::1]9090"):
        with pytest.raises(Exception, match=r"ADDR:PORT|0-65535"):
            _metrics_arg(bad)
    # Names are refused rather than looked up.
    for name in ("localhost:9091", "999.0.0.1:0"):
        with pytest.raises(Exception, match="is not an IP address"):
            _metrics_arg(name)


def test_http_responses() -> None:
    assert _respond(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
    assert _respond(b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert _respond(None).startswith(b"HTTP/1.1 431")


async def test_status_logs_malformed_metadata_as_warnings(tmp_path: Path) -> None:
    """Warnings while reading the store are formatted like the service's log."""
    store = tmp_path / "store"
    await trio.run_process(["git", "init", "-q", "--bare", str(store)], env=GIT_ENV)
    await git_commit_files(
        store,
        "github-metadata",
        {"alice/proj/.monitor": b"", "alice/proj/pr/abc/head": b"x\n"},
    )
    code, _, err = await run_kitci("status", "--store", str(store))
    assert code == 0, err
    [line] = err.splitlines()
    assert " WARNING kitci.metadata: skipping alice/proj/pr/abc" in line


async def test_serve_refuses_the_store_as_a_bridged_repository(tmp_path: Path) -> None:
    """Bridging the store itself (directly or through a linked worktree)
    would mirror kitci's own branches back in without end."""
    (tmp_path / "p.py").write_text(GOOD_PIPELINE)
    store = tmp_path / "store"
    git = ["git", "-C", str(store)]
    await trio.run_process(["git", "init", "-q", str(store)], env=GIT_ENV)
    await trio.run_process(
        [*git, "commit", "-q", "--allow-empty", "-m", "a"], env=GIT_ENV
    )
    await trio.run_process(
        [*git, "worktree", "add", "-q", str(tmp_path / "wt")], env=GIT_ENV
    )
    for path in ("store", "store/.git", "wt"):
        before = listing(tmp_path)
        code, _, err = await run_kitci(
            "serve", "--pipeline", "p.py", "--store", "store",
            "--repo", f"alice/proj={path}", "--metrics", "none",
            cwd=tmp_path,
        )  # fmt: skip
        assert code == 2, err
        assert "is the store itself" in one_error_line(err)
        assert listing(tmp_path) == before
