"""``hsc-pyg serve`` (also ``python -m hsc_pyg.serve``): the local explorer, a web page and an HTTP API over a model
and a gallery.

    hsc-pyg serve --model runs/f8k/checkpoint/model_best.pth --data_path ../shared/data \\
        --data_name flickr8k_mini_precomp --split test --image_root ../shared/data/flickr8k_mini_precomp/images

Expected failures print one line to stderr and exit with status 2 (``--debug`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path
from typing import Sequence

from ..config import INDEX_KINDS
from ..engine.vector_index import import_faiss
from ..errors import ConfigError
from .common import OneLineParser, add_model_and_split_arguments, command_parser, exit_with, run_command

DESCRIPTION = """\
Serve a page and a JSON API over a trained model and one split's gallery: type a sentence, see the photos the model
ranks first (first stage over the whole gallery, the best --shortlist scored exactly, as python -m hsc_pyg.search),
click one to see why it matched: each word's attention over the photo's regions, the strongest learned relations
between regions at each level, the alignment scores and the photo's best-matching captions. The gallery cache is the
search command's (--cache, --rebuild). Binds 127.0.0.1 (this machine only) unless --host says otherwise; Ctrl-C or
SIGTERM stops it after the requests in flight. Needs the serve extra: pip install -e '.[serve]'."""


def build_parser() -> OneLineParser:
    p = command_parser("serve", DESCRIPTION)
    add_model_and_split_arguments(p, split_help="split whose images (and captions) are served (default: test)")
    p.add_argument("--image_root", metavar="DIR",
                   help="folder of the photos named in {split}_ids.txt (without it the page shows no photos)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--shortlist", type=int, default=50,
                   help="items of the first stage scored exactly per query (default: %(default)s)")
    p.add_argument("--parallel", type=int, default=2,
                   help="requests computed at once; the others wait (default: %(default)s)")
    p.add_argument("--cache", metavar="DIR", help="gallery cache folder (default: the search command's)")
    p.add_argument("--rebuild", action="store_true", help="encode the gallery again, replacing the --cache folder")
    p.add_argument("--store_dtype", choices=("float16", "float32"), default="float16",
                   help="precision of the cached encodings (default: %(default)s)")
    p.add_argument("--index", choices=INDEX_KINDS, default="auto",
                   help="first stage over the images: brute force, or a FAISS index kept in the cache (flat, ivf, "
                        "ivf_sq8, hnsw; the faiss extra); auto: brute below 200,000 images, ivf from there "
                        "(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=128, help="items per encoder call when building the cache")
    p.add_argument("--access_log", action="store_true", help="print a line per request")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument that can be checked without loading the model or the data."""
    if not Path(args.model).is_file():
        raise ConfigError(f"--model {args.model} is not a file; pass a checkpoint such as "
                          "runs/f8k/checkpoint/model_best.pth")
    if not (Path(args.data_path) / args.data_name).is_dir():
        raise ConfigError(f"{Path(args.data_path) / args.data_name} is not a folder; --data_path and --data_name "
                          "must name a precomp dataset")
    features = Path(args.data_path) / args.data_name / f"{args.split}_ims.npy"
    if not features.is_file():
        found = sorted(f.name[:-len("_ims.npy")] for f in features.parent.glob("*_ims.npy"))
        raise ConfigError(f"--split {args.split}: {features} does not exist; the splits there are "
                          f"{', '.join(found) or 'none'}")
    if args.vocab_path and not Path(args.vocab_path).is_file():
        raise ConfigError(f"--vocab_path {args.vocab_path} is not a file")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise ConfigError(f"--image_root {args.image_root} is not a folder; pass the folder of the split's photos")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, found {args.port}")
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        raise ConfigError(f"--host {args.host!r} is not an IP address; pass 127.0.0.1 (this machine) or 0.0.0.0 "
                          "(every interface)") from None
    for flag in ("shortlist", "parallel", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, found {getattr(args, flag)}")
    if args.index not in ("auto", "brute"):
        import_faiss()
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"the explorer needs the serve extra ({e.name} is missing); install it with "
                          "pip install -e '.[serve]'") from None


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (cheap, so a taken port is reported before the model is loaded)."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)       # requests that come while the model loads wait in the queue
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port "
                          "(0 picks a free one)") from None
    return sock


def serve_command(args: argparse.Namespace) -> int:
    check_arguments(args)
    sock = bind(args.host, args.port)
    from .. import load_checkpoint
    from ..data.precomp import PrecompSplit
    from ..data.vocab import Vocabulary
    from ..engine.device import resolve_device
    from ..engine.retrieval import open_gallery
    from ..serve.app import Explorer, make_server

    model = load_checkpoint(args.model).to(resolve_device(args.device))
    vocab = Vocabulary.load(args.vocab_path) if args.vocab_path else model.vocab
    if vocab is None:
        raise ConfigError("the model carries no vocabulary (official checkpoints do not); pass --vocab_path")
    split = PrecompSplit.open(args.data_path, args.data_name, args.split)
    gallery, built = open_gallery(model, split, vocab, cache=args.cache, rebuild=args.rebuild,
                                  store_dtype=args.store_dtype, batch_size=args.batch_size,
                                  progress=not args.no_progress, index=args.index)
    print(f"{'built' if built else 'read'} the gallery cache {gallery.folder} ({len(gallery)} images)",
          file=sys.stderr)
    explorer = Explorer(model, vocab, split, gallery, args.image_root, args.shortlist, parallel=args.parallel)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not ipaddress.ip_address(host).is_loopback:
        print(f"note: listening on {host}, not only this machine: anyone who can reach it can query the model",
              file=sys.stderr)
    print(f"serving http://{shown}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    make_server(explorer, access_log=args.access_log).run(sockets=[sock])
    print("stopped", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), serve_command, argv)


if __name__ == "__main__":
    exit_with(main)
