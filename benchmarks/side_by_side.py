"""The same measurements of ``run.py`` on two checkouts (an old commit and the new one), interleaved in one run on one
machine, so that a change in its load hits both: exact scoring (pairs/s) and a training step (steps/s).

    git worktree add /tmp/old a0e672a
    python benchmarks/side_by_side.py --old /tmp/old --new . --repeats 3 --out benchmarks/results/side_by_side.json

Each measurement is ``run.py --worker SPEC`` run by the checkout's own ``benchmarks/run.py`` with that checkout first
on ``PYTHONPATH``; the medians of the per-run rates are reported, wall and process CPU seconds (on a shared machine
the CPU rate is the steadier one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hsc_pyg.io import write_json  # noqa: E402

SPECS = {
    "score_sgraf_saf_100x500": {"kind": "score", "preset": "sgraf_saf", "n_img": 100, "n_cap": 500, "repeats": 1},
    "score_hsc_100x500": {"kind": "score", "preset": "hsc", "n_img": 100, "n_cap": 500, "repeats": 1},
    "train_hsc_batch32": {"kind": "train", "preset": "hsc", "batch_size": 32, "steps": 2},
}
RATES = {"score": ("pairs_per_s", "pairs_per_cpu_s"), "train": ("steps_per_s", "steps_per_cpu_s")}


def measure(tree: Path, spec: dict, threads: int, timeout: float) -> dict:
    spec = {"device": "cpu", "dtype": "fp32", "quick": False, "threads": threads, **spec}
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "run.py"), "--worker", json.dumps(spec)],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{tree}: {spec}: exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, type=Path, help="the old checkout (a git worktree)")
    parser.add_argument("--new", required=True, type=Path, help="the new checkout")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each measurement per checkout")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement (default: 1)")
    parser.add_argument("--only", default=",".join(SPECS), help=f"comma-separated: {', '.join(SPECS)}")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    commits = {k: subprocess.run(["git", "-C", str(t), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() for k, t in trees.items()}
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    result = {"cpu": cpu or platform.machine(), "threads": args.threads, "repeats": args.repeats, "commits": commits,
              "measurements": {}}
    for name in args.only.split(","):
        spec = SPECS[name]
        wall_key, cpu_key = RATES[spec["kind"]]
        runs = {"old": [], "new": []}
        for _ in range(args.repeats):
            for side, tree in trees.items():
                runs[side].append(measure(tree, spec, args.threads, args.timeout))
        summary = {side: {"wall_rate": statistics.median(r[wall_key] for r in rs),
                          "cpu_rate": statistics.median(r[cpu_key] for r in rs),
                          "runs": [{wall_key: r[wall_key], cpu_key: r[cpu_key]} for r in rs]}
                   for side, rs in runs.items()}
        summary["unit"] = wall_key.replace("_per_s", "") + "/s"
        summary["new_over_old_wall"] = summary["new"]["wall_rate"] / summary["old"]["wall_rate"]
        summary["new_over_old_cpu"] = summary["new"]["cpu_rate"] / summary["old"]["cpu_rate"]
        result["measurements"][name] = summary
        print(f"{name}: old {summary['old']['wall_rate']:.1f} / new {summary['new']['wall_rate']:.1f} "
              f"{summary['unit']} wall (x{summary['new_over_old_wall']:.3f}), per CPU-second x"
              f"{summary['new_over_old_cpu']:.3f}", file=sys.stderr, flush=True)
        if args.out:
            write_json(args.out, result, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
