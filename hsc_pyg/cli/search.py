"""``hsc-pyg search`` (also ``python -m hsc_pyg.search``): find the images that match a sentence, or the captions that match an image.

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
from ..engine.retrieval import DEFAULT_SHORTLIST, open_gallery, search_image, search_text
from ..engine.vector_index import INDEX_KINDS
from ..errors import ConfigError
from ..io import write_json
from .common import OneLineParser, add_model_and_split_arguments, command_parser, exit_with, run_command

DESCRIPTION = """\
Search a split's images with a sentence (--query), or its captions with one of its images (--image). The gallery is
encoded once and cached (memory-mapped .npy files; a cache is only ever read back for the same model and the same
files). Each query is compared with every gallery item by the cosine of the model's first-stage vectors; the best
--shortlist of them are scored exactly and the top --k returned. A model trained without the first stage's loss
(--itc_weight 0, official checkpoints) shortlists by the untrained cosine of its global vectors, which misses more."""


def build_parser() -> OneLineParser:
    p = command_parser("search", DESCRIPTION)
    add_model_and_split_arguments(p, split_help="split whose images (and captions) are searched (default: test)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", metavar="TEXT", help="a sentence: find the images that match it")
    query.add_argument("--image", metavar="I|ID", help="an image of the split, by row or by id: find its captions")
    p.add_argument("--k", type=int, default=5, help="results to return (default: %(default)s)")
    p.add_argument("--shortlist", type=int, default=DEFAULT_SHORTLIST,
                   help="items of the first stage scored exactly (default: %(default)s; at least --k)")
    p.add_argument("--cache", metavar="DIR",
                   help="gallery cache folder (default: $HSC_PYG_CACHE or ~/.cache/hsc_pyg, under galleries/, "
                        "named by the model and the data)")
    p.add_argument("--rebuild", action="store_true", help="encode the gallery again, replacing the --cache folder")
    p.add_argument("--store_dtype", choices=("float16", "float32"), default="float16",
                   help="precision of the cached encodings (default: %(default)s)")
    p.add_argument("--index", choices=INDEX_KINDS, default="auto",
                   help="first stage over the images: brute force, or a FAISS index kept in the cache (flat, ivf, "
                        "hnsw; the faiss extra); auto: brute below 200,000 images, ivf from there (default: %(default)s)")
    p.add_argument("--image_root", metavar="DIR",
                   help="folder of the photos named in {split}_ids.txt: write a contact sheet (--sheet)")
    p.add_argument("--sheet", default="search.png", metavar="FILE.png",
                   help="contact sheet written with --image_root (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json or --sheet file")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=128, help="items per encoder call when building the cache")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def _output(path: str | None, flag: str, overwrite: bool) -> Path | None:
    if not path:
        return None
    out = Path(path)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it or choose another {flag}")
    return out


def search_command(args: argparse.Namespace) -> int:
    json_out = _output(args.json, "--json", args.overwrite)
    sheet = _output(args.sheet, "--sheet", args.overwrite) if args.image_root else None
    if args.image_root and not Path(args.image_root).is_dir():
        raise ConfigError(f"--image_root {args.image_root} is not a folder; pass the folder of the split's photos")
    model = load_checkpoint(args.model).to(resolve_device(args.device))
    vocab = Vocabulary.load(args.vocab_path) if args.vocab_path else model.vocab
    split = PrecompSplit.open(args.data_path, args.data_name, args.split)
    gallery, built = open_gallery(model, split, vocab, cache=args.cache, rebuild=args.rebuild,
                                  store_dtype=args.store_dtype, batch_size=args.batch_size,
                                  progress=not args.no_progress, index=args.index)
    print(f"{'built' if built else 'read'} the gallery cache {gallery.folder} ({len(gallery)} images)", file=sys.stderr)
    if args.query is not None:
        result = search_text(model, gallery, args.query, k=args.k, shortlist=args.shortlist, vocab=vocab)
    else:
        result = search_image(model, gallery, args.image, k=args.k, shortlist=args.shortlist)
    if result.clamped:
        print(f"note: --k {args.k} is more than the {result.gallery_size} items of the gallery; returning all of them",
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

        contact_sheet(result, args.image_root, sheet)
        print(f"wrote {sheet}", file=sys.stderr)
    if json_out is not None:
        write_json(json_out, result.to_dict(), indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), search_command, argv)


if __name__ == "__main__":
    exit_with(main)
