"""Turn the workers' figures into a table, target checks and JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["check_targets", "format_report"]

# Results by size, then by mode ("floor", "floor+history", "kitci", "original").
Results = Mapping[int, Mapping[str, Mapping[str, Any]]]

_MIB = 1024 * 1024


def _get(results: Results, size: int, mode: str) -> Mapping[str, Any] | None:
    found = results.get(size, {}).get(mode)
    return None if found is None or "error" in found else found


def _measured(results: Results) -> list[tuple[int, str, Mapping[str, Any]]]:
    """Return (size, mode, figures) of every measurement that did not fail."""
    return [
        (size, mode, figures)
        for size, modes in sorted(results.items())
        for mode, figures in modes.items()
        if "error" not in figures
    ]


def _ratio(value: float, base: float | None) -> str:
    return "" if not base else f"{value / base:.2f}"


def check_targets(results: Results) -> list[dict[str, Any]]:
    """Say whether each of issue #7's targets is met by `results`."""
    targets: list[dict[str, Any]] = []
    largest = max(results) if results else 0

    def add(
        name: str, value: float | None, limit: float, unit: str, met: bool | None
    ) -> None:
        targets.append(
            {"target": name, "value": value, "limit": limit, "unit": unit, "met": met}
        )

    kitci, floor = _get(results, 10000, "kitci"), _get(results, 10000, "floor")
    if kitci and floor:
        ratio = kitci["cold_s"] / floor["cold_s"]
        add(
            "cold start at 10000x3 within 1.5x of the floor",
            ratio,
            1.5,
            "x",
            ratio <= 1.5,
        )
    else:
        add("cold start at 10000x3 within 1.5x of the floor", None, 1.5, "x", None)

    small = _get(results, 100, "kitci")
    if kitci:
        median = kitci["change_s"]["median"] * 1000
        add(
            "one change at 10000 committed in under 50 ms",
            median,
            50,
            "ms",
            median < 50,
        )
    else:
        add("one change at 10000 committed in under 50 ms", None, 50, "ms", None)
    if kitci and small:
        slower = kitci["change_s"]["median"] / small["change_s"]["median"]
        add(
            "one change at 10000 no more than 2x slower than at 100",
            slower,
            2,
            "x",
            slower <= 2,
        )
    else:
        add(
            "one change at 10000 no more than 2x slower than at 100", None, 2, "x", None
        )

    size = 10000 if 10000 in results else largest
    original, kitci_at = _get(results, size, "original"), _get(results, size, "kitci")
    rate = original.get("evaluations_per_s") if original else None
    add(
        f"at least 50000 trivial evaluations per second (full pass, N={size})",
        rate,
        50000,
        "evals/s",
        None if rate is None else rate >= 50000,
    )
    per_job = kitci_at["bytes_per_job"] if kitci_at else None
    add(
        f"at most 2 KiB of memory per job (N={size})",
        per_job,
        2048,
        "B",
        None if per_job is None else per_job <= 2048,
    )
    return targets


def format_report(
    meta: Mapping[str, Any], results: Results, targets: list[dict[str, Any]]
) -> str:
    """Return the human-readable report of a run."""
    measured = _measured(results)
    lines = [
        f"kitci benchmark, {meta['date']}: {meta['jobs_per_target']} jobs per target, "
        f"{meta['repositories']} repositories, {meta['cpu_count']} CPUs, "
        f"Python {meta['python']}, trio {meta['trio']}, pygit2 {meta['pygit2']}",
        "",
        "Cold start: engine start -> every status committed (floor: plain pygit2 "
        "read + one status commit); median of the runs",
        f"{'targets':>8}  {'mode':<13} {'time s':>8} {'runs min-max':>13} "
        f"{'x floor':>8} {'evals':>8} {'st.commits':>10} {'hist.commits':>12} "
        f"{'peak MiB':>9} {'B/job':>7}",
    ]
    for size, mode, r in measured:
        floor = _get(results, size, "floor")
        ratio = _ratio(r["cold_s"], floor["cold_s"] if floor else None)
        runs = r.get("cold_s_runs", [r["cold_s"]])
        per_job = f"{r['bytes_per_job']:.0f}" if "bytes_per_job" in r else ""
        commits = (r.get("cold_status_commits", ""), r.get("cold_history_commits", ""))
        lines.append(
            f"{size:>8}  {mode:<13} {r['cold_s']:>8.3f} "
            f"{f'{min(runs):.2f}-{max(runs):.2f}':>13} {ratio:>8} "
            f"{r.get('cold_evaluations', ''):>8} {commits[0]:>10} {commits[1]:>12} "
            f"{r['peak_rss'] / _MIB:>9.1f} {per_job:>7}"
        )

    lines += [
        "",
        "One change: a PR's head moves -> its statuses committed (ms; evals until "
        "committed / until quiet)",
        f"{'targets':>8}  {'mode':<13} {'median':>8} {'p10':>8} {'p90':>8} {'min':>8} "
        f"{'max':>8} {'x floor':>8} {'evals':>8} {'settled':>8}",
    ]
    for size, mode, r in measured:
        if "change_s" not in r:
            continue
        floor = _get(results, size, "floor")
        base = floor["change_s"]["median"] if floor and "change_s" in floor else None
        s = r["change_s"]
        evals = r.get("change_evaluations", {}).get("median", "")
        settled = r.get("change_evaluations_settled", {}).get("median", "")
        lines.append(
            f"{size:>8}  {mode:<13} "
            + " ".join(
                f"{s[k] * 1000:>8.2f}" for k in ("median", "p10", "p90", "min", "max")
            )
            + f" {_ratio(s['median'], base):>8} {evals:>8} {settled:>8}"
        )

    lines += [
        "",
        "Unrelated metadata commit -> recalculation flushed (the original "
        "re-evaluates every job)",
        f"{'targets':>8}  {'mode':<13} {'median ms':>10} {'evals':>8} {'evals/s':>10}",
    ]
    for size, mode, r in measured:
        if "unrelated_s" not in r:
            continue
        rate = r.get("evaluations_per_s")
        rate_text = "" if rate is None else f"{rate:.0f}"
        lines.append(
            f"{size:>8}  {mode:<13} {r['unrelated_s']['median'] * 1000:>10.2f} "
            f"{r['unrelated_evaluations']:>8} {rate_text:>10}"
        )

    wrong = [
        f"  {size} {mode}: {r['wrong_statuses']} wrong statuses after cold start, "
        f"{r['wrong_statuses_end']} at the end"
        for size, mode, r in measured
        if r.get("wrong_statuses") or r.get("wrong_statuses_end")
    ]
    if wrong:
        lines += ["", "Statuses that differ from what the floor writes:", *wrong]
    failed = [
        f"  {size} {mode}: {figures['error']}"
        for size, modes in sorted(results.items())
        for mode, figures in modes.items()
        if "error" in figures
    ]
    if failed:
        lines += ["", "Failed measurements:", *failed]

    lines += ["", "Targets (issue #7)"]
    for t in targets:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = "" if t["value"] is None else f": {t['value']:.2f} {t['unit']}"
        lines.append(
            f"  [{verdict}] {t['target']}{value} (limit {t['limit']} {t['unit']})"
        )
    return "\n".join(lines)
