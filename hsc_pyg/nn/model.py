"""HSC: encode each image and each caption once, then score pairs densely (DESIGN.md).

``build_model(config)`` is the one door in; the presets ``hsc``, ``sgraf_saf`` and ``sgraf_sgr`` are configurations of
this same class (SGRAF = no relational layers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..data.graphs import caption_graph, collate_graphs, image_graph
from ..errors import ConfigError
from .encoders import RegionGraphEncoder, WordGraphEncoder
from .first_stage import FirstStage
from .functional import l2norm
from .kernels import compute_dtype
from .model_config import ModelConfig
from .similarity import SimilarityModule


def _by_level(states: list[Tensor]) -> Tensor:
    """The states of the aligned levels stacked on axis 1 (one level: a view, not a copy)."""
    return states[0].unsqueeze(1) if len(states) == 1 else torch.stack(states, 1)


def _index(t: Tensor, idx) -> Tensor:
    return t[idx] if not isinstance(idx, int) else t[idx: idx + 1]


@dataclass
class ImageEncoding:
    """Per-image states: ``regions [N, V, R, d]`` (V = aligned levels) and global vectors ``glo [N, V, d]``."""

    regions: Tensor
    glo: Tensor

    def __len__(self) -> int:
        return self.regions.size(0)

    def __getitem__(self, idx) -> "ImageEncoding":
        return ImageEncoding(_index(self.regions, idx), _index(self.glo, idx))

    def to(self, device=None, dtype=None) -> "ImageEncoding":
        return ImageEncoding(self.regions.to(device=device, dtype=dtype), self.glo.to(device=device, dtype=dtype))

    @classmethod
    def cat(cls, parts: Sequence["ImageEncoding"]) -> "ImageEncoding":
        return cls(torch.cat([p.regions for p in parts]), torch.cat([p.glo for p in parts]))


@dataclass
class CaptionEncoding:
    """Per-caption states: ``words [M, V, L, d]`` (zero at padding), ``mask [M, L]``, ``glo [M, V, d]``."""

    words: Tensor
    mask: Tensor
    glo: Tensor

    def __len__(self) -> int:
        return self.words.size(0)

    def __getitem__(self, idx) -> "CaptionEncoding":
        return CaptionEncoding(_index(self.words, idx), _index(self.mask, idx), _index(self.glo, idx))

    def to(self, device=None, dtype=None) -> "CaptionEncoding":
        return CaptionEncoding(self.words.to(device=device, dtype=dtype), self.mask.to(device=device),
                               self.glo.to(device=device, dtype=dtype))

    def trimmed(self) -> "CaptionEncoding":
        """The same captions with padding cut to the longest of them."""
        length = max(int(self.mask.sum(1).max()), 1) if len(self) else 1
        return CaptionEncoding(self.words[:, :, :length], self.mask[:, :length], self.glo)

    @classmethod
    def cat(cls, parts: Sequence["CaptionEncoding"]) -> "CaptionEncoding":
        length = max(p.mask.size(1) for p in parts)
        words = [nn.functional.pad(p.words, (0, 0, 0, length - p.words.size(2))) for p in parts]
        masks = [nn.functional.pad(p.mask, (0, length - p.mask.size(1))) for p in parts]
        return cls(torch.cat(words), torch.cat(masks), torch.cat([p.glo for p in parts]))


class TrainingScores(NamedTuple):
    """What a training forward gives the losses, all in the ``[B, B]`` layout of the batch's captions (row b = caption
    b's image, column c = caption c): ``scores`` exact, ``cosine`` of the first stage's vectors; ``scale`` is the
    first stage's inverse temperature."""

    scores: Tensor
    cosine: Tensor
    scale: Tensor


class HSCModel(nn.Module):
    """Region-graph encoder + word-graph encoder + similarity module (MODEL.md §2-3), built from a
    :class:`~hsc_pyg.nn.model_config.ModelConfig` alone.

    ``score_chunk_mb`` (a run option, not part of the model) bounds the memory of one chunk of the pair scorer; the
    command lines set it from ``--score_chunk_mb``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"HSCModel takes a ModelConfig, found {type(config).__name__}")
        if config.img_dim <= 0 or config.vocab_size <= 0:
            raise ConfigError(f"img_dim ({config.img_dim}) and vocab_size ({config.vocab_size}) must be set before "
                              "building a model; they come from the data and the vocabulary")
        self.config = config
        self.score_chunk_mb = 512
        self.levels = config.levels()
        self.vocab = None  # a hsc_pyg.data.vocab.Vocabulary, attached by training or checkpoint loading
        self.image_encoder = RegionGraphEncoder(config.img_dim, config.embed_size, config.img_gnn, config.img_layers,
                                                config.layer_arguments("img"), config.no_imgnorm)
        self.text_encoder = WordGraphEncoder(config.vocab_size, config.word_dim, config.embed_size, config.txt_gnn,
                                             config.txt_layers, config.layer_arguments("txt"), config.word_dropout,
                                             config.gru_layers, config.no_txtnorm)
        self.similarity = SimilarityModule(config.embed_size, config.sim_dim, config.num_regions, config.head,
                                           config.sgr_step, config.lambda_softmax, config.sa_dropout)
        self.first_stage = FirstStage(config.embed_size, config.first_stage_dim)

    # ---------------------------------------------------------------- per item
    def encode_images(self, images) -> ImageEncoding:
        """A ``Batch`` of region graphs -> :class:`ImageEncoding` (once per image)."""
        states = self.image_encoder(images, self.levels)
        regions = _by_level([states.levels[lv] for lv in self.levels])
        glo = _by_level([self.similarity.visual_sa(states.levels[lv]) for lv in self.levels])
        return ImageEncoding(regions, glo)

    def encode_captions(self, captions) -> CaptionEncoding:
        """A ``Batch`` of word graphs -> :class:`CaptionEncoding` (once per caption)."""
        states = self.text_encoder(captions, self.levels)
        words = _by_level([states.levels[lv] for lv in self.levels])
        glo = _by_level([self.similarity.text_sa(states.levels[lv], states.mask) for lv in self.levels])
        return CaptionEncoding(words, states.mask, glo)

    # ---------------------------------------------------------------- per pair
    def set_kernels(self, mode: str) -> None:
        """Score with the faster steps of :mod:`hsc_pyg.nn.kernels` (``"auto"``, the default) or the plain formulas
        of :mod:`hsc_pyg.nn.similarity` (``"reference"``); both give the same scores."""
        self.similarity.set_kernels(mode)

    #: Captions per eval block (captions are taken in order of length, so a block carries little padding); on the CPU
    #: a block has at most CPU_BLOCK_CAPTIONS captions and about CPU_BLOCK_BYTES of context (see benchmarks/NOTES.md);
    #: given pairs (score_pairs) go in pieces of about CPU_PAIR_WORD_BYTES of caption words.
    SCORE_BLOCK_CAPTIONS = 256
    CPU_BLOCK_CAPTIONS = 64
    CPU_BLOCK_BYTES = 24 * 2**20
    CPU_PAIR_WORD_BYTES = 8 * 2**20

    def score(self, img: ImageEncoding, cap: CaptionEncoding, chunk_mb: int | None = None) -> Tensor:
        """Exact scores of every image against every caption, ``[N_img, N_cap]`` (the level average of
        :meth:`SimilarityModule.forward`).

        Captions are taken in order of length and cut into blocks, each trimmed to its own longest caption (so a
        block carries little padding); each block is scored against the images in as few pieces as ``chunk_mb`` MiB
        of working memory allow (default ``config.score_chunk_mb``). In training mode every piece holds all images
        (the SAF gate's BatchNorm takes its statistics per caption over all images), and that BatchNorm's running
        statistics are updated caption after caption in the batch's order, as the original's loop does.
        """
        n_img, n_cap = len(img), len(cap)
        out = img.regions.new_zeros(n_img, n_cap, dtype=self.similarity.score_proj.weight.dtype)
        if n_img == 0 or n_cap == 0:
            return out
        # under autocast (bf16 scoring) the region and word states are cast once here, not once per product
        dtype = compute_dtype(img.regions)
        img = ImageEncoding(img.regions.to(dtype), img.glo)
        lengths = cap.mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        # captions given in order of length (score_matrix's and pair_scores' blocks): blocks are slices, not copies
        in_order = bool((order == torch.arange(n_cap, device=order.device)).all())
        if self.training:
            max_captions = max(1, self._pairs_per_chunk(img, cap, chunk_mb) // n_img)
        else:
            max_captions = self.CPU_BLOCK_CAPTIONS if img.regions.device.type == "cpu" else self.SCORE_BLOCK_CAPTIONS
        norm = self.similarity.head.caption_norm() if self.training else None
        with norm.deferred_updates() if norm is not None else contextlib.nullcontext():
            for c0, c1 in _length_blocks(lengths[order].tolist(), max_captions):
                columns = order[c0:c1]
                block = (cap[c0:c1] if in_order else cap[columns]).trimmed()
                block = CaptionEncoding(block.words.to(dtype), block.mask, block.glo)
                img_step = n_img if self.training else max(1, self._pairs_per_chunk(img, block, chunk_mb) // len(block))
                for i0 in range(0, n_img, img_step):
                    out[i0:i0 + img_step, columns] = self._score_block(img[i0:i0 + img_step], block, columns, norm)
        return out

    def _score_block(self, img: ImageEncoding, cap: CaptionEncoding, columns: Tensor, norm) -> Tensor:
        """Scores ``[A, C]`` of a block, averaged over the aligned levels; ``columns``: the captions' batch positions,
        for the deferred running statistics of ``norm`` (None outside training)."""
        total = 0
        for v in range(len(self.levels)):
            if norm is not None:      # running statistics: level by level, captions in batch order
                norm.next_captions(v, columns)
            total = total + self.similarity(img.regions[:, v], img.glo[:, v], cap.words[:, v], cap.mask, cap.glo[:, v])
        return total / len(self.levels)

    def score_pairs(self, img: ImageEncoding, words: Tensor, lengths: Tensor, images: Tensor, cap_glo: Tensor) -> Tensor:
        """Exact scores of P given pairs (eval mode), the level average of :meth:`SimilarityModule.score_pairs`:
        ``img`` all images, ``words [T, V, d]`` the words of each pair's caption back to back, ``lengths [P]``,
        ``images [P]`` (each pair's image; keep one image's pairs adjacent), ``cap_glo [P, V, d]`` -> ``[P]``.
        The same numbers as :meth:`score` at those pairs; how many pairs to hand over at once:
        :meth:`words_per_call`."""
        dtype = compute_dtype(img.regions)
        total = 0
        for v in range(len(self.levels)):
            total = total + self.similarity.score_pairs(img.regions[:, v].to(dtype), img.glo[images, v],
                                                        words[:, v].to(dtype).contiguous(), lengths, images,
                                                        cap_glo[:, v])
        return total / len(self.levels)

    def words_per_call(self, chunk_mb: int | None = None, device: torch.device | str = "cpu") -> int:
        """Caption words per :meth:`score_pairs` call within ``chunk_mb`` MiB (default ``score_chunk_mb``) of working
        memory (the ``[T, d]`` buffers dominate); on the CPU at most CPU_PAIR_WORD_BYTES of them (measured: 4-8 MiB
        gave 7.0-7.8k pairs per CPU-second, 24 MiB 5.7-7.0k, 48 MiB 5.2k; full-size SGRAF-SAF, one thread)."""
        d, m, r = self.config.embed_size, self.config.sim_dim, self.config.num_regions
        per_word = (3 * d + 3 * m + 2 * r) * 4
        words = int((chunk_mb or self.score_chunk_mb) * 2**20 // per_word)
        if torch.device(device).type == "cpu":
            words = min(words, self.CPU_PAIR_WORD_BYTES // (d * 4))
        return max(1, words)

    def _pairs_per_chunk(self, img: ImageEncoding, cap: CaptionEncoding, chunk_mb: int | None) -> int:
        d, regions, length = img.regions.size(-1), img.regions.size(-2), cap.words.size(-2)
        # the live [pairs, L, d] tensors of the alignment (context, difference, square) dominate
        per_pair = (4 * length * d + 3 * regions * length + 4 * length * self.config.sim_dim) * img.regions.element_size()
        budget = (chunk_mb or self.score_chunk_mb) * 2**20
        pairs = max(1, int(budget // per_pair))
        if img.regions.device.type == "cpu" and not torch.is_grad_enabled():
            # CPU: blocks whose [pairs, L, d] context stays near CPU_BLOCK_BYTES run in cache and under the allocator's
            # mmap threshold (no page faults per block): 9.6k vs 7.1k pairs/s per thread at 12 MB vs 192 MB
            pairs = min(pairs, max(1, self.CPU_BLOCK_BYTES // (length * d * img.regions.element_size())))
        return pairs

    def forward(self, pairs) -> "TrainingScores":
        """Training: a :class:`hsc_pyg.data.graphs.PairBatch` of B captions -> :class:`TrainingScores` (row b = caption
        b's image)."""
        img, cap = self.encode_images(pairs.images), self.encode_captions(pairs.captions)
        cosine = self.first_stage.image_vectors(img.glo) @ self.first_stage.caption_vectors(cap.glo).T
        return TrainingScores(self.score(img, cap)[pairs.img_index], cosine[pairs.img_index], self.first_stage.scale())

    # ---------------------------------------------------------------- convenience
    @torch.no_grad()
    def similarity_matrix(self, images: Tensor, captions: Sequence[Sequence[int]], batch_size: int = 128,
                          boxes: Tensor | None = None) -> Tensor:
        """Eval-mode scores of raw inputs: ``images`` float ``[N, R, D]``, ``captions`` token-id lists (with
        ``<start>``/``<end>``) -> ``[N, M]`` float32 on the CPU. ``boxes [N, R, 4]``: the regions' boxes, for models
        that read them (``img_edges=spatial``, ``img_gnn=hsc_geo``)."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            images = torch.as_tensor(images, dtype=torch.float32)
            img_parts = [self.encode_images(collate_graphs(
                [image_graph(f, None if boxes is None else torch.as_tensor(boxes[k]), self.config.img_edges)
                 for k, f in enumerate(images[i:i + batch_size], start=i)]).to(device))
                for i in range(0, len(images), batch_size)]
            cap_parts = [self.encode_captions(collate_graphs(
                [caption_graph(c, edges=self.config.txt_edges) for c in captions[i:i + batch_size]]).to(device))
                for i in range(0, len(captions), batch_size)]
            return self.score(ImageEncoding.cat(img_parts), CaptionEncoding.cat(cap_parts)).float().cpu()
        finally:
            self.train(was_training)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


#: A caption block may carry this much padding (relative to its real words) before it is cut.
MAX_BLOCK_PADDING = 0.125


def _length_blocks(lengths: list[int], max_captions: int) -> list[tuple[int, int]]:
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


def build_model(config) -> HSCModel:
    """Build an untrained model from a ModelConfig (or from a run's :class:`~hsc_pyg.config.Config`: its ``model``
    part, with its ``score_chunk_mb``)."""
    if isinstance(config, ModelConfig):
        return HSCModel(config)
    model = HSCModel(config.model)
    model.score_chunk_mb = config.score_chunk_mb
    return model
