"""The bad-input corpus: every command, fed a broken input, exits with status 2 and one line on stderr that says what is
wrong, where and how to fix it, and leaves every existing file as it was.

Each case copies one good tree (a tiny built-in dataset, a tiny checkpoint, an output folder that already holds a
previous run's files), breaks one thing in its copy, runs one real command line in a subprocess and compares every
file of the tree before and after. The subprocesses run concurrently (each one spends seconds importing torch); the
table below is the documentation of what each command says.

The table is grouped by kind of fault (data, captions, vocabulary, boxes, checkpoints, training state, run folders,
sizes, options, outputs); the commands are the constants at the top (EVALUATE, TRAIN, VIZ, VOCAB, CONVERT,
SYNTHETIC), so a command that moves is a one-line change. CONFIG_CASES are option values that the one validation of
every config value will refuse: they are expected failures (strict) until it lands. After the table: a full disk in
each command (in-process, ENOSPC injected where files are synced) and the stop signals through train.py (SIGINT 130,
SIGTERM 143, SIGUSR1 138).

Covered elsewhere, in-process: the malicious pickle and the SIGKILL during a save (test_checkpoint.py), the NaN / inf
loss that stops or skips (test_train.py: test_nan_loss_*), and crashes, interrupts and signals at every point of a run,
locks and full disks of the writer itself (test_reliability.py).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch._utils import ExceptionWrapper

from hsc_pyg.config import Config
from hsc_pyg.data.precomp import PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import Vocabulary, build_vocab
from hsc_pyg.engine.checkpoint import read_checkpoint, save_checkpoint
from hsc_pyg.engine.train import train
from hsc_pyg.errors import DataError
from hsc_pyg.nn.model import build_model
from corpus import (Case, Outcome, assert_one_line_and_nothing_changed, fill, hold_lock,  # noqa: E402
                    run_selected, slug, snapshot, write)

ROOT = Path(__file__).resolve().parents[1]
#: a resumable checkpoint written by commit 7831cd1 (see test_checkpoint.py)
FIXTURES = ROOT / "tests" / "fixtures"
NAME = "synthetic_precomp"
#: test split: 4 images x 16 regions x 8 features, 20 captions; train: 6 images, 30 captions
SIZES = dict(num_train=6, num_dev=4, num_test=4, img_dim=8, num_regions=16)
SMALL = dict(img_dim=8, num_regions=16, embed_size=16, word_dim=8, sim_dim=8, img_layers=1, txt_layers=1)

EVALUATE_DATA = ["evaluate.py", "--data_path", "{data}", "--data_name", NAME, "--split", "test", "--device", "cpu",
                 "--no_progress", "--json", "{out}/report.json"]
EVALUATE = EVALUATE_DATA + ["--model", "{ckpt}", "--save_sims", "{out}/sims.npy", "--overwrite"]
TRAIN_RUN = ["train.py", "--data_path", "{data}", "--data_name", NAME, "--model_name", "{out}", "--logger_name",
             "{out}/log", "--device", "cpu", "--no_progress"]
TRAIN = TRAIN_RUN + ["--embed_size", "16", "--word_dim", "8", "--sim_dim", "8", "--img_layers", "1", "--txt_layers",
                     "1", "--batch_size", "5", "--vocab_threshold", "1"]
VIZ = ["-m", "hsc_pyg.viz", "--model", "{ckpt}", "--data_path", "{data}", "--data_name", NAME, "--split", "test",
       "--out", "{out}/graphs"]
VOCAB = ["-m", "hsc_pyg.cli.vocab", "--data_path", "{data}", "--data_name", NAME, "--out", "{out}/vocab.json",
         "--threshold", "1", "--overwrite"]
CONVERT = ["-m", "hsc_pyg.cli.convert", "{ckpt}", "{out}/converted.pth", "--overwrite"]
SEARCH = ["-m", "hsc_pyg.search", "--model", "{ckpt}", "--data_path", "{data}", "--data_name", NAME, "--split", "test",
          "--cache", "{out}/cache", "--device", "cpu", "--no_progress"]
#: resume the run of the good tree into its own folder
RESUME = TRAIN_RUN + ["--resume", "{tree}/run/checkpoint.pth", "--model_name", "{tree}/run", "--logger_name",
                      "{tree}/run/log"]
SYNTHETIC = ["-m", "hsc_pyg.cli.synthetic", "--out", "{data}/" + NAME, "--overwrite", "--train", "6", "--dev", "4",
             "--test", "4", "--img_dim", "8", "--regions", "16"]


# --------------------------------------------------------------------------- ways to break the good tree
def split_file(tree: Path, suffix: str, split: str = "test") -> Path:
    return tree / "data" / NAME / f"{split}_{suffix}"


def edit_array(suffix: str, change: Callable[[np.ndarray], np.ndarray], split: str = "test"):
    def setup(tree: Path) -> None:
        path = split_file(tree, suffix, split)
        np.save(path, change(np.load(path)), allow_pickle=True)
    return setup


def nan_in_image_2(array: np.ndarray) -> np.ndarray:
    array[2, 3, 1] = np.nan
    return array


def nine_regions(tree: Path) -> None:
    for suffix in ("ims.npy", "boxes.npy"):
        edit_array(suffix, lambda a: a[:, :9])(tree)


def edit_captions(change: Callable[[bytes], bytes], split: str = "test"):
    def setup(tree: Path) -> None:
        path = split_file(tree, "caps.txt", split)
        path.write_bytes(change(path.read_bytes()))
    return setup


def replace_line(number: int, text: bytes) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        lines = data.split(b"\n")
        lines[number - 1] = text
        return b"\n".join(lines)
    return change

def save_torch(name: str, obj) -> Callable[[Path], None]:
    def setup(tree: Path) -> None:
        torch.save(obj, tree / name)
    return setup


def truncated_checkpoint(tree: Path) -> bytes:
    data = (tree / "model.pth").read_bytes()
    return data[: len(data) // 2]


def smaller_vocabulary(tree: Path) -> bytes:
    return json.dumps(Vocabulary(["a", "red", "cube"]).to_dict()).encode()


def reordered_vocabulary(tree: Path) -> bytes:
    """The checkpoint's own words, same size, two of them swapped."""
    own = Vocabulary.from_dict(read_checkpoint(tree / "model.pth")["vocab"])
    words = own.decode(range(4, len(own)))
    words[0], words[1] = words[1], words[0]
    return json.dumps(Vocabulary(words).to_dict()).encode()


def edit_checkpoint(name: str, change: Callable[[dict], None]):
    """Load ``tree/name`` as saved, change the dict, save it back (``torch.save``: not through hsc_pyg)."""
    def setup(tree: Path) -> None:
        ckpt = torch.load(tree / name, weights_only=True)
        change(ckpt)
        torch.save(ckpt, tree / name)
    return setup


def set_item(key: str, value, inside: str | None = None):
    def change(ckpt: dict) -> None:
        target = ckpt[inside] if inside else ckpt
        if value is DELETE:
            del target[key]
        else:
            target[key] = value
    return change


DELETE = object()


def nan_weight(ckpt: dict) -> None:
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))


class _CreatesFile:
    """Unpickled, it would create a file: the hostile checkpoint's payload."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_checkpoint(tree: Path) -> None:
    torch.save({"format": "hsc_pyg", "model": _CreatesFile(str(tree / "pwned.txt"))}, tree / "model.pth")


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def fifo(name: str) -> Callable[[Path], None]:
    return lambda tree: os.mkfifo(tree / name)


def deflate_bomb(tree: Path) -> None:
    """model.pth re-zipped with its members deflated, plus a 100 MB member of zeros (a file of ~0.2 MB)."""
    path = tree / "model.pth"
    with zipfile.ZipFile(path) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
        archive.writestr(members[0][0].split("/")[0] + "/data/padding", bytes(100 * 2**20))


def many_regions(count: int):
    def setup(tree: Path) -> None:
        for split in ("train", "dev"):
            edit_array("ims.npy", lambda a: np.resize(a, (a.shape[0], count, a.shape[2])), split)(tree)
            edit_array("boxes.npy", lambda a: np.resize(a, (a.shape[0], count, 4)), split)(tree)
    return setup


def json_file(name: str, obj):
    return write(name, json.dumps(obj).encode())


CASES = [
    # ---- data folder and split
    Case("missing data folder", EVALUATE + ["--data_path", "{tree}/no_data"],
         r"data folder {tree}/no_data does not exist .*hsc-pyg synthetic --out"),
    Case("missing split", EVALUATE + ["--split", "val"],
         r"{data}/synthetic_precomp/val_ims.npy is missing \(.* has splits: dev, test, train\); every split needs"),
    # ---- region features
    Case("ims.npy of rank 2", EVALUATE, r"test_ims.npy: expected a 3-D array \[images, regions, features\], found "
         r"shape \(4, 128\)", edit_array("ims.npy", lambda a: a.reshape(4, -1))),
    Case("ims.npy of int dtype", EVALUATE, r"test_ims.npy: expected float32 or float16 features, found dtype int64; "
         r"convert with array.astype\(numpy.float32\)", edit_array("ims.npy", lambda a: a.astype(np.int64))),
    Case("ims.npy of object dtype", EVALUATE, r"test_ims.npy: expected float32 or float16 features, found dtype "
         r"object", edit_array("ims.npy", lambda a: a.astype(object))),
    Case("region count other than the checkpoint's", EVALUATE,
         r"test_ims.npy holds \[4, 9, 8\] features but checkpoint {ckpt} expects \[\*, 16, 8\]; evaluate it on the "
         r"dataset it was trained on", nine_regions),
    Case("NaN in features", EVALUATE, r"test_ims.npy: image 2 has NaN or inf values; re-extract its features",
         edit_array("ims.npy", nan_in_image_2)),
    Case("inf in features, read by a loader worker", TRAIN + ["--dry_run", "--workers", "1"],
         r"^error: {data}/synthetic_precomp/train_ims.npy: image \d has NaN or inf values",
         edit_array("ims.npy", lambda a: np.full_like(a, np.inf), split="train")),
    # ---- captions
    Case("captions not a multiple of the images", EVALUATE,
         r"test_caps.txt has 19 captions for 4 images in test_ims.npy; expected a whole number of captions per image",
         edit_captions(lambda data: data.split(b"\n", 1)[1])),
    Case("empty caption line", EVALUATE, r"test_caps.txt line 3 is empty; expected one caption per line: write the "
         r"caption or remove the line", edit_captions(replace_line(3, b"  "))),
    Case("non-UTF-8 caption", VOCAB, r"train_caps.txt line 2 is not valid UTF-8 \(byte 0xff\); .*re-save the file "
         r"as UTF-8", edit_captions(replace_line(2, b"a caf\xff cube"), split="train")),
    # ---- vocabulary
    Case("malformed vocabulary JSON", EVALUATE + ["--vocab_path", "{tree}/vocab.json"],
         r"vocabulary file {tree}/vocab.json is not valid JSON \(.* at line 1 column \d+\); build one with "
         r"`hsc-pyg vocab --data_path DIR --data_name NAME --out FILE`",
         write("vocab.json", b'{"word2idx": {"<pad>": 0,')),
    Case("empty vocabulary JSON", EVALUATE + ["--vocab_path", "{tree}/vocab.json"],
         r"vocabulary file {tree}/vocab.json is empty; build one with `hsc-pyg vocab ",
         write("vocab.json", b"\n")),
    Case("vocabulary with other ids than the checkpoint's own", EVALUATE + ["--vocab_path", "{tree}/vocab.json"],
         r"the vocabulary given maps words to other ids than the one inside checkpoint {ckpt} \(id of '\w+': \d+ "
         r"given, \d+ in the checkpoint\); drop --vocab_path", write("vocab.json", reordered_vocabulary)),
    Case("vocabulary size other than the checkpoint's", EVALUATE + ["--vocab_path", "{tree}/vocab.json"],
         r"the vocabulary has 7 words but checkpoint {ckpt} was trained with vocab_size=\d+; pass the vocabulary it "
         r"was trained with", write("vocab.json", smaller_vocabulary)),
    Case("vocabulary JSON nested 200,000 deep", EVALUATE + ["--vocab_path", "{tree}/vocab.json"],
         r"^error: vocabulary file {tree}/vocab.json nests 200,000 levels deep, more than the 100 that any JSON file "
         r"of hsc_pyg needs; it is damaged or hostile, so it was not read$", write("vocab.json", deep_json(200_000))),
    Case("a folder as --vocab_path", EVALUATE + ["--vocab_path", "{out}"],
         r"^error: vocabulary file {out} is a folder, not a file; build one with"),
    Case("/dev/zero as --vocab_path", EVALUATE + ["--vocab_path", "/dev/zero"],
         r"^error: vocabulary file /dev/zero is a character device, not a file; build one with"),
    Case("a FIFO as --vocab_path", EVALUATE + ["--vocab_path", "{tree}/pipe.json"],
         r"^error: vocabulary file {tree}/pipe.json is a FIFO \(named pipe\), not a file", fifo("pipe.json")),
    # ---- boxes
    Case("boxes of the wrong shape", VIZ + ["--image", "0"],
         r"test_boxes.npy: expected boxes of shape \(4, 16, 4\) .* found \(4, 16, 2\); fix or remove the boxes file",
         edit_array("boxes.npy", lambda a: a[..., :2])),
    # ---- checkpoints
    Case("truncated checkpoint", EVALUATE, r"checkpoint {ckpt} is not a readable PyTorch checkpoint .*re-download or "
         r"re-save it", write("model.pth", truncated_checkpoint)),
    Case("random bytes as checkpoint", CONVERT, r"checkpoint {ckpt} is not a readable PyTorch checkpoint",
         write("model.pth", np.random.default_rng(0).bytes(4096))),
    Case("text file as checkpoint", VIZ + ["--image", "0"], r"checkpoint {ckpt} is not a readable PyTorch checkpoint",
         write("model.pth", b"model: hsc\nepochs: 30\n")),
    Case("a folder as --model", EVALUATE + ["--model", "{out}"],
         r"^error: checkpoint {out} is a folder, not a file; pass the path of a .pth/.pth.tar file$"),
    Case("a FIFO as --model", VIZ + ["--image", "0", "--model", "{tree}/pipe.pth"],
         r"^error: checkpoint {tree}/pipe.pth is a FIFO \(named pipe\), not a file", fifo("pipe.pth")),
    Case("/dev/zero as --model", CONVERT[:2] + ["/dev/zero"] + CONVERT[3:],
         r"^error: checkpoint /dev/zero is a character device, not a file"),
    Case("a file of zeros as --model", EVALUATE, r"^error: checkpoint {ckpt} is not a readable PyTorch checkpoint "
         r"\(starts with bytes 00 00 00 00, not a zip archive or a pickle\); re-download or re-save it$",
         write("model.pth", bytes(1 << 20))),
    Case("a checkpoint that would run code when unpickled", EVALUATE,
         r"^error: checkpoint {ckpt} was refused: it needs code outside the safe list to load "
         r"\((io|builtins|__builtin__).open\); it may be malicious, so it was not unpickled$", hostile_checkpoint),
    Case("checkpoint of another model family", EVALUATE,
         r"checkpoint {ckpt} is neither an hsc_pyg nor an official SGRAF/HSC checkpoint \(top-level keys: epoch, "
         r"state_dict\)", save_torch("model.pth", {"state_dict": {"conv1.weight": torch.zeros(2, 3)}, "epoch": 3})),
    Case("weights-only checkpoint given to --resume", TRAIN_RUN + ["--resume", "{ckpt}"],
         r"^error: {ckpt} holds weights but no training state, so it cannot be resumed; resume from the run's "
         r"checkpoint.pth, or evaluate this one with evaluate.py$"),
    Case("--resume pointing nowhere", TRAIN_RUN + ["--resume", "{tree}/nowhere.pth"],
         r"checkpoint {tree}/nowhere.pth does not exist"),
    Case("checkpoint without config", EVALUATE, r"checkpoint {ckpt}: 'model_config' must be a dict but the checkpoint "
         r"holds nothing; the file is damaged", edit_checkpoint("model.pth", set_item("model_config", DELETE))),
    Case("checkpoint config as a list", EVALUATE, r"checkpoint {ckpt}: 'model_config' must be a dict but the "
         r"checkpoint holds a list", edit_checkpoint("model.pth", set_item("model_config", [16, 8]))),
    Case("checkpoint weights as a list", CONVERT, r"checkpoint {ckpt}: 'model' must be a dict but the checkpoint holds "
         r"a list", edit_checkpoint("model.pth", lambda c: c.update(model=list(c["model"].values())))),
    Case("deflate-compressed checkpoint that expands 500-fold", EVALUATE,
         r"checkpoint {ckpt} would expand from 0.\d MB to 10\d MB when read .*it is damaged or hostile, so it was not "
         r"loaded", deflate_bomb),
    # ---- training state on --resume
    Case("model_best.pth of a run given to --resume", TRAIN_RUN + ["--resume", "{tree}/run/model_best.pth",
                                                                     "--model_name", "{tree}/run"],
         r"^error: {tree}/run/model_best.pth holds weights but no training state, so it cannot be resumed; resume "
         r"from the run's checkpoint.pth"),
    Case("--resume after the train captions changed", RESUME,
         r"^error: the checkpoint was trained on other data than the data found now \(train_caps.txt "
         r"changed\); resume on the data it was trained on, or pass --other_data to continue on this data anyway$",
         edit_captions(replace_line(1, b"a red cube left of a blue ball"), split="train")),
    Case("--resume after the dev split grew", RESUME, r"was trained on other data than the data found now \(dev has 5 "
         r"images, 4 before; dev has 25 captions, 20 before\)",
         lambda tree: make_synthetic(tree / "data" / NAME, **{**SIZES, "num_dev": 5}, overwrite=True)),
    Case("damaged schedule state on --resume", RESUME,
         r"training state is damaged \(the learning-rate schedule state is damaged \(last_epoch, base_lrs\)\)",
         edit_checkpoint("run/checkpoint.pth", set_item("base_lrs", ["0.1"], inside="scheduler"))),
    Case("empty optimizer state on --resume", TRAIN_RUN + ["--resume", "{tree}/run/checkpoint.pth"],
         r"{tree}/run/checkpoint.pth: its training state is damaged \(the optimizer state has no parameter groups\)",
         edit_checkpoint("run/checkpoint.pth", set_item("optimizer", {}))),
    Case("no sampler position on --resume", TRAIN_RUN + ["--resume", "{tree}/run/checkpoint.pth"],
         r"training state is damaged \(no data-order position \(sampler epoch_start and position\)\)",
         edit_checkpoint("run/checkpoint.pth", set_item("position", DELETE, inside="sampler"))),
    Case("no RNG state on --resume", TRAIN_RUN + ["--resume", "{tree}/run/checkpoint.pth"],
         r"training state is damaged \(no RNG state \(torch, numpy, python\)\), so it cannot be resumed exactly",
         edit_checkpoint("run/checkpoint.pth", set_item("rng", {}))),
    # ---- run folders
    Case("new run into a folder of another run", TRAIN,
         r"{out} already holds model_best.pth and checkpoint.pth of another run; pass --resume {out}/checkpoint.pth to "
         r"continue it, --overwrite to replace it, or another --model_name"),
    Case("--resume into a folder of another run", TRAIN_RUN + ["--resume", "{tree}/run/checkpoint.pth"],
         r"{out} already holds model_best.pth and checkpoint.pth of another run than the one resumed; pass --overwrite "
         r"to replace them, or choose another --model_name"),
    Case("training into a folder another process writes", TRAIN,
         r"^error: {out} is in use by another process \(pid \d+ on h: python sleep 60, started now\); wait for it to "
         r"end or stop it, or choose another --model_name$", hold_lock("out")),
    Case("synthetic data into a folder another process writes", SYNTHETIC,
         r"^error: {data}/synthetic_precomp is in use by another process", hold_lock("data/" + NAME)),
    # ---- sizes
    Case("10,000 regions per image with complete graphs", TRAIN + ["--dry_run"],
         r"train_ims.npy \(regions per image\) has 10,000 nodes: img_edges=full would build 100,000,000 edges per "
         r"graph \(1.5 GiB of edge index alone.*use img_edges=knn:K", many_regions(10_000)),
    Case("caption of 2,000 words with complete graphs", TRAIN + ["--dry_run"],
         r"train_caps.txt line 4 \(words\) has 2,002 nodes: txt_edges=full would build 4,008,004 edges per graph",
         edit_captions(replace_line(4, b" ".join([b"red cube"] * 1000)), split="train")),
    # ---- options
    Case("unknown layer name", TRAIN + ["--dry_run", "--img_gnn", "gat9"],
         r"img_gnn='gat9': unknown layer 'gat9'; choose one of gat, gatv2, gcn, .*hsc, hsc_geo, hsc_text, none"),
    Case("unknown edge builder", TRAIN + ["--dry_run", "--img_edges", "delaunay"],
         r"img_edges: edge spec 'delaunay' is unknown; valid: full, knn:K, none, spatial, window:K"),
    Case("non-ASCII digit as K", TRAIN + ["--dry_run", "--img_edges", "knn:²"],
         r"img_edges: edge spec 'knn:²': knn needs a positive integer K, e\.g\. knn:8; found '²'$"),
    Case("no GRU layer", TRAIN + ["--dry_run", "--gru_layers", "0"],
         r"^error: gru_layers=0 is invalid: expected an integer >= 1$"),
    Case("dropout above 1", TRAIN + ["--dry_run", "--word_dropout", "1.5"],
         r"^error: word_dropout=1\.5 is invalid: expected a finite number >= 0\.0 and < 1\.0$"),
    Case("negative layer count", TRAIN + ["--dry_run", "--img_layers", "-1"],
         r"^error: img_layers=-1 is invalid: expected an integer >= 0$"),
    Case("no reasoning step", TRAIN + ["--dry_run", "--sgr_step", "0"],
         r"^error: sgr_step=0 is invalid: expected an integer >= 1$"),
    Case("NaN margin", TRAIN + ["--dry_run", "--margin", "nan"],
         r"^error: margin=nan is invalid: expected a finite number >= 0\.0$"),
    Case("negative scorer memory", TRAIN + ["--dry_run", "--score_chunk_mb", "-5"],
         r"^error: score_chunk_mb=-5 is invalid: expected an integer >= 1$"),
    Case("a dropout the layer cannot take", TRAIN + ["--dry_run", "--txt_gnn", "gcn", "--txt_layer_dropout", "0.2"],
         r"^error: txt_gnn='gcn', txt_layer_dropout=0\.2: layer 'gcn' cannot take dropout; it accepts no arguments$"),
    Case("a string for an int in --config", TRAIN + ["--dry_run", "--config", "{tree}/c.json"],
         r"^error: {tree}/c.json: embed_size='32' is invalid: expected an integer >= 1$",
         write("c.json", b'{"embed_size": "32"}')),
    Case("null in --config", TRAIN + ["--dry_run", "--config", "{tree}/c.json"],
         r"^error: {tree}/c.json: batch_size=None is invalid: expected an integer >= 1$",
         write("c.json", b'{"batch_size": null}')),
    Case("a model too large for memory", TRAIN + ["--dry_run", "--embed_size", str(2**40)],
         r"^error: the model would need about [0-9.e+]+ GiB of float32 weights \(embed_size=1099511627776, .*\), "
         r"more than this machine's [0-9.]+ GiB of memory; lower the sizes$"),
    Case("a score-shaping option changed on --resume", TRAIN_RUN + ["--resume", str(FIXTURES / "v1_checkpoint.pth"),
                                                                    "--lambda_softmax", "9"],
         r"^error: --lambda_softmax cannot change when resuming .*v1_checkpoint.pth \(it was 4\.0\); start a new run"),
    Case("unknown similarity head", TRAIN + ["--dry_run", "--head", "cosine"],
         r"unknown similarity head 'cosine'; choose one of saf, sgr"),
    Case("batch_size larger than the dataset", TRAIN + ["--dry_run", "--batch_size", "31"],
         r"--batch_size 31 is larger than the 30 captions of {data}/synthetic_precomp/train_caps.txt; use at most 30"),
    Case("--fold5 on 4 images", EVALUATE_DATA + ["--model", "{ckpt}", "--fold5"],
         r"--fold5 splits the images into folds of 1000, but found 4 images; .*use --split testall, or drop --fold5"),
    Case("saved score matrix of the wrong shape", EVALUATE_DATA + ["--sims", "{tree}/old.npy"],
         r"--sims {tree}/old.npy has shape \[4, 25\] but synthetic_precomp/test needs \[4, 20\]",
         lambda tree: np.save(tree / "old.npy", np.zeros((4, 25), np.float32))),
    Case("synthetic grid that is not square", SYNTHETIC + ["--regions", "10"],
         r"synthetic regions must be a square grid of at least 4 x 4 \(16, 25, 36, 49, ...\), found 10"),
    Case("a --config JSON nested 200,000 deep", TRAIN + ["--dry_run", "--config", "{tree}/c.json"],
         r"^error: config file {tree}/c.json nests 200,000 levels deep", write("c.json", deep_json(200_000))),
    Case("a FIFO as --config", TRAIN + ["--dry_run", "--config", "{tree}/pipe.json"],
         r"^error: config file {tree}/pipe.json is a FIFO \(named pipe\), not a file; pass a JSON file written by "
         r"train.py", fifo("pipe.json")),
    Case("a seed of 10**30", TRAIN + ["--dry_run", "--seed", str(10**30)],
         rf"^error: .*seed.*{10**30}"),
    Case("evaluate --workers -1", EVALUATE + ["--workers", "-1"],
         r"^error: workers=-1 is invalid: expected an integer >= 0"),
    Case("search --k 0 (before the gallery is encoded)", SEARCH + ["--query", "a red cube", "--k", "0"],
         r"^error: k=0 is invalid: expected an integer >= 1"),
    Case("search with an empty query (before the gallery is encoded)", SEARCH + ["--query", "   "],
         r"^error: --query is empty; give a sentence"),
    Case("search --sheet without --image_root", SEARCH + ["--query", "a red cube", "--sheet", "{out}/s.png"],
         r"^error: --sheet \S+ draws the photos of --image_root, which is not given; add --image_root DIR"),
    Case("viz --image 999 with --image_root", VIZ + ["--image", "999", "--image_root", "{tree}"],
         r"^error: image 999 is out of range: synthetic_precomp/test has 4 images, numbered 0..3$"),
    Case("viz of a model with NaN weights", VIZ + ["--image", "0"],
         r"^error: the model has NaN or inf weights \(\S+\), so its relations cannot be drawn",
         edit_checkpoint("model.pth", nan_weight)),
    # ---- outputs written as one unit
    Case("--save_sims beside a metadata file of the user's", EVALUATE_DATA + ["--model", "{ckpt}", "--save_sims",
                                                                              "{tree}/S.npy"],
         r"^error: --save_sims \(its metadata\) {tree}/S.npy.json already exists; pass --overwrite to replace it or "
         r"choose another file$", write("S.npy.json", b'{"mine": true}\n')),
    Case("--save_sims whose metadata path is a folder", EVALUATE + ["--save_sims", "{tree}/S.npy"],
         r"^error: --save_sims \(its metadata\) {tree}/S.npy.json is a folder, not a file; choose a file name$",
         lambda tree: (tree / "S.npy.json").mkdir()),
    # ---- outputs that cannot be written (tests run as root, so chmod stops nothing: a path under a regular file)
    Case("checkpoint folder under a file", TRAIN + ["--model_name", "{tree}/notes.txt/run"],
         r"cannot write checkpoints into {tree}/notes.txt/run \({tree}/notes.txt is a file, not a folder\); choose a "
         r"writable --model_name"),
    Case("TensorBoard folder under a file, with --overwrite", TRAIN + ["--overwrite", "--logger_name",
                                                                      "{tree}/notes.txt/log"],
         r"cannot write TensorBoard logs into {tree}/notes.txt/log \({tree}/notes.txt is a file, not a folder\); "
         r"choose a writable --logger_name"),
    Case("--json under a file", EVALUATE + ["--json", "{tree}/notes.txt/report.json"],
         r"--json {tree}/notes.txt/report.json: cannot create folder {tree}/notes.txt \({tree}/notes.txt is a file, "
         r"not a folder\); choose another file"),
    Case("vocabulary --out under a file", VOCAB + ["--out", "{tree}/notes.txt/vocab.json"],
         r"cannot write {tree}/notes.txt/vocab.json \({tree}/notes.txt is a file, not a folder\); choose a writable "
         r"path"),
    Case("synthetic --out under a file", SYNTHETIC + ["--out", "{tree}/notes.txt/" + NAME],
         r"cannot write into {tree}/notes.txt/synthetic_precomp \({tree}/notes.txt is a file, not a folder\); "
         r"choose a writable --out"),
    Case("converter output under a file", CONVERT[:3] + ["{tree}/notes.txt/converted.pth"],
         r"cannot write {tree}/notes.txt/converted.pth \({tree}/notes.txt is a file, not a folder\); choose a "
         r"writable path"),
    Case("viz --out under a file", VIZ + ["--image", "0", "--out", "{tree}/notes.txt/graphs"],
         r"--out {tree}/notes.txt/graphs is not a folder it can write into \({tree}/notes.txt is a file, not a "
         r"folder\); choose another --out"),
]

#: option values refused by the one check of every value (hsc_pyg/config.py), from the places the cases above do not
#: cover: a checkpoint's model config, a --config file's key, evaluate.py's flags
CONFIG_CASES = [
    Case(f"checkpoint config embed_size {label}", EVALUATE, r"embed_size",
         edit_checkpoint("model.pth", set_item("embed_size", value, inside="model_config")))
    for label, value in (("0", 0), ("2**40", 2**40), ("as a string", "16"))
] + [
    Case(f"--config with gru_layers {label}", TRAIN + ["--dry_run", "--config", "{tree}/bad.json"], r"gru_layers",
         json_file("bad.json", {"gru_layers": value}))  # a key TRAIN does not set on the command line
    for label, value in (("\"2\"", "2"), ("null", None))
] + [
    Case(f"{flag} {value}", TRAIN + ["--dry_run", flag, value], re.escape(flag.lstrip("-")))
    for flag, value in (("--lambda_softmax", "nan"), ("--grad_clip", "nan"))
] + [
    Case("--score_chunk_mb -5", EVALUATE + ["--score_chunk_mb", "-5"], r"score_chunk_mb"),
]
CASES += CONFIG_CASES


# --------------------------------------------------------------------------- the good tree, once
@pytest.fixture(scope="module")
def good_tree(tmp_path_factory) -> Path:
    """``data/synthetic_precomp`` (tiny), ``model.pth`` (a tiny model with its vocabulary), ``notes.txt``, ``out/``
    holding the files of an earlier run under the names the commands write, and ``run/`` a resumable run (one epoch
    of 6 iterations: its checkpoint.pth and model_best.pth)."""
    tree = tmp_path_factory.mktemp("good")
    make_synthetic(tree / "data" / NAME, **SIZES)
    vocab = build_vocab(PrecompSplit.open(tree / "data", NAME, "train").captions, threshold=1)
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=len(vocab), **SMALL))
    model.vocab = vocab
    save_checkpoint(tree / "model.pth", model)
    (tree / "notes.txt").write_text("a regular file\n")
    out = tree / "out"
    (out / "graphs").mkdir(parents=True)
    for name in ("checkpoint.pth", "model_best.pth", "converted.pth"):
        shutil.copy(tree / "model.pth", out / name)
    vocab.save(out / "vocab.json")
    Config(**SMALL).save(out / "config.json")
    (out / "report.json").write_text('{"rsum": 123.4}\n')
    np.save(out / "sims.npy", np.eye(4, 20, dtype=np.float32))
    train(Config(data_path=str(tree / "data"), data_name=NAME, model_name=str(tree / "run"), batch_size=5,
                 logger_name=str(tree / "run" / "log"), vocab_threshold=1, device="cpu", **SMALL), max_iters=6)
    return tree


@pytest.fixture(scope="module")
def outcomes(good_tree, tmp_path_factory, request) -> dict[str, Outcome]:
    """Run the selected cases, concurrently."""
    return run_selected(CASES, good_tree, tmp_path_factory.mktemp("cases"), request)


@pytest.mark.parametrize("case", CASES, ids=[slug(case.name) for case in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(case, outcomes):
    assert_one_line_and_nothing_changed(case, outcomes[case.name])


def test_an_error_raised_in_a_loader_worker_keeps_its_one_line_message():
    """DataLoader raises a worker's error again as ``type(error)(worker traceback)``; the message stays one line."""
    try:
        raise DataError("train_ims.npy: image 2 has NaN or inf values; re-extract its features")
    except DataError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as raised:
        wrapper.reraise()
    assert str(raised.value) == "train_ims.npy: image 2 has NaN or inf values; re-extract its features"


# --------------------------------------------------------------------------- valid inputs that look bad
def test_caption_of_only_unknown_words_is_valid_input(good_tree, tmp_path):
    """Decision: a caption whose words are all out of the vocabulary is valid input, not an error (<start> <unk>...
    <end>): real test captions have about 1% unknown words, and refusing a whole split for one caption would help
    nobody. It is scored like any other caption."""
    tree = tmp_path / "tree"
    shutil.copytree(good_tree, tree)
    edit_captions(replace_line(1, b"zebra xylophone quokka"))(tree)
    split = PrecompSplit.open(tree / "data", NAME, "test")
    vocab = read_checkpoint(tree / "model.pth")["vocab"]["word2idx"]
    assert not any(word in vocab for word in split.captions[0].split())
    result = subprocess.run([sys.executable, *(fill(a, tree) for a in EVALUATE)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr
    report = json.loads((tree / "out" / "report.json").read_text())
    assert (report["num_images"], report["num_captions"]) == (4, 20)
    assert 0 <= report["metrics"]["rsum"] <= 600
    assert np.isfinite(np.load(tree / "out" / "sims.npy")).all()


# --------------------------------------------------------------------------- full disk, in each command
sys.path.insert(0, str(ROOT))
import evaluate as evaluate_cli  # noqa: E402  (the command lines at the project root)
import train as train_cli  # noqa: E402
from hsc_pyg.cli import convert as convert_cli, synthetic as synthetic_cli, viz as viz_cli, vocab as vocab_cli  # noqa: E402

#: command -> (its main, its argv after "python"); each writes over files of out/ (or the dataset)
FULL_DISK = {
    "train": (train_cli.main, TRAIN + ["--overwrite", "--max_iters", "2"]),
    "evaluate": (evaluate_cli.main, EVALUATE),
    "viz": (viz_cli.main, VIZ + ["--image", "0", "--overwrite"]),
    "vocab": (vocab_cli.main, VOCAB),
    "synthetic": (synthetic_cli.main, SYNTHETIC),
    "convert": (convert_cli.main, CONVERT),
}


@pytest.mark.parametrize("command", list(FULL_DISK))
def test_a_full_disk_is_one_line_and_changes_nothing(command, good_tree, tmp_path, monkeypatch, capsys):
    """ENOSPC at the first file synced to disk (where a full disk shows up with delayed allocation)."""
    main, argv = FULL_DISK[command]
    tree = tmp_path / "tree"
    shutil.copytree(good_tree, tree)
    args = [fill(a, tree) for a in argv[argv.index("-m") + 2 if "-m" in argv else 1:]]
    if command == "viz":  # pictures to replace
        assert main(args) == 0
    before = snapshot(tree)
    capsys.readouterr()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    status = main(args)
    monkeypatch.undo()
    lines = capsys.readouterr().err.splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert re.fullmatch(r"error: cannot write \S+ \(No space left on device(: \S+)?\); the previous (file|folder), if any, "
                        r"is intact; free disk space or choose another path", lines[0]), lines[0]
    assert snapshot(tree) == before


# --------------------------------------------------------------------------- stop signals through the command line
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                            pytest.param(signal.SIGUSR1, 138, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM", "SIGUSR1"])
def test_a_stop_signal_saves_a_resumable_checkpoint_and_exits_128_plus_its_number(good_tree, tmp_path, signum,
                                                                                   status):
    tree = tmp_path / "tree"
    shutil.copytree(good_tree, tree, ignore=shutil.ignore_patterns("out"))
    argv = [fill(a, tree) for a in TRAIN] + ["--num_epochs", "1000", "--val_step", "1000"]
    process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        first = process.stdout.readline()  # printed once everything is built, before the first step
        assert "parameters" in first, first + process.stderr.read()
        time.sleep(1.0)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status, stderr
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    match = re.fullmatch(rf"interrupted{by} at iteration (\d+): saved (\S+); continue with --resume (\S+)\n", stderr)
    assert match and match.group(2) == match.group(3) == str(tree / "out" / "checkpoint.pth"), stderr
    saved = read_checkpoint(tree / "out" / "checkpoint.pth")
    assert saved["iteration"] == int(match.group(1))
    assert {"optimizer", "scheduler", "rng", "sampler"} <= set(saved)
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    # `python -m hsc_pyg.ablate ... --dry_run | head` printed a BrokenPipeError traceback
    script = ("from hsc_pyg.cli.common import exit_with\n"
              "def main():\n"
              "    for i in range(200000):\n"
              "        print('line', i)\n"
              "    return 0\n"
              "exit_with(main)\n")
    reader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[1])
    assert reader.stdout.readline() == b"line 0\n"
    reader.stdout.close()                    # the reader stops, as head does
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=60) == 128 + signal.SIGPIPE
    assert err == ""
