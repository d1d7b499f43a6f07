"""Blocking, chunking and memory limits of the pair scorer: the one place that decides which pairs go into one call of
the model's pure scoring entries (:meth:`HSCModel.score_block <hsc_pyg.nn.model.HSCModel.score_block>`, every image
of a block against every caption of it; :meth:`HSCModel.score_pairs <hsc_pyg.nn.model.HSCModel.score_pairs>`, given
pairs).

* :func:`score` scores every image against every caption of encodings in memory (training's batches, a search's
  shortlist, each caption block of :func:`hsc_pyg.engine.scoring.score_matrix`): captions taken in order of length
  and cut into blocks (:func:`caption_blocks`) that carry little padding, images in steps that keep a block's working
  memory under ``chunk_mb`` MiB (and, on the CPU, in cache).
* :func:`words_per_call`: how many caption words one :meth:`~hsc_pyg.nn.model.HSCModel.score_pairs` call takes.
* :class:`BatchScores`: the training forward (encoders, then :func:`score` on the batch, with autograd).

``chunk_mb`` comes from the run's config (``TrainConfig.score_chunk_mb``, ``EvaluateConfig.score_chunk_mb``); the model
holds no run options. The CPU sizes below were measured on the AMD EPYC of benchmarks/NOTES.md (rows 2 and 5, and
the given-pairs paragraph).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..config import SCORE_CHUNK_MB
from ..nn.kernels import compute_dtype
from ..nn.model import CaptionEncoding, HSCModel, ImageEncoding, TrainingScores
from ..nn.model_config import ModelConfig

#: Captions per block of eval scoring on a GPU and on the CPU.
GPU_BLOCK_CAPTIONS = 256
CPU_BLOCK_CAPTIONS = 64
#: On the CPU (no autograd) a block's ``[pairs, L, d]`` context stays near this size: it then runs in cache and under
#: the allocator's mmap threshold (no page faults per block): 9.6k vs 7.1k pairs/s per thread at 12 MB vs 192 MB.
CPU_BLOCK_BYTES = 24 * 2**20
#: On the CPU a score_pairs call takes about this much caption words (measured: 4-8 MiB gave 7.0-7.8k pairs per
#: CPU-second, 24 MiB 5.7-7.0k, 48 MiB 5.2k; full-size SGRAF-SAF, one thread).
CPU_PAIR_WORD_BYTES = 8 * 2**20
#: A caption block may carry this much padding (relative to its real words) before it is cut.
MAX_BLOCK_PADDING = 0.125


def length_blocks(lengths: list[int], max_captions: int) -> list[tuple[int, int]]:
    """Cut captions sorted by length into blocks of at most ``max_captions`` whose padding to the block's longest
    caption stays under ``MAX_BLOCK_PADDING`` of their words (long captions are rare and spread out: without this, one
    block of the tail would be padded to the longest caption of the set). ``[(start, end), ...]``."""
    blocks, start, n = [], 0, len(lengths)
    while start < n:
        end, words = start + 1, max(lengths[start], 1)
        while end < n and end - start < max_captions:
            longest = max(lengths[end], 1)
            if (end - start + 1) * longest > (1 + MAX_BLOCK_PADDING) * (words + longest):
                break
            words += longest
            end += 1
        blocks.append((start, end))
        start = end
    return blocks


def caption_blocks(lengths: Tensor, max_captions: int) -> list[Tensor]:
    """The captions of word counts ``lengths [M]`` in order of length, cut by :func:`length_blocks`: the caption
    indices of each block (long ``[C]``, on ``lengths``' device)."""
    order = torch.argsort(lengths, stable=True)
    return [order[c0:c1] for c0, c1 in length_blocks(lengths[order].tolist(), max_captions)]


def eval_block_captions(device: torch.device) -> int:
    """Captions per block of eval scoring on ``device``."""
    return CPU_BLOCK_CAPTIONS if device.type == "cpu" else GPU_BLOCK_CAPTIONS


def pairs_per_chunk(config: ModelConfig, regions: Tensor, length: int, chunk_mb: float) -> int:
    """Pairs of images ``regions [.., R, d]`` with captions of ``length`` words whose working memory stays under
    ``chunk_mb`` MiB (and, on the CPU without autograd, near CPU_BLOCK_BYTES of context), counted in the dtype the
    products run in (bf16 under autocast)."""
    d, n_reg = regions.size(-1), regions.size(-2)
    size = torch.finfo(compute_dtype(regions)).bits // 8
    # the live [pairs, L, d] tensors of the alignment (context, difference, square) dominate
    per_pair = (4 * length * d + 3 * n_reg * length + 4 * length * config.sim_dim) * size
    pairs = max(1, int(chunk_mb * 2**20 // per_pair))
    if regions.device.type == "cpu" and not torch.is_grad_enabled():
        pairs = min(pairs, max(1, CPU_BLOCK_BYTES // (length * d * size)))
    return pairs


def score(model: HSCModel, img: ImageEncoding, cap: CaptionEncoding, chunk_mb: float = SCORE_CHUNK_MB) -> Tensor:
    """Exact scores of every image against every caption, ``[N_img, N_cap]``, through
    :meth:`HSCModel.score_block <hsc_pyg.nn.model.HSCModel.score_block>`.

    Captions are taken in order of length and cut into blocks (:func:`caption_blocks`), each padded only to its own
    longest caption; each block is scored against the images in as few steps as ``chunk_mb`` MiB of working memory
    allow. In training mode every step holds all images (the SAF gate's BatchNorm takes its statistics per caption
    over all images), and that BatchNorm's running statistics are updated caption after caption in the batch's order,
    as the original's loop does (its deferred updates, ordered by the captions' positions).
    """
    n_img, n_cap = len(img), len(cap)
    out = img.regions.new_zeros(n_img, n_cap, dtype=next(model.parameters()).dtype)    # the scores' (float32 under amp)
    if n_img == 0 or n_cap == 0:
        return out
    if model.training:
        max_captions = max(1, pairs_per_chunk(model.config, img.regions, cap.longest(), chunk_mb) // n_img)
    else:
        max_captions = eval_block_captions(img.regions.device)
    norm = model.similarity.head.caption_norm() if model.training else None
    with norm.deferred_updates() if norm is not None else contextlib.nullcontext():
        for columns in caption_blocks(cap.lengths, max_captions):
            block = cap[columns]
            step = n_img if model.training else max(
                1, pairs_per_chunk(model.config, img.regions, block.longest(), chunk_mb) // len(block))
            for i0 in range(0, n_img, step):
                out[i0:i0 + step, columns] = model.score_block(img[i0:i0 + step], block,
                                                               columns if norm is not None else None)
    return out


def words_per_call(config: ModelConfig, chunk_mb: float = SCORE_CHUNK_MB, device: torch.device | str = "cpu") -> int:
    """Caption words per :meth:`HSCModel.score_pairs <hsc_pyg.nn.model.HSCModel.score_pairs>` call within
    ``chunk_mb`` MiB of working memory (the ``[T, d]`` buffers dominate); on the CPU about CPU_PAIR_WORD_BYTES of
    them."""
    d, m, r = config.embed_size, config.sim_dim, config.num_regions
    per_word = (3 * d + 3 * m + 2 * r) * 4
    words = int(chunk_mb * 2**20 // per_word)
    if torch.device(device).type == "cpu":
        words = min(words, CPU_PAIR_WORD_BYTES // (d * 4))
    return max(1, words)


class BatchScores(nn.Module):
    """The training forward of ``model``: a :class:`hsc_pyg.data.graphs.PairBatch` of B captions ->
    :class:`~hsc_pyg.nn.model.TrainingScores` (row b = caption b's image), the exact scores through :func:`score`
    within ``chunk_mb`` MiB per block. An ``nn.Module`` so that ``DistributedDataParallel`` can wrap it."""

    def __init__(self, model: HSCModel, chunk_mb: float = SCORE_CHUNK_MB) -> None:
        super().__init__()
        self.model = model
        self.chunk_mb = chunk_mb

    def forward(self, pairs) -> TrainingScores:
        img, cap = self.model.encode_images(pairs.images), self.model.encode_captions(pairs.captions)
        stage = self.model.first_stage
        cosine = stage.image_vectors(img.glo) @ stage.caption_vectors(cap.glo).T
        scores = score(self.model, img, cap, self.chunk_mb)
        return TrainingScores(scores[pairs.img_index], cosine[pairs.img_index], stage.scale())
