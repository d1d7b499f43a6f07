"""HSC: encode each image and each caption once, then score pairs densely (DESIGN.md).

``build_model(config)`` is the one door in; the presets ``hsc``, ``sgraf_saf`` and ``sgraf_sgr`` are configurations of
this same class (SGRAF = no relational layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..data.graphs import caption_graph, collate_graphs, image_graph
from ..errors import ConfigError
from .encoders import RegionGraphEncoder, WordGraphEncoder
from .first_stage import FirstStage
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
    """Per-caption states, packed: the words of all captions back to back, without padding.

    ``words [T, V, d]`` (T = all words, V = aligned levels), ``starts [M]`` and ``lengths [M]`` (long, the row of a
    caption's first word and its word count), ``glo [M, V, d]``. Indexing (an int, a slice or a LongTensor) selects
    captions and shares ``words``, so a split's captions are stored once and a block of them costs nothing to select;
    :meth:`padded` gives the padded view that scoring all pairs of a block needs, :meth:`contiguous` the words of the
    selected captions back to back that scoring given pairs needs.
    """

    words: Tensor
    starts: Tensor
    lengths: Tensor
    glo: Tensor

    @classmethod
    def back_to_back(cls, words: Tensor, lengths: Tensor, glo: Tensor) -> "CaptionEncoding":
        """Captions whose words ``words [T, V, d]`` lie back to back in caption order, ``lengths [M]`` each."""
        return cls(words, lengths.cumsum(0) - lengths, lengths, glo)

    def __len__(self) -> int:
        return self.lengths.numel()

    def __getitem__(self, idx) -> "CaptionEncoding":
        if isinstance(idx, Tensor):
            idx = idx.to(self.starts.device)
        return CaptionEncoding(self.words, _index(self.starts, idx), _index(self.lengths, idx), _index(self.glo, idx))

    def to(self, device=None, dtype=None) -> "CaptionEncoding":
        """All of ``words`` moved or cast (a selection shares them: :meth:`contiguous` first moves only its own)."""
        return CaptionEncoding(self.words.to(device=device, dtype=dtype), self.starts.to(device),
                               self.lengths.to(device), self.glo.to(device=device, dtype=dtype))

    def longest(self) -> int:
        """The words of the longest of these captions (at least 1): the length L of :meth:`padded`."""
        return max(int(self.lengths.max()), 1) if len(self) else 1

    def padded(self) -> tuple[Tensor, Tensor]:
        """These captions padded to the longest of them: ``words [M, V, L, d]`` (zero at padding) and the mask of
        their real words ``[M, L]``."""
        steps = torch.arange(self.longest(), device=self.starts.device)
        mask = steps[None, :] < self.lengths[:, None]
        rows = (self.starts[:, None] + steps[None, :]).masked_fill(~mask, 0).flatten()
        # one row gather, then the few padding rows zeroed (a broadcast masked_fill over [M, L, V, d] costs 6x more)
        words = self.words.flatten(1).index_select(0, rows).index_fill_(0, (~mask).flatten().nonzero().squeeze(1), 0)
        return words.view(*mask.shape, *self.words.shape[1:]).transpose(1, 2), mask

    def contiguous(self) -> "CaptionEncoding":
        """The same captions with their words back to back in caption order (``self`` when they already are)."""
        firsts = self.lengths.cumsum(0) - self.lengths
        total = int(self.lengths.sum())
        if self.words.size(0) == total and torch.equal(self.starts, firsts):
            return self
        rows = torch.repeat_interleave(self.starts - firsts, self.lengths, output_size=total)
        rows += torch.arange(total, device=rows.device)
        return CaptionEncoding(self.words.index_select(0, rows), firsts, self.lengths, self.glo)

    @classmethod
    def cat(cls, parts: Sequence["CaptionEncoding"]) -> "CaptionEncoding":
        parts = [p.contiguous() for p in parts]
        return cls.back_to_back(torch.cat([p.words for p in parts]), torch.cat([p.lengths for p in parts]),
                                torch.cat([p.glo for p in parts]))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.starts, self.lengths, self.glo))


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

    Its scoring is pure: :meth:`score_block` (all pairs of a block) and :meth:`score_pairs` (given pairs) hold no run
    options; blocking, chunking and memory limits are :mod:`hsc_pyg.engine.blocking`'s, which also holds the training
    forward (:class:`~hsc_pyg.engine.blocking.BatchScores`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"HSCModel takes a ModelConfig, found {type(config).__name__}")
        if config.img_dim <= 0 or config.vocab_size <= 0:
            raise ConfigError(f"img_dim ({config.img_dim}) and vocab_size ({config.vocab_size}) must be set before "
                              "building a model; they come from the data and the vocabulary")
        self.config = config
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
        """A ``Batch`` of word graphs -> :class:`CaptionEncoding` (once per caption), the words back to back in the
        batch's order."""
        states = self.text_encoder(captions, self.levels)
        words = _by_level([states.levels[lv][states.mask] for lv in self.levels])
        glo = _by_level([self.similarity.text_sa(states.levels[lv], states.mask) for lv in self.levels])
        return CaptionEncoding.back_to_back(words, states.mask.sum(1), glo)

    # ---------------------------------------------------------------- per pair
    def set_kernels(self, mode: str) -> None:
        """Score with the faster steps of :mod:`hsc_pyg.nn.kernels` (``"auto"``, the default) or the plain formulas
        of :mod:`hsc_pyg.nn.similarity` (``"reference"``); both give the same scores."""
        self.similarity.set_kernels(mode)

    def score_block(self, img: ImageEncoding, cap: CaptionEncoding, positions: Tensor | None = None) -> Tensor:
        """Exact scores of every image of a block against every caption of it, ``[A, C]``: the level average of
        :meth:`SimilarityModule.forward` (MODEL.md §2) on the captions padded to the longest of them
        (:meth:`CaptionEncoding.padded`), all pairs at once. How many pairs a call should hold (memory, padding) is
        the caller's choice: :func:`hsc_pyg.engine.blocking.score` cuts any set into blocks of captions of similar
        length.

        ``positions`` (long ``[C]``, training only): the captions' places in their batch, which order the SAF gate's
        deferred running-statistics updates (:meth:`CaptionwiseBatchNorm.deferred_updates`)."""
        norm = self.similarity.head.caption_norm() if positions is not None else None
        words, mask = cap.padded()
        # under autocast (bf16 scoring) the region and word states are cast once here, not once per product
        dtype = compute_dtype(img.regions)
        words = words.to(dtype)
        total = 0
        for v in range(len(self.levels)):
            if norm is not None:      # running statistics: level by level, captions in batch order
                norm.next_captions(v, positions)
            total = total + self.similarity(img.regions[:, v].to(dtype), img.glo[:, v], words[:, v], mask,
                                            cap.glo[:, v])
        return total / len(self.levels)

    def score_pairs(self, img: ImageEncoding, cap: CaptionEncoding, images: Tensor) -> Tensor:
        """Exact scores of P given pairs (eval mode), the level average of :meth:`SimilarityModule.score_pairs`:
        ``img`` the images, ``cap`` each pair's caption (P of them, repeats allowed; their words are taken back to
        back, :meth:`CaptionEncoding.contiguous`), ``images [P]`` each pair's image (keep one image's pairs adjacent)
        -> ``[P]``. The same numbers as :meth:`score_block` at those pairs; how many pairs to hand over at once:
        :func:`hsc_pyg.engine.blocking.words_per_call`."""
        cap = cap.contiguous()
        dtype = compute_dtype(img.regions)
        words = cap.words.to(dtype)
        total = 0
        for v in range(len(self.levels)):
            total = total + self.similarity.score_pairs(img.regions[:, v].to(dtype), img.glo[images, v],
                                                        words[:, v].contiguous(), cap.lengths, images, cap.glo[:, v])
        return total / len(self.levels)

    # ---------------------------------------------------------------- convenience
    @torch.no_grad()
    def similarity_matrix(self, images: Tensor, captions: Sequence[Sequence[int]], batch_size: int = 128,
                          boxes: Tensor | None = None) -> Tensor:
        """Eval-mode scores of raw inputs: ``images`` float ``[N, R, D]``, ``captions`` token-id lists (with
        ``<start>``/``<end>``) -> ``[N, M]`` float32 on the CPU. ``boxes [N, R, 4]``: the regions' boxes, for models
        that read them (``img_edges=spatial``, ``img_gnn=hsc_geo``). ``batch_size`` images or captions go into one
        encoder call, and ``batch_size`` x ``batch_size`` pairs into one :meth:`score_block` (a smaller one needs less
        memory; :func:`hsc_pyg.engine.scoring.score_matrix` scores large sets within a memory bound, faster)."""
        self.config.check_boxes(boxes is not None)
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
            return torch.cat([torch.cat([self.score_block(img, cap).float().cpu() for cap in cap_parts], 1)
                              for img in img_parts])
        finally:
            self.train(was_training)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config) -> HSCModel:
    """Build an untrained model from a ModelConfig (or from a run's :class:`~hsc_pyg.config.Config`: its ``model``
    part)."""
    return HSCModel(config if isinstance(config, ModelConfig) else config.model)
