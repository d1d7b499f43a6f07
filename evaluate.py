"""Evaluate image-text retrieval: recalls of one checkpoint, an ensemble of several, or saved score matrices.

    python evaluate.py --model runs/run/checkpoint/model_best.pth --data_path data --data_name f30k_precomp --split test
    python evaluate.py --model SAF.pth --model SGR.pth --data_path DIR --data_name coco_precomp --split testall --fold5
    python evaluate.py --sims saf.npy --sims sgr.npy --data_path DIR --data_name f30k_precomp --split test
    torchrun --nproc_per_node 4 evaluate.py --model CKPT --data_path DIR --data_name coco_precomp --split testall

Under torchrun the image rows of each score matrix are split across the processes (one per GPU) and gathered on
rank 0, which alone prints and writes; the numbers are those of one process.

The work is done by :mod:`hsc_pyg.engine.evaluation` and :mod:`hsc_pyg.engine.metrics`; this file parses flags,
prints and exits (status 2 with a one-line message on an expected error).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hsc_pyg.errors import ConfigError, DataError, HSCError, os_error_reason
from hsc_pyg.io import atomic_files, write_json

DESCRIPTION = """\
Image-text retrieval recalls (MODEL.md section 4): i2t = an image's best-ranked caption among its 5, t2i = a caption's
image; R@1/5/10, medr, meanr and rsum (ties count against the query). Every image and caption is encoded once and all
pairs are scored exactly in blocks. Several --model and --sims are averaged before ranking (SGRAF = SAF + SGR).
Protocols: Flickr30K 1K = --split test; COCO 5K = --split testall; COCO 1K = --split testall --fold5."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python evaluate.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    proto.add_argument("--rerank_k", type=int, default=0, metavar="K",
                       help="also re-rank: order all captions (images) by the cosine of the global vectors, score only "
                            "each query's top K exactly; reports both recalls and the exact pair scores each needed "
                            "(needs --model)")
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
                     help="autocast on the GPU (default: %(default)s; fp32 is the reference). Faster, but the scores "
                          "come out rounded to the autocast precision (bf16: about 3 digits), so near-equal scores "
                          "tie and ties count against the query: recalls can drop; check against fp32")
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
    run.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _warn(message: str) -> None:
    from hsc_pyg.engine.distributed import is_main

    if is_main():
        print(f"warning: {message}", file=sys.stderr)


def _check_output(path: str, flag: str, overwrite: bool, make_folder: bool = False) -> Path | None:
    """Fail before any work when an output file cannot be written."""
    if not path:
        return None
    target = Path(path)
    if make_folder:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{flag} {target}: cannot create folder {target.parent} ({os_error_reason(e)}); "
                              "choose another file") from None
    if target.exists() and not overwrite:
        raise ConfigError(f"{flag} {target} already exists; pass --overwrite to replace it or choose another file")
    if not target.parent.is_dir():
        raise ConfigError(f"{flag} {target}: folder {target.parent} does not exist; create it first")
    if not os.access(target.parent, os.W_OK):
        raise ConfigError(f"{flag} {target}: folder {target.parent} is not writable; choose another file")
    return target


def sims_metadata_path(path: Path) -> Path:
    """The JSON written beside a saved matrix: which data, split and sources it was computed from."""
    return path.with_name(path.name + ".json")


def load_sims(path: str, shape: tuple[int, int], data_name: str, split: str) -> np.ndarray:
    """A saved score matrix, memory-mapped; DataError unless it is a float ``shape`` matrix. Warns when the JSON beside
    it names another dataset or split (COCO dev and testall have the same shape)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--sims {file} does not exist; write one with --save_sims")
    try:
        sims = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"--sims {file} is not a readable .npy matrix ({' '.join(str(e).split())[:160]})") from None
    if sims.ndim != 2 or sims.dtype.kind != "f":
        raise DataError(f"--sims {file} holds a {sims.dtype} array of shape {list(sims.shape)}; expected a 2-D float "
                        "matrix [images, captions]")
    if tuple(sims.shape) != shape:
        raise DataError(f"--sims {file} has shape {list(sims.shape)} but {data_name}/{split} needs "
                        f"[{shape[0]}, {shape[1]}] (images x captions); it was saved for another split")
    meta_path = sims_metadata_path(file)
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        saved = (meta.get("data_name"), meta.get("split")) if isinstance(meta, dict) else (None, None)
        if None not in saved and saved != (data_name, split):
            _warn(f"--sims {file} was saved for {saved[0]}/{saved[1]} ({meta_path}), not {data_name}/{split}")
    return sims


class Average:
    """Running mean of score blocks, in float32."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] | None = None
        self.count = 0

    def add(self, blocks: Sequence[np.ndarray], owned: bool = False) -> None:
        """Add one source's blocks; ``owned``: they are fresh float32 arrays that may be summed into (no copy)."""
        if self.blocks is None:
            self.blocks = list(blocks) if owned else [np.array(b, dtype=np.float32) for b in blocks]
        else:
            for total, b in zip(self.blocks, blocks):
                total += b
        self.count += 1

    def mean(self) -> list[np.ndarray]:
        if self.count > 1:
            for total in self.blocks:
                total /= self.count
        return self.blocks


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hsc_pyg import load_checkpoint
    from hsc_pyg.data.precomp import PrecompSplit
    from hsc_pyg.data.vocab import Vocabulary
    from hsc_pyg.engine import distributed
    from hsc_pyg.engine import evaluation as ev
    from hsc_pyg.engine.metrics import average_metrics, fold_slices, format_table, recall_metrics

    if not args.model and not args.sims:
        raise ConfigError("nothing to evaluate: pass --model CKPT and/or --sims FILE.npy")
    if args.rerank_k and not args.model:
        raise ConfigError("--rerank_k needs --model (re-ranking uses the model's global vectors and its pair scorer)")
    if args.rerank_k and args.sims:
        raise ConfigError("--rerank_k cannot use --sims matrices (they hold no global vectors); drop --sims")
    if args.rerank_k < 0:
        raise ConfigError(f"--rerank_k must be at least 1, found {args.rerank_k}")
    if args.save_sims and args.fold5:
        raise ConfigError("--save_sims with --fold5 would save only the five diagonal blocks; save the full matrix "
                          "without --fold5, then evaluate it with --sims FILE --fold5")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, found {args.batch_size}")
    save_path = _check_output(args.save_sims, "--save_sims", args.overwrite)
    json_path = _check_output(args.json, "--json", overwrite=True, make_folder=True)
    main_rank = distributed.is_main()  # under torchrun the other ranks only score their rows of each matrix
    progress = not args.no_progress and main_rank

    split = PrecompSplit.open(args.data_path, args.data_name, args.split)
    n, m, per_image = split.num_images, split.num_captions, split.per_image
    what = f"{args.data_name}/{args.split}"
    if args.data_name.lower().startswith("coco") and args.split == "test":
        _warn(f"evaluating {args.data_name} on split 'test' gives higher numbers than the published COCO protocols; "
              "use --split testall (5K) or --split testall --fold5 (1K)")
    blocks = fold_slices(n, per_image) if args.fold5 else [(slice(0, n), slice(0, m))]
    if args.fold5 and len(blocks) != 5:
        _warn(f"--fold5 on {n} images makes {len(blocks)} fold(s) of 1,000; the COCO 1K protocol has five (testall)")
    exact_pairs = sum((b[0].stop - b[0].start) * (b[1].stop - b[1].start) for b in blocks)
    average = Average()
    seconds: dict[str, float] = {}

    for path in args.sims if main_rank else []:
        sims = load_sims(path, (n, m), args.data_name, args.split)
        average.add([sims[rows, cols] for rows, cols in blocks])

    device = distributed.local_device(ev.resolve_device(args.device)) if args.model else None
    vocab = Vocabulary.load(args.vocab_path) if args.vocab_path and args.model else None
    members = []
    for path in args.model:
        start = time.perf_counter()
        model = load_checkpoint(path, map_location="cpu").to(device).eval()
        ev.check_compatible(model, split, vocab, source=f"checkpoint {path}")
        img_enc, captions = ev.encode_split(model, split, vocab, batch_size=args.batch_size, amp=args.amp,
                                            store_dtype=ev.STORE_DTYPES[args.store_dtype], workers=args.workers,
                                            progress=progress)
        seconds["encode"] = seconds.get("encode", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        parts = [ev.score_matrix_distributed(model, img_enc[rows], captions[cols], amp=args.amp, progress=progress,
                                             chunk_mb=args.score_chunk_mb or None) for rows, cols in blocks]
        seconds["score"] = seconds.get("score", 0.0) + time.perf_counter() - start
        if main_rank:
            average.add(parts, owned=True)
        if args.rerank_k:
            members.append((model, img_enc, captions))
    if not main_rank:
        return {}
    scores = average.mean()

    if save_path is not None:
        meta = {"data_name": args.data_name, "split": args.split, "shape": [n, m], "models": list(args.model),
                "sims": list(args.sims)}
        atomic_files({save_path: lambda f: np.save(f, scores[0], allow_pickle=False),
                      sims_metadata_path(save_path): lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode())})
    per_block = [recall_metrics(block, per_image) for block in scores]
    metrics = average_metrics(per_block) if args.fold5 else per_block[0]
    report: dict[str, Any] = {
        "data_name": args.data_name, "split": args.split, "protocol": "fold5" if args.fold5 else "all",
        "num_images": n, "num_captions": m, "models": list(args.model), "sims": list(args.sims),
        "metrics": metrics, "exact_pairs": exact_pairs,
    }
    title = f"{what}: {'5-fold (1K) average' if args.fold5 else f'{n} images, {m} captions'}"
    print(format_table(metrics, title=f"{title} -- exact ({exact_pairs:,} pair scores)"))

    if args.rerank_k:
        start = time.perf_counter()
        reranked = [ev.rerank_ensemble([(model, img_enc[rows], captions[cols]) for model, img_enc, captions in members],
                                       args.rerank_k, chunk_mb=args.score_chunk_mb or None, amp=args.amp,
                                       progress=progress) for rows, cols in blocks]
        seconds["rerank"] = time.perf_counter() - start
        per_block = [r.metrics(per_image) for r in reranked]
        rerank_metrics = average_metrics(per_block) if args.fold5 else per_block[0]
        rerank_pairs = sum(r.num_exact_pairs for r in reranked)
        report["rerank"] = {"k": args.rerank_k, "metrics": rerank_metrics, "exact_pairs": rerank_pairs,
                            "fraction": rerank_pairs / exact_pairs}
        print()
        print(format_table(rerank_metrics, title=f"{title} -- re-ranked top {args.rerank_k} by cosine "
                                                 f"({rerank_pairs:,} pair scores, {100 * rerank_pairs / exact_pairs:.2f}%"
                                                 " of exact)"))
    if seconds:
        report["seconds"] = seconds
        print("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
              + (f"; {len(args.model) * exact_pairs / seconds['score']:,.0f} exact pairs/s" if seconds.get("score") else ""))
    if save_path is not None:
        print(f"saved the score matrix {list(scores[0].shape)} to {save_path}")
    if json_path is not None:
        write_json(json_path, report, indent=2)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hsc_pyg.engine.distributed import torchrun_job

    try:
        with torchrun_job(args.device):
            run(args)
    except HSCError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
