"""The exceptions kitci raises, in one flat hierarchy."""

from __future__ import annotations


class KitciError(Exception):
    """Base class of every error kitci raises on purpose."""


class StoreError(KitciError):
    """The Git store could not be opened, read or written."""


class NotARepositoryError(StoreError):
    """The store path exists but holds no Git repository."""


class ConflictError(StoreError):
    """A branch moved (or was being moved) while a transaction was prepared.

    The transaction was not committed; re-read the branch and try again.
    `expected` is the head the transaction was built on, `actual` the head
    found instead (equal to `expected` when another writer held the
    branch's lock and had not moved it yet).
    """

    def __init__(self, branch: str, expected: str | None, actual: str | None) -> None:
        if expected == actual:
            what = "was locked by another writer"
        else:
            what = f"moved from {expected or 'nothing'} to {actual or 'nothing'}"
        super().__init__(
            f"branch {branch!r} {what} while committing; re-read it and retry"
        )
        self.branch = branch
        self.expected = expected
        self.actual = actual


class InvalidNameError(KitciError, ValueError):
    """A user, repository, ref, target or branch name is not valid."""


class InvalidStatusError(KitciError, ValueError):
    """A status cannot be written (bad commit hash or context)."""


class DecodeError(KitciError, ValueError):
    """Stored JSON could not be decoded; the message says where and why."""


class TermError(KitciError):
    """A term was used in a way that cannot work (for example, no context)."""


class BuildError(KitciError):
    """A build step could not run or could not save its result."""


class UsageError(KitciError):
    """The command line or a configuration file is wrong."""
