"""``hsc-pyg search`` (also ``python -m hsc_pyg.search``): find the images that match a sentence, or the captions
that match an image.

    hsc-pyg search --model runs/f8k/checkpoint/model_best.pth --data_path ../shared/data \\
        --data_name flickr8k_mini_precomp --split test --query "a dog runs on the beach" --k 5

Expected failures print one line to stderr and exit with status 2 (``--debug`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .. import load_checkpoint
from ..data.precomp import PrecompSplit
from ..data.vocab import Vocabulary
from ..engine.device import resolve_device
from ..config import SearchConfig
from ..engine.retrieval import open_gallery, search_image, search_text, unknown_query_words
from ..errors import ConfigError
from ..io import write_json
from ..options import add_arguments, given
from .common import OneLineParser, command_parser, exit_with, run_command

DESCRIPTION = """\
Search a split's images with a sentence (--query), or its captions with one of its images (--image). The gallery is
encoded once and cached (memory-mapped .npy files; a cache is only ever read back for the same model and the same
files). Each query is compared with every gallery item by the cosine of the model's first-stage vectors; the best
--shortlist of them are scored exactly and the top --k returned. A model trained without the first stage's loss
(--itc_weight 0, official checkpoints) shortlists by the untrained cosine of its global vectors, which misses more."""


def build_parser() -> OneLineParser:
    p = command_parser("search", DESCRIPTION)
    add_arguments(p, [SearchConfig])
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def _output(path: str, flag: str, overwrite: bool) -> Path | None:
    if not path:
        return None
    out = Path(path)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it or choose another {flag}")
    return out


def search_command(args: argparse.Namespace) -> int:
    config = SearchConfig(**given(args, [SearchConfig]))
    json_out = _output(config.json, "--json", config.overwrite)
    sheet = _output(config.sheet_path(), "--sheet", config.overwrite)
    if config.image_root and not Path(config.image_root).is_dir():
        raise ConfigError(f"--image_root {config.image_root} is not a folder; pass the folder of the split's photos")
    model = load_checkpoint(config.model).to(resolve_device(config.device))
    vocab = Vocabulary.load(config.vocab_path) if config.vocab_path else model.vocab
    if config.query is not None:
        if vocab is None:
            raise ConfigError("the model carries no vocabulary (official checkpoints do not); pass --vocab_path")
        unknown_query_words(vocab, config.query)     # refuses an unusable query before the gallery is encoded
    split = PrecompSplit.open(config.data_path, config.data_name, config.split)
    gallery, built = open_gallery(model, split, vocab, cache=config.cache or None, rebuild=config.rebuild,
                                  store_dtype=config.store_dtype, batch_size=config.batch_size,
                                  progress=not args.no_progress, index=config.index)
    print(f"{'built' if built else 'read'} the gallery cache {gallery.folder} ({len(gallery)} images)", file=sys.stderr)
    if config.query is not None:
        result = search_text(model, gallery, config.query, k=config.k, shortlist=config.shortlist, vocab=vocab)
    else:
        result = search_image(model, gallery, config.image, k=config.k, shortlist=config.shortlist)
    if result.clamped:
        print(f"note: --k {config.k} is more than the {result.gallery_size} items of the gallery; returning all of them",
              file=sys.stderr)
    if result.unknown_words:
        print(f"note: not in the vocabulary (read as <unk>): {', '.join(result.unknown_words)}", file=sys.stderr)
    if not result.first_stage_trained:
        print("note: this model's first stage was never trained (--itc_weight 0 or an official checkpoint): the "
              "shortlist is the untrained cosine of its global vectors", file=sys.stderr)
    for rank, hit in enumerate(result.hits, 1):
        text = f"  {hit.text}" if hit.text is not None else ""
        print(f"{rank:3d}  {hit.score:.4f}  {hit.id}{text}")
    if sheet is not None:
        from ..viz.contact_sheet import contact_sheet   # matplotlib only when drawing

        contact_sheet(result, config.image_root, sheet)
        print(f"wrote {sheet}", file=sys.stderr)
    if json_out is not None:
        write_json(json_out, result.to_dict(), indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), search_command, argv)


if __name__ == "__main__":
    exit_with(main)
