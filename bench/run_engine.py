"""Measure kitci's engine on one store: cold start, one change, full passes.

Runs in a worker process of its own (see `bench.__main__`), so the memory
peak it reports is the engine's alone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pygit2
import trio

from kitci import METADATA_BRANCH, PRTarget, Store, Target, Transaction, TreeReader
from kitci._engine import Engine

from .common import memory, progress, spread
from .workload import (
    JOBS,
    REPOS,
    WEB_UI,
    Workload,
    describe,
    fake_hash,
    make_terms,
    status_url,
)

__all__ = ["run_engine"]

_REF = f"refs/heads/{METADATA_BRANCH}"
# How long the engine must stay quiet (no evaluation, no commit) to count as
# settled between two measurements.
_QUIET = 0.2
# Longer than this without settling means the engine is stuck: give up.
_SETTLE_LIMIT = 600


@dataclass(frozen=True)
class _Flush:
    """What the engine had done when one of its flushes finished."""

    time: float
    head: str
    evaluations: int
    status_commits: int
    history_commits: int
    # The process's resident set now and at its peak, and what libgit2 caches.
    rss: int
    peak_rss: int
    libgit2_cache: int


class _FlushWatch:
    """Record the head of `github-metadata` after each flush of `engine`.

    Reads the branch with a pygit2 handle of its own, on the event loop,
    right when the flush finishes, so the time recorded is when the commit
    had landed, whatever the measuring code does afterwards.
    """

    def __init__(self, engine: Engine, store: Path) -> None:
        self.engine = engine
        self.repo = pygit2.Repository(str(store))
        self.records: list[_Flush] = []
        self._new = trio.Event()

    def head(self) -> str:
        return str(self.repo.references[_REF].target)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self.engine.wait_flushed()
            now = time.perf_counter()
            used = memory()
            self.records.append(
                _Flush(
                    now,
                    self.head(),
                    self.engine.evaluations,
                    self.engine.status_commits,
                    self.engine.history_commits,
                    used["rss"],
                    used["peak"],
                    pygit2.settings.cached_memory[0],
                )
            )
            self._new.set()
            self._new = trio.Event()

    async def wait_for(self, since: float, accept: Callable[[_Flush], bool]) -> _Flush:
        """Return the first flush after `since` that `accept` accepts."""
        checked = 0
        while True:
            while checked < len(self.records):
                record = self.records[checked]
                checked += 1
                if record.time > since and accept(record):
                    return record
            await self._new.wait()


class _StatusReader:
    """Find kitci's statuses in one commit of `github-metadata`.

    Looks each repository's `commit` directory up once: path look-ups from
    the root would parse the big directories again for every status.
    """

    def __init__(self, repo: pygit2.Repository, commit: str) -> None:
        self.root = repo[commit].peel(pygit2.Commit).tree
        self._commits: dict[tuple[str, str], pygit2.Tree | None] = {}

    def jobs(self, target: Target, head: str) -> pygit2.Tree | None:
        """Return the `ci/datakit` directory of `head`'s statuses, if any."""
        key = (target.repo.user, target.repo.name)
        if key not in self._commits:
            where = f"{key[0]}/{key[1]}/commit"
            found = self.root / where if where in self.root else None
            self._commits[key] = found if isinstance(found, pygit2.Tree) else None
        commits = self._commits[key]
        if commits is None or head not in commits:
            return None
        statuses = commits / head
        if not isinstance(statuses, pygit2.Tree) or "status/ci/datakit" not in statuses:
            return None
        jobs = statuses / "status/ci/datakit"
        return jobs if isinstance(jobs, pygit2.Tree) else None


def _missing(
    repo: pygit2.Repository, commit: str, heads: Collection[tuple[Target, str]]
) -> set[tuple[Target, str]]:
    """Return the (target, head) pairs whose statuses are not all in `commit`."""
    reader = _StatusReader(repo, commit)
    missing: set[tuple[Target, str]] = set()
    for target, head in heads:
        jobs = reader.jobs(target, head)
        if jobs is None or not all(job in jobs for job in JOBS):
            missing.add((target, head))
    return missing


def _wrong_statuses(
    repo: pygit2.Repository,
    commit: str,
    heads: Collection[tuple[Target, str]],
    other: dict[str, str],
) -> list[str]:
    """Return the statuses in `commit` that differ from what the jobs compute."""
    reader = _StatusReader(repo, commit)
    wrong: list[str] = []
    for target, head in heads:
        jobs = reader.jobs(target, head)
        for job in JOBS:
            expected = {
                "state": "success",
                "description": describe(job, head, other.get(head)),
                "target_url": status_url(target, head, job),
            }
            for name, text in expected.items():
                found = None
                if jobs is not None and f"{job}/{name}" in jobs:
                    blob = jobs / f"{job}/{name}"
                    if isinstance(blob, pygit2.Blob):
                        found = blob.data.decode().strip()
                if found != text:
                    wrong.append(f"{target}:{job} {name}: {found!r} != {text!r}")
    return wrong


async def _settle(engine: Engine, watch: _FlushWatch) -> float:
    """Wait until the engine has handled the newest commit and been quiet a while.

    Returns how long that took.
    """
    start = time.perf_counter()

    def state() -> tuple[object, ...]:
        return (
            engine.evaluations,
            engine.status_commits,
            engine.history_commits,
            engine.handled_commit,
            watch.head(),
        )

    last = state()
    quiet_since = time.perf_counter()
    with trio.fail_after(_SETTLE_LIMIT):
        while time.perf_counter() - quiet_since < _QUIET or last[3] != last[4]:
            await trio.sleep(0.02)
            now = state()
            if now != last:
                last, quiet_since = now, time.perf_counter()
    return quiet_since - start


async def _commit_metadata(store: Store, path: str, data: str, message: str) -> None:
    """Write one file to `github-metadata` in its own commit, as the bridge does."""

    def build(reader: TreeReader, tx: Transaction) -> str:
        tx.write(path, data)
        return message

    await store.update_branch(METADATA_BRANCH, build)


async def _measure(
    store_path: Path, work: Workload, incremental: bool, repeats: int, passes: int
) -> dict[str, Any]:
    mode = "kitci" if incremental else "original"
    label = f"{mode} N={work.size}"
    jobs = work.size * len(JOBS)
    heads = dict(work.heads)
    result: dict[str, Any] = {"mode": mode, "targets": work.size, "jobs": jobs}

    store = await Store.open(store_path)
    before = memory()
    engine = Engine(
        store, dict.fromkeys(REPOS, make_terms), web_ui=WEB_UI, incremental=incremental
    )
    watch = _FlushWatch(engine, store_path)
    checker = pygit2.Repository(str(store_path))

    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)

        # Cold start: from starting the engine to every status committed.
        progress(f"{label}: cold start, {work.size} targets x {len(JOBS)} jobs")
        start = time.perf_counter()
        await nursery.start(engine.run)
        remaining = set(heads.items())
        candidates: list[_Flush] = []

        def complete(record: _Flush) -> bool:
            # Worth a look in the store only once every job has a result.
            if record.head == (candidates[-1].head if candidates else None):
                return False
            views = engine.targets()
            done = len(views) == work.size and all(
                job.output is not None
                for view in views.values()
                for job in view.jobs.values()
            )
            if done:
                candidates.append(record)
            return done

        since = start
        while True:
            record = await watch.wait_for(since, complete)
            since = record.time
            remaining = await trio.to_thread.run_sync(
                _missing, checker, record.head, remaining
            )
            if not remaining:
                break
            progress(
                f"{label}: {len(remaining)} targets still without statuses at a flush"
            )
        cold = record.time - start
        result.update(
            cold_s=cold,
            cold_evaluations=record.evaluations,
            cold_status_commits=record.status_commits,
            cold_history_commits=record.history_commits,
            rss_before=before["rss"],
            # Memory as the flush finished, before the checks below read
            # the store through pygit2 too.
            rss_after=record.rss,
            peak_rss=record.peak_rss,
            bytes_per_job=(record.rss - before["rss"]) / jobs,
            libgit2_cache=record.libgit2_cache,
        )
        if not (repeats or passes):
            progress(f"{label}: cold start took {cold:.3f}s")
            nursery.cancel_scope.cancel()
            return result
        progress(f"{label}: cold start took {cold:.3f}s; checking the statuses written")
        wrong = await trio.to_thread.run_sync(
            _wrong_statuses, checker, record.head, list(heads.items()), dict(work.other)
        )
        result["wrong_statuses"] = len(wrong)
        for line in wrong[:5]:
            progress(f"{label}: WRONG {line}")
        result["settle_after_cold_s"] = await _settle(engine, watch)
        result["evaluations_after_cold_settled"] = engine.evaluations

        # Full passes: an unrelated commit; the original re-evaluates everything.
        progress(f"{label}: {passes} unrelated commits")
        expected = 0 if incremental else jobs
        times, counts = [], []
        for i in range(passes):
            evaluations = engine.evaluations

            def evaluated(record: _Flush, before: int = evaluations) -> bool:
                return record.evaluations - before >= expected

            await _commit_metadata(store, ".bench-tick", f"{i}\n", "Unrelated change")
            start = time.perf_counter()
            record = await watch.wait_for(start, evaluated)
            times.append(record.time - start)
            counts.append(record.evaluations - evaluations)
            await _settle(engine, watch)
        result["unrelated_s"] = spread(times)
        result["unrelated_evaluations"] = max(counts)
        if expected:
            result["evaluations_per_s"] = expected / spread(times)["median"]

        # One change: a PR's head moves; time until its statuses are committed.
        progress(f"{label}: {repeats} single-PR changes")
        chooser = random.Random(7)
        prs = work.prs()
        times, counts, settled = [], [], []
        for i in range(repeats):
            target: PRTarget = chooser.choice(prs)
            new_head = fake_hash("change", i)
            path = f"{target.repo}/pr/{target.number}/head"
            evaluations = engine.evaluations
            await _commit_metadata(store, path, f"{new_head}\n", f"Update {target}")
            start = time.perf_counter()

            def written(
                record: _Flush, target: Target = target, head: str = new_head
            ) -> bool:
                return not _missing(watch.repo, record.head, [(target, head)])

            record = await watch.wait_for(start, written)
            times.append(record.time - start)
            counts.append(record.evaluations - evaluations)
            heads[target] = new_head
            await _settle(engine, watch)
            settled.append(engine.evaluations - evaluations)
            if (i + 1) % 5 == 0:
                progress(
                    f"{label}: change {i + 1}/{repeats}, median so far "
                    f"{spread(times)['median'] * 1000:.1f}ms"
                )
        result["change_s"] = spread(times)
        result["change_evaluations"] = spread([float(c) for c in counts])
        result["change_evaluations_settled"] = spread([float(c) for c in settled])
        progress(f"{label}: checking every status at the end")
        wrong = await trio.to_thread.run_sync(
            _wrong_statuses,
            checker,
            watch.head(),
            list(heads.items()),
            dict(work.other),
        )
        result["wrong_statuses_end"] = len(wrong)
        result["peak_rss_end"] = memory()["peak"]
        result["evaluations_total"] = engine.evaluations
        nursery.cancel_scope.cancel()
    return result


def run_engine(
    store: Path, size: int, *, incremental: bool, repeats: int, passes: int
) -> dict[str, Any]:
    """Measure the engine on the store of `size` targets at `store`.

    With `repeats` and `passes` both 0, measure the cold start only.
    """
    work = Workload.of_size(size)
    return trio.run(_measure, store, work, incremental, repeats, passes)
