"""A served gallery for the explorer's tests (tests/test_serve.py, tests/test_browser.py): a synthetic split whose
images have photos, a tiny untrained model, its gallery cache, and a live server on a free loopback port."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import matplotlib.image
import numpy as np
import torch

from hsc_pyg.config import Config
from hsc_pyg.data.precomp import PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import build_vocab
from hsc_pyg.engine.checkpoint import save_checkpoint
from hsc_pyg.engine.retrieval import open_gallery
from hsc_pyg.nn.model import build_model
from hsc_pyg.serve.app import Explorer, make_server

NAME, REGIONS, IMG_DIM, IMAGES = "tiny", 16, 12, 10


def served_data(root: Path) -> dict:
    """Under ``root``: the split (photos ``photo{i}.png`` named in test_ids.txt, a file ``outside.png`` beside the photo
    folder), ``model.pth`` and the gallery cache; returns them loaded."""
    make_synthetic(root / NAME, seed=3, num_train=8, num_dev=2, num_test=IMAGES, img_dim=IMG_DIM, num_regions=REGIONS)
    ids = [f"photo{i}.png" for i in range(IMAGES)]
    (root / NAME / "test_ids.txt").write_text("\n".join(ids) + "\n")
    photos = root / "photos"
    photos.mkdir()
    for i, name in enumerate(ids):
        matplotlib.image.imsave(photos / name, np.full((120, 160, 3), i / IMAGES))
    (root / "outside.png").write_bytes((photos / ids[0]).read_bytes())
    split = PrecompSplit.open(root, NAME, "test")
    vocab = build_vocab(PrecompSplit.open(root, NAME, "train").captions, threshold=1)
    torch.manual_seed(0)
    model = build_model(Config(img_dim=IMG_DIM, num_regions=REGIONS, vocab_size=len(vocab), embed_size=16,
                               word_dim=8, sim_dim=8, img_layers=2, txt_layers=1)).eval()
    model.vocab = vocab
    save_checkpoint(root / "model.pth", model)
    gallery, _ = open_gallery(model, split, vocab, cache=root / "cache")
    return {"root": root, "split": split, "model": model, "gallery": gallery, "photos": photos}


def explorer_of(data: dict) -> Explorer:
    return Explorer(data["model"], data["model"].vocab, data["split"], data["gallery"], data["photos"], shortlist=6)


@contextlib.contextmanager
def live_server(explorer: Explorer) -> Iterator[str]:
    """The explorer served by uvicorn in a thread on a free loopback port; yields its base URL, stops it after."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(explorer)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
