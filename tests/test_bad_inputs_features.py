"""The bad-input corpus of the photo and caption importers: ``python -m hsc_pyg.features`` and ``python -m
hsc_pyg.cli.import_captions``, fed a broken input, exit with status 2 and one line on stderr that says what is wrong,
where and how to fix it, and leave every existing file as it was (and write none that looks finished).

Same harness as tests/test_bad_inputs.py: each case copies one good tree (three photos, their captions as a CSV, an
output folder holding another extraction), breaks one thing in its copy, runs the real command line in a subprocess
and compares every file of the tree before and after.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

pytest.importorskip("PIL", reason="the features extra (pip install -e '.[features]') is not installed")
pytest.importorskip("efficientnet_lite_pytorch", reason="the features extra (pip install -e '.[features]') is not "
                    "installed")
from PIL import Image  # noqa: E402
from corpus import (Case, Outcome, assert_one_line_and_nothing_changed, hold_lock, run_selected, slug,  # noqa: E402
                    write)

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ["-m", "hsc_pyg.features", "--images", "{tree}/photos", "--out", "{tree}/new", "--split", "test", "--size",
            "32", "--grid", "2", "--device", "cpu", "--no_progress"]
CAPTIONS = ["-m", "hsc_pyg.cli.import_captions", "--captions", "{tree}/captions.csv", "--split", "test", "--out",
            "{tree}/new"]
PHOTOS = ["a.jpg", "b.jpg", "c.jpg"]


# --------------------------------------------------------------------------- ways to break the good tree

def truncated(name: str) -> Callable[[Path], bytes]:
    return lambda tree: (tree / name).read_bytes()[: (tree / name).stat().st_size * 2 // 3]


def garbage_header(name: str) -> Callable[[Path], bytes]:
    return lambda tree: b"\x00" * 64 + (tree / name).read_bytes()[64:]


def bomb_png(side: int) -> Callable[[Path], bytes]:
    """A valid 1-bit ``side x side`` PNG of one colour (20,000: about 60 KB; 400 megapixels when decoded)."""
    return lambda tree: _one_colour_png(side)


def _one_colour_png(side: int) -> bytes:
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)  # filter byte 0, then 2,500 bytes of black pixels
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def caption_rows(tree: Path) -> str:
    return (tree / "captions.csv").read_text()


KARPATHY = CAPTIONS[:3] + ["{tree}/dataset_flickr8k.json", "--out", "{tree}/new", "--split", "test"]
COCO = CAPTIONS[:3] + ["{tree}/captions_val.json", "--out", "{tree}/new", "--split", "test", "--format", "coco"]


def karpathy(changes: list[dict]) -> Callable[[Path], None]:
    """dataset_flickr8k.json: one test image per change, each a good image with ``change`` applied."""
    images = [{**dict(filename=f"p{n}.jpg", split="test", sentences=[dict(raw="a dog .")] * 5), **change}
              for n, change in enumerate(changes)]
    return write("dataset_flickr8k.json", json.dumps(dict(dataset="flickr8k", images=images)).encode())


def coco(images: list[dict] | None = None, annotations: list[dict] | None = None) -> Callable[[Path], None]:
    """captions_val.json: a good image 1 and its annotation, unless replaced."""
    data = dict(images=images or [dict(id=1, file_name="a.jpg")],
                annotations=annotations or [dict(image_id=1, caption="a dog")])
    return write("captions_val.json", json.dumps(data).encode())


def unfinished_other_extraction(tree: Path) -> None:
    (tree / "new").mkdir()
    identity = dict(format="hsc_pyg.features", version=1, backbone="resnet152",
                    weights="ResNet152_Weights.IMAGENET1K_V2", size=32, grid=2, dtype="float16", dim=2048,
                    num_photos=3, ids_sha256="0" * 64)
    state = dict(identity=identity, rows_done=1, skipped={})
    (tree / "new" / "test_features.partial.json").write_text(json.dumps(state))
    (tree / "new" / "test_ims.npy.partial").write_bytes(b"\x00" * 128)


CASES = [
    # ---- photos
    Case("truncated JPEG", FEATURES, r"photo {tree}/photos/a.jpg cannot be decoded \(image file is truncated.*\); "
         r"replace it or leave it out \(--skip_bad\)$", write("photos/a.jpg", truncated("photos/a.jpg"))),
    Case("corrupt JPEG header", FEATURES, r"photo {tree}/photos/b.jpg is not an image Pillow can read \(JPEG, PNG, "
         r"WebP, GIF, BMP, TIFF\); replace it or leave it out \(--skip_bad\)$",
         write("photos/b.jpg", garbage_header("photos/b.jpg"))),
    Case("zero-byte photo", FEATURES, r"photo {tree}/photos/c.jpg is an empty file \(0 bytes\); replace it or leave "
         r"it out \(--skip_bad\)$", write("photos/c.jpg", b"")),
    Case("text file named .jpg", FEATURES, r"photo {tree}/photos/notes.jpg is not an image Pillow can read",
         write("photos/notes.jpg", b"shopping list: milk, eggs\n")),
    Case("decompression bomb PNG", FEATURES, r"photo {tree}/photos/huge.png has 400,000,000 pixels, over the limit "
         r"of 89,478,485 \(Pillow's decompression-bomb threshold\); shrink it .* or leave it out \(--skip_bad\)$",
         write("photos/huge.png", bomb_png(20_000))),
    Case("13,000 x 13,000 PNG (under Pillow's own error, 0.7 GB decoded)", FEATURES,
         r"photo {tree}/photos/huge.png has 169,000,000 pixels, over the limit of 89,478,485",
         write("photos/huge.png", bomb_png(13_000))),
    Case("photo name holding a line break", FEATURES, r"photo folder {tree}/photos: photo name 'a\\nb.jpg' holds the "
         r"control character '\\n', which {{split}}_ids.txt \(one name a line\) cannot hold; rename the photo$",
         lambda tree: shutil.copy(tree / "photos" / "a.jpg", tree / "photos" / "a\nb.jpg")),
    Case("--list naming a photo outside the folder", FEATURES + ["--list", "{tree}/list.txt"],
         r"{tree}/list.txt: photo name '../notes.txt' is not a relative path inside the photo folder",
         write("list.txt", b"a.jpg\n../notes.txt\n")),
    Case("two bad photos are counted", FEATURES, r"photo {tree}/photos/a.jpg is an empty file \(0 bytes\); .*\(and 1 "
         r"more photos that cannot be read\)$", lambda tree: [write(f"photos/{n}", b"")(tree) for n in PHOTOS[:2]]),
    Case("duplicate id in --list", FEATURES + ["--list", "{tree}/list.txt"],
         r"{tree}/list.txt line 3 repeats photo 'a.jpg' \(first on line 1\); each photo is one row: remove the "
         r"duplicate$", write("list.txt", b"a.jpg\nb.jpg\na.jpg\n")),
    Case("--list names a photo that is not there", FEATURES + ["--list", "{tree}/list.txt"],
         r"{tree}/list.txt names photos that are not in {tree}/photos: 'd.jpg'; fix the list or --images$",
         write("list.txt", b"a.jpg\nd.jpg\n")),
    Case("photo folder missing", FEATURES + ["--images", "{tree}/nowhere"],
         r"photo folder {tree}/nowhere does not exist or is not a folder; pass --images DIR$"),
    Case("photo folder without photos", FEATURES + ["--images", "{tree}/new_empty"],
         r"photo folder {tree}/new_empty holds no photos \(.jpg, .jpeg, .png.*\); pass the folder that holds them$",
         lambda tree: (tree / "new_empty").mkdir()),
    # ---- the output folder
    Case("output folder holds other features", FEATURES + ["--out", "{tree}/out"],
         r"{tree}/out already holds test_ims.npy \(features from elsewhere\); pass --overwrite to replace it, or "
         r"choose another --out or --split$"),
    Case("output folder holds an unfinished other extraction", FEATURES,
         r"{tree}/new holds an unfinished extraction of split test that differs \(backbone 'resnet152' here, "
         r"'efficientnet_lite0' now.*\); run it again with its options to resume it, or pass --overwrite",
         unfinished_other_extraction),
    Case("--out under a file", FEATURES + ["--out", "{tree}/notes.txt/new"],
         r"cannot write into {tree}/notes.txt/new \({tree}/notes.txt is a file, not a folder\); choose a writable "
         r"--out$"),
    # ---- options
    Case("unknown backbone", FEATURES + ["--backbone", "vgg16"],
         r"unknown backbone 'vgg16'; choose one of convnext_base, .*efficientnet_lite0, .*resnet152"),
    Case("grid of 0", FEATURES + ["--grid", "0"], r"argument --grid: expected an integer >= 1, got 0"),
    Case("grid of 100,000", FEATURES + ["--grid", "100000"], r"--grid must be an integer from 1 to 32, found 100000$"),
    Case("size of 100,000", FEATURES + ["--size", "100000"], r"--size must be an integer from 32 to 2048, found "
         r"100000$"),
    Case("negative workers", FEATURES + ["--workers", "-1"], r"argument --workers: expected an integer >= 0 and < 257, "
         r"got -1"),
    Case("split name leaving --out", FEATURES + ["--split", "../../evil"], r"--split '../../evil' is not a split "
         r"name; use a plain name such as train, dev or test$"),
    Case("output folder in use by another extraction", FEATURES + ["--out", "{tree}/out"],
         r"^error: {tree}/out is in use by another process \(pid \d+ on \S+: .*sleep.*, started \S+\); wait for it "
         r"to end or stop it, or choose another --out$", hold_lock("out")),
    # ---- captions
    Case("captions for a photo that does not exist", CAPTIONS + ["--images", "{tree}/photos"],
         r"1 captioned photos are not in photo folder {tree}/photos: 'zebra.jpg'; fix the captions file, or pass "
         r"--ignore_extra", write("captions.csv", lambda t: (caption_rows(t) + "zebra.jpg,a zebra .\n").encode())),
    Case("a photo without captions", CAPTIONS + ["--images", "{tree}/photos"],
         r"1 photos of photo folder {tree}/photos have no caption: 'd.jpg'; write captions for them",
         lambda tree: shutil.copy(tree / "photos" / "a.jpg", tree / "photos" / "d.jpg")),
    Case("a photo with 4 captions", CAPTIONS, r"1 photos have fewer than 5 captions: 'b.jpg \(4\)'; write more, or "
         r"pass --fewer repeat to cycle their captions$",
         write("captions.csv", lambda t: caption_rows(t).replace("b.jpg,b 4 .\n", "").encode())),
    Case("non-UTF-8 caption", CAPTIONS, r"{tree}/captions.csv line 3 is not valid UTF-8 \(byte 0xe9\); re-save the "
         r"file as UTF-8$", write("captions.csv", lambda t: caption_rows(t).replace("a 1 .", "a caf\xe9 .").encode(
             "latin-1"))),
    Case("duplicate photo in Karpathy JSON", CAPTIONS[:3] + ["{tree}/dataset_flickr8k.json", "--out", "{tree}/new"],
         r"{tree}/dataset_flickr8k.json: photo 'a.jpg' appears twice \(images\[1\]\); remove the duplicate$",
         write("dataset_flickr8k.json", json.dumps(dict(dataset="flickr8k", images=[
             dict(filename="a.jpg", split=s, sentences=[dict(raw="a dog .")] * 5) for s in ("train", "test")
         ])).encode())),
    Case("CSV row without a caption", CAPTIONS, r"{tree}/captions.csv line 4: expected image,caption, found 1 column",
         write("captions.csv", lambda t: caption_rows(t).replace("a.jpg,a 2 .", "a.jpg").encode())),
    Case("captions already imported, different", CAPTIONS + ["--out", "{tree}/out"],
         r"{tree}/out/test_caps.txt already exists with other captions; pass --overwrite to replace it",
         write("out/test_caps.txt", b"other\n" * 15)),
    Case("captions split name leaving --out", CAPTIONS + ["--split", "../../evil"],
         r"--split '../../evil' is not a split name; use a plain name such as train, dev or test$"),
    Case("CSV photo name holding a line break (a quoted field)", CAPTIONS,
         r"{tree}/captions.csv line \d+: photo name 'a\\nb.jpg' holds the control character '\\n'",
         write("captions.csv", lambda t: (caption_rows(t) + '"a\nb.jpg",a dog .\n').encode())),
    Case("CSV photo name with ..", CAPTIONS, r"{tree}/captions.csv line \d+: photo name '../../etc/x.jpg' is not a "
         r"relative path inside the photo folder", write("captions.csv", lambda t: (caption_rows(t) + "../../etc/x.jpg,"
                                                                                     "a dog .\n").encode())),
    Case("Karpathy photo name holding a line break", KARPATHY, r"dataset_flickr8k.json images\[0\]: photo name "
         r"'a\\nb.jpg' holds the control character", karpathy([dict(filename="a\nb.jpg")])),
    Case("Karpathy photo name holding a NUL", KARPATHY, r"photo name 'a\\x00.jpg' holds the control character",
         karpathy([dict(filename="a\x00.jpg")])),
    Case("Karpathy file name as a number", KARPATHY, r"dataset_flickr8k.json: images\[0\].filename is a number, not "
         r"text; expected Karpathy's layout$", karpathy([dict(filename=1234)])),
    Case("Karpathy split as a list", KARPATHY, r"dataset_flickr8k.json: images\[0\].split is a list, not text",
         karpathy([dict(split=["test"])])),
    Case("Karpathy sentences as a number", KARPATHY, r"images\[0\] lacks filename, split or sentences\[\].raw",
         karpathy([dict(sentences=5)])),
    Case("COCO file_name as a number", COCO, r"captions_val.json: images\[0\] lacks id or file_name \(text\)$",
         coco(images=[dict(id=1, file_name=7)])),
    Case("COCO image id as a list", COCO, r"captions_val.json: images\[0\].id is a list; expected a number or text$",
         coco(images=[dict(id=[1], file_name="a.jpg")])),
    Case("COCO annotation image_id as a list", COCO, r"annotations\[0\].image_id is a list; expected the id of one "
         r"of images$", coco(annotations=[dict(image_id=[1], caption="a dog")])),
    Case("captions JSON nested 200,000 deep", CAPTIONS[:3] + ["{tree}/deep.json", "--out", "{tree}/new", "--split",
                                                              "test"],
         r"captions file {tree}/deep.json nests 200,000 levels deep, more than the 100 that any JSON file of hsc_pyg "
         r"needs; it is damaged or hostile, so it was not read$", write("deep.json", b"[" * 200_000 + b"]" * 200_000)),
    Case("Karpathy JSON nested 200,000 deep", KARPATHY[:3] + ["{tree}/deep.json"] + KARPATHY[4:] + ["--format",
                                                                                                    "karpathy"],
         r"nests 200,001 levels deep", write("deep.json", b'{"images": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")),
    Case("captions file that is a folder, as --format coco", CAPTIONS[:3] + ["{tree}/photos", "--format", "coco",
                                                                           "--split", "test", "--out", "{tree}/new"],
         r"captions file {tree}/photos is a folder, not a file; check --captions$"),
    Case("captions output folder in use", CAPTIONS + ["--out", "{tree}/out"],
         r"^error: {tree}/out is in use by another process \(pid \d+", hold_lock("out")),
    Case("unknown caption format", CAPTIONS[:3] + ["{tree}/notes.json", "--out", "{tree}/new", "--split", "test"],
         r"cannot tell the format of {tree}/notes.json; pass --format karpathy, coco, csv or txt$",
         write("notes.json", b'{"hello": 1}')),
]


# --------------------------------------------------------------------------- the good tree, once
@pytest.fixture(scope="module")
def good_tree(tmp_path_factory) -> Path:
    """``photos/`` (three 64 x 64 JPEGs), ``captions.csv`` (5 each), ``notes.txt``, and ``out/`` holding another
    extraction (``test_ims.npy``, ``test_ids.txt``)."""
    tree = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    (tree / "photos").mkdir()
    for name in PHOTOS:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tree / "photos" / name, quality=90)
    (tree / "captions.csv").write_text("image,caption\n" + "".join(f"{n},{n[0]} {k} .\n" for n in PHOTOS
                                                                   for k in range(5)))
    (tree / "notes.txt").write_text("a regular file\n")
    (tree / "out").mkdir()
    np.save(tree / "out" / "test_ims.npy", np.zeros((3, 4, 8), np.float32))
    (tree / "out" / "test_ids.txt").write_text("".join(n + "\n" for n in PHOTOS))
    return tree


@pytest.fixture(scope="module")
def outcomes(good_tree, tmp_path_factory, request) -> dict[str, Outcome]:
    """Run the selected cases, concurrently."""
    return run_selected(CASES, good_tree, tmp_path_factory.mktemp("cases"), request)


@pytest.mark.parametrize("case", CASES, ids=[slug(case.name) for case in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(case, outcomes):
    assert_one_line_and_nothing_changed(case, outcomes[case.name])


def test_a_bad_photo_after_some_rows_keeps_them_resumable_and_nothing_looks_finished(good_tree, tmp_path):
    """c.jpg truncated, batches of 1: a.jpg and b.jpg are done; the run stops with status 2, test_ims.npy does not
    exist, the state records 2 rows; the same command with --skip_bad resumes there and lists c.jpg."""
    tree = tmp_path / "tree"
    shutil.copytree(good_tree, tree)
    write("photos/c.jpg", truncated("photos/c.jpg"))(tree)
    command = [sys.executable, *(a.format(tree=tree) for a in FEATURES), "--batch_size", "1"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 2, first.stderr
    assert re.fullmatch(r"error: photo \S+/c.jpg cannot be decoded \(image file is truncated.*\); replace it or leave "
                        r"it out \(--skip_bad\); the 2 photos before it are kept: run the same command again to "
                        r"resume\n", first.stderr), first.stderr
    assert sorted(p.name for p in (tree / "new").iterdir()) == ["test_features.partial.json", "test_ims.npy.partial"]
    assert json.loads((tree / "new" / "test_features.partial.json").read_text())["rows_done"] == 2
    second = subprocess.run(command + ["--skip_bad"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resumed at photo 2" in second.stdout and "1 photos left out" in second.stdout
    assert (tree / "new" / "test_ids.txt").read_text() == "a.jpg\nb.jpg\n"
    assert np.load(tree / "new" / "test_ims.npy").shape == (2, 4, 1280)
    assert (tree / "new" / "test_skipped.txt").read_text().startswith("c.jpg\tphoto ")
