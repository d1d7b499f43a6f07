"""``hsc-pyg evaluate`` (``python evaluate.py`` in a checkout): image-text retrieval recalls of one checkpoint, an
ensemble of several, or saved score matrices.

    hsc-pyg evaluate --model runs/run/checkpoint/model_best.pth --data_path data --data_name f30k_precomp --split test
    hsc-pyg evaluate --model SAF.pth --model SGR.pth --data_path DIR --data_name coco_precomp --split testall --fold5
    hsc-pyg evaluate --sims saf.npy --sims sgr.npy --data_path DIR --data_name f30k_precomp --split test
    torchrun --nproc_per_node 4 -m hsc_pyg evaluate --model CKPT --data_path DIR --data_name coco_precomp --split testall

Under torchrun the image rows of each score matrix are split across the processes (one per GPU) and gathered on
rank 0, which alone prints and writes; the numbers are those of one process.

The work is done by :mod:`hsc_pyg.engine.protocols` (over :mod:`hsc_pyg.engine.evaluation` and
:mod:`hsc_pyg.engine.metrics`); this module parses flags, prints and exits (status 2 with a one-line message on an
expected error).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from ..engine.protocols import DEFAULT_RESCORE_K
from .common import OneLineParser, command_parser, exit_with, run_command

DESCRIPTION = """\
Image-text retrieval recalls (MODEL.md section 4): i2t = an image's best-ranked caption among its 5, t2i = a caption's
image; R@1/5/10, medr, meanr and rsum (ties count against the query). Every image and caption is encoded once and all
pairs are scored exactly in blocks. Several --model and --sims are averaged before ranking (SGRAF = SAF + SGR).
Protocols: Flickr30K 1K = --split test; COCO 5K = --split testall; COCO 1K = --split testall --fold5."""


def build_parser() -> OneLineParser:
    p = command_parser("evaluate", DESCRIPTION)
    src = p.add_argument_group("what to evaluate (at least one --model or --sims)")
    src.add_argument("--model", action="append", default=[], metavar="CKPT",
                     help="checkpoint: this project's (model_best.pth) or an official SGRAF / HSC one; repeat to "
                          "average several models' scores")
    src.add_argument("--sims", action="append", default=[], metavar="FILE.npy",
                     help="a score matrix saved by --save_sims ([images, captions] of the same split); repeat to "
                          "average; combines with --model")
    src.add_argument("--vocab_path", default="", metavar="VOCAB.json",
                     help="vocabulary JSON for every --model (default: the one stored in the checkpoint; official "
                          "checkpoints have none, pass the SCAN f30k/coco vocabulary)")
    data = p.add_argument_group("data")
    data.add_argument("--data_path", default="data", help="folder that holds <data_name>/ (default: %(default)s)")
    data.add_argument("--data_name", default="synthetic_precomp",
                      help="dataset folder: f30k_precomp, coco_precomp, flickr8k_mini_precomp, synthetic_precomp "
                           "(default: %(default)s)")
    data.add_argument("--split", default="test",
                      help="test, testall (COCO 5,000 images: the fair COCO protocol) or dev (default: %(default)s)")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--fold5", action="store_true",
                       help="COCO 1K: five folds of 1,000 images / 5,000 captions, metrics averaged (needs --split "
                            "testall); only the five diagonal blocks are scored")
    proto.add_argument("--rerank_k", type=int, nargs="+", default=[], metavar="K",
                       help="also re-rank: order all captions (images) by the model's first stage (the cosine of its "
                            "retrieval vectors), score only each query's top K exactly; reports the first stage's own "
                            "recalls and, per K, the re-ranked recalls and the exact pair scores needed (needs "
                            "--model; several K at once: --rerank_k 5 10 20 50)")
    out = p.add_argument_group("output")
    out.add_argument("--save_sims", default="", metavar="FILE.npy",
                     help="write the [images, captions] float32 score matrix (the average when several sources are "
                          "given) for later --sims runs")
    out.add_argument("--overwrite", action="store_true", help="let --save_sims replace an existing file")
    out.add_argument("--json", default="", metavar="OUT.json",
                     help="write the printed numbers as JSON (replaces the file; its folder is created)")
    run = p.add_argument_group("compute")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    run.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                     help="precision of the pair scores (default: %(default)s = float32, the reference). bf16 (on a "
                          "GPU, or a CPU with AMX-BF16 / AVX512-BF16 / Arm BF16; refused elsewhere) or fp16 (GPU): "
                          "every pair is scored in that precision, then again in float32: each query's top "
                          "--rescore_k in both directions, every ground-truth pair, and every pair whose score lies "
                          "within the largest bf16 error seen of its query's best ground-truth score, so that the "
                          "recall table is float32's. The encoders run in float32")
    run.add_argument("--rescore_k", type=int, default=None, metavar="K",
                     help="with --amp bf16/fp16: the top K of every query, in both directions, re-scored in float32 "
                          f"(the top of each ranking in float32 order; default: {DEFAULT_RESCORE_K}); 0 = pure "
                          "bf16/fp16 scores, nothing re-scored (about 3 significant digits: near-equal scores tie, and "
                          "ties count against the query)")
    run.add_argument("--batch_size", type=int, default=128,
                     help="images or captions per encoder call (default: %(default)s)")
    run.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: %(default)s)")
    run.add_argument("--score_chunk_mb", type=int, default=0, metavar="MB",
                     help="memory bound of one chunk of the pair scorer in MiB (default: the checkpoint's "
                          "score_chunk_mb, 512); on a GPU with room, 4096 scores about 1.4x faster")
    run.add_argument("--store_dtype", default="float32", choices=("float32", "float16"),
                     help="precision the encodings are kept in between encoding and scoring (default: %(default)s; "
                          "float16 halves their memory)")
    run.add_argument("--no_progress", action="store_true", help="no progress bars on stderr")
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
    from ..engine.distributed import torchrun_job
    from ..engine.protocols import Protocol, run_protocol

    protocol = Protocol(
        data_path=args.data_path, data_name=args.data_name, split=args.split, models=args.model, sims=args.sims,
        vocab_path=args.vocab_path, fold5=args.fold5, rerank_k=tuple(args.rerank_k), save_sims=args.save_sims,
        overwrite=args.overwrite, json=args.json, device=args.device, amp=args.amp, rescore_k=args.rescore_k,
        batch_size=args.batch_size,
        workers=args.workers, score_chunk_mb=args.score_chunk_mb, store_dtype=args.store_dtype,
        progress=not args.no_progress)
    with torchrun_job(args.device):
        report = run_protocol(protocol, warn=_warn)
    if report is not None:
        print_report(report)
        if args.save_sims:
            print(f"saved the score matrix [{report['num_images']}, {report['num_captions']}] to {args.save_sims}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), evaluate_command, argv)


if __name__ == "__main__":
    exit_with(main)
