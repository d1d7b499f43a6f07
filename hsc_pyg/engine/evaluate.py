"""The retrieval protocols behind ``hsc-pyg evaluate``: one split, several sources (checkpoints and saved score matrices)
averaged, the whole matrix or COCO's five 1K folds, optionally re-ranked; saved score matrices read and written.

``--amp bf16`` (or fp16) scores every pair in that precision, then re-scores in float32 each query's top
``rescore_k`` in both directions, the ground-truth pairs and the pairs whose score is near a ground-truth score
(:func:`~hsc_pyg.engine.scoring.rescore_ranking`), so that the recall table is float32's
(``benchmarks/bf16_ranking.py`` measures it).

:func:`run_protocol` does the work and returns a report dict; the command line only parses flags and prints it. Under
``torchrun`` the image rows of each matrix are split across the processes and only rank 0 gets the report (the other
ranks get None). Warnings go to the ``warn`` callback (the library never prints).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import EvaluateConfig
from ..data.precomp import PrecompSplit
from ..data.vocab import Vocabulary
from ..errors import ConfigError, DataError, os_error_reason
from ..io import atomic_files, parse_json, write_json
from . import distributed
from .checkpoint import load_checkpoint
from .device import autocast, resolve_device
from .scoring import (STORE_DTYPES, check_compatible, encode_split, pair_scores, rerank_ensemble,
                      rescore_ranking, score_matrix_distributed)
from .metrics import fold_slices, protocol_metrics, recall_metrics

Warn = Callable[[str], None]


# --------------------------------------------------------------------------- output files
def check_output(path: str, flag: str, overwrite: bool, make_folder: bool = False) -> Path | None:
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
    if target.is_dir():
        raise ConfigError(f"{flag} {target} is a folder, not a file; choose a file name")
    if target.exists() and not overwrite:
        raise ConfigError(f"{flag} {target} already exists; pass --overwrite to replace it or choose another file")
    if not target.parent.is_dir():
        raise ConfigError(f"{flag} {target}: folder {target.parent} does not exist; create it first")
    if not os.access(target.parent, os.W_OK):
        raise ConfigError(f"{flag} {target}: folder {target.parent} is not writable; choose another file")
    return target


# --------------------------------------------------------------------------- saved score matrices
def sims_metadata_path(path: Path) -> Path:
    """The JSON written beside a saved matrix: which data, split and sources it was computed from."""
    return path.with_name(path.name + ".json")


def load_sims(path: str, shape: tuple[int, int], data_name: str, split: str, warn: Warn) -> np.ndarray:
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
            meta = parse_json(meta_path.read_text(encoding="utf-8"))
        except (ValueError, OSError):  # JSONDecodeError, UnicodeDecodeError and a too deep file are ValueErrors
            meta = {}
        saved = (meta.get("data_name"), meta.get("split")) if isinstance(meta, dict) else (None, None)
        if None not in saved and saved != (data_name, split):
            warn(f"--sims {file} was saved for {saved[0]}/{saved[1]} ({meta_path}), not {data_name}/{split}")
    return sims


def save_sims(path: Path, scores: np.ndarray, meta: dict[str, Any]) -> None:
    """The matrix as ``.npy`` and its metadata JSON beside it, written as one unit (:func:`hsc_pyg.io.atomic_files`):
    a failure changes neither."""
    text = json.dumps(meta, indent=2) + "\n"
    atomic_files({path: lambda f: np.save(f, scores, allow_pickle=False),
                  sims_metadata_path(path): lambda f: f.write(text.encode("utf-8"))})


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


# --------------------------------------------------------------------------- the protocol
def run_protocol(p: EvaluateConfig, warn: Warn, progress: bool = True) -> dict[str, Any] | None:
    """Evaluate ``p``; the report dict (``metrics``, ``exact_pairs``, ``rerank``, ``seconds`` ...) on rank 0 (or the
    single process), None on the other ranks. Writes ``--save_sims`` and ``--json`` when asked; progress bars on
    stderr when ``progress``."""
    save_path = check_output(p.save_sims, "--save_sims", p.overwrite)
    if save_path is not None:  # the matrix and its metadata are one output, under one overwrite rule
        check_output(str(sims_metadata_path(save_path)), "--save_sims (its metadata)", p.overwrite)
    json_path = check_output(p.json, "--json", overwrite=True, make_folder=True)
    main_rank = distributed.is_main()  # under torchrun the other ranks only score their rows of each matrix
    progress = progress and main_rank
    split = PrecompSplit.open(p.data_path, p.data_name, p.split)
    n, m, per_image = split.num_images, split.num_captions, split.per_image
    if p.data_name.lower().startswith("coco") and p.split == "test":
        warn(f"evaluating {p.data_name} on split 'test' gives higher numbers than the published COCO protocols; "
             "use --split testall (5K) or --split testall --fold5 (1K)")
    blocks = fold_slices(n, per_image) if p.fold5 else [(slice(0, n), slice(0, m))]
    if p.fold5 and len(blocks) != 5:
        warn(f"--fold5 on {n} images makes {len(blocks)} fold(s) of 1,000; the COCO 1K protocol has five (testall)")
    exact_pairs = sum((b[0].stop - b[0].start) * (b[1].stop - b[1].start) for b in blocks)
    average = Average()
    seconds: dict[str, float] = {}
    loaded = [load_sims(path, (n, m), p.data_name, p.split, warn) for path in (p.sims if main_rank else [])]
    for sims in loaded:
        average.add([sims[rows, cols] for rows, cols in blocks])
    members = _score_models(p, split, blocks, average, seconds, progress)
    if not main_rank:
        return None
    scores = average.mean()
    if save_path is not None:
        save_sims(save_path, scores[0], {"data_name": p.data_name, "split": p.split, "shape": [n, m],
                                         "models": list(p.models), "sims": list(p.sims), "amp": p.amp})
    report: dict[str, Any] = {
        "data_name": p.data_name, "split": p.split, "protocol": "fold5" if p.fold5 else "all",
        "num_images": n, "num_captions": m, "models": list(p.models), "sims": list(p.sims), "amp": p.amp,
        "exact_pairs": exact_pairs,
    }
    if p.rescored_k():
        start = time.perf_counter()
        rescored = [_rescore(p, members, [sims[rows, cols] for sims in loaded], block, rows, cols, per_image,
                             progress) for block, (rows, cols) in zip(scores, blocks)]
        seconds["rescore"] = time.perf_counter() - start
        per_block = [r.metrics(per_image) for r in rescored]
        float32_pairs = sum(r.num_float32_pairs for r in rescored)
        report["rescore"] = {"k": p.rescored_k(), "float32_pairs": float32_pairs,
                             "fraction": float32_pairs / exact_pairs, "margin": max(r.margin for r in rescored)}
    else:
        per_block = [recall_metrics(block, per_image) for block in scores]
    report["metrics"] = protocol_metrics(per_block, p.fold5)
    if p.rerank_k:
        untrained = [path for path, (model, _, _) in zip(p.models, members) if not bool(model.first_stage.trained)]
        if untrained:
            warn(f"{', '.join(untrained)}: no trained first stage (--itc_weight 0 or an official checkpoint); the "
                 "shortlist is the untrained cosine of the global vectors, which misses more of the exact ranking")
        report["rerank"] = []
        amp = "off" if p.rescored_k() else p.amp       # exact ranking: the re-ranked pairs' scores in float32
        start = time.perf_counter()
        by_block = [rerank_ensemble([(model, img[rows], cap[cols]) for model, img, cap in members], p.rerank_k,
                                    chunk_mb=p.score_chunk_mb, amp=amp, progress=progress)
                    for rows, cols in blocks]
        seconds["rerank"] = time.perf_counter() - start        # every K: the exact scores of the largest K's shortlist
        for i, k in enumerate(p.rerank_k):
            reranked = [block[i] for block in by_block]
            per_block = [r.metrics(per_image) for r in reranked]
            shared = [r.shared_metrics(per_image) for r in reranked]
            rerank_pairs = sum(r.num_exact_pairs for r in reranked)
            report["rerank"].append({"k": k, "metrics": protocol_metrics(per_block, p.fold5),
                                     "shared_metrics": protocol_metrics(shared, p.fold5),
                                     "exact_pairs": rerank_pairs, "fraction": rerank_pairs / exact_pairs})
        first = [block[0].first_stage_metrics(per_image) for block in by_block]
        report["first_stage_metrics"] = protocol_metrics(first, p.fold5)
    if seconds:
        report["seconds"] = seconds
    if json_path is not None:
        write_json(json_path, report, indent=2)
    return report


def _rescore(p: EvaluateConfig, members: list[tuple], sims: list[np.ndarray], scores: np.ndarray, rows: slice,
             cols: slice, per_image: int, progress: bool):
    """One block's ``scores`` (the average of the sources at ``--amp``) with float32 scores where they decide the
    ranking (:func:`~hsc_pyg.engine.scoring.rescore_ranking`): the models' float32 pair scores averaged with the
    saved matrices' entries."""

    def float32_scores(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        total = np.zeros(len(r), dtype=np.float32)
        for model, img, cap in members:
            total += pair_scores(model, img[rows], cap[cols], r, c, chunk_mb=p.score_chunk_mb,
                                 progress=progress)
        for matrix in sims:
            total += matrix[r, c]
        return total / (len(members) + len(sims))

    return rescore_ranking(scores, p.rescored_k(), per_image, float32_scores)


def _score_models(p: EvaluateConfig, split: PrecompSplit, blocks: list[tuple[slice, slice]], average: Average,
                  seconds: dict[str, float], progress: bool) -> list[tuple]:
    """Encode the split with each checkpoint (in float32: ``--amp`` is the precision of the pair scores), score only
    ``blocks`` into ``average``; the encodings kept for re-ranking and re-scoring (``[(model, images, captions)]``
    when ``p.rerank_k`` or ``p.rescored_k()``)."""
    device = distributed.local_device(resolve_device(p.device)) if p.models else None
    if p.models:
        autocast(device, p.amp, cpu_bf16=True)     # an --amp this device cannot do fails before any work
    vocab = Vocabulary.load(p.vocab_path) if p.vocab_path and p.models else None
    members = []
    for path in p.models:
        start = time.perf_counter()
        model = load_checkpoint(path, map_location="cpu").to(device).eval()
        check_compatible(model, split, vocab, source=f"checkpoint {path}")
        img_enc, captions = encode_split(model, split, vocab, batch_size=p.batch_size,
                                         store_dtype=STORE_DTYPES[p.store_dtype], workers=p.workers,
                                         progress=progress)
        seconds["encode"] = seconds.get("encode", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        parts = [score_matrix_distributed(model, img_enc[rows], captions[cols], amp=p.amp, progress=progress,
                                          chunk_mb=p.score_chunk_mb) for rows, cols in blocks]
        seconds["score"] = seconds.get("score", 0.0) + time.perf_counter() - start
        if distributed.is_main():
            average.add(parts, owned=True)
        if p.rerank_k or p.rescored_k():
            members.append((model, img_enc, captions))
    return members
