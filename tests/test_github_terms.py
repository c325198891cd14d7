"""Tests of kitci.github: terms reading github-metadata, on a real store."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kitci import (
    METADATA_BRANCH,
    PR,
    PRTarget,
    Ref,
    RefTarget,
    Repo,
    Snapshot,
    SnapshotParser,
    Status,
    StatusState,
    Store,
    Target,
    Transaction,
    TreeReader,
    github,
    write_status,
)
from kitci._terms import Context, Evaluated, Failed, Ok, Pending, Term

T = TypeVar("T")

REPO = Repo("alice", "proj")
PR_9 = PRTarget(REPO, 9)
MAIN = RefTarget(REPO, ("heads", "main"))
H1 = "1" * 40
H2 = "2" * 40
H3 = "3" * 40
OTHER = "ci/other"


class Metadata:
    """A store whose github-metadata branch the test writes like a bridge."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.parser = SnapshotParser()

    async def commit(
        self,
        files: dict[str, str | None] | None = None,
        statuses: list[Status] | None = None,
    ) -> Snapshot:
        """Write `files` (None removes) and `statuses`; return the new snapshot."""

        def build(reader: TreeReader, tx: Transaction) -> str:
            for path, text in (files or {}).items():
                if text is None:
                    tx.remove(path)
                else:
                    tx.write(path, text + "\n")
            for status in statuses or []:
                write_status(tx, status)
            return "Bridge update"

        await self.store.update_branch(METADATA_BRANCH, build)
        head = await self.store.head(METADATA_BRANCH)
        return await self.parser.parse(self.store, head)

    async def set_status(
        self,
        state: StatusState,
        description: str | None = None,
        url: str | None = None,
        context: str = OTHER,
        commit: str = H1,
    ) -> Snapshot:
        parts = tuple(context.split("/"))
        status = Status(REPO, commit, parts, state, description, url)
        return await self.commit(statuses=[status])


def pr_files(number: int, head: str, title: str = "Fix it") -> dict[str, str | None]:
    where = f"{REPO}/pr/{number}"
    return {
        f"{where}/head": head,
        f"{where}/state": "open",
        f"{where}/title": title,
        f"{where}/owner": "bob",
    }


@pytest.fixture
async def metadata(tmp_path: Path) -> Metadata:
    store = await Store.open(tmp_path / "s", create=True)
    meta = Metadata(store)
    await meta.commit(
        {
            f"{REPO}/.monitor": "",
            **pr_files(9, H1),
            f"{REPO}/ref/heads/main/head": H2,
            f"{REPO}/ref/heads/feature/x/head": H3,
            f"{REPO}/ref/tags/v1.0/head": H3,
        }
    )
    return meta


async def evaluate(
    snapshot: Snapshot, t: Term[T], target: Target = PR_9
) -> Evaluated[T]:
    assert t.immediate
    return await t.evaluate(Context(snapshot, target, "test"))


async def latest(metadata: Metadata) -> Snapshot:
    return await metadata.commit()


# Targets and heads ----------------------------------------------------------------


async def test_target_gives_the_pr_or_ref_of_the_snapshot(metadata: Metadata) -> None:
    snap = await latest(metadata)
    assert await evaluate(snap, github.target(PR_9)) == (
        Ok(PR(REPO, 9, H1, "open", "Fix it", "bob", "master")),
        None,
    )
    assert await evaluate(snap, github.target(MAIN)) == (
        Ok(Ref(REPO, ("heads", "main"), H2)),
        None,
    )


async def test_missing_target_fails_naming_it(metadata: Metadata) -> None:
    snap = await latest(metadata)
    missing_pr = PRTarget(REPO, 10)
    missing_ref = RefTarget(REPO, ("heads", "gone"))
    for t in (github.target(missing_pr), github.head(missing_pr)):
        assert await evaluate(snap, t) == (
            Failed("Target alice/proj/pr/10 does not exist"),
            None,
        )
    assert await evaluate(snap, github.head(missing_ref)) == (
        Failed("Target alice/proj/ref/heads/gone does not exist"),
        None,
    )


async def test_a_removed_pr_no_longer_exists(metadata: Metadata) -> None:
    snap = await metadata.commit({f"{REPO}/pr/9": None})
    assert await evaluate(snap, github.head(PR_9)) == (
        Failed("Target alice/proj/pr/9 does not exist"),
        None,
    )


async def test_head_follows_the_snapshot(metadata: Metadata) -> None:
    assert await evaluate(await latest(metadata), github.head(PR_9)) == (Ok(H1), None)
    moved = await metadata.commit({f"{REPO}/pr/9/head": H2})
    assert await evaluate(moved, github.head(PR_9)) == (Ok(H2), None)
    assert await evaluate(moved, github.head(MAIN)) == (Ok(H2), None)


async def test_branch_head_and_tag(metadata: Metadata) -> None:
    snap = await latest(metadata)
    assert await evaluate(snap, github.branch_head(REPO, "main")) == (Ok(H2), None)
    assert await evaluate(snap, github.branch_head(REPO, "feature/x")) == (
        Ok(H3),
        None,
    )
    assert await evaluate(snap, github.tag(REPO, "v1.0")) == (Ok(H3), None)
    # A branch and a tag are different refs even with the same name.
    assert await evaluate(snap, github.tag(REPO, "main")) == (
        Failed("Target alice/proj/ref/tags/main does not exist"),
        None,
    )


@pytest.mark.parametrize("name", ["a..b", "", "x/", "bad name", "end.lock", "a~1"])
async def test_invalid_ref_name_fails_naming_it(metadata: Metadata, name: str) -> None:
    snap = await latest(metadata)
    assert await evaluate(snap, github.branch_head(REPO, name)) == (
        Failed(f"Invalid ref name {'heads/' + name!r}"),
        None,
    )
    assert await evaluate(snap, github.tag(REPO, name)) == (
        Failed(f"Invalid ref name {'tags/' + name!r}"),
        None,
    )


# Statuses -------------------------------------------------------------------------


async def test_ci_status_and_target_url(metadata: Metadata) -> None:
    snap = await latest(metadata)
    assert await evaluate(snap, github.ci_status(OTHER, PR_9)) == (Ok(None), None)
    assert await evaluate(snap, github.ci_target_url(OTHER, PR_9)) == (Ok(None), None)

    snap = await metadata.set_status(StatusState.PENDING, "Running")
    assert await evaluate(snap, github.ci_status(OTHER, PR_9)) == (
        Ok(StatusState.PENDING),
        None,
    )
    assert await evaluate(snap, github.ci_target_url(OTHER, PR_9)) == (Ok(None), None)

    snap = await metadata.set_status(StatusState.SUCCESS, url="https://ci.example/1")
    assert await evaluate(snap, github.ci_status(("ci", "other"), PR_9)) == (
        Ok(StatusState.SUCCESS),
        None,
    )
    assert await evaluate(snap, github.ci_target_url(OTHER, PR_9)) == (
        Ok("https://ci.example/1"),
        None,
    )


async def test_statuses_are_read_on_the_targets_current_head(
    metadata: Metadata,
) -> None:
    await metadata.set_status(StatusState.SUCCESS, commit=H1)
    snap = await metadata.set_status(StatusState.FAILURE, commit=H2)
    assert await evaluate(snap, github.ci_status(OTHER, PR_9)) == (
        Ok(StatusState.SUCCESS),
        None,
    )
    assert await evaluate(snap, github.ci_status(OTHER, MAIN), MAIN) == (
        Ok(StatusState.FAILURE),
        None,
    )
    moved = await metadata.commit({f"{REPO}/pr/9/head": H3})
    assert await evaluate(moved, github.ci_status(OTHER, PR_9)) == (Ok(None), None)


async def test_status_terms_of_a_missing_target_fail(metadata: Metadata) -> None:
    snap = await latest(metadata)
    gone = PRTarget(REPO, 77)
    expected = (Failed("Target alice/proj/pr/77 does not exist"), None)
    assert await evaluate(snap, github.ci_status(OTHER, gone)) == expected
    assert await evaluate(snap, github.ci_target_url(OTHER, gone)) == expected
    assert await evaluate(snap, github.ci_success_target_url(OTHER, gone)) == expected


async def test_ci_success_target_url_through_each_state(metadata: Metadata) -> None:
    def url_of(snap: Snapshot) -> Any:
        return evaluate(snap, github.ci_success_target_url(OTHER, PR_9))

    # The other CI has not posted anything yet.
    snap = await latest(metadata)
    assert await url_of(snap) == (
        Pending("Waiting for ci/other status to appear"),
        None,
    )

    # It starts, with and then without a description.
    snap = await metadata.set_status(StatusState.PENDING, "Build 7 running")
    assert await url_of(snap) == (
        Pending("Waiting for ci/other to complete (Build 7 running)"),
        None,
    )
    snap = await metadata.set_status(StatusState.PENDING)
    assert await url_of(snap) == (Pending("Waiting for ci/other to complete"), None)

    # It fails, or errors.
    snap = await metadata.set_status(StatusState.FAILURE, "3 tests failed")
    assert await url_of(snap) == (Failed("ci/other failed (3 tests failed)"), None)
    snap = await metadata.set_status(StatusState.FAILURE)
    assert await url_of(snap) == (Failed("ci/other failed"), None)
    snap = await metadata.set_status(StatusState.ERROR, "No runner")
    assert await url_of(snap) == (Failed("ci/other errored (No runner)"), None)

    # It succeeds, first without a URL, then with one.
    snap = await metadata.set_status(StatusState.SUCCESS, "All passed")
    assert await url_of(snap) == (Failed("ci/other succeeded, but has no URL!"), None)
    snap = await metadata.set_status(
        StatusState.SUCCESS, "All passed", "https://ci.example/7"
    )
    assert await url_of(snap) == (Ok("https://ci.example/7"), None)


async def test_status_contexts_that_are_prefixes_are_distinct(
    metadata: Metadata,
) -> None:
    travis = "continuous-integration/travis-ci"
    await metadata.set_status(StatusState.SUCCESS, url="https://t/push", context=travis)
    await metadata.set_status(
        StatusState.FAILURE, "Broken", context=travis + "/pr/extra"
    )
    await metadata.set_status(StatusState.PENDING, context="continuous-integration")
    snap = await metadata.set_status(
        StatusState.SUCCESS, url="https://t/pr", context=travis + "/pr"
    )

    def success_url(context: str) -> Term[str]:
        return github.ci_success_target_url(context, PR_9)

    assert await evaluate(snap, success_url(travis)) == (Ok("https://t/push"), None)
    assert await evaluate(snap, success_url(travis + "/pr")) == (
        Ok("https://t/pr"),
        None,
    )
    assert await evaluate(snap, success_url(travis + "/pr/extra")) == (
        Failed(f"{travis}/pr/extra failed (Broken)"),
        None,
    )
    assert await evaluate(snap, success_url("continuous-integration")) == (
        Pending("Waiting for continuous-integration to complete"),
        None,
    )
    # A context with no status of its own, only longer ones under it, has
    # not appeared; nor has a longer one that nobody posted.
    snap = await metadata.set_status(StatusState.SUCCESS, context="lint/python")
    assert await evaluate(snap, success_url("lint")) == (
        Pending("Waiting for lint status to appear"),
        None,
    )
    assert await evaluate(snap, success_url(travis + "/pr/x")) == (
        Pending(f"Waiting for {travis}/pr/x status to appear"),
        None,
    )
    assert await evaluate(snap, github.ci_status(travis + "/pr", PR_9)) == (
        Ok(StatusState.SUCCESS),
        None,
    )


async def test_github_terms_record_what_they_read(metadata: Metadata) -> None:
    snap = await metadata.set_status(StatusState.SUCCESS, url="https://ci.example/1")
    ctx = Context(snap, PR_9, "test")
    job = github.ci_success_target_url(OTHER, PR_9).bind(
        lambda url: github.branch_head(REPO, "feature/x")
    )
    assert await job.evaluate(ctx) == (Ok(H3), None)
    assert ctx.reads == {
        ("pr", REPO, 9),
        ("status", REPO, H1, ("ci", "other")),
        ("ref", REPO, ("heads", "feature", "x")),
    }


# The example pipeline ------------------------------------------------------------


def load_example() -> dict[str, Callable[[Target], dict[str, Term[str]]]]:
    path = Path(__file__).resolve().parents[1] / "ci" / "example.py"
    spec = importlib.util.spec_from_file_location("kitci_example_pipeline", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    projects: dict[str, Callable[[Target], dict[str, Term[str]]]] = module.projects
    return projects


async def test_example_pipeline_jobs_follow_the_other_ci(tmp_path: Path) -> None:
    projects = load_example()
    assert list(projects) == ["example-org/example-repo"]
    repo = Repo("example-org", "example-repo")
    pr = PRTarget(repo, 1)
    branch = RefTarget(repo, ("heads", "main"))
    context = ("continuous-integration", "travis-ci", "pr")

    async def outcomes(snap: Snapshot, target: Target) -> dict[str, object]:
        jobs = projects[str(repo)](target)
        found: dict[str, object] = {}
        for name, job in jobs.items():
            outcome, _ = await job.evaluate(Context(snap, target, name))
            found[name] = outcome
        return found

    # A PR and a branch appear; the other CI has not reported yet.
    store = await Store.open(tmp_path / "s", create=True)
    meta = Metadata(store)
    where = f"{repo}/pr/1"
    snap = await meta.commit(
        {
            f"{where}/head": H1,
            f"{where}/state": "open",
            f"{where}/title": "WIP: try",
            f"{where}/owner": "bob",
            f"{repo}/ref/heads/main/head": H2,
        }
    )
    name = "continuous-integration/travis-ci/pr"
    waiting = Pending(f"Waiting for {name} status to appear")
    assert await outcomes(snap, branch) == {"other-ci": waiting}
    assert await outcomes(snap, pr) == {
        "other-ci": waiting,
        "ready": Failed("The title starts with WIP"),
    }

    # The title is fixed; the other CI is running.
    await meta.commit({f"{where}/title": "Try"})
    running = Status(repo, H1, context, StatusState.PENDING, "Build 3")
    snap = await meta.commit(statuses=[running])
    assert await outcomes(snap, pr) == {
        "other-ci": Pending(f"Waiting for {name} to complete (Build 3)"),
        "ready": Pending(f"Waiting for {name}"),
    }

    # It passes.
    passed = Status(repo, H1, context, StatusState.SUCCESS, "Done", "https://t/3")
    snap = await meta.commit(statuses=[passed])
    assert await outcomes(snap, pr) == {
        "other-ci": Ok(f"{name} passed: https://t/3"),
        "ready": Ok("Commit 11111111 is ready to merge"),
    }

    # It fails on the branch.
    failed = Status(repo, H2, context, StatusState.FAILURE, "Red")
    snap = await meta.commit(statuses=[failed])
    assert await outcomes(snap, branch) == {
        "other-ci": Failed(f"{name} failed (Red)"),
    }
