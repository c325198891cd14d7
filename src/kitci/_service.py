"""kitci's command line: `kitci serve` runs the engine, `kitci status` reports.

`kitci serve` loads a pipeline file, opens (or creates) the store, and runs
the engine, the local bridges and the metrics endpoint in one Trio nursery
until SIGINT or SIGTERM cancels it. `kitci status` reads a store directly
and prints every open target with its jobs and its newest history entry.

Every argument is checked before the store is opened, so a mistake on the
command line never creates or changes a store: it prints one line
`kitci: error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import importlib.util
import inspect
import ipaddress
import json
import logging
import os
import signal
import sys
import traceback
import urllib.parse
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn, cast

import msgspec
import pygit2
import trio
from prometheus_client import generate_latest

from ._bridge import LocalBridge
from ._cache import BuildCache
from ._engine import Engine, MakeTerms
from ._errors import InvalidNameError, KitciError, StoreError, UsageError
from ._history import HistoryState, load_states_sync
from ._metadata import METADATA_BRANCH, Snapshot, SnapshotParser
from ._model import (
    PR,
    PRTarget,
    Ref,
    Repo,
    Target,
    check_web_ui,
    is_valid_path_component,
    parse_target_arg,
    status_branch_name,
)
from ._results import encode_output
from ._store import Store
from ._terms import Term, fail

__all__ = ["Pipeline", "PipelineContext", "load_pipeline", "main", "serve"]

log = logging.getLogger("kitci.service")

DEFAULT_STORE = "_kitci/store"
DEFAULT_WORK_DIR = "_kitci/work"
DEFAULT_WEB_UI = "http://127.0.0.1:8080"
# Not 9090: that is the Prometheus server's own port.
DEFAULT_METRICS = "127.0.0.1:8088"
DEFAULT_MAX_EVALUATIONS = 50
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_BRIDGE_INTERVAL = 1.0
# Starts the body of every reply to a rebuild or cancel request, so that the
# command can tell kitci's answers from another server's.
_REPLY_MARK = "kitci: "
# Bounds of --poll-interval and --bridge-interval, in seconds: polling more
# often than 100 times a second only burns a core.
MIN_INTERVAL = 0.01
MAX_INTERVAL = 3600.0
# The module name a pipeline file is imported as.
PIPELINE_MODULE = "kitci_pipeline"
# The job reported when a pipeline's jobs function misbehaves for a target.
PIPELINE_ERROR_JOB = "pipeline"
# Prometheus' text format, version 0.0.4, as `generate_latest` writes it.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Limits of the metrics HTTP server.
_MAX_REQUEST_HEAD = 16 * 1024
_REQUEST_TIMEOUT = 10.0


class _ExitError(Exception):
    """Stop with one `kitci: error: MESSAGE` line and exit status `status`."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


# The command line ---------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, raised, not printed."""

    def error(self, message: str) -> NoReturn:
        raise _ExitError(f"{message} (see '{self.prog} --help')")


_SERVE_EPILOG = f"""\
The pipeline file is a Python file defining a module-level mapping
`projects` from "user/repo" (a string, or a kitci.Repo) to a function that
takes a target (kitci.PRTarget or kitci.RefTarget) and returns that target's
jobs, a mapping job name -> Term[str]. See ci/example.py. The file's folder
is put first on sys.path while it is imported, so it can import its
neighbours. It may also define `async def setup(context)`, run once before
the engine starts with a kitci._service.PipelineContext (store, builds: the
build cache, work_dir, repos: the --repo paths), to open the Git plugin's
clones, e.g. `await kitci.builds.GitRepo.open(context.builds, remote=...,
work_dir=context.work_dir / "proj")`.

Each --repo USER/REPO=PATH mirrors the local Git repository at PATH into the
store as if it were USER/REPO on GitHub: its branches, tags and
refs/pull/N/head refs become branches, tags and open pull requests.

The store is created (as a bare Git repository) if it does not exist. With
no --store, it is {DEFAULT_STORE} under the current folder. Prometheus
metrics are served at http://ADDR:PORT/metrics (--metrics, default
{DEFAULT_METRICS}; port 0 picks a free port, logged at start-up; `none`
turns them off). SIGINT or SIGTERM stops the service: running builds are
cancelled and the exit status is 0.

examples:
  kitci serve --pipeline ci/self.py --repo kitci/kitci=.
  kitci serve --store /srv/kitci/store --pipeline pipeline.py \\
      --repo alice/proj=/srv/git/proj.git --canary alice/proj/prs/12 \\
      --web-ui https://ci.example.org --metrics 127.0.0.1:9091
"""

_STATUS_EPILOG = f"""\
Reads the store directly (no running service is needed): every open pull
request, branch and tag of each monitored repository in github-metadata,
with each job's state and description from the target's status branch,
then the newest entry of each status branch.

--json prints a JSON list with one object per target:
  target          printed form, e.g. "alice/proj/pr/1", "alice/proj/ref/heads/main"
  arg             command-line form for --canary, e.g. "alice/proj/prs/1"
  repo            "user/repo"
  kind            "pr", "branch" or "tag"
  number          PR number (null for branches and tags)
  ref             ref name, e.g. "heads/main" (null for PRs)
  title           PR title (null for branches and tags)
  head            commit hash the target points at now
  status_branch   name of the target's status branch
  jobs            list of {{"name", "state", "description", "logs"}}, where
                  state is "success", "pending" or "failure" and logs is
                  the stored logs JSON (null, an object or a pair)
  history         null if nothing was recorded yet, else {{"commit",
                  "message" (first line), "source_commit", "metadata_commit"}}
  up_to_date      true when the history's source commit is the head

examples:
  kitci status
  kitci status --store /srv/kitci/store --json | jq '.[].jobs'

The default store is {DEFAULT_STORE}.
"""


def _repo_arg(text: str) -> tuple[Repo, Path]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} must look like USER/REPO=PATH (the path of a local Git "
            "repository)"
        )
    name, _, path = text.partition("=")
    try:
        repo = Repo.parse(name)
    except InvalidNameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r} has no path after '='")
    return repo, Path(path)


def _web_ui_arg(text: str) -> str:
    try:
        return check_web_ui(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _canary_arg(text: str) -> Target:
    try:
        return parse_target_arg(text)
    except InvalidNameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be between {MIN_INTERVAL} and {MAX_INTERVAL:g} seconds"
        )
    return value


def _metrics_arg(text: str) -> tuple[str, int] | None:
    if text.lower() == "none":
        return None
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(
            f"{text!r} must look like ADDR:PORT (e.g. 127.0.0.1:8088 or "
            "[::1]:8088) or be 'none'"
        )
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(
            f"port {port_text!r} in {text!r} is not 0-65535"
        )
    try:
        # An address, not a name: nothing is looked up.
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{host!r} in {text!r} is not an IP address (e.g. 127.0.0.1 or ::1)"
        ) from None
    return host, int(port_text)


def _log_level_arg(text: str) -> str:
    level = text.upper()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of {', '.join(_LOG_LEVELS)}"
        )
    return level


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of kitci's command line."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="kitci",
        description="kitci: a continuous-integration engine that keeps its state\n"
        "and logs in a Git repository (a Trio port of DataKitCI).",
        epilog="Run 'kitci COMMAND --help' for a command's options.",
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the CI engine as a service",
        description="Run the CI engine: test every open pull request, branch and\n"
        "tag of the pipeline's projects and write the results to the store.",
        epilog=_SERVE_EPILOG,
        formatter_class=formatter,
    )
    serve.add_argument(
        "--store",
        metavar="PATH",
        default=DEFAULT_STORE,
        help=f"the Git repository holding kitci's state (default: {DEFAULT_STORE}, "
        "created on first use)",
    )
    serve.add_argument(
        "--work-dir",
        metavar="PATH",
        default=DEFAULT_WORK_DIR,
        help="a folder for the pipeline's working files, such as Git clones "
        f"(default: {DEFAULT_WORK_DIR})",
    )
    serve.add_argument(
        "--pipeline",
        metavar="FILE",
        required=True,
        help="the Python file defining `projects` (required)",
    )
    serve.add_argument(
        "--repo",
        metavar="USER/REPO=PATH",
        type=_repo_arg,
        action="append",
        default=[],
        help="bridge the local Git repository at PATH in as USER/REPO (repeatable)",
    )
    serve.add_argument(
        "--web-ui",
        metavar="URL",
        type=_web_ui_arg,
        default=DEFAULT_WEB_UI,
        help=f"absolute http(s) address used in status target URLs "
        f"(default: {DEFAULT_WEB_UI})",
    )
    serve.add_argument(
        "--canary",
        metavar="TARGET",
        type=_canary_arg,
        action="append",
        default=[],
        help="test only this target: USER/REPO/prs/N, USER/REPO/heads/NAME or "
        "USER/REPO/tags/NAME (repeatable)",
    )
    serve.add_argument(
        "--max-evaluations",
        metavar="N",
        type=_positive_int,
        default=DEFAULT_MAX_EVALUATIONS,
        help=f"how many job evaluations may run at once "
        f"(default: {DEFAULT_MAX_EVALUATIONS})",
    )
    serve.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        type=_metrics_arg,
        default=DEFAULT_METRICS,
        help=f"serve Prometheus metrics at http://ADDR:PORT/metrics, or 'none' "
        f"(default: {DEFAULT_METRICS}, reachable from this machine only)",
    )
    serve.add_argument(
        "--poll-interval",
        metavar="SECONDS",
        type=_interval,
        default=DEFAULT_POLL_INTERVAL,
        help="how often to look for changes to github-metadata made by other "
        f"processes (default: {DEFAULT_POLL_INTERVAL:g})",
    )
    serve.add_argument(
        "--bridge-interval",
        metavar="SECONDS",
        type=_interval,
        default=DEFAULT_BRIDGE_INTERVAL,
        help="how often to poll the --repo repositories "
        f"(default: {DEFAULT_BRIDGE_INTERVAL:g})",
    )
    serve.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=_log_level_arg,
        default="INFO",
        help=f"one of {', '.join(_LOG_LEVELS)} (default: INFO)",
    )

    status = commands.add_parser(
        "status",
        help="print the targets of a store and their jobs",
        description="Print the open pull requests, branches and tags of a store\n"
        "with each job's state, and the newest history entry of each.",
        epilog=_STATUS_EPILOG,
        formatter_class=formatter,
    )
    status.add_argument(
        "--store",
        metavar="PATH",
        default=DEFAULT_STORE,
        help=f"the store to read (default: {DEFAULT_STORE})",
    )
    status.add_argument(
        "--json", action="store_true", help="print JSON for scripts (see below)"
    )

    for name, summary, description in (
        (
            "rebuild",
            "build a saved result again",
            "Ask a running `kitci serve` to build the saved result on BRANCH\n"
            "again (the branch named in a job's logs, e.g. cmd-test-...), then\n"
            "to evaluate the jobs that use it.",
        ),
        (
            "cancel",
            "cancel a running build",
            "Ask a running `kitci serve` to cancel the build writing BRANCH;\n"
            "the jobs that wait for it fail, saying it was cancelled, and a\n"
            "later `kitci rebuild BRANCH` runs it again.",
        ),
    ):
        command = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=f"example:\n  kitci {name} cmd-test-kitci-0123abc... "
            "--server 127.0.0.1:8088",
            formatter_class=formatter,
        )
        command.add_argument(
            "branch", metavar="BRANCH", type=_branch_arg, help="the result branch"
        )
        command.add_argument(
            "--server",
            metavar="ADDR:PORT",
            type=_metrics_arg,
            default=DEFAULT_METRICS,
            help="the --metrics address of the running service "
            f"(default: {DEFAULT_METRICS})",
        )
    return parser


# Pipelines ----------------------------------------------------------------------


def _exception_line(exc: BaseException, path: Path) -> str:
    """Describe `exc` in one line, with the line of `path` it came from."""
    where: str | None = None
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        where = f"line {exc.lineno}"
        if exc.filename and Path(exc.filename) != path:
            where = f"{exc.filename}, {where}"
        text = f"{type(exc).__name__}: {exc.msg}"
    else:
        for frame, frame_line in traceback.walk_tb(exc.__traceback__):
            if Path(frame.f_code.co_filename) == path:
                where = f"line {frame_line}"
        text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    text = " ".join(text.split())
    return f"{where}: {text}" if where is not None else text


def _import_pipeline(path: Path, name: str) -> ModuleType:
    """Import the pipeline at `path` (shown as `name` in errors)."""
    spec = importlib.util.spec_from_file_location(PIPELINE_MODULE, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load pipeline {name}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[PIPELINE_MODULE] = module
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[PIPELINE_MODULE]
        raise UsageError(
            f"cannot load pipeline {name}: {_exception_line(exc, path)}"
        ) from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


SetupFn = Callable[["PipelineContext"], Awaitable[None]]


@dataclass(frozen=True)
class Pipeline:
    """A loaded pipeline file: its projects and its optional `setup`."""

    path: Path
    projects: Mapping[Repo, MakeTerms]
    setup: SetupFn | None = None


@dataclass(frozen=True)
class PipelineContext:
    """What `kitci serve` hands to a pipeline's `async def setup(context)`.

    `setup` runs once, after the store is open and the local bridges have
    made their first sync, before the engine starts. It typically opens the
    Git plugin's clones (`kitci.builds.GitRepo.open(context.builds, ...)`)
    and keeps them in module globals for the jobs functions of `projects`.
    """

    # The store kitci runs on.
    store: Store
    # The build cache that runs cached build steps (saved in the store).
    builds: BuildCache
    # A folder for the pipeline's working files, such as Git clones
    # (--work-dir; it may not exist yet).
    work_dir: Path
    # The local repositories bridged with --repo, by name.
    repos: Mapping[Repo, Path]


def load_pipeline(file: str) -> Pipeline:
    """Import the pipeline `file` and return its checked `projects` and `setup`.

    Raises `UsageError` with a one-line message when the file is missing,
    cannot be imported, has no valid `projects` mapping, or a `setup` that
    is not an `async def` function.
    """
    path = Path(file)
    if not path.exists():
        raise UsageError(f"pipeline file {file} does not exist")
    if not path.is_file():
        raise UsageError(f"pipeline {file} is not a file")
    module = _import_pipeline(path.resolve(), file)
    where = f"pipeline {file}"
    if not hasattr(module, "projects"):
        raise UsageError(
            f"{where} defines no module-level `projects` mapping "
            '("user/repo" -> function returning the jobs of a target)'
        )
    projects: object = module.projects
    if not isinstance(projects, Mapping):
        raise UsageError(
            f'{where}: `projects` must be a mapping of "user/repo" to a '
            f"function, not {_a(type(projects).__name__)}"
        )
    if not projects:
        raise UsageError(f"{where}: `projects` is empty, so there is nothing to test")
    checked: dict[Repo, MakeTerms] = {}
    for key, value in projects.items():
        if isinstance(key, Repo):
            repo = key
        elif isinstance(key, str):
            try:
                repo = Repo.parse(key)
            except InvalidNameError as exc:
                raise UsageError(f"{where}: bad key in `projects`: {exc}") from None
        else:
            raise UsageError(
                f'{where}: key {key!r} in `projects` is not a "user/repo" string'
            )
        if repo in checked:
            raise UsageError(f"{where}: `projects` names {repo} twice")
        if not callable(value):
            raise UsageError(
                f"{where}: the value for {repo} in `projects` must be a function "
                f"taking a target, not {_a(type(value).__name__)}"
            )
        checked[repo] = _guarded(repo, value)
    setup: object = getattr(module, "setup", None)
    if setup is not None and not inspect.iscoroutinefunction(setup):
        raise UsageError(
            f"{where}: `setup` must be an `async def setup(context)` function"
        )
    return Pipeline(path.resolve(), checked, cast(SetupFn | None, setup))


def _guarded(repo: Repo, make_jobs: Callable[[Target], object]) -> MakeTerms:
    """Wrap a pipeline's jobs function so that its mistakes fail one job.

    A function that raises, or returns something other than a mapping of
    job names to terms, gives the target a single failing job named
    `pipeline` (and an error in the log) instead of stopping the engine.
    """

    def make(target: Target) -> Mapping[str, Term[str]]:
        try:
            jobs = make_jobs(target)
        except Exception as exc:
            log.error(
                "the pipeline's jobs function for %s raised for %s",
                repo,
                target,
                exc_info=True,
            )
            text = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return {PIPELINE_ERROR_JOB: fail(f"Pipeline error: {text}")}
        problem = _jobs_problem(jobs)
        if problem is not None:
            log.error(
                "the pipeline's jobs function for %s, for %s: %s", repo, target, problem
            )
            return {PIPELINE_ERROR_JOB: fail(f"Pipeline error: {problem}")}
        assert isinstance(jobs, Mapping)
        return dict(jobs)

    return make


def _a(noun: str) -> str:
    """Return `noun` with its indefinite article: `a list`, `an int`."""
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def _jobs_problem(jobs: object) -> str | None:
    if not isinstance(jobs, Mapping):
        return (
            "the jobs must be a mapping of names to terms, "
            f"not {_a(type(jobs).__name__)}"
        )
    for name, value in jobs.items():
        if not isinstance(name, str) or not is_valid_path_component(name):
            return f"job name {name!r} is not a valid name (no '/', not empty)"
        if not isinstance(value, Term):
            return f"job {name} is {_a(type(value).__name__)}, not a Term"
    return None


# `kitci serve` ------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """Everything `kitci serve` needs, checked."""

    store: Path
    pipeline: Pipeline
    work_dir: Path
    repos: Mapping[Repo, Path]
    web_ui: str
    canaries: tuple[Target, ...]
    max_evaluations: int
    metrics: tuple[str, int] | None
    poll_interval: float
    bridge_interval: float


def _check_store_path(path: Path) -> None:
    if path.is_file():
        raise UsageError(
            f"store path {path} is a file; give the path of a Git repository or "
            "of a folder to create one in"
        )
    _check_can_create(path, f"the store {path}")


def _check_can_create(path: Path, what: str) -> None:
    """Raise `UsageError` if `path` is missing and a file is in its way."""
    if not path.exists():
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UsageError(f"cannot create {what}: {parent} is a file")
                break


def _git_dir(path: Path) -> Path | None:
    """Return the Git directory of the repository at `path` (exactly), or None.

    For a linked worktree this is the main repository's directory, whose
    refs the worktree shares.
    """
    try:
        repo = pygit2.Repository(str(path), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
    except pygit2.GitError:
        return None
    git_dir = Path(repo.path).resolve()
    common = git_dir / "commondir"
    if common.is_file():
        git_dir = (git_dir / common.read_text().strip()).resolve()
    return git_dir


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Check the options of `kitci serve`; raise `UsageError` naming a mistake."""
    repos: dict[Repo, Path] = {}
    named = [repo for repo, _ in args.repo]
    for repo in named:
        if named.count(repo) > 1:
            raise UsageError(f"--repo names {repo} twice")
    for repo, path in args.repo:
        if not path.exists():
            raise UsageError(f"--repo {repo}={path}: {path} does not exist")
        if not path.is_dir():
            raise UsageError(f"--repo {repo}={path}: {path} is not a folder")
        if _git_dir(path) is None:
            raise UsageError(f"--repo {repo}={path}: {path} is not a Git repository")
        repos[repo] = path.absolute()
    store = Path(args.store)
    _check_store_path(store)
    store_git_dir = _git_dir(store) if store.exists() else None
    for repo, path in repos.items():
        if store_git_dir is not None and _git_dir(path) == store_git_dir:
            # kitci's own branches would be bridged back in, without end.
            raise UsageError(
                f"--repo {repo}={path} is the store itself; keep the store in "
                "a repository of its own"
            )
    work_dir = Path(args.work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise UsageError(f"--work-dir {work_dir} is not a folder")
    _check_can_create(work_dir, f"--work-dir {work_dir}")
    pipeline = load_pipeline(args.pipeline)
    for canary in args.canary:
        if canary.repo not in pipeline.projects:
            raise UsageError(
                f"--canary {canary.to_arg()}: {canary.repo} is not a project of "
                f"the pipeline {args.pipeline}"
            )
    return ServeConfig(
        store=store,
        pipeline=pipeline,
        work_dir=work_dir.absolute(),
        repos=repos,
        web_ui=args.web_ui,
        canaries=tuple(dict.fromkeys(args.canary)),
        max_evaluations=args.max_evaluations,
        metrics=args.metrics,
        poll_interval=args.poll_interval,
        bridge_interval=args.bridge_interval,
    )


async def serve(
    config: ServeConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the service until cancelled or until SIGINT or SIGTERM.

    Binds the metrics endpoint and opens the store first, then runs the
    metrics server, the build cache, the local bridges, the pipeline's
    `setup` and the engine in one nursery. Raises `_ExitError` if the
    endpoint, the store or `setup` fails.
    """
    # Signals that arrive while the service stops are redelivered by Trio
    # when the receiver closes; with these handlers they are ignored, so a
    # second SIGTERM (as `timeout` sends) cannot kill the stopping service.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        listeners: list[trio.SocketListener] = []
        if config.metrics is not None:
            host, port = config.metrics
            try:
                listeners = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise _ExitError(
                    f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
                ) from None
        try:
            try:
                store = await Store.open(
                    config.store, create=True, poll_interval=config.poll_interval
                )
            except StoreError as exc:
                raise _ExitError(str(exc)) from None
            with _service_lock(store):
                failure = await _run_service(
                    config, store, listeners, signals, task_status
                )
        finally:
            for listener in listeners:
                await listener.aclose()
    if failure is not None:
        raise _ExitError(failure, status=1)
    log.info("kitci stopped")


async def _run_service(
    config: ServeConfig,
    store: Store,
    listeners: list[trio.SocketListener],
    signals: AsyncIterator[int],
    task_status: trio.TaskStatus[None],
) -> str | None:
    """Run everything in one nursery; return why it stopped early, if it did."""
    projects = config.pipeline.projects
    for repo in config.repos:
        if repo not in projects:
            log.warning(
                "%s is bridged but the pipeline has no project for it: "
                "it is mirrored but not tested",
                repo,
            )
    builds = BuildCache(store)
    engine = Engine(
        store,
        projects,
        web_ui=config.web_ui,
        canaries=config.canaries or None,
        max_evaluations=config.max_evaluations,
        builds=builds,
    )
    failure: str | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
        if listeners:
            for listener in listeners:
                log.info("serving metrics at %s", _metrics_url(listener))
                host = listener.socket.getsockname()[0]
                if not ipaddress.ip_address(host).is_loopback:
                    log.warning(
                        "%s is reachable from other machines: anyone who can "
                        "reach it can cancel and rebuild builds",
                        _metrics_url(listener),
                    )
            handler = functools.partial(_handle_http, _Control(engine, builds))
            nursery.start_soon(trio.serve_listeners, handler, list(listeners))
            listeners.clear()
        await nursery.start(builds.run)
        if config.repos:
            bridge = LocalBridge(store, config.repos)
            await nursery.start(
                functools.partial(bridge.run, interval=config.bridge_interval)
            )
            for repo, path in config.repos.items():
                log.info("bridging %s from %s", repo, path)
        setup = config.pipeline.setup
        if setup is not None:
            context = PipelineContext(store, builds, config.work_dir, config.repos)
            try:
                await setup(context)
            except Exception as exc:
                log.error("the pipeline's setup failed", exc_info=True)
                failure = (
                    f"the setup of pipeline {config.pipeline.path} failed: "
                    f"{_exception_line(exc, config.pipeline.path)}"
                )
                nursery.cancel_scope.cancel()
                return failure
        await nursery.start(engine.run)
        log.info(
            "kitci is running: store %s, projects %s%s",
            config.store,
            ", ".join(map(str, sorted(projects))),
            ""
            if not config.canaries
            else f", canaries {', '.join(map(str, config.canaries))}",
        )
        task_status.started()
    return failure


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("received %s: stopping", signal.Signals(signum).name)
        scope.cancel()
        return


@contextmanager
def _service_lock(store: Store) -> Iterator[None]:
    """Hold the store's service lock, or raise `_ExitError` if it is taken.

    Two services on one store would stay consistent (branches move by
    compare-and-swap) but write every status twice; one is a mistake.
    The lock is an advisory `flock` on `kitci-serve.lock` in the store's Git
    directory, released by the system if the process dies.
    """
    path = Path(store.git_dir) / "kitci-serve.lock"
    with open(path, "a+", encoding="ascii") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            raise _ExitError(
                f"the store {store.path} is in use by another kitci serve "
                f"(pid {holder}); stop it first",
                status=1,
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        yield


def _metrics_url(listener: trio.SocketListener) -> str:
    address = listener.socket.getsockname()
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


# The metrics endpoint -----------------------------------------------------------


class _Control:
    """What the HTTP endpoint may act on: rebuilds and cancellations."""

    def __init__(self, engine: Engine, builds: BuildCache) -> None:
        self.engine = engine
        self.builds = builds

    async def act(self, action: str, branch: str) -> tuple[str, str]:
        """Rebuild or cancel `branch`; return an HTTP status and a message."""
        try:
            if action == "rebuild":
                if await self.engine.rebuild(branch):
                    message = f"rebuilding {branch}"
                else:
                    message = f"{branch} is building already; rebuild ignored"
            else:
                self.builds.live_logs.cancel(branch, "cancelled by request")
                message = f"cancelled the build of {branch}"
        except KitciError as exc:
            return "404 Not Found", f"{_REPLY_MARK}{exc}"
        log.info("%s (asked over HTTP)", message)
        return "200 OK", f"{_REPLY_MARK}{message}"


async def _handle_http(control: _Control | None, stream: trio.SocketStream) -> None:
    """Answer one HTTP request.

    `GET /metrics` gives the Prometheus metrics; `POST /rebuild?branch=B`
    and `POST /cancel?branch=B` rebuild or cancel a build (see `kitci
    rebuild` and `kitci cancel`).
    """
    try:
        with trio.fail_after(_REQUEST_TIMEOUT):
            head = await _read_request_head(stream)
            action = _control_request(head)
            if action is not None and control is not None:
                status, message = await control.act(*action)
                reply = _response(
                    status, f"{message}\n".encode(), "text/plain; charset=utf-8"
                )
            else:
                reply = _respond(head)
            await stream.send_all(reply)
    except (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        trio.TooSlowError,
        OSError,
    ) as exc:
        log.debug("metrics connection closed: %r", exc)
    except Exception:
        log.exception("metrics request failed")
    finally:
        await stream.aclose()


async def _read_request_head(stream: trio.SocketStream) -> bytes | None:
    """Read up to the blank line ending the request head; None if too long."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > _MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


def _response(
    status: str, body: bytes, content_type: str, *, head: bool = False, extra: str = ""
) -> bytes:
    lines = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return lines.encode("ascii") + (b"" if head else body)


def _control_request(head: bytes | None) -> tuple[str, str] | None:
    """Return (action, branch) for `POST /rebuild|/cancel?branch=B`, else None."""
    if head is None:
        return None
    parts = head.split(b"\n", 1)[0].strip().decode("latin-1").split(" ")
    if len(parts) != 3 or parts[0] != "POST":
        return None
    target = urllib.parse.urlsplit(parts[1])
    branches = urllib.parse.parse_qs(target.query).get("branch", [])
    if target.path not in ("/rebuild", "/cancel") or len(branches) != 1:
        return None
    return target.path[1:], branches[0]


async def _control(
    server: tuple[str, int], action: str, branch: str
) -> tuple[int, str]:
    """Send `action` for `branch` to a running service; return status, message."""
    host, port = server
    query = urllib.parse.urlencode({"branch": branch})
    request = (
        f"POST /{action}?{query} HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        with trio.fail_after(_REQUEST_TIMEOUT + 5):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(request)
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
    except (OSError, trio.TooSlowError) as exc:
        raise _ExitError(
            f"cannot reach kitci serve at {_show_address(host, port)}: {exc} "
            "(is it running, with --metrics at that address?)",
            status=1,
        ) from None
    head, _, body = data.partition(b"\r\n\r\n")
    words = head.split(b"\r\n", 1)[0].split(b" ")
    code = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
    message = body.decode("utf-8", "replace").strip()
    if not message.startswith(_REPLY_MARK):
        # Whatever answered is not kitci serve (or an older one).
        return 0, (
            f"{_show_address(host, port)} does not look like kitci serve "
            f"(HTTP status {code or 'missing'}); give its --metrics address"
        )
    return code, message.removeprefix(_REPLY_MARK)


def _show_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _branch_arg(text: str) -> str:
    if not pygit2.reference_is_valid_name(f"refs/heads/{text}"):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise argparse.ArgumentTypeError(f"{shown!r} is not a valid branch name")
    return text


def _respond(head: bytes | None) -> bytes:
    text_type = "text/plain; charset=utf-8"
    if head is None:
        return _response(
            "431 Request Header Fields Too Large", b"too large\n", text_type
        )
    request_line = head.split(b"\n", 1)[0].strip().decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", b"bad request\n", text_type)
    method, target, _ = parts
    path = urllib.parse.urlsplit(target).path
    if path != "/metrics":
        return _response(
            "404 Not Found",
            b"not found: try /metrics\n",
            text_type,
            head=method == "HEAD",
        )
    if method not in ("GET", "HEAD"):
        return _response(
            "405 Method Not Allowed",
            b"use GET\n",
            text_type,
            extra="Allow: GET, HEAD\r\n",
        )
    return _response(
        "200 OK", generate_latest(), METRICS_CONTENT_TYPE, head=method == "HEAD"
    )


# `kitci status` -----------------------------------------------------------------


class JobRow(msgspec.Struct):
    name: str
    state: str
    description: str
    logs: Any


class HistoryRow(msgspec.Struct):
    commit: str
    message: str
    source_commit: str | None
    metadata_commit: str | None


class TargetRow(msgspec.Struct):
    target: str
    arg: str
    repo: str
    kind: str
    number: int | None
    ref: str | None
    title: str | None
    head: str
    status_branch: str
    jobs: list[JobRow]
    history: HistoryRow | None
    up_to_date: bool


def _open_targets(snapshot: Snapshot) -> list[PR | Ref]:
    found: list[PR | Ref] = []
    for repo in snapshot.monitored_repos():
        prs = snapshot.open_prs(repo)
        found.extend(prs[n] for n in sorted(prs))
        refs = snapshot.refs(repo)
        found.extend(refs[name] for name in sorted(refs))
    return found


def _collect_sync(
    repo: pygit2.Repository, targets: Sequence[Target]
) -> dict[Target, tuple[HistoryState, str]]:
    states = load_states_sync(repo, targets)
    out: dict[Target, tuple[HistoryState, str]] = {}
    for target, state in states.items():
        message = ""
        if state.commit is not None:
            commit = repo[state.commit].peel(pygit2.Commit)
            lines = commit.message.strip().splitlines()
            message = lines[0] if lines else ""
        out[target] = (state, message)
    return out


async def collect_status(store: Store) -> list[TargetRow]:
    """Return every open target of `store` with its recorded jobs."""
    head = await store.head(METADATA_BRANCH)
    snapshot = await SnapshotParser().parse(store, head)
    values = _open_targets(snapshot)
    targets = [v.target for v in values]
    recorded = await store.run_sync(lambda repo: _collect_sync(repo, targets))
    rows: list[TargetRow] = []
    for value in values:
        target = value.target
        state, message = recorded[target]
        jobs = [
            JobRow(
                name,
                output.result.status,
                output.result.descr,
                msgspec.json.decode(encode_output(output))["logs"],
            )
            for name, output in sorted(state.jobs.items())
        ]
        history = None
        if state.commit is not None:
            history = HistoryRow(
                state.commit, message, state.source_commit, state.metadata_commit
            )
        rows.append(
            TargetRow(
                target=str(target),
                arg=target.to_arg(),
                repo=str(target.repo),
                kind=target.kind,
                number=target.number if isinstance(target, PRTarget) else None,
                ref=None if isinstance(target, PRTarget) else "/".join(target.name),
                title=value.title if isinstance(value, PR) else None,
                head=value.head,
                status_branch=status_branch_name(target),
                jobs=jobs,
                history=history,
                up_to_date=history is not None and state.source_commit == value.head,
            )
        )
    return rows


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _short(commit: str | None) -> str:
    return "-" if not commit else commit[:7]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = []
    for row in (header, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_status(rows: Sequence[TargetRow]) -> str:
    """Return the readable tables `kitci status` prints."""
    if not rows:
        return "No open pull requests, branches or tags in the store.\n"
    jobs: list[list[str]] = []
    for row in rows:
        first = [row.target, _short(row.head)]
        blank = ["", ""]
        if not row.jobs:
            jobs.append([*first, "-", "-", "(no jobs recorded yet)"])
        for i, job in enumerate(row.jobs):
            jobs.append(
                [
                    *(first if i == 0 else blank),
                    job.name,
                    job.state,
                    _one_line(job.description),
                ]
            )
    history: list[list[str]] = []
    for row in rows:
        if row.history is None:
            history.append([row.target, "-", "-", "(nothing recorded yet)"])
        else:
            source = _short(row.history.source_commit)
            if not row.up_to_date:
                source += " (old head)"
            history.append(
                [
                    row.target,
                    _short(row.history.commit),
                    source,
                    _one_line(row.history.message),
                ]
            )
    lines = _table(("TARGET", "HEAD", "JOB", "STATE", "DESCRIPTION"), jobs)
    lines += ["", "Newest history entry of each target's status branch:"]
    lines += _table(("TARGET", "COMMIT", "SOURCE", "MESSAGE"), history)
    return "\n".join(lines) + "\n"


async def _status(store_path: Path, as_json: bool) -> str:
    try:
        store = await Store.open(store_path, create=False)
        rows = await collect_status(store)
    except StoreError as exc:
        raise _ExitError(str(exc)) from None
    if as_json:
        return (
            json.dumps(msgspec.to_builtins(rows), indent=2, ensure_ascii=False) + "\n"
        )
    return format_status(rows)


# Entry point --------------------------------------------------------------------


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format=_LOG_FORMAT, stream=sys.stderr, force=True)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        raise _ExitError(
            "choose a command: serve, status, rebuild or cancel (see 'kitci --help')"
        )
    if extra:
        raise _ExitError(
            f"unrecognized arguments: {' '.join(extra)} "
            f"(see 'kitci {args.command} --help')"
        )
    if args.command == "status":
        if Path(args.store).is_file():
            raise _ExitError(f"store path {args.store} is a file, not a Git repository")
        if not Path(args.store).exists():
            raise _ExitError(
                f"store {args.store} does not exist (`kitci serve --store "
                f"{args.store}` creates one)"
            )
        # Warnings about malformed metadata, formatted like the service's.
        _setup_logging("WARNING")
        sys.stdout.write(trio.run(_status, Path(args.store), args.json))
        return 0
    if args.command in ("rebuild", "cancel"):
        if args.server is None:
            raise _ExitError("--server must be the address of a running kitci serve")
        code, body = trio.run(_control, args.server, args.command, args.branch)
        if code != 200:
            raise _ExitError(body, status=1)
        print(body)
        return 0
    _setup_logging(args.log_level)
    try:
        config = serve_config(args)
    except UsageError as exc:
        raise _ExitError(str(exc)) from None
    trio.run(serve, config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run kitci's command line; return the exit status."""
    try:
        return _run(argv)
    except _ExitError as exc:
        message = " ".join(str(exc).split())
        print(f"kitci: error: {message}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.critical("kitci stopped by an unexpected error: %s", exc, exc_info=True)
        return 1
