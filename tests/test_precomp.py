"""SCAN precomp splits: loading (float32 / float16, with and without boxes), the memory map, validation messages."""
from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from hsc_pyg.data.precomp import CaptionDataset, ImageDataset, PrecompSplit, TextDataset, drop_words, read_lines
from hsc_pyg.data.vocab import END, START, UNK, Vocabulary
from hsc_pyg.errors import ConfigError, DataError


def write_split(root, name="toy_precomp", split="train", images=4, regions=6, dim=8, dtype=np.float32, per_image=5,
                boxes=True, ids=True, seed=0):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    ims = np.random.default_rng(seed).standard_normal((images, regions, dim)).astype(dtype)
    np.save(folder / f"{split}_ims.npy", ims)
    caps = [f"image {i} caption {j}" for i in range(images) for j in range(per_image)]
    (folder / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    if boxes:
        np.save(folder / f"{split}_boxes.npy", np.tile(np.array([0, 0, 0.5, 0.5], np.float32), (images, regions, 1)))
    if ids:
        (folder / f"{split}_ids.txt").write_text("".join(f"img{i}\n" for i in range(images)))
    return folder, ims


def test_open_float32_with_boxes(tmp_path):
    folder, ims = write_split(tmp_path)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    assert (s.num_images, s.num_regions, s.img_dim, s.num_captions, s.per_image) == (4, 6, 8, 20, 5)
    assert (s.path, s.name, s.split) == (folder, "toy_precomp", "train")
    assert s.images.dtype == np.float32 and s.boxes.shape == (4, 6, 4)
    assert s.ids == ["img0", "img1", "img2", "img3"]
    assert s.captions[7] == "image 1 caption 2"
    f = s.features(2)
    assert f.dtype == torch.float32 and f.shape == (6, 8) and torch.equal(f, torch.from_numpy(ims[2]))
    assert s.box_tensor(1).tolist()[0] == [0, 0, 0.5, 0.5]
    batch = s.features_batch([3, 0, 3])
    assert batch.shape == (3, 6, 8) and torch.equal(batch[1], torch.from_numpy(ims[0]))


def test_open_float16_without_boxes_or_ids(tmp_path):
    _, ims = write_split(tmp_path, dtype=np.float16, boxes=False, ids=False)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    assert s.images.dtype == np.float16 and s.boxes is None and s.ids is None and s.box_tensor(0) is None
    f = s.features(1)
    assert f.dtype == torch.float32 and torch.equal(f, torch.from_numpy(ims[1].astype(np.float32)))
    assert s.features_batch([0, 1]).dtype == torch.float32


def test_opening_maps_the_file_without_reading_it(tmp_path):
    write_split(tmp_path, images=400, regions=36, dim=512)  # 29.5 MB of features
    tracemalloc.start()
    try:
        s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(s.images, np.memmap) and Path(s.images.filename).name == "train_ims.npy"
    assert isinstance(s.boxes, np.memmap)
    assert peak < 1_000_000  # the 29.5 MB array was not read into memory


def test_caption_to_image_mapping(tmp_path):
    write_split(tmp_path)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    assert [s.image_of(k) for k in (0, 4, 5, 9, 10, 19)] == [0, 0, 1, 1, 2, 3]
    write_split(tmp_path, name="one_precomp", per_image=1)
    assert PrecompSplit.open(tmp_path, "one_precomp", "train").per_image == 1
    write_split(tmp_path, name="two_precomp", per_image=2)
    s2 = PrecompSplit.open(tmp_path, "two_precomp", "train")
    assert s2.per_image == 2 and s2.image_of(5) == 2


def test_read_lines_crlf_no_final_newline_and_utf8(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_bytes("a café\r\nthe dog ran \nlast line".encode("utf-8"))
    assert read_lines(path) == ["a café", "the dog ran ", "last line"]


def test_caption_dataset_items(tmp_path):
    _, ims = write_split(tmp_path)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    vocab = Vocabulary(["image", "caption", "1", "2"])
    ds = CaptionDataset(s, vocab)
    assert len(ds) == 20
    image, caption, i, k = ds[7]
    assert (i, k) == (1, 7)
    assert torch.equal(image.x, torch.from_numpy(ims[1])) and image.pos.shape == (6, 4)
    assert image.edge_index.shape == (2, 36)
    assert caption.x.tolist() == [START, 4, 6, 5, 7, END]  # image 1 caption 2
    assert caption.edge_index.shape == (2, 36) and caption.num_nodes == 6
    assert len(ImageDataset(s)) == 4 and ImageDataset(s, "knn:2")[3].edge_index.shape == (2, 18)
    text = TextDataset(s, vocab, "window:1")
    assert len(text) == 20 and text[0].edge_index.shape == (2, 6 * 3 - 2)


def test_drop_words_keeps_the_ends_and_a_word_and_drops_at_the_given_rate():
    rng = np.random.default_rng(0)
    tokens = [START, *range(10, 30), END]
    kept = [drop_words(tokens, 0.25, rng) for _ in range(2000)]
    assert all(t[0] == START and t[-1] == END and len(t) >= 3 for t in kept)
    assert all(all(w in tokens for w in t) and t[1:-1] == sorted(t[1:-1]) for t in kept)    # a subsequence, in order
    rate = 1 - sum(len(t) - 2 for t in kept) / (2000 * 20)
    assert 0.23 < rate < 0.27
    assert drop_words([START, 10, END], 0.999, rng) == [START, 10, END]          # never an empty caption
    assert drop_words([START, END], 0.5, rng) == [START, END]


def test_caption_word_drop_repeats_per_seed_epoch_and_caption_and_is_off_at_zero(tmp_path):
    write_split(tmp_path)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    vocab = Vocabulary(["image", "caption", "1", "2"])
    plain = CaptionDataset(s, vocab)
    assert [CaptionDataset(s, vocab, word_drop=0.0, seed=3)[k][1].x.tolist() for k in range(20)] == \
        [plain[k][1].x.tolist() for k in range(20)]

    def words(seed, epoch):
        ds = CaptionDataset(s, vocab, word_drop=0.5, seed=seed)
        ds.set_epoch(epoch)
        return [ds[k][1].x.tolist() for k in range(20)]

    assert words(1, 0) == words(1, 0) != words(1, 1)
    assert words(1, 0) != words(2, 0)
    assert words(1, 0) != [plain[k][1].x.tolist() for k in range(20)]


def test_all_unknown_caption_is_valid_input(tmp_path):
    write_split(tmp_path)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    _, caption, _, _ = CaptionDataset(s, Vocabulary())[0]
    assert caption.x.tolist() == [START, UNK, UNK, UNK, UNK, END]


def test_dataset_edge_spec_errors(tmp_path):
    write_split(tmp_path, boxes=False)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    with pytest.raises(DataError, match=r"^img_edges='spatial' needs region boxes \(\{split\}_boxes\.npy \[N, R, 4\]\) "
                                        r"but the data has none; add the boxes file or use img_edges=full or knn:K$"):
        CaptionDataset(s, Vocabulary(), img_edges="spatial")
    with pytest.raises(ConfigError, match=r"^txt_edges='knn:3' applies to region graphs only"):
        TextDataset(s, Vocabulary(), txt_edges="knn:3")
    with pytest.raises(ConfigError, match=r"^edge spec 'grid' is unknown; valid: full, knn:K, none, spatial, window:K$"):
        ImageDataset(s, "grid")


def test_split_pickles_as_a_file_name(tmp_path):
    write_split(tmp_path, images=200, regions=36, dim=64)  # 1.8 MB of features
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    blob = pickle.dumps(s)
    assert len(blob) < 50_000
    copy = pickle.loads(blob)
    assert isinstance(copy.images, np.memmap) and isinstance(copy.boxes, np.memmap)
    assert torch.equal(copy.features(5), s.features(5))


def test_loader_with_workers(tmp_path):
    write_split(tmp_path)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    ds = CaptionDataset(s, Vocabulary(["image"]))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=ds.collate_fn)
    batches = list(loader)
    assert [len(b) for b in batches] == [8, 8, 4]
    assert batches[0].img_ids.tolist() == [0, 1] and batches[0].images.max_nodes == 6
    assert batches[0].images.complete is True and batches[1].img_ids.tolist() == [1, 2, 3]
    images = ImageDataset(s, "knn:2")
    batch = next(iter(torch.utils.data.DataLoader(images, batch_size=3, collate_fn=images.collate_fn)))
    assert batch.num_graphs == 3 and batch.edge_index.shape == (2, 3 * 6 * 3) and batch.complete is False


# ---- validation messages ----------------------------------------------------------------------------------------

def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match=rf"^data folder {tmp_path / 'nope'} does not exist \(looked for "
                                        rf"{tmp_path / 'nope' / 'f30k_precomp'}\); get the SCAN precomp features "
                                        r"\(kuanghueilee/scan-features on Kaggle\) or make the built-in data with "
                                        rf"`hsc-pyg synthetic --out {tmp_path / 'nope'}/synthetic_precomp`$"):
        PrecompSplit.open(tmp_path / "nope", "f30k_precomp", "train")


def test_missing_dataset_folder_lists_what_is_there(tmp_path):
    write_split(tmp_path, name="coco_precomp")
    (tmp_path / "synthetic_precomp").mkdir()
    with pytest.raises(DataError, match=rf"^dataset folder {tmp_path / 'f30k_precomp'} does not exist \({tmp_path} "
                                        r"holds: coco_precomp, synthetic_precomp\); get the SCAN precomp features"):
        PrecompSplit.open(tmp_path, "f30k_precomp", "train")


def test_missing_split_files(tmp_path):
    folder, _ = write_split(tmp_path)
    write_split(tmp_path, split="dev")
    with pytest.raises(DataError, match=rf"^{folder}/testall_ims\.npy is missing \({folder} has splits: dev, train\); "
                                        r"every split needs testall_ims\.npy and testall_caps\.txt$"):
        PrecompSplit.open(tmp_path, "toy_precomp", "testall")
    (folder / "dev_caps.txt").unlink()
    with pytest.raises(DataError, match=rf"^{folder}/dev_caps\.txt is missing"):
        PrecompSplit.open(tmp_path, "toy_precomp", "dev")


def _replace_ims(folder, array, allow_pickle=False):
    np.save(folder / "train_ims.npy", array, allow_pickle=allow_pickle)


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 48), np.float32), r"expected a 3-D array \[images, regions, features\], found shape \(4, 48\)$"),
    (np.zeros((4, 6, 8), np.int64), r"expected float32 or float16 features, found dtype int64; convert with "
                                    r"array\.astype\(numpy\.float32\) and save it again$"),
    (np.zeros((4, 6, 8), np.float64), r"expected float32 or float16 features, found dtype float64; "),
    (np.empty((4, 6, 8), object), r"expected float32 or float16 features, found dtype object; "),
    (np.zeros((0, 6, 8), np.float32), r"the array is empty \(shape \(0, 6, 8\)\); "),
])
def test_bad_feature_arrays(tmp_path, array, message):
    folder, _ = write_split(tmp_path)
    _replace_ims(folder, array, allow_pickle=True)
    with pytest.raises(DataError, match=rf"^{folder}/train_ims\.npy: {message}") as info:
        PrecompSplit.open(tmp_path, "toy_precomp", "train")
    assert "\n" not in str(info.value)


def test_not_an_npy_file(tmp_path):
    folder, _ = write_split(tmp_path)
    (folder / "train_ims.npy").write_bytes(b"hello, world")
    with pytest.raises(DataError, match=rf"^{folder}/train_ims\.npy is not a readable \.npy file \(the magic string "
                                        r"is not correct; .*\); write it with numpy\.save$"):
        PrecompSplit.open(tmp_path, "toy_precomp", "train")


def test_truncated_npy_file(tmp_path):
    folder, _ = write_split(tmp_path)
    path = folder / "train_ims.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"^{path} cannot be memory-mapped \(.*\); the file may be truncated: "
                                        r"rewrite it with numpy\.save$"):
        PrecompSplit.open(tmp_path, "toy_precomp", "train")


def test_caption_count_not_a_multiple_of_images(tmp_path):
    folder, _ = write_split(tmp_path)
    (folder / "train_caps.txt").write_text("a caption\n" * 19)
    with pytest.raises(DataError, match=rf"^{folder}/train_caps\.txt has 19 captions for 4 images in train_ims\.npy; "
                                        r"expected a whole number of captions per image \(5 per image: 20 lines\); "
                                        r"the two files must come from the same split$"):
        PrecompSplit.open(tmp_path, "toy_precomp", "train")


def test_empty_caption_line_gives_its_number(tmp_path):
    folder, _ = write_split(tmp_path)
    lines = ["a caption"] * 20
    lines[6] = ""
    lines[11] = "   "
    (folder / "train_caps.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{folder}/train_caps\.txt line 7 \(and 1 more\) is empty; expected one "
                                        r"caption per line: write the caption or remove the line$"):
        PrecompSplit.open(tmp_path, "toy_precomp", "train")


def test_empty_caption_file(tmp_path):
    folder, _ = write_split(tmp_path)
    (folder / "train_caps.txt").write_text("")
    with pytest.raises(DataError, match=rf"^{folder}/train_caps\.txt is empty; expected one caption per line$"):
        PrecompSplit.open(tmp_path, "toy_precomp", "train")


def test_non_utf8_caption_gives_its_line(tmp_path):
    folder, _ = write_split(tmp_path)
    lines = [b"a caption"] * 20
    lines[2] = b"a caf\xe9"  # Latin-1, not UTF-8
    (folder / "train_caps.txt").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"^{folder}/train_caps\.txt line 3 is not valid UTF-8 \(byte 0xe9\); "
                                        r"expected UTF-8 text, one caption per line; re-save the file as UTF-8$"):
        PrecompSplit.open(tmp_path, "toy_precomp", "train")


def test_boxes_of_the_wrong_shape(tmp_path):
    folder, _ = write_split(tmp_path)
    np.save(folder / "train_boxes.npy", np.zeros((4, 6, 5), np.float32))
    with pytest.raises(DataError, match=rf"^{folder}/train_boxes\.npy: expected boxes of shape \(4, 6, 4\) \[images, "
                                        r"regions, x1 y1 x2 y2\] to match train_ims\.npy, found \(4, 6, 5\); "
                                        r"fix or remove the boxes file$"):
        PrecompSplit.open(tmp_path, "toy_precomp", "train")
    np.save(folder / "train_boxes.npy", np.zeros((4, 6, 4), np.int32))
    with pytest.raises(DataError, match=rf"^{folder}/train_boxes\.npy: expected float boxes, found dtype int32; "):
        PrecompSplit.open(tmp_path, "toy_precomp", "train")


def test_ids_of_the_wrong_count(tmp_path):
    folder, _ = write_split(tmp_path)
    (folder / "train_ids.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=rf"^{folder}/train_ids\.txt has 3 lines for 4 images in train_ims\.npy; "
                                        r"expected one id per image; fix or remove the ids file$"):
        PrecompSplit.open(tmp_path, "toy_precomp", "train")


def test_non_finite_features(tmp_path):
    folder, ims = write_split(tmp_path, images=600)
    ims[517, 2, 3] = np.nan
    ims[580, 0, 0] = np.inf
    np.save(folder / "train_ims.npy", ims)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")  # no full read at open
    assert s.features(516).shape == (6, 8)
    fix = r"; re-extract its features, or open with check_finite=False to skip this check$"
    with pytest.raises(DataError, match=rf"^{folder}/train_ims\.npy: image 517 has NaN or inf values{fix}"):
        s.features(517)
    with pytest.raises(DataError, match=rf"^{folder}/train_ims\.npy: image 580 has NaN or inf values \(1 more such "
                                        rf"images in the same read\){fix}"):
        s.features_batch([3, 580, 517])  # the first bad image in the order asked
    with pytest.raises(DataError, match=rf"^{folder}/train_ims\.npy: image 517 has NaN or inf values \(1 more"):
        s.scan_finite()  # chunks of 256 images: the chunk 512..599 holds both
    unchecked = PrecompSplit.open(tmp_path, "toy_precomp", "train", check_finite=False)
    assert torch.isnan(unchecked.features(517)).sum() == 1


def test_non_finite_boxes(tmp_path):
    folder, _ = write_split(tmp_path)
    boxes = np.tile(np.array([0, 0, 0.5, 0.5], np.float32), (4, 6, 1))
    boxes[2, 1, 0] = np.nan
    np.save(folder / "train_boxes.npy", boxes)
    s = PrecompSplit.open(tmp_path, "toy_precomp", "train")
    s.box_tensor(1)
    with pytest.raises(DataError, match=rf"^{folder}/train_boxes\.npy: image 2 has NaN or inf values"):
        s.scan_finite()


# ---- the real mini benchmark ------------------------------------------------------------------------------------

@pytest.mark.parametrize("split, images, first_id", [
    ("train", 700, "1001773457_577c3a7d70.jpg"),
    ("dev", 100, "1003163366_44323f5815.jpg"),
    ("test", 200, "1000268201_693b08cb0e.jpg"),
])
def test_flickr8k_mini_loads(shared_dir, split, images, first_id):
    s = PrecompSplit.open(shared_dir / "data", "flickr8k_mini_precomp", split)
    assert (s.num_images, s.num_captions, s.per_image, s.num_regions, s.img_dim) == (images, 5 * images, 5, 36, 1280)
    assert isinstance(s.images, np.memmap) and s.images.dtype == np.float16
    assert s.boxes.shape == (images, 36, 4) and s.ids[0] == first_id and len(s.ids) == images
    assert s.image_of(5 * images - 1) == images - 1
    cell = s.box_tensor(0)[7]  # row 1, column 1 of the 6 x 6 grid
    assert torch.allclose(cell, torch.tensor([1 / 6, 1 / 6, 2 / 6, 2 / 6]), atol=1e-3)
    f = s.features(images - 1)
    assert f.shape == (36, 1280) and f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 6


def test_flickr8k_mini_test_split_is_finite_and_graphs_build(shared_dir):
    s = PrecompSplit.open(shared_dir / "data", "flickr8k_mini_precomp", "test")
    s.scan_finite()
    assert s.captions[0] == "A child in a pink dress is climbing up a set of stairs in an entry way ."
    image = ImageDataset(s, "spatial")[0]
    assert image.edge_index.shape == (2, 256) and image.edge_attr.shape == (256, 5)
