"""Would fewer epochs rank the configurations of a study as the full training does?

    python benchmarks/epoch_ranking.py --study benchmarks/results/ablation.json --out runs/layers \
        --cutoffs 6,8,10 --json benchmarks/results/epoch_ranking.json

For every configuration of a study (the JSON written by ``python -m hsc_pyg.ablate``) with finished runs in ``--out``,
this reads each run's ``train.log`` (one ``epoch E ... dev: ... rsum X`` line per epoch) and reports, averaged over the
seeds: the best dev rsum within the first N epochs for each cutoff N (what a study stopped after N epochs would keep),
the best dev rsum of the whole training, and the test rsum of the study. Then, for each cutoff, the order of the
configurations next to their order by test rsum, with Kendall's tau between them (1: the same order). A shorter
study is only sound if the orders agree on the configurations measured so far.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hsc_pyg.io import write_json  # noqa: E402

DEV_LINE = re.compile(r"^epoch (\d+) iter \d+ dev: .*\| rsum ([0-9.]+)")


def dev_curve(log: Path) -> dict[int, float]:
    """Epoch (0-based) -> dev rsum, from a train.log (a resumed training repeats no epoch)."""
    curve = {}
    for line in log.read_text().splitlines():
        match = DEV_LINE.match(line)
        if match:
            curve[int(match.group(1))] = float(match.group(2))
    return curve


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two equally long score lists (ties count as neither agreeing nor disagreeing)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    if not pairs:
        return float("nan")
    sign = [((a[i] > a[j]) - (a[i] < a[j])) * ((b[i] > b[j]) - (b[i] < b[j])) for i, j in pairs]
    return sum(sign) / len(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/epoch_ranking.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="the study JSON of python -m hsc_pyg.ablate")
    parser.add_argument("--out", required=True, help="the run folders (the runner's --out)")
    parser.add_argument("--cutoffs", default="6,8,10", help="numbers of epochs to compare (default: %(default)s)")
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args(argv)
    cutoffs = [int(c) for c in args.cutoffs.split(",") if c]
    runs = json.loads(Path(args.study).read_text())["runs"]
    rows = {}
    for run in runs:
        log = Path(args.out) / run["name"] / f"seed{run['seed']}" / "train.log"
        if not log.is_file():
            print(f"{log}: missing, run left out", file=sys.stderr)
            continue
        curve = dev_curve(log)
        row = rows.setdefault(run["name"], {"seeds": [], "test": [], "dev_best": [],
                                            **{f"dev_best_first_{n}": [] for n in cutoffs}})
        row["seeds"].append(run["seed"])
        row["test"].append(run["test_rsum"])
        row["dev_best"].append(max(curve.values()))
        for n in cutoffs:
            row[f"dev_best_first_{n}"].append(max(v for e, v in curve.items() if e < n))
    if len(rows) < 2:
        print("error: fewer than two configurations with finished runs", file=sys.stderr)
        return 2
    mean = {name: {k: sum(v) / len(v) for k, v in row.items() if k != "seeds"} for name, row in rows.items()}
    names = sorted(mean, key=lambda n: -mean[n]["test"])
    test = [mean[n]["test"] for n in names]
    report = {"study": args.study, "configurations": {n: {**rows[n], "mean": mean[n]} for n in names},
              "order_by_test": names, "cutoffs": {}}
    print(f"{'configuration':32s} seeds  test   dev best  " + "  ".join(f"first {n:2d}" for n in cutoffs))
    for n in names:
        m = mean[n]
        print(f"{n:32s} {len(rows[n]['seeds']):5d}  {m['test']:5.1f}  {m['dev_best']:8.1f}  "
              + "  ".join(f"{m[f'dev_best_first_{c}']:8.1f}" for c in cutoffs))
    for key in [f"dev_best_first_{n}" for n in cutoffs] + ["dev_best"]:
        values = [mean[n][key] for n in names]
        order = sorted(names, key=lambda n: -mean[n][key])
        tau = kendall_tau(values, test)
        report["cutoffs"][key] = {"order": order, "kendall_tau_vs_test": tau}
        print(f"{key:20s} order {' > '.join(order)}  (Kendall tau vs test {tau:+.2f})")
    if args.json:
        write_json(args.json, report, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
