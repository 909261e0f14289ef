"""Calibrated pruning time of a baseline revision against the working tree, in one job.

This machine's speed drifts by 15-40 % between runs, so a change to the calibrated pass is
timed against its baseline back to back: the baseline revision is checked out into a temporary
git worktree and installed (without dependencies) into a temporary folder; then each model of
:mod:`bench_prune` is pruned to 50 % FLOPs with ``--samples`` calibration samples by the
baseline and by the working tree in turn, each run in a fresh process, ``--repeats`` times.
Prints one JSON line per run and a summary per model: the median times, their ratio, and
whether both versions reached the same plan (parameters after pruning). Run from the
repository root::

    .venv/bin/python benchmarks/bench_calibrated_ab.py --baseline HEAD~1 [--models resnet50]
        [--samples 64] [--repeats 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(name: str, samples: int) -> None:
    """Prune one model with whichever ``tvm_qmfrg`` this process imports; print a JSON line."""
    from bench_prune import calibrated

    import tvm_qmfrg
    from tvm_qmfrg.onnxio import synthetic

    seconds, plan = calibrated(getattr(synthetic, name)(seed=0), name, samples)
    package = str(Path(tvm_qmfrg.__file__).resolve().parent)
    row = {"seconds": round(seconds, 2), "params_after": plan.params_after, "package": package}
    print(json.dumps(row))


def _install(revision: str, into: Path) -> str:
    """Install ``revision`` of this repository into ``into``; return its full commit id."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tree:
        subprocess.run(["git", "worktree", "add", "--detach", tree, commit], check=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-t", into, tree],
                check=True,
            )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], check=True)
    return commit


def _run(name: str, samples: int, pythonpath: str | None, version: str) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, __file__, "--child", name, "--samples", str(samples)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"bench_calibrated_ab: {name} ({version}): {last}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    package = Path(run.pop("package"))
    if pythonpath and Path(pythonpath).resolve() not in package.parents:
        raise SystemExit(f"bench_calibrated_ab: the {version} run imported another tvm_qmfrg")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--models", default="resnet50,bert_base")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each version")
    parser.add_argument("--out", help="also write the runs and the summary to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.samples)
        return
    if not args.baseline:
        parser.error("--baseline REV is required")
    runs, summary = [], []
    with tempfile.TemporaryDirectory() as pkgs:
        commit = _install(args.baseline, Path(pkgs))
        for name in args.models.split(","):
            for k in range(args.repeats):
                for version, path in (("baseline", pkgs), ("working tree", None)):
                    run = {"model": name, "version": version, "repeat": k}
                    run.update(_run(name, args.samples, path, version))
                    runs.append(run)
                    print(json.dumps(run), flush=True)
            mine = [r for r in runs if r["model"] == name]
            base = [r["seconds"] for r in mine if r["version"] == "baseline"]
            new = [r["seconds"] for r in mine if r["version"] == "working tree"]
            row = {
                "model": name,
                "baseline_seconds": round(statistics.median(base), 2),
                "working_tree_seconds": round(statistics.median(new), 2),
                "speedup": round(statistics.median(base) / statistics.median(new), 3),
                "same_plan": len({r["params_after"] for r in mine}) == 1,
            }
            summary.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        from tvm_qmfrg.report import write_json

        write_json(
            args.out,
            {
                "command": "python benchmarks/bench_calibrated_ab.py " + " ".join(sys.argv[1:]),
                "baseline": commit,
                "samples": args.samples,
                "runs": runs,
                "summary": summary,
            },
        )


if __name__ == "__main__":
    main()
