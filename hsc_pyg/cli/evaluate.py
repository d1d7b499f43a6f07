"""``hsc-pyg evaluate`` (``python evaluate.py`` in a checkout): image-text retrieval recalls of one checkpoint, an
ensemble of several, or saved score matrices.

    hsc-pyg evaluate --model runs/run/checkpoint/model_best.pth --data_path data --data_name f30k_precomp --split test
    hsc-pyg evaluate --model SAF.pth --model SGR.pth --data_path DIR --data_name coco_precomp --split testall --fold5
    hsc-pyg evaluate --sims saf.npy --sims sgr.npy --data_path DIR --data_name f30k_precomp --split test
    torchrun --nproc_per_node 4 -m hsc_pyg evaluate --model CKPT --data_path DIR --data_name coco_precomp --split testall

Under torchrun the image rows of each score matrix are split across the processes (one per GPU) and gathered on
rank 0, which alone prints and writes; the numbers are those of one process.

The work is done by :mod:`hsc_pyg.engine.evaluate` (over :mod:`hsc_pyg.engine.scoring` and
:mod:`hsc_pyg.engine.metrics`); this module parses flags, prints and exits (status 2 with a one-line message on an
expected error).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from ..config import EvaluateConfig
from ..options import add_arguments, given
from .common import OneLineParser, command_parser, exit_with, run_command

DESCRIPTION = """\
Image-text retrieval recalls (MODEL.md section 4): i2t = an image's best-ranked caption among its 5, t2i = a caption's
image; R@1/5/10, medr, meanr and rsum (ties count against the query). Every image and caption is encoded once and all
pairs are scored exactly in blocks. Several --model and --sims are averaged before ranking (SGRAF = SAF + SGR).
Protocols: Flickr30K 1K = --split test; COCO 5K = --split testall; COCO 1K = --split testall --fold5."""


#: the flags of EvaluateConfig, by help section
GROUPS = {"what to evaluate (at least one --model or --sims)": ["models", "sims", "vocab_path"],
          "data": ["data_path", "data_name", "split"],
          "protocol": ["fold5", "rerank_k"],
          "output": ["save_sims", "overwrite", "json"],
          "compute": ["device", "amp", "rescore_k", "batch_size", "workers", "score_chunk_mb", "store_dtype"]}


def build_parser() -> OneLineParser:
    p = command_parser("evaluate", DESCRIPTION)
    for title, names in GROUPS.items():
        add_arguments(p.add_argument_group(title), [EvaluateConfig], names)
    p.add_argument("--no_progress", action="store_true", help="no progress bars on stderr")
    return p


def _warn(message: str) -> None:
    from ..engine.distributed import is_main

    if is_main():
        print(f"warning: {message}", file=sys.stderr)


def print_report(report: dict[str, Any]) -> None:
    from ..engine.metrics import format_table

    n, m, exact_pairs = report["num_images"], report["num_captions"], report["exact_pairs"]
    what = f"{report['data_name']}/{report['split']}"
    title = f"{what}: {'5-fold (1K) average' if report['protocol'] == 'fold5' else f'{n} images, {m} captions'}"
    if "rescore" in report:
        rescore = report["rescore"]
        how = (f"{report['amp']} scores, each query's top {rescore['k']} re-scored in float32 "
               f"({rescore['float32_pairs']:,} of {exact_pairs:,} pair scores, {100 * rescore['fraction']:.2f}%)")
    elif report["amp"] != "off":
        how = f"{report['amp']} scores ({exact_pairs:,} pair scores)"
    else:
        how = f"exact ({exact_pairs:,} pair scores)"
    print(format_table(report["metrics"], title=f"{title} -- {how}"))
    if "first_stage_metrics" in report:
        print()
        print(format_table(report["first_stage_metrics"],
                           title=f"{title} -- first stage only (cosine, no exact score)"))
    for rerank in report.get("rerank", []):
        print()
        print(format_table(rerank["metrics"], title=f"{title} -- re-ranked top {rerank['k']} of the first stage "
                                                    f"({rerank['exact_pairs']:,} pair scores, "
                                                    f"{100 * rerank['fraction']:.2f}% of exact)"))
        if "shared_metrics" in rerank:
            print()
            print(format_table(rerank["shared_metrics"], title=f"{title} -- the same {rerank['exact_pairs']:,} pair "
                                                               "scores, each used in both directions"))
    seconds = report.get("seconds")
    if seconds:
        rate = (f"; {len(report['models']) * exact_pairs / seconds['score']:,.0f} exact pairs/s"
                if seconds.get("score") else "")
        print("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + rate)


def evaluate_command(args: argparse.Namespace) -> int:
    config = EvaluateConfig(**given(args, [EvaluateConfig]))
    from ..engine.distributed import torchrun_job
    from ..engine.evaluate import run_protocol

    with torchrun_job(config.device):
        report = run_protocol(config, warn=_warn, progress=not args.no_progress)
    if report is not None:
        print_report(report)
        if config.save_sims:
            print(f"saved the score matrix [{report['num_images']}, {report['num_captions']}] to {config.save_sims}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), evaluate_command, argv)


if __name__ == "__main__":
    exit_with(main)
