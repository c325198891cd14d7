"""An example kitci pipeline: copy this file and adapt the jobs.

kitci reads `projects` below. It maps each monitored repository, spelled
`user/repo` as on GitHub, to a function that kitci calls once for every open
pull request, branch and tag of that repository (a *target*). The function
returns the target's jobs: a mapping from job name to a `Term[str]`.

Each job becomes one GitHub commit status, with context `ci/datakit/JOB`,
on the target's head commit:

- while the term is pending, the status is `pending` with the reason;
- when it fails, the status is `failure` with the failure message;
- when it succeeds, the status is `success` and the string the term
  produced is the status description (cut to 140 characters).

kitci evaluates the jobs again whenever the github-metadata it reads changes
(for instance when another CI system posts a status), so a job simply says
what it needs and kitci does the waiting.
"""

from __future__ import annotations

from collections.abc import Callable

from kitci import PR, PRTarget, Target, Term, fail, github, term, wait_for

# The context of another CI system's status that our jobs wait for. Contexts
# are compared exactly: `continuous-integration/travis-ci` and
# `continuous-integration/travis-ci/pr` are two different statuses.
OTHER_CI = "continuous-integration/travis-ci/pr"


def other_ci_passed(target: Target) -> Term[str]:
    """Succeed once the other CI's status on the target's head succeeded.

    While that status is missing or pending, this job is pending too; if it
    failed or errored, this job fails with the other CI's description.
    """
    url = github.ci_success_target_url(OTHER_CI, target)
    return url.map(lambda link: f"{OTHER_CI} passed: {link}")


def ready_to_merge(target: Target) -> Term[str]:
    """Check a pull request once the other CI passed, as an `async def` job.

    Inside a function decorated with `@term`, `await` on a term gives its
    value. If the awaited term is pending or failed, the function stops
    there and the whole job is pending or failed with the same message.
    """

    @term
    async def job() -> str:
        # The PR (or branch, or tag) as github-metadata has it now.
        found = await github.target(target)
        if isinstance(found, PR) and found.title.startswith("WIP"):
            await fail("The title starts with WIP")

        # `wait_for` replaces the other term's messages with our own.
        await wait_for(
            other_ci_passed(target),
            while_pending=f"Waiting for {OTHER_CI}",
            on_failure=f"{OTHER_CI} did not pass",
        )
        return f"Commit {found.head[:8]} is ready to merge"

    return job


def make_jobs(target: Target) -> dict[str, Term[str]]:
    """Return the jobs of one target of `example-org/example-repo`."""
    jobs = {"other-ci": other_ci_passed(target)}

    # Branches and tags get only the first job; pull requests get both.
    if isinstance(target, PRTarget):
        jobs["ready"] = ready_to_merge(target)
    return jobs


projects: dict[str, Callable[[Target], dict[str, Term[str]]]] = {
    "example-org/example-repo": make_jobs,
}
