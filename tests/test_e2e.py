"""End-to-end tests of `kitci serve`, run as a real process on real Git repos.

The service bridges a local source repository (two branches, a tag and a
`refs/pull/1/head`), runs a pipeline whose jobs are the Git plugin's
command steps, and is stopped with a signal. Every wait polls the store or
the service's log with a deadline; nothing sleeps to let things settle.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from support import GIT_ENV, git, is_alive, run_kitci

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="needs Linux's /proc"
)

_METRICS_LINE = re.compile(rb"serving metrics at http://127\.0\.0\.1:(\d+)/metrics")

# The pipeline under test: every job runs a real command with the Git
# plugin's cached command step on a checkout of the target's head.
PIPELINE = """
from __future__ import annotations

import sys

from kitci import RefTarget, Repo, Target, github
from kitci._service import PipelineContext
from kitci._terms import Term
from kitci.builds import GitCommit, GitRepo

PROJ = Repo("alice", "proj")
PID_FILE = {pid_file!r}
SLOW = (
    "import os, sys, time\\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\\n"
    "time.sleep(600)\\n"
)
_git: GitRepo | None = None


async def setup(context: PipelineContext) -> None:
    global _git
    _git = await GitRepo.open(
        context.builds,
        remote=str(context.repos[PROJ]),
        work_dir=context.work_dir / "proj",
    )


def command(target: Target, label: str, argv: list[str]) -> Term[str]:
    git = _git
    assert git is not None

    def run(commit: GitCommit) -> Term[None]:
        return git.run_command(commit, label, argv, timeout=120)

    head = github.head(target)
    return head.bind(git.fetch_head).bind(run).map(lambda _: f"{{label}} passed")


def jobs(target: Target) -> dict[str, Term[str]]:
    found = {{
        "pass": command(target, "pass", [sys.executable, "-c", "print('hi')"]),
        "fail": command(target, "fail", [sys.executable, "-c", "raise SystemExit(3)"]),
    }}
    if target == RefTarget(PROJ, ("heads", "main")):
        found["slow"] = command(target, "slow", [sys.executable, "-c", SLOW, PID_FILE])
    return found


projects = {{"alice/proj": jobs}}
"""


async def run_git(*args: str) -> tuple[int, str]:
    done = await trio.run_process(
        ["git", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=GIT_ENV,
    )
    return done.returncode, done.stdout.decode("utf-8", "replace").strip()


async def make_source(path: Path) -> dict[str, str]:
    """Create a repository with main, feature, tag v1 and PR 1; return heads."""
    await trio.Path(path).mkdir()
    await git(path, "init", "-q", "-b", "main")
    await git(path, "commit", "-q", "--allow-empty", "-m", "First commit")
    await git(path, "tag", "v1")
    await git(path, "branch", "feature")
    await git(path, "commit", "-q", "--allow-empty", "-m", "Second commit")
    await git(path, "checkout", "-q", "feature")
    await git(path, "commit", "-q", "--allow-empty", "-m", "Feature work")
    await git(path, "checkout", "-q", "main")
    tree = await git(path, "rev-parse", "main^{tree}")
    pr = await git(path, "commit-tree", tree, "-p", "main", "-m", "Add a feature")
    await git(path, "update-ref", "refs/pull/1/head", pr)
    return {
        "main": await git(path, "rev-parse", "main"),
        "feature": await git(path, "rev-parse", "feature"),
        "v1": await git(path, "rev-parse", "v1^{commit}"),
        "pr1": pr,
    }


class Service:
    """A `kitci serve` process with its log in a file."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            pytest.fail(
                f"kitci serve exited with {self.process.returncode}:\n{self.log()}"
            )

    async def metrics_port(self) -> int:
        while True:
            self.check_alive()
            found = _METRICS_LINE.search(self.log_path.read_bytes())
            if found:
                return int(found.group(1))
            await trio.sleep(0.05)

    async def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        with trio.fail_after(30):
            return await self.process.wait()


@asynccontextmanager
async def serving(tmp_path: Path, *args: str) -> AsyncIterator[Service]:
    """Run `kitci serve ARGS` in `tmp_path` for the duration of the block."""
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "kitci", "serve", *args],
            stdin=None,
            stdout=log_file,
            stderr=log_file,
            cwd=tmp_path,
            env=GIT_ENV,
        )
    service = Service(process, log_path)
    try:
        yield service
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def http(port: int, request: bytes) -> bytes:
    """Send `request` to 127.0.0.1:`port` and return the whole response."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def descendants(pid: int) -> set[int]:
    """Return the processes below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def log_branches(logs: object) -> list[str]:
    """Return the branches of the saved logs in a stored logs JSON value."""
    if isinstance(logs, list):
        return [branch for entry in logs for branch in log_branches(entry)]
    if isinstance(logs, dict):
        return [logs["branch"]]
    return []


async def read_state(store: Path, head: str, job: str) -> str | None:
    path = f"github-metadata:alice/proj/commit/{head}/status/ci/datakit/{job}"
    code, out = await run_git("--git-dir", str(store), "show", f"{path}/state")
    return out if code == 0 else None


async def test_serve_end_to_end(tmp_path: Path) -> None:
    heads = await make_source(tmp_path / "src")
    store = tmp_path / "store"
    pid_file = tmp_path / "slow.pid"
    pipeline = tmp_path / "pipeline.py"
    pipeline.write_text(PIPELINE.format(pid_file=str(pid_file)))

    async with serving(
        tmp_path,
        "--store", str(store),
        "--work-dir", str(tmp_path / "work"),
        "--pipeline", str(pipeline),
        "--repo", f"alice/proj={tmp_path / 'src'}",
        "--web-ui", "http://127.0.0.1:8087/ci",
        "--metrics", "127.0.0.1:0",
        "--bridge-interval", "0.2",
        "--poll-interval", "0.2",
    ) as service:  # fmt: skip
        with trio.fail_after(60):
            # Every target's two quick jobs finish; main's slow job runs.
            expected = {"pass": "success", "fail": "failure"}
            for head in heads.values():
                for job, state in expected.items():
                    while await read_state(store, head, job) != state:
                        service.check_alive()
                        await trio.sleep(0.2)
            while await read_state(store, heads["main"], "slow") != "pending":
                service.check_alive()
                await trio.sleep(0.2)
            while not pid_file.exists():
                service.check_alive()
                await trio.sleep(0.2)
        slow_pid = int(pid_file.read_text())

        # The statuses on github-metadata.
        where = f"github-metadata:alice/proj/commit/{heads['pr1']}/status/ci/datakit"
        _, url = await run_git(
            "--git-dir", str(store), "show", f"{where}/fail/target_url"
        )
        assert (
            url
            == f"http://127.0.0.1:8087/ci/alice/proj/commit/{heads['pr1']}?test=fail"
        )
        _, description = await run_git(
            "--git-dir", str(store), "show", f"{where}/fail/description"
        )
        assert "exited with status 3" in description
        _, description = await run_git(
            "--git-dir", str(store), "show", f"{where}/pass/description"
        )
        assert description == "pass passed"

        # The status branches record what was tested, with saved logs.
        for branch, head in [
            ("status-alice-proj-pr-1", heads["pr1"]),
            ("status-alice-proj-ref-heads-feature", heads["feature"]),
            ("status-alice-proj-ref-tags-v1", heads["v1"]),
        ]:
            _, source = await run_git(
                "--git-dir", str(store), "show", f"{branch}:source-commit"
            )
            assert source == head
            _, raw = await run_git(
                "--git-dir", str(store), "show", f"{branch}:job/pass/output"
            )
            output = json.loads(raw)
            assert output["result"] == {"status": "success", "descr": "pass passed"}
            assert f"cmd-pass-src-{head}" in log_branches(output["logs"])
            _, log_text = await run_git(
                "--git-dir", str(store), "show", f"cmd-pass-src-{head}:log"
            )
            assert "hi" in log_text
        code, _ = await run_git(
            "--git-dir", str(store), "show",
            f"commit-index:alice/proj/commit/{heads['feature']}/ref-heads-feature",
        )  # fmt: skip
        assert code == 0

        # `kitci status` reads the same store while the service runs.
        done = await trio.run_process(
            [sys.executable, "-m", "kitci", "status", "--store", str(store)],
            capture_stdout=True, capture_stderr=True, check=False, env=GIT_ENV,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        table = done.stdout.decode()
        assert re.search(
            r"alice/proj/pr/1\s+" + heads["pr1"][:7] + r"\s+fail\s+failure", table
        )
        assert re.search(r"slow\s+pending", table)
        assert "pass passed" in table
        done = await trio.run_process(
            [sys.executable, "-m", "kitci", "status", "--store", str(store), "--json"],
            capture_stdout=True, capture_stderr=True, check=False, env=GIT_ENV,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows = {row["target"]: row for row in json.loads(done.stdout)}
        assert set(rows) == {
            "alice/proj/pr/1",
            "alice/proj/ref/heads/feature",
            "alice/proj/ref/heads/main",
            "alice/proj/ref/tags/v1",
        }
        assert rows["alice/proj/pr/1"]["title"] == "Add a feature"
        main_jobs = {
            j["name"]: j["state"] for j in rows["alice/proj/ref/heads/main"]["jobs"]
        }
        assert main_jobs == {"fail": "failure", "pass": "success", "slow": "pending"}

        # The metrics endpoint counts the evaluations and the builds.
        port = await service.metrics_port()
        with trio.fail_after(10):
            response = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head_part, _, body = response.partition(b"\r\n\r\n")
        assert head_part.startswith(b"HTTP/1.1 200 OK")
        evals = re.search(rb"^DataKitCI_term_evals_total (\S+)$", body, re.MULTILINE)
        assert evals is not None
        assert float(evals.group(1)) > 0
        assert b'DataKitCI_cache_builds_started_total{name="shell:pass"} 4.0' in body

        # SIGTERM stops it cleanly: exit status 0, the slow build's process
        # and every other child gone.
        children = descendants(service.process.pid)
        assert slow_pid in children
        assert await service.stop(signal.SIGTERM) == 0
        assert [pid for pid in children if is_alive(pid)] == []
        log_text = service.log()
        assert "received SIGTERM: stopping" in log_text
        assert "kitci stopped" in log_text
        assert "Traceback" not in log_text.split("received SIGTERM", 1)[1]


async def test_metrics_endpoint_and_sigint(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.py"
    pipeline.write_text(
        "from kitci._terms import ok\n"
        "projects = {'alice/proj': lambda target: {'build': ok('fine')}}\n"
    )
    async with serving(
        tmp_path, "--pipeline", str(pipeline), "--metrics", "127.0.0.1:0"
    ) as service:
        with trio.fail_after(30):
            port = await service.metrics_port()
            response = await http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
            assert b"# TYPE DataKitCI_term_evals_total counter" in body
            assert b"DataKitCI_engine_connection_attempts_total" in body

            response = await http(port, b"GET /other HTTP/1.1\r\n\r\n")
            assert response.startswith(b"HTTP/1.1 404 Not Found")
            response = await http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert response.startswith(b"HTTP/1.1 405 Method Not Allowed")
            response = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert response.startswith(b"HTTP/1.1 200 OK")
            assert response.endswith(b"\r\n\r\n")
            response = await http(port, b"nonsense\r\n\r\n")
            assert response.startswith(b"HTTP/1.1 400 Bad Request")

        # The default store was created in the working folder.
        assert (tmp_path / "_kitci" / "store" / "HEAD").exists()
        assert await service.stop(signal.SIGINT) == 0
        assert "received SIGINT: stopping" in service.log()


# A pipeline whose one job, `step`, runs the Python code SCRIPT with the
# arguments: a pid file (one per target: every target runs it), then ARGS.
ONE_STEP_PIPELINE = """
import sys

from kitci import PipelineContext, Repo, Target, Term, github
from kitci.builds import GitRepo

PROJ = Repo("alice", "proj")
_git: GitRepo | None = None


async def setup(context: PipelineContext) -> None:
    global _git
    _git = await GitRepo.open(
        context.builds, remote=str(context.repos[PROJ]), work_dir=context.work_dir
    )


def jobs(target: Target) -> dict[str, Term[str]]:
    git = _git
    assert git is not None
    pid_file = {pid_file!r} + "." + target.to_arg().replace("/", "_")
    argv = [sys.executable, "-c", {script!r}, pid_file, *{args!r}]
    run = github.head(target).bind(git.fetch_head).bind(
        lambda commit: git.run_command(commit, "step", argv, timeout=120)
    )
    return {{"step": run.map(lambda _: "step done")}}


projects = {{"alice/proj": jobs}}
"""

# Writes its pid, then waits for the file named by its second argument.
GATE = (
    "import os, sys, time\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "while not os.path.exists(sys.argv[2]):\n"
    "    time.sleep(0.05)\n"
)
# Writes its pid and sleeps, ignoring SIGTERM: stopping it takes the kill
# grace (two seconds).
STUBBORN = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
    "time.sleep(600)\n"
)


def one_step_pipeline(path: Path, pid_file: Path, script: str, *args: str) -> None:
    path.write_text(
        ONE_STEP_PIPELINE.format(pid_file=str(pid_file), script=script, args=args)
    )


async def test_cancel_and_rebuild_from_the_command_line(tmp_path: Path) -> None:
    """Case 09 as a user does it: `kitci cancel` fails the waiting job with a
    cancelled build (its process gone), `kitci rebuild` runs it again."""
    heads = await make_source(tmp_path / "src")
    head = heads["main"]
    store = tmp_path / "store"
    pid_file, open_file = tmp_path / "gate.pid", tmp_path / "gate.open"
    main_pid_file = tmp_path / "gate.pid.alice_proj_heads_main"
    pipeline = tmp_path / "pipeline.py"
    one_step_pipeline(pipeline, pid_file, GATE, str(open_file))
    async with serving(
        tmp_path,
        "--store", str(store),
        "--work-dir", str(tmp_path / "work"),
        "--pipeline", str(pipeline),
        "--repo", f"alice/proj={tmp_path / 'src'}",
        "--metrics", "127.0.0.1:0",
        "--bridge-interval", "0.2",
        "--poll-interval", "0.2",
    ) as service:  # fmt: skip
        server = f"127.0.0.1:{await service.metrics_port()}"
        branch = f"cmd-step-src-{head}"
        with trio.fail_after(60):
            while not main_pid_file.exists():
                service.check_alive()
                await trio.sleep(0.1)
        pid = int(main_pid_file.read_text())

        # A rebuild asked for while it builds is ignored, and says so.
        code, out, err = await run_kitci("rebuild", branch, "--server", server)
        assert (code, err) == (0, "")
        assert "building already; rebuild ignored" in out

        code, out, err = await run_kitci("cancel", branch, "--server", server)
        assert (code, err) == (0, "")
        assert f"cancelled the build of {branch}" in out
        with trio.fail_after(60):
            while await read_state(store, head, "step") != "failure":
                service.check_alive()
                await trio.sleep(0.1)
        _, description = await run_git(
            "--git-dir", str(store), "show",
            f"github-metadata:alice/proj/commit/{head}/status/ci/datakit/step/description",
        )  # fmt: skip
        assert "cancelled" in description.lower(), description
        # The build's process was stopped before the failure was saved.
        assert not is_alive(pid)

        # Open the gate, then rebuild: the job runs again and passes.
        open_file.write_text("")
        code, out, err = await run_kitci("rebuild", branch, "--server", server)
        assert (code, err) == (0, "")
        with trio.fail_after(60):
            while await read_state(store, head, "step") != "success":
                service.check_alive()
                await trio.sleep(0.1)

        # A branch no job depends on: one line, exit status 1.
        code, out, err = await run_kitci("rebuild", "nothing", "--server", server)
        assert code == 1
        assert err.count("\n") == 1
        assert "No job depends on 'nothing'" in err
        assert await service.stop(signal.SIGTERM) == 0


async def test_a_second_sigterm_while_stopping_still_exits_0(tmp_path: Path) -> None:
    """`timeout` and service managers may signal twice: a SIGTERM that comes
    while the service stops does not kill it; it still exits with 0."""
    await make_source(tmp_path / "src")
    pid_file = tmp_path / "pid"
    pipeline = tmp_path / "pipeline.py"
    one_step_pipeline(pipeline, pid_file, STUBBORN)
    async with serving(
        tmp_path,
        "--pipeline", str(pipeline),
        "--repo", f"alice/proj={tmp_path / 'src'}",
        "--work-dir", str(tmp_path / "work"),
        "--metrics", "none",
        "--bridge-interval", "0.2",
    ) as service:  # fmt: skip
        main_pid_file = tmp_path / "pid.alice_proj_heads_main"
        with trio.fail_after(60):
            while not main_pid_file.exists():
                service.check_alive()
                await trio.sleep(0.05)
        service.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while "received SIGTERM: stopping" not in service.log():
                service.check_alive()
                await trio.sleep(0.05)
        # The build's process holds the stop up for its kill grace.
        service.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await service.process.wait() == 0
        assert "kitci stopped" in service.log()


async def test_control_commands_tell_kitci_from_other_servers(tmp_path: Path) -> None:
    """An address where something else answers is reported as such."""

    async def not_kitci(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, not_kitci, 0, host="127.0.0.1")
        [listener] = await nursery.start(serve)
        port = listener.socket.getsockname()[1]
        code, out, err = await run_kitci(
            "rebuild", "some-branch", "--server", f"127.0.0.1:{port}"
        )
        nursery.cancel_scope.cancel()
    assert (code, out) == (1, "")
    assert "does not look like kitci serve (HTTP status 200)" in err

    # A branch name Git would refuse is a usage error, sent nowhere.
    code, _, err = await run_kitci("cancel", "a..b", "--server", "127.0.0.1:9")
    assert code == 2
    assert "'a..b' is not a valid branch name" in err


async def test_a_second_service_on_the_same_store_is_refused(tmp_path: Path) -> None:
    """Two services on one store would write every status twice."""
    pipeline = tmp_path / "pipeline.py"
    pipeline.write_text(
        "from kitci import ok\nprojects = {'a/b': lambda t: {'j': ok('x')}}\n"
    )
    async with serving(
        tmp_path, "--pipeline", str(pipeline), "--metrics", "127.0.0.1:0"
    ) as first:
        await first.metrics_port()  # it is up, holding the store
        code, _, err = await run_kitci(
            "serve", "--pipeline", str(pipeline), "--metrics", "none", cwd=tmp_path
        )
        assert code == 1
        assert f"in use by another kitci serve (pid {first.process.pid})" in err
        assert await first.stop(signal.SIGTERM) == 0
