"""Run the benchmark: `python -m bench [--sizes 100,1000] [--large] [--json PATH]`.

The parent process builds one store per size and runs every measurement
(floor, floor with history, kitci, the original algorithm) in a worker
process of its own, on a hard-linked copy of that store, so each memory
peak is honest and no run sees another's objects. It then prints the table
and writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pygit2
import trio

from .common import START_VARIABLE, progress, started_at
from .report import check_targets, format_report
from .workload import JOBS, REPOS, Workload, build_store

DEFAULT_SIZES = (100, 1000, 10000)
LARGE_SIZE = 50000
MODES = ("floor", "floor+history", "kitci", "original")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes must be numbers separated by commas, not {text!r}"
        ) from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"--sizes must list sizes >= 1, not {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark kitci's recalculation against the Git floor and "
        "the original (re-evaluate everything) algorithm.",
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="comma-separated numbers of targets (default: 100,1000,10000)",
    )
    parser.add_argument(
        "--large", action="store_true", help=f"also run {LARGE_SIZE} targets"
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="single-PR changes per run (default 20)"
    )
    parser.add_argument(
        "--passes", type=int, default=3, help="unrelated commits per run (default 3)"
    )
    parser.add_argument(
        "--cold-runs",
        type=int,
        default=3,
        help="cold starts per size and mode, each in a fresh process on a fresh "
        "copy of the store; the median is reported (default 3)",
    )
    parser.add_argument(
        "--json", type=Path, help="write the figures as JSON to this path"
    )
    parser.add_argument(
        "--tmp",
        type=Path,
        default=None,
        help="where to build the stores (default: /dev/shm if writable, else the "
        "system's temporary folder); a RAM disk keeps disk noise out of the ratios",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated measurements to run (default: {','.join(MODES)})",
    )
    # Internal: run one measurement in this process (see `_run_worker`).
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def _run_worker(args: argparse.Namespace) -> None:
    """Measure one mode on one store, writing the figures to `args.result`."""
    if args.store is None or args.size is None or args.result is None:
        raise SystemExit("--worker needs --store, --size and --result")
    result: dict[str, Any]
    if args.worker in ("floor", "floor+history"):
        from .floor import run_floor

        result = run_floor(
            args.store, args.size, args.repeats, history=args.worker == "floor+history"
        )
    else:
        from .run_engine import run_engine

        result = run_engine(
            args.store,
            args.size,
            incremental=args.worker == "kitci",
            repeats=args.repeats,
            passes=args.passes,
        )
    args.result.write_text(json.dumps(result, indent=1))


def _measure(
    mode: str, template: Path, size: int, scratch: Path, repeats: int, passes: int
) -> dict[str, Any]:
    """Run one worker process on a hard-linked copy of `template`."""
    store = scratch / f"{mode}-{size}"
    result = scratch / f"{mode}-{size}.json"
    # Objects are never modified in place and refs are replaced by rename,
    # so hard links keep the template intact.
    shutil.copytree(template, store, copy_function=os.link)
    env = dict(os.environ)
    env[START_VARIABLE] = str(started_at())
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [package_root, env.get("PYTHONPATH")])
    )
    command = [
        sys.executable, "-m", "bench", "--worker", mode, "--store", str(store),
        "--size", str(size), "--result", str(result),
        "--repeats", str(repeats), "--passes", str(passes),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, env=env, timeout=1800 + size * 0.2)
        figures: dict[str, Any] = json.loads(result.read_text())
    finally:
        shutil.rmtree(store, ignore_errors=True)
        result.unlink(missing_ok=True)
    return figures


def _default_scratch() -> Path | None:
    """Return /dev/shm when it is a writable folder, else None (the default)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def _meta(sizes: list[int]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "trio": trio.__version__,
        "pygit2": importlib.metadata.version("pygit2"),
        "libgit2": pygit2.LIBGIT2_VERSION,
        "sizes": sizes,
        "jobs_per_target": len(JOBS),
        "repositories": len(REPOS),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with `--worker`, one measurement of it)."""
    args = _parser().parse_args(argv)
    if args.worker is not None:
        _run_worker(args)
        return
    if args.repeats < 1 or args.passes < 1 or args.cold_runs < 1:
        raise SystemExit("--repeats, --passes and --cold-runs must be >= 1")

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(
            f"unknown --modes {', '.join(unknown)}; choose from {', '.join(MODES)}"
        )
    sizes = list(args.sizes or DEFAULT_SIZES)
    if args.large and LARGE_SIZE not in sizes:
        sizes.append(LARGE_SIZE)
    meta = _meta(sizes)
    meta.update(
        repeats=args.repeats, passes=args.passes, cold_runs=args.cold_runs, modes=modes
    )
    results: dict[int, dict[str, Any]] = {}
    where = args.tmp if args.tmp is not None else _default_scratch()
    meta["scratch"] = str(where) if where is not None else tempfile.gettempdir()
    with tempfile.TemporaryDirectory(prefix="kitci-bench-", dir=where) as tmp:
        scratch = Path(tmp)
        for size in sizes:
            work = Workload.of_size(size)
            counts = ", ".join(f"{kind}: {n}" for kind, n in work.counts().items())
            progress(f"N={size}: building the store ({counts})")
            template = scratch / f"store-{size}"
            start = time.perf_counter()
            files = build_store(template, work)
            progress(
                f"N={size}: {files} files written in {time.perf_counter() - start:.1f}s"
            )
            results[size] = {}
            for mode in modes:
                progress(f"N={size}: measuring {mode}")
                try:
                    figures = _measure(
                        mode, template, size, scratch, args.repeats, args.passes
                    )
                    runs = [figures["cold_s"]]
                    for run in range(2, args.cold_runs + 1):
                        progress(f"N={size}: {mode} cold start {run}/{args.cold_runs}")
                        again = _measure(mode, template, size, scratch, 0, 0)
                        runs.append(again["cold_s"])
                except (subprocess.SubprocessError, OSError, ValueError) as exc:
                    # Report the other measurements all the same.
                    progress(f"N={size}: {mode} FAILED: {exc}")
                    results[size][mode] = {"mode": mode, "error": str(exc)}
                    continue
                figures["cold_s_runs"] = runs
                figures["cold_s"] = statistics.median(runs)
                results[size][mode] = figures
            shutil.rmtree(template, ignore_errors=True)

    targets = check_targets(results)
    print(format_report(meta, results, targets))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "meta": meta,
            "results": {str(size): modes for size, modes in results.items()},
            "targets": targets,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        progress(f"figures written to {args.json}")
    if any(
        "error" in figures
        for by_mode in results.values()
        for figures in by_mode.values()
    ):
        raise SystemExit("some measurements failed; see the errors above")


if __name__ == "__main__":
    main()
