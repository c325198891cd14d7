"""The pipeline kitci tests itself with: lint, type check and tests.

`make serve` runs `kitci serve --pipeline ci/self.py --repo kitci/kitci=.`:
the local bridge mirrors this repository's branches, tags and
`refs/pull/N/head` into the store, and every one of them gets three jobs,
each run on a clean checkout of its head commit.

The commands use the tools of the Python environment kitci itself runs in
(`make install` puts ruff, mypy and pytest there), with the checkout's
`src/` first on the import path, so a head is tested with its own code and
nothing is installed per commit.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from kitci import PipelineContext, Repo, Target, Term, github
from kitci.builds import GitRepo

REPO = Repo("kitci", "kitci")

# Set by `setup`: the local clone that fetches each head and runs commands.
_git: GitRepo | None = None

# Seconds a step may run before it is stopped and fails.
_TIMEOUT = 30 * 60


async def setup(context: PipelineContext) -> None:
    """Open the clone of this repository, fetched from the bridged path."""
    global _git
    source = context.repos.get(REPO)
    if source is None:
        raise RuntimeError(f"run kitci serve with --repo {REPO}=PATH for this pipeline")
    _git = await GitRepo.open(
        context.builds,
        remote=str(source),
        work_dir=context.work_dir / "kitci",
        name="kitci",
    )


def _step(target: Target, label: str, argv: list[str], done: str) -> Term[str]:
    """Return a job running `argv` on a checkout of `target`'s head."""
    git = _git
    if git is None:
        raise RuntimeError("ci/self.py: setup() has not run")
    commit = github.head(target).bind(git.fetch_head)
    env = {"PYTHONPATH": "src", "PYTHONDONTWRITEBYTECODE": "1"}
    run = commit.bind(
        lambda head: git.run_command(head, label, argv, timeout=_TIMEOUT, extra_env=env)
    )
    return run.map(lambda _: done)


def jobs(target: Target) -> Mapping[str, Term[str]]:
    """Return the jobs of one branch, tag or PR of kitci."""
    python = sys.executable
    return {
        "lint": _step(
            target,
            "lint",
            [python, "-m", "ruff", "check", "."],
            "ruff found nothing",
        ),
        "typecheck": _step(
            target, "typecheck", [python, "-m", "mypy"], "mypy --strict passed"
        ),
        "test": _step(
            target,
            "test",
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            "All tests passed",
        ),
    }


projects = {str(REPO): jobs}
