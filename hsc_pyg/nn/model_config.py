"""The model's configuration: :class:`ModelConfig`, everything that shapes the weights or the scores, and the presets
(``hsc``, ``sgraf_saf``, ``sgraf_sgr``) that set its layer types, layer counts and head unless those are given.

The model is built from it alone (:func:`~hsc_pyg.nn.model.build_model`), the checkpoint stores it, and a resumed run
refuses any difference in it. It lives beside the model so that ``nn`` needs nothing from :mod:`hsc_pyg.config`
(which gathers it with the run's other configurations and builds the command lines' flags).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from ..data.graphs import check_edge_spec, edge_feature_size
from ..errors import ConfigError, DataError
from ..options import check_fields, option
from .layers import LAYERS
from .similarity import HEADS

LEVELS = ("object", "relational", "higher")


class _FromPreset:
    """Default of the fields a preset sets: the preset's value is used unless the field is given."""

    def __repr__(self) -> str:
        return "from --preset"


FROM_PRESET: Any = _FromPreset()

PRESETS: dict[str, dict[str, Any]] = {
    "hsc": dict(img_gnn="hsc", txt_gnn="hsc_text", img_layers=4, txt_layers=4, head="saf"),
    "sgraf_saf": dict(img_gnn="none", txt_gnn="none", img_layers=0, txt_layers=0, head="saf"),
    "sgraf_sgr": dict(img_gnn="none", txt_gnn="none", img_layers=0, txt_layers=0, head="sgr"),
}


def physical_memory() -> int | None:
    """Bytes of memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class ModelConfig:
    """What shapes the weights and the scores: sizes, layer types and their arguments, head, edges, norms."""

    preset: str = option("hsc", "hsc, sgraf_saf or sgraf_sgr (sets the layer types, layer counts and head unless given)",
                         choices=tuple(PRESETS))
    img_dim: int = option(0, "region feature size; 0 = read from the data", low=0)
    num_regions: int = option(36, "regions per image (VisualSA's BatchNorm is over this axis)", low=1)
    vocab_size: int = option(0, "set from the vocabulary (0 = not yet known)", low=0)
    embed_size: int = option(1024, "joint embedding size d", low=1)
    word_dim: int = option(300, "word embedding size", low=1)
    sim_dim: int = option(256, "alignment vector size m", low=1)
    img_gnn: str = option(FROM_PRESET, "layer type of the region graph (see hsc_pyg.nn.layers.LAYERS)")
    txt_gnn: str = option(FROM_PRESET, "layer type of the word graph")
    img_layers: int = option(FROM_PRESET, "relational layers on the region graph", low=0)
    txt_layers: int = option(FROM_PRESET, "relational layers on the word graph", low=0)
    img_layer_heads: int | None = option(None, "heads of the region-graph layers (hsc, gat, gatv2, transformer); "
                                               "default: the layer's (4)", low=1)
    img_layer_dropout: float | None = option(None, "dropout inside the region-graph layers that have one (gat, "
                                                   "gatv2, transformer: on the attention)", low=0.0, below=1.0)
    txt_layer_heads: int | None = option(None, "heads of the word-graph layers (gat, gatv2, transformer)", low=1)
    txt_layer_dropout: float | None = option(None, "dropout inside the word-graph layers that have one (hsc_text: "
                                                   "drop_out in the original, 0; gat, gatv2, transformer: on the "
                                                   "attention)", low=0.0, below=1.0)
    head: str = option(FROM_PRESET, "similarity head (see hsc_pyg.nn.similarity.HEADS): saf or sgr")
    sgr_step: int = option(3, "reasoning steps of the sgr head", low=1)
    lambda_softmax: float = option(9.0, "inverse temperature of the word-to-region attention", low=0.0)
    word_dropout: float = option(0.4, "dropout after the word embedding", low=0.0, below=1.0)
    sa_dropout: float = option(0.4, "dropout inside VisualSA / TextSA", low=0.0, below=1.0)
    gru_layers: int = option(1, "GRU layers of the text encoder", low=1)
    no_imgnorm: bool = option(False, "skip the l2norm of region states")
    no_txtnorm: bool = option(False, "skip the l2norm of word states")
    first_stage_dim: int = option(0, "size of the first stage's retrieval vectors: 0 = the global vectors themselves, "
                                     "else a learned projection to this size", low=0)
    align_levels: str = option("higher", "comma-separated levels to align and fuse: object, relational, higher")
    img_edges: str = option("full", "region-graph edges: full, knn:K, spatial, none")
    txt_edges: str = option("full", "word-graph edges: full, window:K, none")
    img_edge_features: bool = option(False, "give the img_edges builder's edge features (spatial: 5 columns of "
                                            "relative geometry) to the region-graph layers (gat, gatv2, transformer, "
                                            "gine; their edge_dim)")
    txt_edge_features: bool = option(False, "give the word graph's relation features (2 columns: relative word "
                                            "offset) to the word-graph layers (gat, gatv2, transformer, gine)")

    def __post_init__(self) -> None:
        if self.preset in PRESETS:
            for name, value in PRESETS[self.preset].items():
                if getattr(self, name) is FROM_PRESET:
                    object.__setattr__(self, name, value)
        check_fields(self)
        self.levels()
        self._check_edges()
        for side in ("img", "txt"):
            try:
                LAYERS.get(getattr(self, f"{side}_gnn"))
            except ConfigError as e:
                raise ConfigError(f"{side}_gnn={getattr(self, f'{side}_gnn')!r}: {e}") from None
            self._check_layer_inputs(side)
            arguments = self.layer_arguments(side)
            try:
                LAYERS.check_arguments(getattr(self, f"{side}_gnn"), arguments, skip=1)
            except ConfigError as e:
                given = "".join(f", {side}_layer_{k}={v!r}" for k, v in arguments.items())
                raise ConfigError(f"{side}_gnn={getattr(self, f'{side}_gnn')!r}{given}: {e}") from None
        try:
            HEADS.get(self.head)
        except ConfigError as e:
            raise ConfigError(f"head={self.head!r}: {e}") from None
        self._check_preset()
        self._check_size()

    def levels(self) -> tuple[str, ...]:
        """The aligned levels, in the order given."""
        names = tuple(s.strip() for s in self.align_levels.split(",") if s.strip())
        bad = [n for n in names if n not in LEVELS]
        if bad or not names:
            raise ConfigError(f"align_levels={self.align_levels!r} is invalid: expected a comma-separated subset of "
                              f"{', '.join(LEVELS)}")
        return names

    def layer_arguments(self, side: str) -> dict[str, Any]:
        """Keyword arguments of the ``side`` (``img`` / ``txt``) layers: the ``{side}_layer_*`` fields that are set."""
        given = {"heads": getattr(self, f"{side}_layer_heads"), "dropout": getattr(self, f"{side}_layer_dropout")}
        if getattr(self, f"{side}_edge_features"):
            given["edge_dim"] = self.edge_feature_size(side)
        return {k: v for k, v in given.items() if v is not None}

    def edge_feature_size(self, side: str) -> int:
        """Columns of the ``side`` graphs' edge features (0: none), as the edge builder declares them."""
        spec, graph = (self.img_edges, "image") if side == "img" else (self.txt_edges, "caption")
        return edge_feature_size(spec, graph=graph)

    def check_boxes(self, has_boxes: bool) -> None:
        """DataError unless the data has region boxes where ``img_gnn`` needs them (checked before any work)."""
        if LAYERS.capability(self.img_gnn, "needs_pos") and not has_boxes:
            raise DataError(f"img_gnn={self.img_gnn!r} needs region boxes ({{split}}_boxes.npy [N, R, 4]) but the data "
                            "has none; add the boxes file or use img_gnn=hsc")

    def _check_layer_inputs(self, side: str) -> None:
        """The layer type and the edge features / boxes it gets agree (one-line ConfigError saying what to set)."""
        layer, edges, features = (getattr(self, f"{side}_{k}") for k in ("gnn", "edges", "edge_features"))
        if side == "txt" and LAYERS.capability(layer, "needs_pos"):
            raise ConfigError(f"txt_gnn={layer!r} needs region boxes, so it applies to region graphs only; use "
                              "txt_gnn=hsc_text or another layer without boxes")
        takes = ", ".join(n for n in LAYERS if LAYERS.capability(n, "supports_edge_attr"))
        if features and not LAYERS.capability(layer, "supports_edge_attr"):
            raise ConfigError(f"{side}_edge_features=True but {side}_gnn={layer!r} takes no edge features; use one of "
                              f"{takes} or set {side}_edge_features=false")
        if features and self.edge_feature_size(side) == 0:
            raise ConfigError(f"{side}_edge_features=True but {side}_edges={edges!r} builds no edge features; use "
                              f"{side}_edges=spatial (boxes needed) or set {side}_edge_features=false")
        if LAYERS.capability(layer, "needs_edge_attr") and not features:
            fix = "with img_edges=spatial" if side == "img" else "(relative word positions)"
            raise ConfigError(f"{side}_gnn={layer!r} needs edge features; set {side}_edge_features=true {fix}")

    def _check_preset(self) -> None:
        if self.preset.startswith("sgraf_"):
            expected = PRESETS[self.preset]
            wrong = [k for k in ("img_layers", "txt_layers", "head") if getattr(self, k) != expected[k]]
            if wrong:
                raise ConfigError(f"preset={self.preset!r} with {wrong[0]}={getattr(self, wrong[0])!r} is not "
                                  f"{self.preset} (it needs {wrong[0]}={expected[wrong[0]]!r}); use --preset hsc for "
                                  "a model with relational layers")
        elif self.img_layers == 0 and self.txt_layers == 0:
            raise ConfigError(f"preset='hsc' with img_layers=0 and txt_layers=0 has no relational layers: that is "
                              f"--preset sgraf_{self.head}")

    def _check_edges(self) -> None:
        for name, graph in (("img_edges", "image"), ("txt_edges", "caption")):
            try:
                check_edge_spec(getattr(self, name), graph=graph)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None

    def parameter_estimate(self) -> int:
        """About how many parameters these sizes make (the large terms: embeddings, projections, layers, GRU)."""
        d, w, m = self.embed_size, self.word_dim, self.sim_dim
        img_layer = 0 if self.img_gnn == "none" else 6 * d * d
        txt_layer = 0 if self.txt_gnn == "none" else 6 * w * w
        gru_in = [w] + [2 * d] * (self.gru_layers - 1)
        gru = sum(2 * 3 * (i * d + d * d + 2 * d) for i in gru_in)
        head = (3 * self.sgr_step + 1) * m * m
        return (self.img_dim * d + self.img_layers * img_layer + self.vocab_size * w + self.txt_layers * txt_layer
                + gru + 4 * d * d + 2 * d * m + head)

    def _check_size(self) -> None:
        memory = physical_memory()
        need = 4 * self.parameter_estimate()
        if memory is not None and need > memory:
            sizes = ", ".join(f"{k}={getattr(self, k)}" for k in ("embed_size", "word_dim", "sim_dim", "img_dim",
                                                                   "vocab_size", "gru_layers"))
            raise ConfigError(f"the model would need about {need / 2**30:.3g} GiB of float32 weights ({sizes}), more "
                              f"than this machine's {memory / 2**30:.1f} GiB of memory; lower the sizes")


def model_config_from_dict(values: Any, source: str = "checkpoint") -> ModelConfig:
    """A ModelConfig from a dict of its fields; ConfigError naming ``source`` for anything wrong."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the model config must be an object of field names to values, found "
                          f"{type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ConfigError(f"{source}: unknown model config field(s) {', '.join(unknown)}")
    try:
        return ModelConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def model_differences(old: ModelConfig, new: ModelConfig) -> list[str]:
    """Names of the fields whose values differ."""
    return [f.name for f in fields(ModelConfig) if getattr(old, f.name) != getattr(new, f.name)]
