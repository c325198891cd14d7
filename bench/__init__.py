"""Benchmarks of kitci's recalculation (issue #7): run `python -m bench`.

For stores of N targets (80% PRs, 15% branches, 5% tags over four
repositories; 3 trivial jobs each that read the target's head and another
CI's status), it measures:

- the floor: plain pygit2 reading every target and writing all statuses in
  one commit (and, as `floor+history`, also the status branches and commit
  index kitci records);
- kitci's cold start (engine start to every status committed), its term
  evaluations, commits and memory per job;
- one change (a PR's head moves) until its statuses are committed;
- an unrelated metadata commit, which the original algorithm answers with
  a full re-evaluation (its throughput in evaluations per second);

with `Engine(incremental=False)`, the original algorithm, side by side.
Each measurement runs in a fresh process on a fresh copy of the store.
See `python -m bench --help` for the options.
"""
