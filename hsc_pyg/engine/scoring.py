"""Scoring: encode every image and caption once, score all pairs exactly and densely, or retrieve-then-rerank.

The pipeline of ``hsc-pyg evaluate`` (:mod:`hsc_pyg.engine.evaluate`) and of training's validation (MODEL.md §4):

1. :func:`encode_split` runs the encoders once per image and once per caption, in batches (captions grouped by length),
   and keeps the results in float32 or float16 -- images as an :class:`~hsc_pyg.nn.model.ImageEncoding`, captions as
   a :class:`~hsc_pyg.nn.model.CaptionEncoding`, packed without padding (COCO test captions: 13 tokens on average, up
   to 40; padding every caption to the longest would take 3x the memory).
2. :func:`score_matrix` scores blocks of images against blocks of captions of similar length (the blocks, chunks and
   memory limits of :mod:`hsc_pyg.engine.blocking`) and fills a host float32 ``[N, M]`` matrix (500 MB for COCO 5K),
   with a progress bar and an ETA.
   Under ``torchrun``, :func:`score_matrix_distributed` splits the image rows across the processes and gathers the
   matrix on rank 0, with the same numbers.
3. :mod:`hsc_pyg.engine.metrics` turns the matrix into recalls.

Re-ranking (:func:`rerank`): rank by the cosine of the global vectors, score only each query's top K exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import SCORE_CHUNK_MB
from ..data.precomp import ImageDataset, PrecompSplit, TextDataset
from ..data.vocab import Vocabulary
from ..errors import ConfigError, DataError, VocabError
from ..nn.model import CaptionEncoding, HSCModel, ImageEncoding
from . import blocking, distributed
from .device import autocast, eval_mode, resolve_device
from .metrics import FOLD_SIZE, fold_slices, protocol_metrics, recall_metrics

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _model_device(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _bar(total: int, desc: str, unit: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not progress, leave=False,
                dynamic_ncols=True)


# --------------------------------------------------------------------------- encoding
def check_features(model: HSCModel, split: PrecompSplit, source: str = "the model") -> None:
    """DataError unless the split's region features have the shape ``[*, num_regions, img_dim]`` the model reads, and
    boxes where its layers need them."""
    config = model.config
    if split.img_dim != config.img_dim or split.num_regions != config.num_regions:
        raise DataError(f"{split.file('ims.npy')} holds [{split.num_images}, {split.num_regions}, {split.img_dim}] "
                        f"features but {source} expects [*, {config.num_regions}, {config.img_dim}]; evaluate it on "
                        "the dataset it was trained on")
    config.check_boxes(split.boxes is not None)


def check_compatible(model: HSCModel, split: PrecompSplit, vocab: Vocabulary | None, source: str = "the model",
                     ) -> Vocabulary:
    """The vocabulary to use (``vocab`` or the model's); VocabError / DataError when the model cannot read the split."""
    config = model.config
    own = getattr(model, "vocab", None)
    vocab = vocab if vocab is not None else own
    if vocab is None:
        raise VocabError(f"{source} carries no vocabulary (official checkpoints do not); pass --vocab_path "
                         f"with the SCAN vocabulary JSON it was trained with")
    if len(vocab) != config.vocab_size:
        raise VocabError(f"the vocabulary has {len(vocab)} words but {source} was trained with vocab_size="
                         f"{config.vocab_size}; pass the vocabulary it was trained with (--vocab_path)")
    if own is not None and vocab.word2idx != own.word2idx:
        # its embedding rows are indexed by its own ids: another mapping silently scrambles every caption
        moved = next(w for w, i in vocab.word2idx.items() if own.word2idx.get(w) != i)
        raise VocabError(f"the vocabulary given maps words to other ids than the one inside {source} (id of {moved!r}: "
                         f"{vocab.word2idx.get(moved)} given, {own.word2idx.get(moved)} in the checkpoint); drop "
                         "--vocab_path to use the checkpoint's own")
    check_features(model, split, source)
    return vocab


def encode_split(model: HSCModel, split: PrecompSplit, vocab: Vocabulary | None = None, batch_size: int = 128,
                 device: str | torch.device | None = None, max_images: int | None = None,
                 store_dtype: torch.dtype = torch.float32, store_device: str | torch.device | None = None,
                 amp: str = "off", workers: int = 0, progress: bool = True,
                 ) -> tuple[ImageEncoding, CaptionEncoding]:
    """Encode each image and each caption of ``split`` once, in batches.

    Args:
        model: moved to ``device`` when given (default: where its parameters are); run in eval mode.
        split: the images and captions; with ``max_images`` only the first ``max_images`` images and their
            ``per_image * max_images`` captions.
        vocab: default ``model.vocab``.
        batch_size: images or captions per encoder call; captions are batched in order of length (less padding).
        store_dtype, store_device: where the encodings are kept (default float32 on the compute device).
        amp: ``off``, ``bf16`` or ``fp16`` (GPU autocast).

    Returns:
        ``ImageEncoding`` of ``N`` images and ``CaptionEncoding`` of ``per_image * N`` captions, in split order.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, found {batch_size}")
    vocab = check_compatible(model, split, vocab)
    if device is not None:
        model.to(resolve_device(device))
    device, _ = _model_device(model)
    store_device = device if store_device is None else resolve_device(store_device)
    num_images = split.num_images if max_images is None else max(0, min(max_images, split.num_images))
    if num_images == 0:
        raise ConfigError(f"max_images={max_images}: nothing to evaluate")
    num_captions = num_images * split.per_image
    images_ds = ImageDataset(split, img_edges=model.config.img_edges)
    captions_ds = TextDataset(split, vocab, txt_edges=model.config.txt_edges)
    image_batches = [list(range(i, min(i + batch_size, num_images))) for i in range(0, num_images, batch_size)]
    lengths = torch.tensor([len(vocab.encode(split.captions[k])) for k in range(num_captions)], dtype=torch.long)
    by_length = torch.argsort(lengths, stable=True)
    caption_batches = [by_length[i:i + batch_size].tolist() for i in range(0, num_captions, batch_size)]

    def loader(dataset, batches):
        return DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate_fn, num_workers=workers)

    def empty_like(t: Tensor, rows: int) -> Tensor:   # the store for all items, filled batch by batch (no copy at the end)
        return torch.empty((rows,) + tuple(t.shape[1:]), dtype=store_dtype, device=store_device)

    with eval_mode(model), autocast(device, amp):
        regions = img_glo = None
        with _bar(num_images, "encoding images", "image", progress) as bar:
            for ids, batch in zip(image_batches, loader(images_ds, image_batches)):
                enc = model.encode_images(batch.to(device))
                if regions is None:
                    regions, img_glo = empty_like(enc.regions, num_images), empty_like(enc.glo, num_images)
                regions[ids[0]:ids[-1] + 1] = enc.regions
                img_glo[ids[0]:ids[-1] + 1] = enc.glo
                bar.update(batch.num_graphs)
        # captions: words back to back in encoding order, ``starts`` / ``glo`` in split order
        words = cap_glo = None
        starts = torch.empty(num_captions, dtype=torch.long)
        offset = 0
        with _bar(num_captions, "encoding captions", "caption", progress) as bar:
            for ids, batch in zip(caption_batches, loader(captions_ds, caption_batches)):
                enc = model.encode_captions(batch.to(device))              # words back to back, batch order
                if not torch.equal(enc.lengths.cpu(), lengths[ids]):
                    raise RuntimeError("the caption encoder returned other word counts than the tokenizer")
                if words is None:
                    words, cap_glo = empty_like(enc.words, int(lengths.sum())), empty_like(enc.glo, num_captions)
                words[offset:offset + len(enc.words)] = enc.words
                starts[ids] = offset + enc.starts.cpu()
                cap_glo[torch.tensor(ids, device=store_device)] = enc.glo.to(store_device, store_dtype)
                offset += len(enc.words)
                bar.update(batch.num_graphs)
    return (ImageEncoding(regions, img_glo),
            CaptionEncoding(words, starts.to(store_device), lengths.to(store_device), cap_glo))


# --------------------------------------------------------------------------- exact scoring
def score_matrix(model: HSCModel, img_enc: ImageEncoding, captions: CaptionEncoding,
                 block_images: int = 128, chunk_mb: int = SCORE_CHUNK_MB, amp: str = "off",
                 progress: bool = True) -> np.ndarray:
    """Exact scores of every image against every caption, ``[N, M]`` float32 on the host.

    The captions are cut into the blocks of :func:`~hsc_pyg.engine.blocking.caption_blocks` (in order of length, each
    padded only to its own longest caption); each block's words are gathered onto the model's device and scored by
    :func:`~hsc_pyg.engine.blocking.score` (within ``chunk_mb`` MiB of working memory) against ``block_images``
    images at a time, and copied to the host. ``amp``: the precision of the products (autocast; ``bf16`` also on CPUs
    with native bf16 matrix instructions). The progress bar counts pairs.
    """
    device, dtype = _model_device(model)
    n, m = len(img_enc), len(captions)
    out = np.empty((n, m), dtype=np.float32)
    with eval_mode(model), autocast(device, amp, cpu_bf16=True), _bar(n * m, "scoring", "pair", progress) as bar:
        for columns in blocking.caption_blocks(captions.lengths.cpu(), blocking.eval_block_captions(device)):
            cap = captions[columns].contiguous().to(device, dtype)
            columns = columns.numpy()
            for i0 in range(0, n, block_images):
                img = img_enc[i0:i0 + block_images].to(device, dtype)
                out[i0:i0 + len(img), columns] = blocking.score(model, img, cap, chunk_mb).float().cpu().numpy()
                bar.update(len(img) * len(columns))
    return out


def score_matrix_distributed(model: HSCModel, img_enc: ImageEncoding, captions: CaptionEncoding,
                             block_images: int = 128, chunk_mb: int = SCORE_CHUNK_MB, amp: str = "off",
                             progress: bool = True) -> np.ndarray | None:
    """:func:`score_matrix` with the image rows split across the processes of ``torch.distributed``.

    Every rank holds all the encodings (encoding is linear and cheap; scoring is quadratic); rank ``r`` scores the
    rows :func:`~hsc_pyg.engine.distributed.shard_rows` gives it, cut at multiples of ``block_images`` so that each of
    its blocks is a block of the single-process computation, and rank 0 receives the whole ``[N, M]`` matrix: the
    same numbers as :func:`score_matrix`. Returns the matrix on rank 0 and None on the others; without
    torch.distributed it is :func:`score_matrix`. The ranks must hold the same weights and buffers
    (:func:`~hsc_pyg.engine.distributed.broadcast_buffers` after training steps).
    """
    rows = distributed.shard_rows(len(img_enc), block_images)
    part = score_matrix(model, img_enc[rows.start:rows.stop], captions, block_images, chunk_mb, amp,
                        progress and distributed.is_main())
    return distributed.gather_rows(part, len(img_enc), block_images)


def pair_scores(model: HSCModel, img_enc: ImageEncoding, captions: CaptionEncoding,
                rows: np.ndarray, cols: np.ndarray, chunk_mb: int = SCORE_CHUNK_MB, amp: str = "off",
                progress: bool = False) -> np.ndarray:
    """Exact scores of the pairs ``(rows[p], cols[p])`` -> ``[P]`` float32.

    The pairs are taken image by image and handed to :meth:`HSCModel.score_pairs` in pieces of at most
    :func:`blocking.words_per_call(model.config, chunk_mb) <hsc_pyg.engine.blocking.words_per_call>` caption words,
    their captions' words gathered back to back (no padding)."""
    device, dtype = _model_device(model)
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    out = np.empty(len(rows), dtype=np.float32)
    if not len(rows):
        return out
    order = np.lexsort((cols, rows))                    # by image, then caption
    lengths = captions.lengths.cpu().numpy()[cols[order]]
    budget = blocking.words_per_call(model.config, chunk_mb, device)
    ends = np.cumsum(lengths)
    with (eval_mode(model), autocast(device, amp, cpu_bf16=True),
          _bar(len(out), "scoring pairs", "pair", progress) as bar):
        p0 = 0
        while p0 < len(order):
            p1 = max(p0 + 1, int(np.searchsorted(ends, (ends[p0 - 1] if p0 else 0) + budget, side="right")))
            piece = order[p0:p1]
            # only this piece's images and captions go to the device and the compute dtype (a float16 gallery
            # stays as it is)
            cap = captions[torch.from_numpy(cols[piece])].contiguous().to(device, dtype)
            used, images = np.unique(rows[piece], return_inverse=True)
            img = img_enc[torch.from_numpy(used)].to(device, dtype)
            images = torch.from_numpy(images).to(device)
            out[piece] = model.score_pairs(img, cap, images).float().cpu().numpy()
            bar.update(len(piece))
            p0 = p1
    return out


def first_stage_matrix(model: HSCModel, img_enc: ImageEncoding, captions: CaptionEncoding,
                       block_images: int = 1024) -> np.ndarray:
    """First-stage scores: the cosine of the model's first-stage image and caption vectors
    (:class:`~hsc_pyg.nn.first_stage.FirstStage`), ``[N, M]`` float32 on the host."""
    device, _ = _model_device(model)
    stage = model.first_stage
    with torch.no_grad():
        img = stage.image_vectors(img_enc.glo.to(device))
        cap = stage.caption_vectors(captions.glo.to(device))
    out = np.empty((len(img), len(cap)), dtype=np.float32)
    for i0 in range(0, len(img), block_images):
        out[i0:i0 + block_images] = (img[i0:i0 + block_images] @ cap.T).cpu().numpy()
    return out


# --------------------------------------------------------------------------- retrieve, then rerank
@dataclass
class Reranked:
    """Scores after re-ranking, one matrix per direction ``[N, M]`` float32.

    In ``i2t`` each image's top ``k`` captions by first-stage score hold their exact score; in ``t2i`` each caption's
    top ``k`` images do. Every other entry is its first-stage score shifted below the lowest exact score, so the rest of
    a ranking (below the shortlist) follows the first stage's order. ``num_exact_pairs``: the distinct pairs scored
    exactly (the union of both directions' top K); ``first_stage``: the first-stage matrix itself; ``pairs``: those
    pairs' rows, columns and exact scores, and ``shift``: what the entries without an exact score are lowered by.

    :meth:`shared` is the same pairs used in both directions: an image's ranking then also holds the exact scores of
    the captions that have the image in their own top ``k`` (and the other way round), at no extra exact score.
    """

    i2t: np.ndarray
    t2i: np.ndarray
    num_exact_pairs: int
    k: int
    first_stage: np.ndarray
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray]
    shift: np.float32

    def metrics(self, per_image: int = 5) -> dict[str, float]:
        return recall_metrics(self.i2t, per_image, sims_t2i=self.t2i)

    def shared(self) -> np.ndarray:
        """``[N, M]``: every exactly scored pair (either direction's shortlist) at its exact score, in both
        directions; the other entries as in :attr:`i2t` / :attr:`t2i`."""
        rows, cols, values = self.pairs
        out = np.subtract(self.first_stage, self.shift, dtype=np.float32)
        out[rows, cols] = values
        return out

    def shared_metrics(self, per_image: int = 5) -> dict[str, float]:
        """The recalls of :meth:`shared`: the same exact scores, each ranked in both directions."""
        return recall_metrics(self.shared(), per_image)

    def first_stage_metrics(self, per_image: int = 5) -> dict[str, float]:
        """The recalls of the first stage alone (no exact score)."""
        return recall_metrics(self.first_stage, per_image)


def rerank_scores(cosine: np.ndarray, k: int, exact: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Reranked:
    """Retrieve-then-rerank from a first-stage score matrix ``[N, M]``.

    Args:
        cosine: first-stage scores (cosines).
        k: candidates re-scored per query (image queries: captions; caption queries: images); capped at the number of
            items, so ``k`` >= ``M`` gives the exact matrix in both directions.
        exact: ``exact(rows, cols) -> [P]`` exact scores of the pairs ``(rows[p], cols[p])``; called once, with the
            union of both directions' candidates.
    """
    if k < 1:
        raise ConfigError(f"--rerank_k must be at least 1, found {k}")
    n, m = cosine.shape
    scores = torch.from_numpy(np.ascontiguousarray(cosine, dtype=np.float32))
    i2t_mask = torch.zeros(n, m, dtype=torch.bool)
    i2t_mask.scatter_(1, scores.topk(min(k, m), dim=1).indices, True)
    t2i_mask = torch.zeros(n, m, dtype=torch.bool)
    t2i_mask.scatter_(0, scores.topk(min(k, n), dim=0).indices, True)
    rows, cols = (i2t_mask | t2i_mask).nonzero(as_tuple=True)
    in_i2t, in_t2i = i2t_mask[rows, cols].numpy(), t2i_mask[rows, cols].numpy()
    del i2t_mask, t2i_mask
    rows, cols = rows.numpy(), cols.numpy()
    values = np.asarray(exact(rows, cols), dtype=np.float32)
    if values.shape != rows.shape:
        raise ValueError(f"the exact scorer returned shape {values.shape} for {len(rows)} pairs")
    # below every exact score by at least 1, in cosine order
    shift = np.float32(float(cosine.max()) - float(values.min()) + 1.0)
    i2t = np.subtract(cosine, shift, dtype=np.float32)
    t2i = i2t.copy()
    i2t[rows[in_i2t], cols[in_i2t]] = values[in_i2t]
    t2i[rows[in_t2i], cols[in_t2i]] = values[in_t2i]
    return Reranked(i2t, t2i, int(len(rows)), k, cosine, (rows, cols, values), shift)


# --------------------------------------------------------------------------- reduced precision, float32 ranking
#: A pair whose reduced-precision score lies within BAND_FACTOR x (the largest reduced-precision error seen) of the
#: float32 score of its query's best ground-truth pair is re-scored in float32 too. 1: on Flickr8k-mini (a weak model,
#: dense scores) factors 1 / 2 / 4 re-scored 20 / 28 / 40 % of the pairs at K = 20 (a band then around every
#: ground-truth pair), all with float32's recall table; with the band around the best one only, 1x re-scores 18.2 %.
BAND_FACTOR = 1.0


@dataclass
class Rescored:
    """Reduced-precision (bf16) scores of all pairs ``[N, M]`` with float32 scores where they decide the ranking:
    ``num_float32_pairs`` of them (each query's top ``k`` in both directions, the ground-truth pairs and the pairs
    near them); ``margin``: the band around the ground-truth scores (see :func:`rescore_ranking`)."""

    scores: np.ndarray
    num_float32_pairs: int
    k: int
    margin: float

    def metrics(self, per_image: int = 5) -> dict[str, float]:
        return recall_metrics(self.scores, per_image)


def rescore_ranking(scores: np.ndarray, k: int, per_image: int,
                    float32: Callable[[np.ndarray, np.ndarray], np.ndarray], block_rows: int = 256) -> Rescored:
    """Give a reduced-precision score matrix ``[N, M]`` (caption c belongs to image c // per_image) float32's
    rankings: float32 scores (``float32(rows, cols) -> [P]``) replace

    1. each query's top ``k`` in both directions (the top of every ranking in float32 order), with every pair tied
       with its query's ``k``-th reduced-precision score (the coarse bf16 grid makes such ties common, and which of
       them a sort would keep is arbitrary), and every ground-truth pair (an image with each of its captions);
    2. every pair whose score lies within ``margin`` of the float32 score of the best ground-truth pair of its query
       (the same row for image queries: an image's rank is that of its best caption; the same column for caption
       queries), where ``margin`` is BAND_FACTOR x the largest difference between the two precisions over the pairs
       of step 1.

    Every other pair is then more than ``margin`` above or below that ground-truth score, so, as long as its own
    reduced-precision error is not larger than the largest one seen on the thousands of pairs of step 1, it falls on
    the same side as in float32: every query's rank, hence the whole recall table (R@K, medr, meanr), is float32's.
    ``k`` only decides the top of each ranking (in float32 order when the query's float32 top 10 lies in its
    reduced-precision top ``k``).
    """
    n, m = scores.shape
    approx = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    chosen = torch.zeros(n, m, dtype=torch.bool)
    if k:
        chosen |= approx >= approx.topk(min(k, m), dim=1).values[:, -1:]    # at least each row's k-th score
        chosen |= approx >= approx.topk(min(k, n), dim=0).values[-1:]       # at least each column's k-th score
    captions = torch.arange(m)
    chosen[captions // per_image, captions] = True
    out = approx.clone()
    rows, cols = chosen.nonzero(as_tuple=True)
    values = torch.from_numpy(np.asarray(float32(rows.numpy(), cols.numpy()), dtype=np.float32))
    out[rows, cols] = values
    margin = BAND_FACTOR * float((values - approx[rows, cols]).abs().max())
    truth = out[captions // per_image, captions]                                  # [M] float32 ground-truth scores
    band = torch.zeros(n, m, dtype=torch.bool)
    for r0 in range(0, n, block_rows):
        rows_approx = approx[r0:r0 + block_rows]                                  # [B, M]
        best = truth[r0 * per_image:(r0 + len(rows_approx)) * per_image].view(-1, per_image).amax(1, keepdim=True)
        near = (rows_approx - best).abs() <= margin                               # image queries
        near |= (rows_approx - truth).abs() <= margin                             # caption queries
        band[r0:r0 + block_rows] = near & ~chosen[r0:r0 + block_rows]
    rows, cols = band.nonzero(as_tuple=True)
    if len(rows):
        out[rows, cols] = torch.from_numpy(np.asarray(float32(rows.numpy(), cols.numpy()), dtype=np.float32))
    return Rescored(out.numpy(), int(chosen.sum()) + len(rows), k, margin)


Member = tuple[HSCModel, ImageEncoding, CaptionEncoding]


def rerank_ensemble(members: Sequence[Member], ks: Sequence[int], chunk_mb: int = SCORE_CHUNK_MB, amp: str = "off",
                    progress: bool = False) -> list[Reranked]:
    """:func:`rerank_scores` for the average of several models (first-stage scores averaged, exact pair scores
    averaged), for each K of ``ks``: the first-stage matrix is computed once, and the exact scores once, for the largest
    K (a smaller K's shortlist is part of it), so several K cost what the largest costs."""
    if not members:
        raise ConfigError("re-ranking needs at least one model")
    cosine = first_stage_matrix(*members[0])
    for member in members[1:]:
        cosine += first_stage_matrix(*member)
    cosine /= len(members)
    m = cosine.shape[1]
    known_keys, known_values = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)   # sorted by key

    def exact(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        nonlocal known_keys, known_values
        keys = rows.astype(np.int64) * m + cols
        pos = np.searchsorted(known_keys, keys).clip(max=max(len(known_keys) - 1, 0))
        have = known_keys[pos] == keys if len(known_keys) else np.zeros(len(keys), dtype=bool)
        out = np.empty(len(keys), dtype=np.float32)
        out[have] = known_values[pos[have]]
        new = ~have
        if new.any():
            total = np.zeros(int(new.sum()), dtype=np.float32)
            for model, img_enc, captions in members:
                total += pair_scores(model, img_enc, captions, rows[new], cols[new], chunk_mb, amp, progress)
            out[new] = total / len(members)
            known_keys = np.concatenate([known_keys, keys[new]])
            known_values = np.concatenate([known_values, out[new]])
            order = np.argsort(known_keys, kind="stable")
            known_keys, known_values = known_keys[order], known_values[order]
        return out

    results = {k: rerank_scores(cosine, k, exact) for k in sorted(set(ks), reverse=True)}
    return [results[k] for k in ks]


def rerank(model: HSCModel, img_enc: ImageEncoding, captions: CaptionEncoding, k: int,
           chunk_mb: int = SCORE_CHUNK_MB, amp: str = "off", progress: bool = False) -> Reranked:
    """Rank all captions per image and all images per caption by the model's first stage, then score each query's
    top ``k`` exactly with :func:`pair_scores` (see :class:`Reranked`)."""
    return rerank_ensemble([(model, img_enc, captions)], [k], chunk_mb, amp, progress)[0]


# --------------------------------------------------------------------------- the whole protocol
def evaluate(model: HSCModel, split: PrecompSplit, vocab: Vocabulary | None = None, max_images: int | None = None,
             fold5: bool = False, batch_size: int = 128, device: str | torch.device | None = None, amp: str = "off",
             chunk_mb: int = SCORE_CHUNK_MB, progress: bool = False, fold_size: int = FOLD_SIZE) -> dict[str, Any]:
    """Recall metrics of ``model`` on ``split`` (all of it, or its first ``max_images`` images and their captions;
    training's validation passes ``--val_images``); ``fold5``: COCO 1K protocol, which scores only the diagonal
    blocks of ``fold_size`` images x their captions (a fifth of the pairs of the whole matrix on COCO testall) and
    averages their metrics. The model's mode is kept.

    Under ``torchrun`` every rank calls it and gets the same metrics: each encodes the split, scores its rows of each
    block (:func:`score_matrix_distributed`), rank 0 ranks them and sends the metrics to the others."""
    progress = progress and distributed.is_main()
    img_enc, captions = encode_split(model, split, vocab, batch_size=batch_size, device=device, max_images=max_images,
                                     amp=amp, progress=progress)
    blocks = fold_slices(len(img_enc), split.per_image, fold_size) if fold5 else [(slice(None), slice(None))]
    score = score_matrix_distributed if distributed.is_distributed() else score_matrix
    parts = [score(model, img_enc[rows], captions[cols], chunk_mb=chunk_mb, amp=amp, progress=progress)
             for rows, cols in blocks]
    metrics = None
    if all(part is not None for part in parts):   # rank 0 (or the single process) holds the matrices
        per_block = [recall_metrics(part, split.per_image) for part in parts]
        metrics = protocol_metrics(per_block, fold5)
    return distributed.broadcast_object(metrics) if distributed.is_distributed() else metrics
