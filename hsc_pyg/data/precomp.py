"""SCAN "precomp" splits (the data format of SCAN, SGRAF and HSC), validated on open, and the datasets over them.

A dataset folder ``<data_path>/<data_name>/`` holds per split:

- ``{split}_ims.npy``: region features, float32 or float16 ``[N, R, D]``. Opened as a memory map and never read whole
  (COCO train is 33 GB); one image is copied out (as float32) when it is used.
- ``{split}_caps.txt``: UTF-8, one caption per line, ``per_image`` (5) per image: caption k belongs to image
  ``k // per_image``.
- ``{split}_boxes.npy`` (optional): ``[N, R, 4]`` boxes x1, y1, x2, y2 of the regions.
- ``{split}_ids.txt`` (optional): one identifier (e.g. the photo's file name) per image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_geometric.data import Data

from ..errors import DataError
from .graphs import caption_graph, check_edge_spec, collate_graphs, collate_pairs, image_graph, parse_edge_spec
from .vocab import BOM, Vocabulary

FEATURE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
#: Images per chunk of :meth:`PrecompSplit.scan_finite` (bounds its memory: 256 x 36 x 2048 float32 = 75 MB).
FINITE_CHUNK = 256
#: Most edges one region or word graph may have: 1,000 regions (or words) fully connected. Message passing holds a
#: vector per edge, so a complete graph of 10,000 regions (10^8 edges) would exhaust memory before the first step.
MAX_GRAPH_EDGES = 1_000_000
EDGE_INDEX_BYTES = 16  # two int64 node ids per edge
_GET_DATA = ("get the SCAN precomp features (kuanghueilee/scan-features on Kaggle) or make the built-in data with "
             "`hsc-pyg synthetic --out {}`")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def dataset_folder(data_path: str | Path, data_name: str) -> Path:
    """``<data_path>/<data_name>``, or a DataError that lists what is there and how to get the data."""
    root = Path(data_path)
    folder = root / data_name
    if folder.is_dir():
        return folder
    how = _GET_DATA.format(root / "synthetic_precomp")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (looked for {folder}); {how}")
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise DataError(f"dataset folder {folder} does not exist ({root} holds: {', '.join(present) or 'no folders'}); {how}")


def _splits_in(folder: Path) -> str:
    names = sorted(p.name[: -len("_ims.npy")] for p in folder.glob("*_ims.npy"))
    return ", ".join(names) or "none"


def split_file(folder: Path, split: str, suffix: str) -> Path:
    """``folder/{split}{suffix}``, or a DataError naming the splits the folder has."""
    path = folder / f"{split}{suffix}"
    if not path.is_file():
        raise DataError(f"{path} is missing ({folder} has splits: {_splits_in(folder)}); every split needs "
                        f"{split}_ims.npy and {split}_caps.txt")
    return path


def caption_file(data_path: str | Path, data_name: str, split: str) -> Path:
    return split_file(dataset_folder(data_path, data_name), split, "_caps.txt")


def read_lines(path: str | Path, what: str = "caption") -> list[str]:
    """Lines of a UTF-8 text file without their line ends (``\\n`` or ``\\r\\n``; the final newline is optional) and
    without a leading byte order mark.

    DataError on bytes that are not UTF-8, an empty (or blank) line, or no line at all, with the line number.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                        f"expected UTF-8 text, one {what} per line; re-save the file as UTF-8") from None
    if not text:
        raise DataError(f"{path} is empty; expected one {what} per line")
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    blank = [n for n, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        more = f" (and {len(blank) - 1} more)" if len(blank) > 1 else ""
        raise DataError(f"{path} line {blank[0]}{more} is empty; expected one {what} per line: "
                        f"write the {what} or remove the line")
    return lines


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header, without reading (or unpickling) the data."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .npy file ({_one_line(e)}); write it with numpy.save") from None
    return shape, dtype


def _memmap(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{path} cannot be memory-mapped ({_one_line(e)}); the file may be truncated: "
                        "rewrite it with numpy.save") from None


def _open_features(path: Path) -> np.ndarray:
    shape, dtype = _npy_header(path)
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3-D array [images, regions, features], found shape {shape}")
    if dtype not in FEATURE_DTYPES:
        raise DataError(f"{path}: expected float32 or float16 features, found dtype {dtype}; "
                        "convert with array.astype(numpy.float32) and save it again")
    if 0 in shape:
        raise DataError(f"{path}: the array is empty (shape {shape}); expected [images, regions, features] > 0")
    return _memmap(path)


def _open_boxes(path: Path, num_images: int, num_regions: int, ims_path: Path) -> np.ndarray:
    shape, dtype = _npy_header(path)
    expected = (num_images, num_regions, 4)
    if shape != expected:
        raise DataError(f"{path}: expected boxes of shape {expected} [images, regions, x1 y1 x2 y2] to match "
                        f"{ims_path.name}, found {shape}; fix or remove the boxes file")
    if dtype.kind != "f":
        raise DataError(f"{path}: expected float boxes, found dtype {dtype}; convert with array.astype(numpy.float32)")
    return _memmap(path)


class PrecompSplit:
    """One split of a precomp dataset; open it with :meth:`open`.

    ``images`` is a read-only memory map ``[N, R, D]``; :meth:`features` and :meth:`features_batch` copy images out as
    float32 tensors. With ``check_finite`` (default) each image is checked for NaN / inf when it is read (no extra I/O:
    the same bytes are being copied); :meth:`scan_finite` checks the whole file up front, in chunks of 256 images.
    """

    def __init__(self, path: Path, name: str, split: str, images: np.ndarray, captions: list[str],
                 boxes: np.ndarray | None = None, ids: list[str] | None = None, check_finite: bool = True) -> None:
        self.path, self.name, self.split = Path(path), name, split
        self.images, self.captions, self.boxes, self.ids = images, captions, boxes, ids
        self.check_finite = check_finite
        self.num_images, self.num_regions, self.img_dim = (int(n) for n in images.shape)
        self.num_captions = len(captions)
        if self.num_captions % self.num_images:
            raise DataError(
                f"{self.file('caps.txt')} has {self.num_captions} captions for {self.num_images} images in "
                f"{self.file('ims.npy').name}; expected a whole number of captions per image (5 per image: "
                f"{5 * self.num_images} lines); the two files must come from the same split")
        self.per_image = self.num_captions // self.num_images
        if ids is not None and len(ids) != self.num_images:
            raise DataError(f"{self.file('ids.txt')} has {len(ids)} lines for {self.num_images} images in "
                            f"{self.file('ims.npy').name}; expected one id per image; fix or remove the ids file")

    @classmethod
    def open(cls, data_path: str | Path, data_name: str, split: str, check_finite: bool = True) -> "PrecompSplit":
        """Open and validate ``<data_path>/<data_name>/{split}_*``; reads the captions, memory-maps the arrays."""
        folder = dataset_folder(data_path, data_name)
        ims_path = split_file(folder, split, "_ims.npy")
        caps_path = split_file(folder, split, "_caps.txt")
        images = _open_features(ims_path)
        captions = read_lines(caps_path, what="caption")
        boxes_path, ids_path = folder / f"{split}_boxes.npy", folder / f"{split}_ids.txt"
        boxes = _open_boxes(boxes_path, *images.shape[:2], ims_path) if boxes_path.is_file() else None
        ids = read_lines(ids_path, what="image id") if ids_path.is_file() else None
        return cls(folder, data_name, split, images, captions, boxes=boxes, ids=ids, check_finite=check_finite)

    def file(self, suffix: str) -> Path:
        return self.path / f"{self.split}_{suffix}"

    def __repr__(self) -> str:
        return (f"PrecompSplit({self.path}, split={self.split!r}: {self.num_images} images x {self.num_regions} "
                f"regions x {self.img_dim} {self.images.dtype}, {self.num_captions} captions "
                f"({self.per_image} per image), boxes={'yes' if self.boxes is not None else 'no'})")

    def image_of(self, caption_index: int) -> int:
        """Image row of caption ``caption_index``."""
        return caption_index // self.per_image

    def _check(self, array: np.ndarray, indices: np.ndarray, what: str) -> None:
        bad = ~np.isfinite(array.reshape(len(indices), -1)).all(axis=1)
        if bad.any():
            first = int(indices[bad.argmax()])
            more = int(bad.sum()) - 1
            raise DataError(f"{self.file(what)}: image {first} has NaN or inf values"
                            + (f" ({more} more such images in the same read)" if more else "")
                            + "; re-extract its features, or open with check_finite=False to skip this check")

    def features(self, i: int) -> torch.Tensor:
        """Regions of image ``i`` as a float32 tensor ``[R, D]`` (a copy)."""
        array = np.array(self.images[i], dtype=np.float32)
        if self.check_finite:
            self._check(array, np.array([i]), "ims.npy")
        return torch.from_numpy(array)

    def features_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Regions of several images as a float32 tensor ``[n, R, D]`` (a copy)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        array = np.asarray(self.images[indices], dtype=np.float32)
        if self.check_finite:
            self._check(array, indices, "ims.npy")
        return torch.from_numpy(array)

    def box_tensor(self, i: int) -> torch.Tensor | None:
        """Boxes of image ``i`` as a float32 tensor ``[R, 4]``, or None when the split has no boxes file."""
        if self.boxes is None:
            return None
        array = np.array(self.boxes[i], dtype=np.float32)
        if self.check_finite:
            self._check(array, np.array([i]), "boxes.npy")
        return torch.from_numpy(array)

    def scan_finite(self, chunk_images: int = FINITE_CHUNK) -> None:
        """Check every image for NaN / inf, streaming through the memory map ``chunk_images`` images at a time."""
        for start in range(0, self.num_images, chunk_images):
            stop = min(start + chunk_images, self.num_images)
            self._check(np.asarray(self.images[start:stop]), np.arange(start, stop), "ims.npy")
        if self.boxes is not None:
            for start in range(0, self.num_images, chunk_images):
                stop = min(start + chunk_images, self.num_images)
                self._check(np.asarray(self.boxes[start:stop]), np.arange(start, stop), "boxes.npy")

    # A memory map pickles as a full in-memory copy; DataLoader workers started with spawn / forkserver would copy the
    # whole feature file. Send the file name instead and map it again on the other side.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("images", "boxes"):
            if isinstance(state[key], np.memmap):
                state[key] = ("memmap", str(Path(state[key].filename).resolve()))
        return state

    def __setstate__(self, state: dict) -> None:
        for key in ("images", "boxes"):
            if isinstance(state[key], tuple) and state[key][0] == "memmap":
                state[key] = _memmap(Path(state[key][1]))
        self.__dict__.update(state)


def graph_edges(spec: str, num_nodes: int) -> int:
    """An upper bound on the edges ``spec`` builds on ``num_nodes`` nodes (``K`` or ``2K + 1`` per node for the
    builders that take ``:K``, every pair otherwise)."""
    name, k = parse_edge_spec(spec)
    if name == "none":
        return 0
    return num_nodes * min(num_nodes, 2 * k + 1) if k is not None else num_nodes * num_nodes


def check_graph_size(spec: str, num_nodes: int, flag: str, what: str) -> None:
    """DataError, with the estimate, when graphs of ``num_nodes`` nodes would exceed :data:`MAX_GRAPH_EDGES`."""
    edges = graph_edges(spec, num_nodes)
    if edges > MAX_GRAPH_EDGES:
        raise DataError(f"{what} has {num_nodes:,} nodes: {flag}={spec} would build {edges:,} edges per graph "
                        f"({edges * EDGE_INDEX_BYTES / 2**30:.1f} GiB of edge index alone, plus a message vector per "
                        f"edge), over the limit of {MAX_GRAPH_EDGES:,}; use {flag}=knn:K / window:K or fewer nodes")


def check_image_graphs(split: PrecompSplit, img_edges: str) -> None:
    check_graph_size(img_edges, split.num_regions, "img_edges", f"{split.file('ims.npy')} (regions per image)")


def check_caption_graphs(split: PrecompSplit, txt_edges: str) -> None:
    """The longest caption, counted in blanks plus <start> and <end> (the tokenizer may split a few more words off
    punctuation: the bound is a guard against runaway lines, not an exact count)."""
    blanks = [caption.count(" ") for caption in split.captions]
    longest = int(np.argmax(blanks))
    check_graph_size(txt_edges, blanks[longest] + 3, "txt_edges", f"{split.file('caps.txt')} line {longest + 1} (words)")


def drop_words(tokens: list[int], chance: float, rng: np.random.Generator) -> list[int]:
    """``tokens`` (``<start>`` words ``<end>``) with each word left out with probability ``chance``; the first and last
    tokens stay, and one word (drawn uniformly) when every word would go."""
    words = tokens[1:-1]
    if not words:
        return list(tokens)
    keep = rng.random(len(words)) >= chance
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [tokens[0], *(w for w, k in zip(words, keep) if k), tokens[-1]]


class CaptionDataset(Dataset):
    """Training items, one per caption: ``(image Data, caption Data, image index, caption index)``.

    Collate with :attr:`collate_fn` (:func:`~hsc_pyg.data.graphs.collate_pairs`: each distinct image of a batch
    becomes one graph). ``word_drop``: :func:`drop_words`'s chance, with a generator seeded by ``(seed, epoch,
    caption index)`` (:meth:`set_epoch`), so an item is the same in every process, worker and resumed run.
    """

    def __init__(self, split: PrecompSplit, vocab: Vocabulary, img_edges: str = "full", txt_edges: str = "full",
                 word_drop: float = 0.0, seed: int = 0):
        check_edge_spec(img_edges, graph="image", has_pos=split.boxes is not None)
        check_edge_spec(txt_edges, graph="caption")
        check_image_graphs(split, img_edges)
        check_caption_graphs(split, txt_edges)
        self.split, self.vocab, self.img_edges, self.txt_edges = split, vocab, img_edges, txt_edges
        self.word_drop, self.seed, self.epoch = word_drop, seed, 0
        self.collate_fn = collate_pairs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, k: int) -> tuple[Data, Data, int, int]:
        i = self.split.image_of(k)
        image = image_graph(self.split.features(i), self.split.box_tensor(i), self.img_edges)
        tokens = self.vocab.encode(self.split.captions[k])
        if self.word_drop > 0:
            tokens = drop_words(tokens, self.word_drop, np.random.default_rng([self.seed, self.epoch, k]))
        caption = caption_graph(tokens, self.txt_edges)
        return image, caption, i, k


class ImageDataset(Dataset):
    """One region graph per image (to encode every image once); collate with :attr:`collate_fn`."""

    def __init__(self, split: PrecompSplit, img_edges: str = "full"):
        check_edge_spec(img_edges, graph="image", has_pos=split.boxes is not None)
        check_image_graphs(split, img_edges)
        self.split, self.img_edges = split, img_edges
        self.collate_fn = collate_graphs

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, i: int) -> Data:
        return image_graph(self.split.features(i), self.split.box_tensor(i), self.img_edges)


class TextDataset(Dataset):
    """One word graph per caption (to encode every caption once); collate with :attr:`collate_fn`."""

    def __init__(self, split: PrecompSplit, vocab: Vocabulary, txt_edges: str = "full"):
        check_edge_spec(txt_edges, graph="caption")
        check_caption_graphs(split, txt_edges)
        self.split, self.vocab, self.txt_edges = split, vocab, txt_edges
        self.collate_fn = collate_graphs

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, k: int) -> Data:
        return caption_graph(self.vocab.encode(self.split.captions[k]), self.txt_edges)
