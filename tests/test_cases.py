"""The scenarios of the shared bug-report cases, one test (or a few) per case.

Shorthand as in the cases: P/ is alice/proj/ on github-metadata, S(H, j)/
is P/commit/H/status/ci/datakit/j/, and M1, M2, ... are commits made by the
bridge (the test) rather than by kitci.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import pygit2
import pytest
import trio
from prometheus_client import REGISTRY

from conftest import (
    ALICE,
    H1,
    H2,
    H3,
    H4,
    H5,
    bridge,
    descr,
    file_at,
    handled,
    log,
    make_engine,
    messages,
    pr,
    read,
    ref,
    running,
    settled,
    status,
    status_dir,
    until,
)
from kitci import (
    METADATA_BRANCH,
    PR,
    Failed,
    LiveLogRef,
    Ok,
    PRTarget,
    RefTarget,
    Repo,
    Store,
    Target,
    github,
    parse_status_branch,
    status_branch_name,
)
from kitci._engine import Engine, MakeTerms
from kitci._history import INDEX_BRANCH, builds_of_commit
from kitci._live_log import LiveLog
from kitci._store import read_files
from kitci._terms import Context, Evaluated, Pending, SlowAnswer, Term, of_slow
from kitci.builds import BuildCache, open_build_cache

MONITOR = {"alice/proj/.monitor": ""}
BOB = Repo("bob", "fork")


def gauge(kind: str) -> float | None:
    return REGISTRY.get_sample_value("DataKitCI_engine_active_targets", {"type": kind})


def head_of(ctx: Context) -> str:
    target = ctx.target
    if isinstance(target, PRTarget):
        value: object = ctx.read_pr(target.repo, target.number)
    else:
        value = ctx.read_ref(target.repo, target.name)
    assert isinstance(value, PR) or value is not None
    return value.head  # type: ignore[attr-defined, no-any-return]  # PR or Ref


def job(fn: Callable[[Context], Ok[str] | Pending | Failed]) -> Term[str]:
    return Term(sync=lambda ctx: (fn(ctx), None))


def jobs(**terms: Term[str]) -> MakeTerms:
    return lambda target: dict(terms)


async def history_of(store: Store, target: Target) -> list[tuple[str, str]]:
    """Return (state commit, source-commit) of `target`'s status branch,
    newest first."""
    out = []
    for commit, _ in await log(store, status_branch_name(target)):
        source = await file_at(store, commit, "source-commit")
        out.append((commit, (source or "").strip()))
    return out


async def files_under(store: Store, prefix: str) -> dict[str, bytes]:
    head = await store.head(METADATA_BRANCH)
    assert head is not None

    def collect(repo: pygit2.Repository) -> dict[str, bytes]:
        tree = repo[head].peel(pygit2.Commit).tree
        return {p: d for p, d in read_files(repo, tree).items() if p.startswith(prefix)}

    return await store.run_sync(collect)


async def every_version(store: Store, path: str) -> list[str | None]:
    """Return `path` in every github-metadata commit, oldest first."""
    return [
        await file_at(store, commit, path)
        for commit, _ in reversed(await log(store, METADATA_BRANCH))
    ]


# 01 -------------------------------------------------------------------------------

PR4 = PRTarget(ALICE, 4)


@pytest.mark.parametrize("how", ["closed", "removed", "closed-while-running"])
async def test_01_pr_closed_while_kitci_was_down(store: Store, how: str) -> None:
    counter: Counter[Target] = Counter()

    def waiting(ctx: Context) -> Pending:
        counter[ctx.target] += 1
        return Pending("Waiting for Godot")

    projects = {ALICE: jobs(test=job(waiting))}
    m2 = (
        {"alice/proj/pr/4/state": "closed"}
        if how != "removed"
        else {"alice/proj/pr/4": None}
    )
    engine = make_engine(store, projects)
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(4, H1)}, "M1")
        await until(engine, lambda: _state_is(store, H1, "pending"))
        await settled(engine)
        assert counter == {PR4: 1}
        if how == "closed-while-running":
            await bridge(store, m2, "M2")
            await settled(engine)
    if how != "closed-while-running":
        await bridge(store, m2, "M2")
    metadata_head = await store.head(METADATA_BRANCH)
    history_head = await store.head("status-alice-proj-pr-4")
    assert history_head is not None

    engine = make_engine(store, projects)
    async with running(engine):
        await settled(engine)
        assert gauge("pr") == 0
    assert engine.evaluations == 0
    assert counter == {PR4: 1}
    assert await store.head(METADATA_BRANCH) == metadata_head
    assert (await messages(store, METADATA_BRANCH))[0] == "M2"
    assert await store.head("status-alice-proj-pr-4") == history_head
    assert await status(store, H1, "test") == "pending"
    assert engine.prs()[ALICE] == {}


async def _state_is(store: Store, head: str, state: str, job: str = "test") -> bool:
    return await status(store, head, job) == state


# 02 -------------------------------------------------------------------------------


async def test_02_same_hash_in_two_repositories(store: Store) -> None:
    counter: Counter[Target] = Counter()

    def verdict(result: Ok[str] | Failed) -> Term[str]:
        def run(ctx: Context) -> Ok[str] | Failed:
            counter[ctx.target] += 1
            head_of(ctx)
            return result

        return job(run)

    projects = {
        ALICE: jobs(test=verdict(Ok("passed"))),
        BOB: jobs(test=verdict(Failed("failed"))),
    }
    pr1, pr7 = PRTarget(ALICE, 1), PRTarget(BOB, 7)
    engine = make_engine(store, projects)
    async with running(engine):
        await bridge(
            store,
            {**MONITOR, "bob/fork/.monitor": "", **pr(1, H1), **pr(7, H1, repo=BOB)},
        )
        await settled(engine)
        assert await status(store, H1, "test") == "success"
        assert await status(store, H1, "test", BOB) == "failure"
        assert await store.head("status-alice-proj-pr-1") is not None
        assert await store.head("status-bob-fork-pr-7") is not None
        index = await store.head(INDEX_BRANCH)
        assert index is not None
        alice_entry = await file_at(store, index, f"alice/proj/commit/{H1}/pr-1")
        bob_entry = await file_at(store, index, f"bob/fork/commit/{H1}/pr-7")
        assert (alice_entry or "").strip() == await store.head("status-alice-proj-pr-1")
        assert (bob_entry or "").strip() == await store.head("status-bob-fork-pr-7")
        assert await builds_of_commit(store, BOB, H1) == {
            pr7: (bob_entry or "").strip()
        }
        assert engine.targets_of_commit(ALICE, H1) == [pr1]
        assert engine.targets_of_commit(BOB, H1) == [pr7]

        bob_files = await files_under(store, "bob/")
        bob_history = await store.head("status-bob-fork-pr-7")
        await bridge(store, {"alice/proj/pr/1": None}, "M2")
        await settled(engine)
        assert engine.targets_of_commit(ALICE, H1) == []
        assert engine.targets_of_commit(BOB, H1) == [pr7]
        assert set(engine.prs()[BOB]) == {7}
    assert counter == {pr1: 1, pr7: 1}
    assert await files_under(store, "bob/") == bob_files
    assert await store.head("status-bob-fork-pr-7") == bob_history
    assert (await messages(store, METADATA_BRANCH))[0] == "M2"


# 03 -------------------------------------------------------------------------------

PR3 = PRTarget(ALICE, 3)


class Build:
    """A build seen through a slow term: pending until finished."""

    def __init__(self, branch: str) -> None:
        self.branch = branch
        self.ready = trio.Event()
        self.answer: SlowAnswer[str] | None = None

    async def check(self) -> SlowAnswer[str]:
        if self.answer is not None:
            return self.answer
        return SlowAnswer(Pending("Building"), LiveLogRef(self.branch), self.ready)

    def finish(self, outcome: Ok[str] | Failed) -> None:
        self.answer = SlowAnswer(outcome)
        self.ready.set()


@pytest.mark.parametrize("kind", ["blocking", "ignores-cancel", "slow-build"])
async def test_03_force_push_while_building_old_result_lands_late(
    store: Store, kind: str
) -> None:
    """The evaluation for H1 is stopped when the head moves, and its late
    failure never lands anywhere."""
    started = {H1: trio.Event(), H2: trio.Event()}
    finish_h1 = trio.Event()
    cancelled: list[str] = []
    builds = {H1: Build("log-h1"), H2: Build("log-h2")}

    async def run(ctx: Context) -> Evaluated[str]:
        head = head_of(ctx)
        started[head].set()
        if head == H2:
            return Ok(f"tested {head}"), None
        if kind == "blocking":
            try:
                await trio.sleep_forever()
            finally:
                cancelled.append(head)
        if kind == "ignores-cancel":
            with trio.CancelScope(shield=True):
                await finish_h1.wait()
            return Failed(f"late failure of {head}"), None
        answer = await builds[head].check()
        if isinstance(answer.outcome, Pending) and answer.ready is not None:
            ctx.wake_on(answer.ready)
        return answer.outcome, answer.logs

    engine = make_engine(store, {ALICE: jobs(test=Term(run=run))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(3, H1)}, "M1")
        with trio.fail_after(5):
            await started[H1].wait()
        if kind == "slow-build":
            await until(engine, lambda: _state_is(store, H1, "pending"))
        await bridge(store, {"alice/proj/pr/3/head": H2}, "M2")
        await handled(engine)
        if kind == "ignores-cancel":
            # Never two evaluations of one job at once: H2 waits for H1.
            assert not started[H2].is_set()
            finish_h1.set()
        await until(engine, lambda: _state_is(store, H2, "success"))
        if kind == "slow-build":
            # The H1 build now fails, after H2's success.
            builds[H1].finish(Failed(f"late failure of {H1}"))
        await settled(engine)
        if kind == "slow-build":
            assert builds[H1].ready.statistics().tasks_waiting == 0
    if kind == "blocking":
        assert cancelled == [H1]

    h2_states = await every_version(store, f"{status_dir(H2, 'test')}/state")
    seen = [s for s in h2_states if s is not None]
    assert seen
    assert set(seen) == {"success\n"}
    h2_descrs = await every_version(store, f"{status_dir(H2, 'test')}/description")
    assert {d for d in h2_descrs if d is not None} == {f"tested {H2}\n"}
    h1_states = await every_version(store, f"{status_dir(H1, 'test')}/state")
    assert "failure\n" not in h1_states
    for message in await messages(store, METADATA_BRANCH):
        assert "late failure" not in message
    sources = [source for _, source in reversed(await history_of(store, PR3))]
    assert sources[-1] == H2
    assert H1 not in sources[sources.index(H2) :]
    for commit, _ in await log(store, status_branch_name(PR3)):
        output = await file_at(store, commit, "job/test/output")
        assert "late failure" not in (output or "")


# 04 -------------------------------------------------------------------------------


class Abandoned:
    def __init__(self) -> None:
        self.branches: list[str] = []

    def abandon(self, branch: str) -> None:
        self.branches.append(branch)


async def test_04_branch_and_tag_with_the_same_name(store: Store) -> None:
    heads_seen: dict[Target, list[str]] = {}
    builds: dict[Target, Build] = {}

    def make(target: Target) -> dict[str, Term[str]]:
        def hash_of(ctx: Context) -> Ok[str]:
            head = head_of(ctx)
            heads_seen.setdefault(ctx.target, []).append(head)
            return Ok(head)

        assert isinstance(target, RefTarget)
        build = builds.setdefault(target, Build(f"log-{target.name[0]}"))
        return {"test": job(hash_of), "build": of_slow(build.check)}

    branch = RefTarget(ALICE, ("heads", "v1.0"))
    tag = RefTarget(ALICE, ("tags", "v1.0"))
    abandoned = Abandoned()
    engine = make_engine(store, {ALICE: make}, builds=abandoned)
    async with running(engine):
        await bridge(
            store, {**MONITOR, **ref("heads/v1.0", H1), **ref("tags/v1.0", H2)}, "M1"
        )
        await settled(engine)
        assert set(engine.refs()[ALICE]) == {branch.name, tag.name}
        assert await descr(store, H1, "test") == H1
        assert await descr(store, H2, "test") == H2
        assert heads_seen == {branch: [H1], tag: [H2]}
        assert [s for _, s in await history_of(store, branch)] == [H1]
        assert [s for _, s in await history_of(store, tag)] == [H2]
        assert status_branch_name(branch) == "status-alice-proj-ref-heads-v1.0"
        assert status_branch_name(tag) == "status-alice-proj-ref-tags-v1.0"
        # Both builds are running: each evaluation waits for its build.
        assert builds[branch].ready.statistics().tasks_waiting == 1
        assert builds[tag].ready.statistics().tasks_waiting == 1
        branch_history = await store.head(status_branch_name(branch))

        await bridge(store, {"alice/proj/ref/tags/v1.0": None}, "M2")
        await settled(engine)
        assert abandoned.branches == ["log-tags"]
        assert builds[tag].ready.statistics().tasks_waiting == 0
        assert builds[branch].ready.statistics().tasks_waiting == 1
        assert set(engine.refs()[ALICE]) == {branch.name}
        assert heads_seen == {branch: [H1], tag: [H2]}
        # The branch's build goes on and its result still arrives.
        builds[branch].finish(Ok("built"))
        await until(engine, lambda: _descr_is(store, H1, "build", "built"))
    assert await store.head(status_branch_name(branch)) != branch_history


async def _descr_is(store: Store, head: str, job: str, text: str) -> bool:
    return await descr(store, head, job) == text


# 05 -------------------------------------------------------------------------------


async def test_05_several_targets_share_one_head(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kitci")
    counter: Counter[Target] = Counter()

    def passes(ctx: Context) -> Ok[str]:
        counter[ctx.target] += 1
        return Ok(f"tested {head_of(ctx)}")

    master = RefTarget(ALICE, ("heads", "master"))
    pr1, pr2 = PRTarget(ALICE, 1), PRTarget(ALICE, 2)
    engine = make_engine(store, {ALICE: jobs(test=job(passes))})
    async with running(engine):
        await bridge(
            store, {**MONITOR, **ref("heads/master", H1), **pr(1, H1), **pr(2, H1)}
        )
        await settled(engine)
        assert await status(store, H1, "test") == "success"
        for name in ("ref-heads-master", "pr-1", "pr-2"):
            assert await store.head(f"status-alice-proj-{name}") is not None
        index = await store.head(INDEX_BRANCH)
        listed = await store.read(index, lambda r: r.listdir(f"alice/proj/commit/{H1}"))
        assert sorted(listed) == ["pr-1", "pr-2", "ref-heads-master"]
        assert set(engine.targets_of_commit(ALICE, H1)) == {master, pr1, pr2}
        assert len(engine.targets_of_commit(ALICE, H1)) == 3

        await bridge(store, {"alice/proj/pr/2": None}, "M2")
        await settled(engine)
        assert (await messages(store, METADATA_BRANCH))[0] == "M2"
        assert set(engine.targets_of_commit(ALICE, H1)) == {master, pr1}
        assert counter == {master: 1, pr1: 1, pr2: 1}

        # Master's and PR 1's jobs go on.
        await bridge(store, {**ref("heads/master", H2), **pr(1, H3)}, "M3")
        await until(engine, lambda: _state_is(store, H2, "success"))
        await until(engine, lambda: _state_is(store, H3, "success"))
    assert await status(store, H1, "test") == "success"
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []
    assert not any("conflict" in r.getMessage().lower() for r in caplog.records)


# 06 -------------------------------------------------------------------------------


async def test_06_status_contexts_that_are_prefixes(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    def both(ctx: Context) -> Ok[str]:
        head = head_of(ctx)
        travis = ctx.read_status(ALICE, head, ("continuous-integration", "travis-ci"))
        travis_pr = ctx.read_status(
            ALICE, head, ("continuous-integration", "travis-ci", "pr")
        )
        assert travis is not None
        assert travis_pr is not None
        return Ok(f"{travis.state} {travis_pr.state}")

    via_terms = github.ci_status(
        "continuous-integration/travis-ci/pr", PRTarget(ALICE, 2)
    )
    base = f"alice/proj/commit/{H1}/status"
    existing = {
        f"{base}/continuous-integration/travis-ci/state": "success",
        f"{base}/continuous-integration/travis-ci/pr/state": "failure",
        f"{base}/ci/datakit/state": "pending",
    }
    ok = job(lambda ctx: Ok("ok"))
    projects = {
        ALICE: jobs(test=job(both), other=via_terms.map(str), state=ok, description=ok)
    }
    engine = make_engine(store, projects)
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(2, H1), **existing})
        before = await files_under(store, base)
        await until(engine, lambda: _state_is(store, H1, "success"))
        await settled(engine)
    assert await descr(store, H1, "test") == "success failure"
    assert await descr(store, H1, "other") == "failure"
    after = await files_under(store, base)
    ours = {p for p in after if p.startswith(f"{base}/ci/datakit/test/")}
    ours |= {p for p in after if p.startswith(f"{base}/ci/datakit/other/")}
    assert {p: d for p, d in after.items() if p not in ours} == before
    assert before == {p: (t + "\n").encode() for p, t in existing.items()}
    # Jobs whose status would clobber the `ci/datakit` context are refused.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("'state'" in m for m in errors)
    assert any("'description'" in m for m in errors)


# 07 -------------------------------------------------------------------------------

LONG = "  " + "\n".join(f"ligne {i}: élève déçu à Noël " * 2 for i in range(12))
LONG += "  \n"


@pytest.mark.parametrize(
    ("outcome", "state"),
    [(Failed(LONG), "failure"), (Ok(""), "success"), (Ok("   "), "success")],
)
async def test_07_long_multiline_and_empty_descriptions(
    store: Store, outcome: Ok[str] | Failed, state: str
) -> None:
    assert len(LONG) > 500
    evaluations = 0

    def run(ctx: Context) -> Ok[str] | Failed:
        nonlocal evaluations
        evaluations += 1
        head_of(ctx)
        return outcome

    engine = make_engine(store, {ALICE: jobs(test=job(run))})
    where = status_dir(H1, "test")
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(6, H1)})
        await until(engine, lambda: _state_is(store, H1, state))
        await settled(engine)
        data = (await files_under(store, f"{where}/description")).get(
            f"{where}/description"
        )
        url = await read(store, METADATA_BRANCH, f"{where}/target_url")
        assert url == f"http://127.0.0.1:8080/alice/proj/commit/{H1}?test=test\n"
        # Evaluating again with the same result writes nothing.
        await bridge(store, {"alice/proj/pr/6/title": "new title"}, "M2")
        await settled(engine)
        assert evaluations == 2
        assert (await messages(store, METADATA_BRANCH))[0] == "M2"
    # Commit messages keep one line per change, however long the result.
    one_line = (
        " ".join(outcome.message.split())[:140] if isinstance(outcome, Failed) else ""
    )
    assert (await messages(store, METADATA_BRANCH))[1] == (
        f"Set alice/proj/pr/6:test to {one_line}"
    )
    assert await messages(store, "status-alice-proj-pr-6") == [f"test -> {one_line}"]
    assert data is not None
    text = data.decode("utf-8")  # strict: no character cut in half
    assert text.endswith("\n")
    assert not text.endswith("\n\n")
    body = text[:-1]
    assert len(body) <= 140
    assert body == body.strip()
    if isinstance(outcome, Failed):
        assert body == LONG.strip()[:140].rstrip()
        assert "é" in body
    else:
        assert body == ""


async def test_07_change_beyond_the_cut_writes_no_status(store: Store) -> None:
    """The comparison is made on what would be written, not on the result."""

    def run(ctx: Context) -> Failed:
        target = ctx.target
        assert isinstance(target, PRTarget)
        found = ctx.read_pr(ALICE, target.number)
        assert found is not None
        return Failed("é" * 150 + found.title)

    engine = make_engine(store, {ALICE: jobs(test=job(run))})
    async with running(engine):
        await bridge(store, {**MONITOR, **pr(6, H1, title="one")})
        await until(engine, lambda: _state_is(store, H1, "failure"))
        await settled(engine)
        await bridge(store, {"alice/proj/pr/6/title": "two"}, "M2")
        await settled(engine)
    assert (await messages(store, METADATA_BRANCH))[0] == "M2"
    assert await descr(store, H1, "test") == "é" * 140
    # The history still records the full new result.
    state = engine.latest_state(PRTarget(ALICE, 6))
    assert state is not None
    assert state.jobs["test"].result.descr.endswith("two")


# 08 -------------------------------------------------------------------------------


async def test_08_slashes_underscores_dashes_and_unicode(store: Store) -> None:
    my_org = Repo("my-org", "proj")
    odd = "unit test+é/"[:-1]
    ok = job(lambda ctx: Ok(f"tested {head_of(ctx)}"))
    projects = {ALICE: jobs(test=ok, **{odd: ok}), my_org: jobs(test=ok)}
    engine = make_engine(store, projects)
    async with running(engine):
        await bridge(
            store,
            {
                **MONITOR,
                **ref("heads/feature/login_v2", H1),
                **ref("heads/héllo", H2),
                "my-org/proj/.monitor": "",
                **pr(1, H3, repo=my_org),
            },
        )
        await settled(engine)
    expected: dict[Target, str] = {
        RefTarget(ALICE, ("heads", "feature", "login_v2")): (
            "status-alice-proj-ref-heads-feature_2flogin_5fv2"
        ),
        RefTarget(ALICE, ("heads", "héllo")): "status-alice-proj-ref-heads-h_c3_a9llo",
        PRTarget(my_org, 1): "status-my_2dorg-proj-pr-1",
    }
    for target, branch in expected.items():
        assert status_branch_name(target) == branch
        assert parse_status_branch(branch) == target
        assert await store.head(branch) is not None
    assert await descr(store, H3, "test", my_org) == f"tested {H3}"
    for job_name in ("test", odd):
        where = f"{status_dir(H1, job_name)}/target_url"
        url = (await read(store, METADATA_BRANCH, where) or "").strip()
        parts = urllib.parse.urlsplit(url)
        assert (parts.scheme, parts.netloc) == ("http", "127.0.0.1:8080")
        assert parts.path == f"/alice/proj/commit/{H1}"
        assert urllib.parse.parse_qs(parts.query) == {"test": [job_name]}
        assert parts.query == "test=" + urllib.parse.quote(job_name, safe="")
    assert "%20" in url
    assert "+" not in url
    feature = RefTarget(ALICE, ("heads", "feature", "login_v2"))
    assert str(feature) == "alice/proj/ref/heads/feature/login_v2"


# 09 -------------------------------------------------------------------------------


class GatedBuilder:
    """A build step that blocks on its first run until cancelled."""

    name = "gated"

    def __init__(self) -> None:
        self.runs = 0
        self.cancelled = 0
        self.started = trio.Event()

    def title(self, key: str) -> str:
        return f"Build {key[:8]}"

    def branch(self, key: str) -> str:
        return f"build-{key}"

    async def build(self, log: LiveLog, key: str) -> str:
        self.runs += 1
        self.started.set()
        if self.runs == 1:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled += 1
                raise
        log.log("built fine")
        return "built"

    def save(self, value: str) -> dict[str, bytes]:
        return {"v": value.encode()}

    def load(self, files: Mapping[str, bytes], key: str) -> str:
        return files["v"].decode()


def built_jobs(cache: BuildCache, builder: GatedBuilder) -> MakeTerms:
    """Jobs of one step, `test`, that builds the target's head with `builder`."""

    def make(target: Target) -> dict[str, Term[str]]:
        step: Term[str] = github.head(target).bind(
            lambda head: cache.term(builder, head)
        )
        return {"test": step.map(lambda value: f"ok: {value}")}

    return make


async def build_then_cancel(engine: Engine, cache: BuildCache, log_branch: str) -> None:
    """Open branch foo at H1, wait for its build, cancel it through its live
    log, and wait for the job's failure."""
    store = engine.store
    await bridge(store, {**MONITOR, **ref("heads/foo", H1)})
    await until(engine, lambda: _state_is(store, H1, "pending"))
    cache.live_logs.cancel(log_branch)
    await until(engine, lambda: _state_is(store, H1, "failure"))


async def test_09_cancelled_build_leaves_a_failure_then_rebuilds(store: Store) -> None:
    builder = GatedBuilder()
    foo = RefTarget(ALICE, ("heads", "foo"))
    log_branch = f"build-{H1}"
    async with open_build_cache(store) as cache:
        engine = make_engine(store, {ALICE: built_jobs(cache, builder)}, builds=cache)
        async with running(engine):
            # The user cancels the build through its live log.
            await build_then_cancel(engine, cache, log_branch)
            await settled(engine)
            text = await descr(store, H1, "test")
            assert text is not None
            assert "cancelled" in text.lower()
            state = engine.latest_state(foo)
            assert state is not None
            assert state.jobs["test"].result.status == "failure"
            assert "cancelled" in state.jobs["test"].result.descr.lower()
            assert builder.cancelled == 1
            # A rebuild of the same log branch runs the step again.
            await engine.rebuild(log_branch)
            await until(engine, lambda: _state_is(store, H1, "success"))
            assert await descr(store, H1, "test") == "ok: built"
    assert builder.runs == 2
    assert (await messages(store, log_branch))[0] == "Cached successful result"


async def test_09_a_rebuild_through_the_cache_alone_reevaluates_the_job(
    store: Store,
) -> None:
    """Rebuilding through the build cache (not `Engine.rebuild`) still
    brings the new result to the job: a saved result's answer carries an
    event set when it is replaced."""
    builder = GatedBuilder()
    log_branch = f"build-{H1}"
    async with open_build_cache(store) as cache:
        engine = make_engine(store, {ALICE: built_jobs(cache, builder)}, builds=cache)
        async with running(engine):
            await build_then_cancel(engine, cache, log_branch)
            await cache.rebuild(log_branch)
            await until(engine, lambda: _state_is(store, H1, "success"))
    assert builder.runs == 2


async def test_09_closing_the_target_cancels_the_build_and_writes_nothing(
    store: Store,
) -> None:
    builder = GatedBuilder()
    log_branch = f"build-{H1}"
    async with open_build_cache(store) as cache:
        engine = make_engine(store, {ALICE: built_jobs(cache, builder)}, builds=cache)
        async with running(engine):
            await bridge(store, {**MONITOR, **ref("heads/foo", H1)})
            await until(engine, lambda: _state_is(store, H1, "pending"))
            await settled(engine)
            heads = await store.heads()
            await bridge(store, {"alice/proj/ref/heads/foo": None}, "M2")
            await settled(engine)
            assert builder.cancelled == 1
            assert not cache.is_building(log_branch)
    after = await store.heads()
    assert after.pop(METADATA_BRANCH) != heads.pop(METADATA_BRANCH)
    assert after == heads
    assert log_branch not in after
    assert (await messages(store, METADATA_BRANCH))[0] == "M2"
    assert await status(store, H1, "test") == "pending"


# 10 -------------------------------------------------------------------------------


async def test_10_malformed_metadata(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kitci")
    seen: dict[int, PR] = {}

    def check(ctx: Context) -> Ok[str]:
        target = ctx.target
        assert isinstance(target, PRTarget)
        found = ctx.read_pr(ALICE, target.number)
        assert found is not None
        seen[target.number] = found
        return Ok(f"tested {found.head} on {found.base}")

    huge = "T" * 100_000
    m1: dict[str, str | bytes | None] = {
        **MONITOR,
        "alice/proj/pr/11/state": "open",
        "alice/proj/pr/11/owner": "bob",
        **pr(12, H2, state="merged"),
        "alice/proj/pr/abc/head": H3,
        "alice/proj/pr/13/head": f" {H4}\n".encode(),
        "alice/proj/pr/13/state": b"open\n",
        "alice/proj/pr/13/owner": "bob",
        **pr(14, H5, title=huge),
        "alice/proj/ref/heads/x/head": b"\xff\xfe" + H1.encode() + b"\n",
    }
    engine = make_engine(store, {ALICE: jobs(test=job(check))})
    async with running(engine):
        await bridge(store, m1, "M1")
        await until(engine, lambda: _state_is(store, H5, "success"))
        await settled(engine)
    assert set(seen) == {13, 14}
    assert seen[13].head == H4
    assert seen[13].base == "master"
    assert await descr(store, H4, "test") == f"tested {H4} on master"
    assert await descr(store, H5, "test") == f"tested {H5} on master"
    assert await status(store, H2, "test") is None
    assert await status(store, H3, "test") is None
    assert await status(store, H1, "test") is None
    assert set(engine.prs()[ALICE]) == {13, 14}
    assert engine.refs()[ALICE] == {}
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(lv >= logging.WARNING and "alice/proj/pr/11" in m for lv, m in records)
    assert any(lv >= logging.ERROR and "alice/proj/pr/12" in m for lv, m in records)
    assert any(lv == logging.WARNING and "alice/proj/pr/abc" in m for lv, m in records)
    assert any(
        lv == logging.WARNING and "alice/proj/ref/heads/x" in m for lv, m in records
    )
    # The huge title reaches neither a status nor a commit message.
    for message in await messages(store, METADATA_BRANCH):
        assert huge[:200] not in message
    for path, data in (await files_under(store, "alice/proj/commit/")).items():
        assert huge[:200].encode() not in data, path


async def test_10_missing_object_is_a_store_error_not_an_absence(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kitci")
    await bridge(store, {**MONITOR, **pr(1, H1, owner="zed-unique-owner")}, "M1")

    def owner_blob(repo: pygit2.Repository) -> str:
        return str(repo.create_blob(b"zed-unique-owner\n"))

    blob = await store.run_sync(owner_blob)
    loose = store.path / "objects" / blob[:2] / blob[2:]
    hidden = tmp_path / "hidden-object"
    loose.rename(hidden)

    def failures() -> float:
        name = "DataKitCI_engine_connection_failures_total"
        return REGISTRY.get_sample_value(name) or 0.0

    before = failures()
    engine_store = await Store.open(store.path)
    engine = make_engine(engine_store, {ALICE: jobs(test=job(lambda c: Ok("ok")))})
    async with running(engine):
        with trio.fail_after(10):
            # A metric has no event to wait on: poll it.
            while failures() == before:  # noqa: ASYNC110
                await trio.sleep(0.005)
        assert engine.prs()[ALICE] == {}
        assert await status(store, H1, "test") is None
        hidden.rename(loose)
        await until(engine, lambda: _state_is(store, H1, "success"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(blob in m and "will retry" in m for m in warnings)
