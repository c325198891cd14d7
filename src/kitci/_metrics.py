"""Prometheus metrics, named as DataKitCI named them for its dashboards."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Summary

__all__ = [
    "ACTIVE_TARGETS",
    "BUILDS_FAILED",
    "BUILDS_IN_PROGRESS",
    "BUILDS_STARTED",
    "BUILDS_SUCCEEDED",
    "BUILD_EXCEPTIONS",
    "BUILD_TIME",
    "CONNECTION_ATTEMPTS",
    "CONNECTION_FAILURES",
    "STATUS_UPDATES",
    "TERM_EVALS",
    "UPDATE_NOTIFICATIONS",
]

_NS = "DataKitCI"

CONNECTION_ATTEMPTS = Counter(
    "connection_attempts",
    "Number of attempts to open the store",
    namespace=_NS,
    subsystem="engine",
)
CONNECTION_FAILURES = Counter(
    "connection_failures",
    "Number of failed attempts to open or read the store",
    namespace=_NS,
    subsystem="engine",
)
STATUS_UPDATES = Counter(
    "status_updates", "Number of status updates", namespace=_NS, subsystem="engine"
)
UPDATE_NOTIFICATIONS = Counter(
    "update_notifications",
    "Number of new github-metadata snapshots seen",
    namespace=_NS,
    subsystem="engine",
)
ACTIVE_TARGETS = Gauge(
    "active_targets",
    "Number of branches, tags and PRs currently being monitored",
    ["type"],
    namespace=_NS,
    subsystem="engine",
)
TERM_EVALS = Counter(
    "evals", "Number of term evaluations", namespace=_NS, subsystem="term"
)
BUILDS_STARTED = Counter(
    "builds_started",
    "Number of builds started",
    ["name"],
    namespace=_NS,
    subsystem="cache",
)
BUILDS_SUCCEEDED = Counter(
    "builds_succeeded",
    "Number of builds that succeeded",
    ["name"],
    namespace=_NS,
    subsystem="cache",
)
BUILDS_FAILED = Counter(
    "builds_failed",
    "Number of builds that failed",
    ["name"],
    namespace=_NS,
    subsystem="cache",
)
BUILD_EXCEPTIONS = Counter(
    "build_exceptions",
    "Number of builds that raised an exception",
    ["name"],
    namespace=_NS,
    subsystem="cache",
)
BUILDS_IN_PROGRESS = Gauge(
    "builds_in_progress",
    "Number of builds running now",
    ["name"],
    namespace=_NS,
    subsystem="cache",
)
BUILD_TIME = Summary(
    "build_time", "Time spent building", ["name"], namespace=_NS, subsystem="cache"
)
