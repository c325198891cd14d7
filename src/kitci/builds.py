"""Build steps: live logs, cached builds, external commands and Git checkouts.

async with open_build_cache(store) as cache:
    repo = await GitRepo.open(cache, remote="https://...", work_dir="work/proj")
    test = repo.fetch_head(head).bind(
        lambda commit: repo.run_command(commit, "test", ["make", "test"], timeout=600)
    )
"""

from ._cache import BuildCache, Builder, BuildFailed, open_build_cache
from ._git import GitCommit, GitRepo
from ._live_log import LiveLog, LiveLogs, LogFollower
from ._process import CommandFailed, CompletedCommand, run_process

__all__ = [
    "BuildCache",
    "BuildFailed",
    "Builder",
    "CommandFailed",
    "CompletedCommand",
    "GitCommit",
    "GitRepo",
    "LiveLog",
    "LiveLogs",
    "LogFollower",
    "open_build_cache",
    "run_process",
]
