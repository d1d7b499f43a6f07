"""The built-in dataset: format, determinism, twins whose captions differ by a relation or swapped colours."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from hsc_pyg.data.precomp import CaptionDataset, PrecompSplit
from hsc_pyg.cli.synthetic import main
from hsc_pyg.data.synthetic import COLOURS, RELATIONS, make_synthetic, relation
from hsc_pyg.data.vocab import UNK, build_vocab, tokenize
from hsc_pyg.errors import ConfigError

SMALL = dict(num_train=40, num_dev=10, num_test=11, img_dim=16)
RELATION_WORDS = {w for phrases in RELATIONS.values() for p in phrases for w in p.split()} - {"to", "the", "of"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "synthetic_precomp", seed=3, **SMALL)


def test_default_size_generates_in_seconds(tmp_path):
    start = time.perf_counter()
    out = make_synthetic(tmp_path / "synthetic_precomp")
    elapsed = time.perf_counter() - start
    assert elapsed < 5  # about 0.3 s
    sizes = {split: PrecompSplit.open(tmp_path, "synthetic_precomp", split).num_images for split in ("train", "dev", "test")}
    assert sizes == {"train": 1000, "dev": 100, "test": 100}
    train = PrecompSplit.open(tmp_path, "synthetic_precomp", "train")
    assert (train.num_regions, train.img_dim, train.num_captions) == (36, 64, 5000)
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 0


def test_loads_through_precomp_split(small):
    s = PrecompSplit.open(small.parent, small.name, "test")
    assert (s.num_images, s.num_captions, s.per_image, s.num_regions, s.img_dim) == (11, 55, 5, 36, 16)
    assert s.images.dtype == np.float32 and s.boxes.dtype == np.float32 and s.boxes.shape == (11, 36, 4)
    assert s.ids[0] == "synth_000050" and s.ids[-1] == "synth_000060"  # ids run on from train (40) and dev (10)
    assert s.boxes[0, 7].tolist() == pytest.approx([1 / 6, 1 / 6, 2 / 6, 2 / 6])  # row 1, column 1
    s.scan_finite()
    lines = (small / "test_caps.txt").read_text().split("\n")
    assert len(lines) == 56 and lines[-1] == ""  # 5 per image, final newline


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, small):
    again = make_synthetic(tmp_path / "again", seed=3, **SMALL)
    names = sorted(p.name for p in small.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and len(names) == 16
    for name in names:
        assert (small / name).read_bytes() == (again / name).read_bytes(), name
    other = make_synthetic(tmp_path / "other", seed=4, **SMALL)
    assert (other / "train_ims.npy").read_bytes() != (small / "train_ims.npy").read_bytes()
    assert (other / "train_caps.txt").read_text() != (small / "train_caps.txt").read_text()


def test_a_split_does_not_depend_on_the_other_sizes(tmp_path, small):
    bigger = make_synthetic(tmp_path / "bigger", seed=3, **dict(SMALL, num_train=60))
    assert (bigger / "test_caps.txt").read_bytes() == (small / "test_caps.txt").read_bytes()
    assert np.array_equal(np.load(bigger / "test_ims.npy"), np.load(small / "test_ims.npy"))


def _differing(a: str, b: str) -> list[tuple[str, str]] | None:
    ta, tb = a.split(), b.split()
    if len(ta) != len(tb):
        return None
    return [(x, y) for x, y in zip(ta, tb) if x != y]


def test_twins_differ_only_by_a_relation_or_swapped_colours(small):
    captions = (small / "train_caps.txt").read_text().split("\n")[:-1]
    scenes = json.loads((small / "train_scenes.json").read_text())
    kinds = {"mirror": 0, "colour_swap": 0}
    for a in range(0, 40, 2):
        b = a + 1
        twin = scenes[b]["twin"]
        assert twin["of"] == a and scenes[a]["twin"] == dict(of=b, kind=twin["kind"])
        kinds[twin["kind"]] += 1
        first_a, first_b = captions[5 * a], captions[5 * b]
        diff = _differing(first_a, first_b)
        assert diff, (first_a, first_b)
        if twin["kind"] == "mirror":
            # e.g. "a red cube left of a blue ball" / "a red cube right of a blue ball"
            assert len(diff) == 1 and set(diff[0]) <= RELATION_WORDS, diff
        else:
            # e.g. "a red cube left of a blue ball" / "a blue cube left of a red ball"
            assert len(diff) == 2 and diff[0] == diff[1][::-1] and set(diff[0]) <= set(COLOURS), diff
    assert kinds == {"mirror": 10, "colour_swap": 10}
    assert len({tuple(np.load(small / "train_ims.npy")[i].ravel()[:8]) for i in range(40)}) == 40


def test_captions_state_the_true_relations(small):
    scenes = json.loads((small / "dev_scenes.json").read_text())
    captions = (small / "dev_caps.txt").read_text().split("\n")
    for i, scene in enumerate(scenes):
        a, b = scene["objects"][:2]
        first = captions[5 * i]
        phrase = first[len(f"a {a['colour']} {a['cls']} "): -len(f" a {b['colour']} {b['cls']}")]
        assert phrase in RELATIONS[relation(a, b)], (first, a, b)


def test_relation_by_dominant_axis():
    cube = dict(cls="cube", colour="red", size="small", row=2, col=1)
    assert relation(cube, dict(cube, col=4)) == "left"
    assert relation(dict(cube, col=4), cube) == "right"
    assert relation(cube, dict(cube, row=5, col=2)) == "above"
    assert relation(dict(cube, size="large", row=4, col=0), cube) == "below"  # large: centre at (1, 5)


def test_vocabulary_covers_every_test_word(small):
    train = PrecompSplit.open(small.parent, small.name, "train")
    vocab = build_vocab(train.captions)
    test = PrecompSplit.open(small.parent, small.name, "test")
    assert all(UNK not in vocab.encode(c) for c in test.captions)
    assert 25 <= len(vocab) <= 45
    image, caption, i, k = CaptionDataset(test, vocab, img_edges="spatial")[12]
    assert (i, k) == (2, 12) and image.edge_attr.shape == (256, 5) and caption.num_nodes == len(tokenize(test.captions[12])) + 2


def test_refuses_to_overwrite(small, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{small} already holds a dataset \(synthetic\.json, train_ims\.npy, "
                                          r"train_caps\.txt, \.\.\.\); pass --overwrite to replace it or choose another --out$"):
        make_synthetic(small, seed=3, **SMALL)
    out = make_synthetic(tmp_path / "x", **dict(SMALL, num_train=2))
    assert make_synthetic(out, overwrite=True, **dict(SMALL, num_train=4)) == out
    assert PrecompSplit.open(out.parent, out.name, "train").num_images == 4


@pytest.mark.parametrize("options, message", [
    (dict(num_train=0), r"^synthetic train size must be a positive number of images, found 0$"),
    (dict(num_test=-1), r"^synthetic test size must be a positive number of images, found -1$"),
    (dict(img_dim=0), r"^synthetic img_dim must be a positive integer, found 0$"),
    (dict(num_regions=30), r"^synthetic regions must be a square grid of at least 4 x 4 \(16, 25, 36, 49, \.\.\.\), found 30$"),
    (dict(num_regions=9), r"found 9$"),
])
def test_bad_options(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        make_synthetic(tmp_path / "bad", **options)
    assert not (tmp_path / "bad").exists()


def test_other_grid_sizes(tmp_path):
    out = make_synthetic(tmp_path / "g4", num_train=6, num_dev=2, num_test=2, img_dim=8, num_regions=16)
    s = PrecompSplit.open(tmp_path, "g4", "train")
    assert (s.num_regions, s.img_dim, s.num_captions) == (16, 8, 30)
    assert s.boxes[0, 5].tolist() == [0.25, 0.25, 0.5, 0.5] and out.name == "g4"


def test_command(tmp_path, capsys):
    out = tmp_path / "cmd"
    argv = ["--out", str(out), "--train", "4", "--dev", "2", "--test", "2", "--img_dim", "8", "--seed", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: train 4 / dev 2 / test 2 images, 5 captions each, 36 regions x 8 features, "
                              "seed 1 (")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} already holds a dataset") and err.count("\n") == 1
    assert main(argv + ["--overwrite"]) == 0
