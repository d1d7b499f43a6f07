"""Captions importers: small files in each format, written here, -> {split}_caps.txt aligned with {split}_ids.txt."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hsc_pyg.data.importers import clean_caption, import_captions, read_csv, read_karpathy
from hsc_pyg.data.precomp import read_lines
from hsc_pyg.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def caps(photo: str, count: int) -> list[str]:
    return [f"{photo} caption {k}" for k in range(count)]


def karpathy(dataset: str, images: list[tuple[str, str, int]], filepath: str = "") -> dict:
    """Karpathy's layout: (filename, split, number of sentences) per image."""
    return dict(dataset=dataset, images=[
        dict(filepath=filepath, filename=name, split=split, imgid=i,
             sentences=[dict(raw=text, tokens=text.lower().split(), imgid=i) for text in caps(name, n)])
        for i, (name, split, n) in enumerate(images)])


def lines(path: Path) -> list[str]:
    return read_lines(path)


def test_karpathy_flickr_uses_scan_split_names(tmp_path):
    """train + restval -> train, val -> dev, test -> test; photos sorted by name; 5 captions each."""
    data = karpathy("flickr30k", [("b.jpg", "train", 5), ("a.jpg", "restval", 5), ("c.jpg", "val", 5),
                                  ("d.jpg", "test", 5)])
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    reports = import_captions(tmp_path / "dataset_flickr30k.json", tmp_path / "out")
    assert {r.split: r.photos for r in reports} == {"train": 2, "dev": 1, "test": 1}
    assert lines(tmp_path / "out" / "train_ids.txt") == ["a.jpg", "b.jpg"]
    assert lines(tmp_path / "out" / "train_caps.txt") == caps("a.jpg", 5) + caps("b.jpg", 5)
    assert lines(tmp_path / "out" / "dev_caps.txt") == caps("c.jpg", 5)
    assert lines(tmp_path / "out" / "test_ids.txt") == ["d.jpg"]


def test_karpathy_coco_test_is_testall_ids_carry_the_folder_and_the_first_5_are_kept(tmp_path):
    """COCO's photos with 6 or 7 captions keep the first 5 (as SCAN); test -> testall; ids are filepath/filename."""
    data = karpathy("coco", [("COCO_val2014_1.jpg", "test", 7), ("COCO_val2014_2.jpg", "test", 5),
                             ("COCO_val2014_3.jpg", "val", 6)], filepath="val2014")
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    reports = import_captions(tmp_path / "dataset_coco.json", tmp_path / "out")
    assert {r.split: (r.photos, r.trimmed) for r in reports} == {"testall": (2, 1), "dev": (1, 1)}
    assert lines(tmp_path / "out" / "testall_ids.txt") == ["val2014/COCO_val2014_1.jpg", "val2014/COCO_val2014_2.jpg"]
    assert lines(tmp_path / "out" / "testall_caps.txt") == (caps("COCO_val2014_1.jpg", 5)
                                                            + caps("COCO_val2014_2.jpg", 5))
    assert not (tmp_path / "out" / "test_caps.txt").exists()


def test_karpathy_one_split_only(tmp_path):
    data = karpathy("flickr8k", [("a.jpg", "train", 5), ("b.jpg", "test", 5)])
    (tmp_path / "k.json").write_text(json.dumps(data))
    reports = import_captions(tmp_path / "k.json", tmp_path / "out", split="test")
    assert [r.split for r in reports] == ["test"] and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "test_caps.txt", "test_ids.txt"]


def test_coco_captions_json(tmp_path):
    data = dict(images=[dict(id=7, file_name="COCO_val2014_7.jpg"), dict(id=3, file_name="COCO_val2014_3.jpg")],
                annotations=[dict(image_id=i, id=k, caption=text) for k, (i, text) in enumerate(
                    [(7, f"seven {n}") for n in range(5)] + [(3, f"three {n}\n") for n in range(6)])])
    (tmp_path / "captions_val2014.json").write_text(json.dumps(data))
    (report,) = import_captions(tmp_path / "captions_val2014.json", tmp_path / "out", split="dev")
    assert (report.photos, report.trimmed) == (2, 1)
    assert lines(tmp_path / "out" / "dev_ids.txt") == ["COCO_val2014_3.jpg", "COCO_val2014_7.jpg"]
    assert lines(tmp_path / "out" / "dev_caps.txt") == [f"three {n}" for n in range(5)] + [f"seven {n}"
                                                                                          for n in range(5)]


def test_csv_with_quotes_header_and_whitespace(tmp_path):
    """The Flickr8k captions.txt: header image,caption; a caption holding a comma is quoted; whitespace runs (a line
    break included) become one space."""
    rows = ["image,caption"] + [f"b.jpg,b {k} ." for k in range(5)] + [f'a.jpg,"a {k}, with a comma"'
                                                                       for k in range(4)]
    rows.append('a.jpg,"two\n  lines  "')
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n")
    assert read_csv(tmp_path / "captions.txt")["a.jpg"][-1] == "two lines"
    import_captions(tmp_path / "captions.txt", tmp_path / "out", split="test", fmt="csv")
    assert lines(tmp_path / "out" / "test_caps.txt") == [f"a {k}, with a comma" for k in range(4)] + [
        "two lines"] + [f"b {k} ." for k in range(5)]


def test_txt_per_photo_beside_the_photos(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("x.jpg", "y.png"):
        (photos / name).write_bytes(b"not read")
        (photos / f"{Path(name).stem}.txt").write_text("\n".join(caps(name, 5)) + "\n\n")
    import_captions(photos, tmp_path / "out", split="train")
    assert lines(tmp_path / "out" / "train_ids.txt") == ["x.jpg", "y.png"]
    assert lines(tmp_path / "out" / "train_caps.txt") == caps("x.jpg", 5) + caps("y.png", 5)


def test_captions_follow_existing_ids_and_fewer_can_repeat(tmp_path):
    """Features first: {split}_ids.txt exists, the captions follow its order; a photo with 2 captions is an error,
    or with fewer='repeat' its captions are cycled (c0 c1 c0 c1 c0)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "test_ids.txt").write_text("z.jpg\na.jpg\n")
    rows = [f"a.jpg,{t}" for t in caps("a.jpg", 5)] + [f"z.jpg,{t}" for t in caps("z.jpg", 2)]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"^1 photos have fewer than 5 captions: 'z.jpg \(2\)'; write more, or pass "
                                        r"--fewer repeat"):
        import_captions(tmp_path / "c.csv", out, split="test")
    (report,) = import_captions(tmp_path / "c.csv", out, split="test", fewer="repeat")
    assert (report.repeated, report.wrote_ids) == (1, False)
    z = caps("z.jpg", 2)
    assert lines(out / "test_caps.txt") == [z[0], z[1], z[0], z[1], z[0]] + caps("a.jpg", 5)
    assert (out / "test_ids.txt").read_text() == "z.jpg\na.jpg\n"


def test_extra_captions_are_an_error_or_left_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "test_ids.txt").write_text("a.jpg\n")
    rows = [f"{p},{t}" for p in ("a.jpg", "b.jpg") for t in caps(p, 5)]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"1 captioned photos are not in .*test_ids.txt: 'b.jpg'; .*--ignore_extra"):
        import_captions(tmp_path / "c.csv", out, split="test")
    (report,) = import_captions(tmp_path / "c.csv", out, split="test", ignore_extra=True)
    assert report.extra == 1 and lines(out / "test_caps.txt") == caps("a.jpg", 5)


def test_existing_captions_are_not_replaced_without_overwrite(tmp_path):
    (tmp_path / "c.csv").write_text("".join(f"a.jpg,{t}\n" for t in caps("a.jpg", 5)))
    import_captions(tmp_path / "c.csv", tmp_path / "out", split="test")
    import_captions(tmp_path / "c.csv", tmp_path / "out", split="test")  # same content: fine
    (tmp_path / "c.csv").write_text("".join(f"a.jpg,{t}\n" for t in caps("A", 5)))
    with pytest.raises(ConfigError, match=r"test_caps.txt already exists with other captions; pass --overwrite"):
        import_captions(tmp_path / "c.csv", tmp_path / "out", split="test")
    import_captions(tmp_path / "c.csv", tmp_path / "out", split="test", overwrite=True)
    assert lines(tmp_path / "out" / "test_caps.txt") == caps("A", 5)


def test_clean_caption_and_karpathy_duplicates():
    assert clean_caption("  A dog\truns\r\n fast . ") == "A dog runs fast ."
    assert clean_caption("Unchanged \" ADHD \" quotes .") == 'Unchanged " ADHD " quotes .'


def test_duplicate_photo_in_karpathy_json(tmp_path):
    data = karpathy("flickr8k", [("a.jpg", "train", 5), ("a.jpg", "test", 5)])
    (tmp_path / "k.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"photo 'a.jpg' appears twice \(images\[1\]\); remove the duplicate"):
        read_karpathy(tmp_path / "k.json")


def test_command_line_reports_what_it_wrote(tmp_path):
    (tmp_path / "c.csv").write_text("image,caption\n" + "".join(f"a.jpg,{t}\n" for t in caps("a.jpg", 6)))
    result = subprocess.run([sys.executable, "-m", "hsc_pyg.cli.import_captions", "--captions",
                             str(tmp_path / "c.csv"), "--split", "dev", "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"{tmp_path / 'out'}/dev_caps.txt: 1 photos x 5 captions; 1 photos had more than 5 "
                             "(first 5 kept); wrote dev_ids.txt\n")


# --------------------------------------------------------------------------- split lists (the official Flickr8k split)
def _flickr_like(tmp_path: Path) -> dict[str, Path]:
    """Captions of 6 photos (CSV with header, grouped by photo); lists: train d, a, f (not sorted), dev c, test b;
    photo e in no list."""
    photos = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]
    (tmp_path / "captions.csv").write_text("image,caption\n" + "".join(f"{p},{t}\n" for p in photos
                                                                     for t in caps(p, 5)))
    lists = {"train": ["d.jpg", "a.jpg", "f.jpg"], "dev": ["c.jpg"], "test": ["b.jpg"]}
    for name, names in lists.items():
        (tmp_path / f"{name}_images.txt").write_text("".join(n + "\n" for n in names))
    return {name: tmp_path / f"{name}_images.txt" for name in lists}


def test_split_lists_give_each_split_its_photos_in_list_order_and_leave_out_the_unlisted(tmp_path):
    lists = _flickr_like(tmp_path)
    reports = import_captions(tmp_path / "captions.csv", tmp_path / "out", split_lists=lists)
    assert [(r.split, r.photos, r.unlisted, r.wrote_ids) for r in reports] == [
        ("train", 3, 1, True), ("dev", 1, 1, True), ("test", 1, 1, True)]
    out = tmp_path / "out"
    assert lines(out / "train_ids.txt") == ["d.jpg", "a.jpg", "f.jpg"]
    assert lines(out / "train_caps.txt") == caps("d.jpg", 5) + caps("a.jpg", 5) + caps("f.jpg", 5)
    assert lines(out / "dev_caps.txt") == caps("c.jpg", 5) and lines(out / "test_ids.txt") == ["b.jpg"]
    assert not any("e.jpg" in (out / f).read_text() for f in ("train_caps.txt", "dev_caps.txt", "test_caps.txt"))
    # features extracted first (another order): the captions follow test_ids.txt, the list only selects
    (out / "train_ids.txt").write_text("a.jpg\nd.jpg\nf.jpg\n")
    import_captions(tmp_path / "captions.csv", out, split_lists=lists, overwrite=True)
    assert lines(out / "train_caps.txt") == caps("a.jpg", 5) + caps("d.jpg", 5) + caps("f.jpg", 5)


def test_split_lists_errors_leave_nothing_written(tmp_path):
    lists = _flickr_like(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "test_images.txt").write_text("b.jpg\na.jpg\n")  # a.jpg is in train too
    with pytest.raises(DataError, match=r"^photo 'a.jpg' is in the split lists of both train and test .*disjoint"):
        import_captions(tmp_path / "captions.csv", out, split_lists=lists)
    (tmp_path / "test_images.txt").write_text("b.jpg\nz.jpg\n")  # z.jpg has no caption
    with pytest.raises(DataError, match=r"^1 photos of the split list .*test_images.txt have no caption: 'z.jpg'"):
        import_captions(tmp_path / "captions.csv", out, split_lists=lists)
    assert not out.exists()
    (tmp_path / "test_images.txt").write_text("b.jpg\n")
    with pytest.raises(ConfigError, match=r"^--split_list cannot go with --split"):
        import_captions(tmp_path / "captions.csv", out, split="test", split_lists=lists)
    with pytest.raises(ConfigError, match=r"^--split_list a/b=.*: 'a/b' is not a split name"):
        import_captions(tmp_path / "captions.csv", out, split_lists={"a/b": lists["test"]})
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"^4 listed photos are not in .*photos: 'd.jpg', 'a.jpg', 'f.jpg' and 1 more"):
        import_captions(tmp_path / "captions.csv", out, split_lists=lists, images=tmp_path / "photos")
    assert not out.exists()


def test_command_line_split_lists(tmp_path):
    lists = _flickr_like(tmp_path)
    command = [sys.executable, "-m", "hsc_pyg.cli.import_captions", "--captions", str(tmp_path / "captions.csv"),
               "--out", str(tmp_path / "out")] + [a for name, path in lists.items()
                                                   for a in ("--split_list", f"{name}={path}")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (f"{tmp_path / 'out'}/train_caps.txt: 3 photos x 5 captions; captions of "
                                             "1 photos in no split list left out; wrote train_ids.txt")
    bad = subprocess.run(command + ["--split_list", "dev"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected NAME=FILE" in bad.stderr


def test_make_flickr8k_builds_the_precomp_folder_and_then_has_nothing_to_do(tmp_path):
    """The Makefile's flickr8k target on a tiny Flickr8k-like folder (6 photos, 3 lists, one photo in none): captions
    in list order, then each split's features in that order; a second make has nothing to do."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the features extra is not installed")
    from PIL import Image
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    photos = tmp_path / "flickr8k"
    photos.mkdir()
    _flickr_like(photos)
    (photos / "images").mkdir()
    for k, name in enumerate("abcdef"):
        Image.new("RGB", (40, 40), (40 * k, 255 - 40 * k, 90)).save(photos / "images" / f"{name}.jpg")
    stamp = tmp_path / "installed"
    stamp.touch()  # newer than pyproject.toml: make installs nothing
    out = tmp_path / "out"
    command = ["make", "-s", "flickr8k", f"PY={sys.executable}", f"STAMP={stamp}", f"F8K_PHOTOS={photos}",
               f"F8K={out}", "F8K_FEATURES=--size 64 --grid 2 --no_progress"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert lines(out / "train_ids.txt") == ["d.jpg", "a.jpg", "f.jpg"]
    for split, count in (("train", 3), ("dev", 1), ("test", 1)):
        assert np.load(out / f"{split}_ims.npy").shape == (count, 4, 1280)
        identity = json.loads((out / f"{split}_features.json").read_text())["identity"]
        assert (identity["backbone"], identity["normalize"], identity["size"]) == ("efficientnet_lite0", "tf_lite", 64)
    again = subprocess.run(command[:1] + ["flickr8k"] + command[3:], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "Nothing to be done for 'flickr8k'" in again.stdout, again.stdout + again.stderr
