"""Gather the files of one ``benchmarks/gpu_check.sh`` run into one JSON named after the card, and print its table.

    python benchmarks/gpu_report.py OUT --card "NVIDIA H100 80GB HBM3" --results_dir benchmarks/results

``OUT`` holds what the parts wrote: ``parts.tsv`` (name, status, seconds, limit), ``cuda_check.json``,
``pytest_cuda.log``, ``bench_fp32.json``, ``bench_layers.json``, ``bench_bf16.json``, ``evaluate_off.json`` /
``evaluate_bf16.json`` (the same checkpoint evaluated in float32 and in bf16 with float32's ranking, both
re-ranked at K = 10), ``search.json``,
``evaluate_ddp.json`` (float32 under torchrun, world size 1) and ``coco5k.json``; a part that failed leaves its file
out, and the JSON says so. Derived here, from those files only: exact scoring per preset beside the original-style loop
at the baseline's size (fp32 from one run, bf16 from the other, the same GPU); whether bf16's recall table and the
DDP run's equal the float32 one. The JSON is written to ``OUT/gpu_check_<card>.json`` and, when ``--results_dir``
differs, there too.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for path in (str(HERE), str(HERE.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import run  # noqa: E402
from hsc_pyg.io import write_json  # noqa: E402

PARTS = ("cuda_check", "bench_fp32", "bench_layers", "bench_bf16", "evaluate_off", "evaluate_bf16", "search",
         "evaluate_ddp", "coco5k")


def load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def exact_scoring(fp32: dict[str, Any] | None, bf16: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per preset, at the size of the original-style baseline: original-style fp32, ours fp32 (interleaved with it),
    ours bf16 (the bf16 run's measurement at that size) in pairs/s and as multiples of the original; and our largest
    measured size in fp32 with its peak memory."""
    rows = []
    for base in (fp32 or {}).get("baseline_scoring", []):
        if "error" in base:
            continue
        preset, size = base["preset"], (base["n_img"], base["n_cap"])
        original = base["original"]["pairs_per_s"]
        row: dict[str, Any] = {"preset": preset, "size": f"{size[0]}x{size[1]}",
                               "original_fp32_pairs_per_s": original,
                               "fp32_pairs_per_s": base["ours"]["pairs_per_s"],
                               "fp32_vs_original": base["speedup_wall"]}
        same = [r for r in (bf16 or {}).get("scoring", []) if "error" not in r and r["preset"] == preset
                and (r["n_img"], r["n_cap"]) == size]
        if same:
            row.update(bf16_pairs_per_s=same[0]["pairs_per_s"], bf16_vs_original=same[0]["pairs_per_s"] / original)
        measured = [r for r in fp32.get("scoring", []) if "error" not in r and r["preset"] == preset]
        if measured:
            largest = max(measured, key=lambda r: r["pairs"])
            row.update(largest_size=f"{largest['n_img']}x{largest['n_cap']}",
                       largest_fp32_pairs_per_s=largest["pairs_per_s"],
                       largest_fp32_peak_mb=largest["peak_memory"].get("above_start_mb"))
        rows.append(row)
    return rows


def same_table(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool | None:
    """Whether two evaluate.py JSONs hold the same recall table (None when one is missing)."""
    if a is None or b is None:
        return None
    return a.get("metrics") == b.get("metrics")


def pipeline(files: dict[str, Any]) -> dict[str, Any]:
    off, bf16 = files.get("evaluate_off"), files.get("evaluate_bf16")
    result: dict[str, Any] = {"bf16_recall_table_equals_float32": same_table(off, bf16),
                              "ddp_recall_table_equals_single_process": same_table(off, files.get("evaluate_ddp"))}
    for name, report in (("float32", off), ("bf16", bf16)):
        if report is not None:
            result[name] = {"rsum": report["metrics"]["rsum"],
                            "first_stage_rsum": report.get("first_stage_metrics", {}).get("rsum"),
                            "rerank": [{"k": r["k"], "rsum": r["metrics"]["rsum"]} for r in report.get("rerank", [])],
                            "rescore": report.get("rescore"), "seconds": report.get("seconds")}
    search = files.get("search")
    if search is not None:
        result["search"] = search
    return result


def pytest_summary(out: Path) -> str | None:
    try:
        lines = (out / "pytest_cuda.log").read_text().splitlines()
    except OSError:
        return None
    found = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
    return found[-1] if found else None


def read_parts(out: Path) -> list[dict[str, Any]]:
    try:
        lines = (out / "parts.tsv").read_text().splitlines()
    except OSError:
        return []
    parts = []
    for line in lines:
        name, status, seconds, limit = line.split("\t")
        parts.append({"part": name, "status": status, "seconds": int(seconds), "limit_s": int(limit)})
    return parts


def report(out: Path, card: str, wall_s: float | None = None, budget_s: float | None = None) -> dict[str, Any]:
    files = {name: load(out, name) for name in PARTS}
    cuda = files["cuda_check"] or {}
    results = cuda.get("results", [])
    return {
        "card": card, "wall_s": wall_s, "budget_s": budget_s, "parts": read_parts(out),
        "missing_files": [name for name, value in files.items() if value is None],
        "cuda_check": {"passed": sum(r["ok"] is True for r in results),
                       "failed": [r["check"] for r in results if r["ok"] is False],
                       "skipped": [r["check"] for r in results if r["ok"] is None]},
        "pytest_cuda": pytest_summary(out),
        "exact_scoring": exact_scoring(files["bench_fp32"], files["bench_bf16"]),
        "pipeline": pipeline(files),
        "files": files,
    }


def table(rep: dict[str, Any]) -> str:
    lines = [f"=== gpu_check: {rep['card']}, {rep['wall_s']} s of {rep['budget_s']} s"]
    lines += [f"{p['part']:14s} {p['status']:10s} {p['seconds']:>4} s  (limit {p['limit_s']} s)" for p in rep["parts"]]
    if rep["missing_files"]:
        lines.append(f"missing: {', '.join(rep['missing_files'])}")
    cc = rep["cuda_check"]
    lines.append(f"cuda_check: {cc['passed']} passed, failed: {cc['failed'] or 'none'}, "
                 f"skipped: {cc['skipped'] or 'none'}")
    lines.append(f"pytest -m cuda: {rep['pytest_cuda']}")
    for row in rep["exact_scoring"]:
        bf16 = (f", bf16 {row['bf16_pairs_per_s']:,.0f} (x{row['bf16_vs_original']:.1f})"
                if "bf16_pairs_per_s" in row else ", bf16 not measured")
        lines.append(f"exact scoring {row['preset']:10s} {row['size']}: original-style fp32 "
                     f"{row['original_fp32_pairs_per_s']:,.0f} pairs/s, ours fp32 {row['fp32_pairs_per_s']:,.0f} "
                     f"(x{row['fp32_vs_original']:.1f}){bf16}")
    pipe = rep["pipeline"]
    for name in ("float32", "bf16"):
        if name in pipe:
            p = pipe[name]
            reranked = ", ".join(f"K = {r['k']} {r['rsum']:.1f}" for r in p["rerank"])
            lines.append(f"evaluate {name}: rsum {p['rsum']:.1f}, first stage {p['first_stage_rsum']}, re-ranked "
                         f"{reranked}")
    lines.append(f"bf16 recall table = float32's: {pipe['bf16_recall_table_equals_float32']}; DDP (world size 1) "
                 f"= one process: {pipe['ddp_recall_table_equals_single_process']}")
    for name in ("bench_fp32", "bench_layers", "bench_bf16"):
        bench = rep["files"].get(name)
        if bench is not None:
            lines += [f"--- {name}", run.table(bench)]
    coco = rep["files"].get("coco5k")
    if coco and "stages" in coco:
        st = coco["stages"]
        lines.append(f"--- coco5k {coco['images']}x{coco['captions']} ({coco['preset']}, {coco['amp']}): total "
                     f"{coco['wall_s']:.1f} s (encode {st['encode']['wall_s']:.1f} s, "
                     f"score {st['score']['wall_s']:.1f} s "
                     f"= {st['score']['pairs_per_s']:,.0f} pairs/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder gpu_check.sh wrote its parts to")
    parser.add_argument("--card", required=True, help="the GPU's name (the file is named after it)")
    parser.add_argument("--results_dir", default="", help="also write the JSON here (default: OUT only)")
    parser.add_argument("--wall_s", type=float, default=None, help="the whole run's seconds, for the record")
    parser.add_argument("--budget_s", type=float, default=None, help="the run's time budget, for the record")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"gpu_report.py: {out} is not a folder; give the OUT folder of a benchmarks/gpu_check.sh run",
              file=sys.stderr)
        return 2
    rep = report(out, args.card, args.wall_s, args.budget_s)
    name = f"gpu_check_{slug(rep['card'])}.json"
    for folder in {out, Path(args.results_dir or out)}:
        write_json(folder / name, rep, indent=2)
    print(table(rep))
    print(f"written: {', '.join(str(folder / name) for folder in sorted({out, Path(args.results_dir or out)}))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
