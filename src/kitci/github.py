"""Terms that read the github-metadata snapshot: targets, heads, statuses.

Every read goes through the evaluation context, so the engine knows which
PRs, refs and statuses a job depends on.
"""

from __future__ import annotations

from ._model import (
    PR,
    PRTarget,
    Ref,
    RefTarget,
    Repo,
    StatusState,
    Target,
    is_valid_ref_name,
)
from ._terms import Context, Evaluated, Failed, Ok, Pending, Term

__all__ = [
    "branch_head",
    "ci_status",
    "ci_success_target_url",
    "ci_target_url",
    "head",
    "tag",
    "target",
]


def _context_parts(ci: str | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(ci.split("/")) if isinstance(ci, str) else ci


def _read_target(ctx: Context, which: Target) -> PR | Ref | None:
    if isinstance(which, PRTarget):
        return ctx.read_pr(which.repo, which.number)
    return ctx.read_ref(which.repo, which.name)


def target(which: Target) -> Term[PR | Ref]:
    """Return the PR or ref `which` as the snapshot has it.

    Fails with `Target X does not exist` when it is not in the snapshot.
    """

    def read(ctx: Context) -> Evaluated[PR | Ref]:
        found = _read_target(ctx, which)
        if found is None:
            return Failed(f"Target {which} does not exist"), None
        return Ok(found), None

    return Term(sync=read)


def _head_of(ctx: Context, which: Target) -> str | None:
    found = _read_target(ctx, which)
    return None if found is None else found.head


def head(which: Target) -> Term[str]:
    """Return the hash of `which`'s head commit (fails if it does not exist)."""

    def read(ctx: Context) -> Evaluated[str]:
        found = _head_of(ctx, which)
        if found is None:
            return Failed(f"Target {which} does not exist"), None
        return Ok(found), None

    return Term(sync=read)


def _ref_head(repo: Repo, name: str) -> Term[str]:
    parts = tuple(name.split("/"))
    if not is_valid_ref_name(parts):
        return Term(sync=lambda ctx: (Failed(f"Invalid ref name {name!r}"), None))
    return head(RefTarget(repo, parts))


def branch_head(repo: Repo, branch: str) -> Term[str]:
    """Return the head of branch `branch` of `repo`."""
    return _ref_head(repo, "heads/" + branch)


def tag(repo: Repo, name: str) -> Term[str]:
    """Return the commit tag `name` of `repo` points at."""
    return _ref_head(repo, "tags/" + name)


def _status_field(ci: str | tuple[str, ...], which: Target, field: str) -> Term[object]:
    context = _context_parts(ci)

    def read(ctx: Context) -> Evaluated[object]:
        commit = _head_of(ctx, which)
        if commit is None:
            return Failed(f"Target {which} does not exist"), None
        status = ctx.read_status(which.repo, commit, context)
        return Ok(None if status is None else getattr(status, field)), None

    return Term(sync=read)


def ci_status(ci: str | tuple[str, ...], which: Target) -> Term[StatusState | None]:
    """Return the state of status `ci` on `which`'s head, or None if absent."""
    return _status_field(ci, which, "state")  # type: ignore[return-value]  # field is "state"


def ci_target_url(ci: str | tuple[str, ...], which: Target) -> Term[str | None]:
    """Return the target URL of status `ci` on `which`'s head, or None."""
    return _status_field(ci, which, "target_url")  # type: ignore[return-value]  # a str field


def ci_success_target_url(ci: str | tuple[str, ...], which: Target) -> Term[str]:
    """Return the URL of status `ci` on `which`'s head once it succeeded.

    Pending while the status is absent (`Waiting for CTX status to appear`)
    or pending (`Waiting for CTX to complete (DESCR)`); fails when it failed
    (`CTX failed (DESCR)`), errored (`CTX errored (DESCR)`) or succeeded
    without a URL (`CTX succeeded, but has no URL!`).
    """
    context = _context_parts(ci)
    name = "/".join(context)

    def read(ctx: Context) -> Evaluated[str]:
        commit = _head_of(ctx, which)
        if commit is None:
            return Failed(f"Target {which} does not exist"), None
        status = ctx.read_status(which.repo, commit, context)
        if status is None:
            return Pending(f"Waiting for {name} status to appear"), None
        descr = f" ({status.description})" if status.description is not None else ""
        if status.state is StatusState.PENDING:
            return Pending(f"Waiting for {name} to complete{descr}"), None
        if status.state is StatusState.FAILURE:
            return Failed(f"{name} failed{descr}"), None
        if status.state is StatusState.ERROR:
            return Failed(f"{name} errored{descr}"), None
        if not status.target_url:
            return Failed(f"{name} succeeded, but has no URL!"), None
        return Ok(status.target_url), None

    return Term(sync=read)
