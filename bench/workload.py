"""The benchmark's workload: repositories, targets, jobs and the store.

Everything here is deterministic for a given size, so the floor and each
engine run see exactly the same store and compute exactly the same statuses.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pygit2

from kitci import (
    METADATA_BRANCH,
    PRTarget,
    RefTarget,
    Repo,
    StatusState,
    Target,
    github,
)
from kitci._terms import Term, pair

__all__ = [
    "JOBS",
    "OTHER_CI",
    "REPOS",
    "WEB_UI",
    "Workload",
    "build_store",
    "describe",
    "fake_hash",
    "make_terms",
    "status_url",
]

# Four repositories, as a small organisation would monitor.
REPOS = (
    Repo("acme", "api"),
    Repo("acme", "web"),
    Repo("moby", "engine"),
    Repo("alice", "tools"),
)
# The context of the other CI whose statuses the jobs read.
OTHER_CI = ("ci", "other")
# The jobs of every target; see `describe` for what each computes.
JOBS = ("head", "other", "both")
WEB_UI = "http://127.0.0.1:8080"
_OWNERS = ("alice", "bob", "carol", "dave", "erin")
_OTHER_STATES = ("success", "success", "pending", "failure")
_SIGNATURE = pygit2.Signature("bench", "bench@localhost", 1_700_000_000, 0)


def fake_hash(*parts: object) -> str:
    """Return a fake but valid 40-hex commit hash derived from `parts`."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()


def describe(job: str, head: str, other: str | None) -> str:
    """Return the description job `job` gives for `head` and the other CI state.

    `other` is the state of the other CI's status on `head`, None if absent.
    The engine's terms and the floor both use this, so they write the same
    statuses.
    """
    seen = "no ci/other status" if other is None else f"ci/other is {other}"
    if job == "head":
        return f"Head is {head[:12]}"
    if job == "other":
        return seen
    return f"{head[:7]} and {seen}"


def status_url(target: Target, head: str, job: str) -> str:
    """Return the target URL kitci writes for `job` on `head` (SPEC §2)."""
    repo = target.repo
    return (
        f"{WEB_UI}/{urllib.parse.quote(repo.user, safe='')}"
        f"/{urllib.parse.quote(repo.name, safe='')}/commit/{head}?"
        + urllib.parse.urlencode({"test": job})
    )


def _state_text(state: StatusState | None) -> str | None:
    return None if state is None else state.value


def make_terms(target: Target) -> Mapping[str, Term[str]]:
    """Return the three trivial jobs of `target`."""
    head = github.head(target)
    other = github.ci_status(OTHER_CI, target)
    return {
        "head": head.map(lambda h: describe("head", h, None)),
        "other": other.map(lambda s: describe("other", "", _state_text(s))),
        "both": pair(head, other).map(
            lambda hs: describe("both", hs[0], _state_text(hs[1]))
        ),
    }


@dataclass(frozen=True)
class Workload:
    """The targets of a store of `size` targets, with their heads.

    About 80% PRs, 15% branches (some with `/` in their names) and 5% tags,
    spread over `REPOS`. About three quarters of the heads carry a status
    of the other CI.
    """

    size: int
    heads: Mapping[Target, str]
    other: Mapping[str, str]

    @classmethod
    def of_size(cls, size: int) -> Workload:
        """Return the workload of `size` targets."""
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size}")
        branches = round(size * 0.15)
        tags = round(size * 0.05)
        prs = size - branches - tags
        heads: dict[Target, str] = {}
        for i in range(prs):
            repo = REPOS[i % len(REPOS)]
            heads[PRTarget(repo, 1 + i // len(REPOS))] = fake_hash("pr", i)
        for i in range(branches):
            repo = REPOS[i % len(REPOS)]
            k = i // len(REPOS)
            name = ("heads", "master") if k == 0 else ("heads", "feature", f"f{k}")
            heads[RefTarget(repo, name)] = fake_hash("branch", i)
        for i in range(tags):
            repo = REPOS[i % len(REPOS)]
            name = ("tags", f"v1.{i // len(REPOS)}.0")
            heads[RefTarget(repo, name)] = fake_hash("tag", i)
        other = {
            head: _OTHER_STATES[i % len(_OTHER_STATES)]
            for i, head in enumerate(heads.values())
            if i % 4 != 3
        }
        return cls(size, heads, other)

    def counts(self) -> dict[str, int]:
        """Return how many PRs, branches and tags there are."""
        out = {"pr": 0, "branch": 0, "tag": 0}
        for target in self.heads:
            out[target.kind] += 1
        return out

    def prs(self) -> list[PRTarget]:
        """Return the PR targets, in a fixed order."""
        return [t for t in self.heads if isinstance(t, PRTarget)]


# A directory being built: name -> file content or sub-directory.
_Dir = dict[str, "bytes | _Dir"]


def _put(root: _Dir, path: tuple[str, ...], data: bytes) -> None:
    node = root
    for part in path[:-1]:
        child = node.setdefault(part, {})
        assert isinstance(child, dict)
        node = child
    node[path[-1]] = data


def _write_dir(
    repo: pygit2.Repository, node: _Dir, blobs: dict[bytes, pygit2.Oid]
) -> pygit2.Oid:
    builder = repo.TreeBuilder()
    for name, child in node.items():
        if isinstance(child, dict):
            oid = _write_dir(repo, child, blobs)
            builder.insert(name, oid, pygit2.enums.FileMode.TREE)
        else:
            found = blobs.get(child)
            if found is None:
                found = blobs[child] = repo.create_blob(child)
            builder.insert(name, found, pygit2.enums.FileMode.BLOB)
    return builder.write()


def build_store(path: Path, work: Workload) -> int:
    """Create a bare store at `path` holding `work` in one commit.

    The `github-metadata` tree is written directly with TreeBuilder, with
    the `.monitor` files present so the engine's start-up commits nothing.
    Returns the number of files in the tree.
    """
    repo = pygit2.init_repository(str(path), bare=True)
    root: _Dir = {}
    files = 0
    for r in REPOS:
        _put(root, (r.user, r.name, ".monitor"), b"")
        files += 1
    for target, head in work.heads.items():
        base = (target.repo.user, target.repo.name)
        if isinstance(target, PRTarget):
            where = (*base, "pr", str(target.number))
            n = target.number
            _put(root, (*where, "head"), f"{head}\n".encode())
            _put(root, (*where, "state"), b"open\n")
            _put(root, (*where, "title"), f"Fix issue {n % 97}\n".encode())
            _put(root, (*where, "owner"), f"{_OWNERS[n % len(_OWNERS)]}\n".encode())
            _put(root, (*where, "base"), b"master\n")
            files += 5
        else:
            _put(root, (*base, "ref", *target.name, "head"), f"{head}\n".encode())
            files += 1
        state = work.other.get(head)
        if state is not None:
            status = (*base, "commit", head, "status", *OTHER_CI)
            _put(root, (*status, "state"), f"{state}\n".encode())
            _put(root, (*status, "description"), f"Build {state}\n".encode())
            url = f"https://other.example/{target.repo}/{head[:12]}\n"
            _put(root, (*status, "target_url"), url.encode())
            files += 3
    tree = _write_dir(repo, root, {})
    repo.create_commit(
        f"refs/heads/{METADATA_BRANCH}",
        _SIGNATURE,
        _SIGNATURE,
        f"Bench store with {work.size} targets",
        tree,
        [],
    )
    return files
