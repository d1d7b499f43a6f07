"""Photos -> grid region features in the SCAN precomp layout, resumable, in bounded memory.

For a split ``NAME`` it writes into ``out``:

- ``NAME_ims.npy``    ``[N, R, D]`` float16 or float32, ``R = grid * grid`` cells, row-major (cell k = row k // grid,
  column k % grid): adaptive average pooling of the backbone's feature map to ``grid x grid``;
- ``NAME_boxes.npy``  ``[N, R, 4]`` the normalised cell boxes ``[c/g, r/g, (c+1)/g, (r+1)/g]`` (same dtype);
- ``NAME_ids.txt``    the photos' names (paths relative to the photo folder), one per line, in row order;
- ``NAME_features.json`` what was extracted (backbone, weights, size, grid, dtype, counts, package versions);
- ``NAME_skipped.txt`` only with ``skip_bad``: ``name<TAB>reason`` for each photo left out.

While it runs, rows go straight into ``NAME_ims.npy.partial`` (a memory-mapped ``.npy`` opened for each batch, so the
process never holds more than one batch) and ``NAME_features.partial.json`` records the extraction and the rows done,
after those rows are flushed. An interrupted run (Ctrl-C, kill -9) resumes at the first row not recorded and, with the
same batch size, gives the same bytes as an uninterrupted run. ``NAME_ims.npy`` appears last, by a rename: a folder
that holds it holds a finished extraction.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from ..data.importers import check_photo_id, check_split_name, read_photo_names
from ..io import FolderLock, create_npy, parse_json, write_bytes
from .backbones import Backbone, Normalization, build_backbone, normalization
from .images import PHOTO_SUFFIXES, open_photo, photo_tensor

FORMAT = "hsc_pyg.features"
VERSION = 1
DTYPES = ("float16", "float32")
#: Bounds of the options that size the work: a photo side of 2,048 px is 4.5 times the default's; a 32 x 32 grid is
#: 1,024 regions per photo (the model's graphs grow with its square).
MAX_SIZE, MAX_GRID = 2048, 32

#: called with (rows done, rows in all) once at the start and after every batch
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- which photos, in which order
def list_photos(images: str | Path, list_file: str | Path | None = None) -> list[str]:
    """Photo names relative to ``images``: the lines of ``list_file`` in their order, else every photo file of the
    folder (by ending, :data:`PHOTO_SUFFIXES`) sorted by name (code point order). DataError for a missing folder or
    listed file, a duplicate, or a folder without photos."""
    folder = Path(images)
    if not folder.is_dir():
        raise DataError(f"photo folder {folder} does not exist or is not a folder; pass --images DIR")
    if list_file is None:
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
        if not names:
            raise DataError(f"photo folder {folder} holds no photos ({', '.join(PHOTO_SUFFIXES)}); pass the folder "
                            "that holds them")
        return names
    names = read_photo_names(list_file)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{list_file} names photos that are not in {folder}: {missing[0]!r}{more}; fix the list or "
                        "--images")
    return names


def cell_boxes(grid: int) -> np.ndarray:
    """``[grid * grid, 4]`` float64: cell k = row k // grid, column k % grid, as ``[x1, y1, x2, y2]`` in [0, 1]."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.stack([cols / grid, rows / grid, (cols + 1) / grid, (rows + 1) / grid], axis=1)


def grid_features(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, D, h, w]`` -> ``[B, grid * grid, D]``: adaptive average pooling to ``grid x grid``, cells row-major."""
    pooled = F.adaptive_avg_pool2d(feature_map, grid)
    return pooled.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- decoding, in loader workers
class _Photos(Dataset):
    """Row i -> ``(i, [3, S, S] tensor or None, error line)``: a bad photo is reported, not raised, so that the
    caller decides between stopping and skipping."""

    def __init__(self, folder: Path, names: Sequence[str], size: int, scaling: Normalization) -> None:
        self.folder, self.names, self.size, self.scaling = folder, names, size, scaling

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        try:
            return i, photo_tensor(self.folder / self.names[i], self.size, self.scaling), ""
        except DataError as e:
            return i, None, str(e)


def _collate(items):
    return items


# --------------------------------------------------------------------------- the extraction
@dataclass
class Extraction:
    """What :func:`extract_features` did: ``num_rows`` rows of ``[regions, dim]`` in ``paths``; ``resumed_at`` the
    row it started from (0 for a fresh run, ``num_photos`` when the folder already held this extraction);
    ``skipped`` (name, reason) of the photos left out."""

    out: Path
    split: str
    num_photos: int
    num_rows: int
    regions: int
    dim: int
    resumed_at: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ims(self) -> Path:
        return self.out / f"{self.split}_ims.npy"


class _Files:
    def __init__(self, out: Path, split: str) -> None:
        self.split = split
        self.ims = out / f"{split}_ims.npy"
        self.partial = out / f"{split}_ims.npy.partial"
        self.state = out / f"{split}_features.partial.json"
        self.boxes = out / f"{split}_boxes.npy"
        self.ids = out / f"{split}_ids.txt"
        self.manifest = out / f"{split}_features.json"
        self.skipped = out / f"{split}_skipped.txt"


def _identity(backbone_name: str, backbone: Backbone, normalize: str, size: int, grid: int, dtype: str,
              names: list[str]) -> dict:
    """What makes two runs the same extraction (a run resumes only its own): not the batch size, workers or device."""
    ids = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()
    return dict(format=FORMAT, version=VERSION, backbone=backbone_name, weights=backbone.weights, normalize=normalize,
                size=size, grid=grid, dtype=dtype, dim=backbone.dim, num_photos=len(names), ids_sha256=ids)


def _read_json(path: Path) -> dict | None:
    try:
        return parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _differences(found: dict, wanted: dict) -> str:
    keys = [k for k in wanted if found.get(k) != wanted[k]]
    return ", ".join(f"{k} {found.get(k)!r} here, {wanted[k]!r} now" for k in keys[:3]) or "same options"


def _check_options(split: str, grid: int, size: int, dtype: str, batch_size: int, workers: int) -> None:
    check_split_name(split)
    for flag, value, least, most in (("--grid", grid, 1, MAX_GRID), ("--size", size, 32, MAX_SIZE),
                                     ("--batch_size", batch_size, 1, 4096), ("--workers", workers, 0, 256)):
        if type(value) is not int or not least <= value <= most:
            raise ConfigError(f"{flag} must be an integer from {least} to {most}, found {value!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; choose float16 or float32")


def _prepare_out(files: _Files, out: Path, identity: dict, ids_text: bytes, overwrite: bool) -> int | None:
    """Rows already done of this extraction (0 for a fresh start), or None when ``out`` already holds it finished.
    ConfigError when ``out`` (locked, so existing) holds another extraction and not ``overwrite``."""
    state = _read_json(files.state) if files.state.exists() else None
    if state is not None and state.get("identity") == identity:
        return int(state["rows_done"]) if files.partial.exists() else 0
    manifest = _read_json(files.manifest) if files.manifest.exists() else None
    if (files.ims.exists() and manifest is not None and manifest.get("identity") == identity
            and files.ids.exists() and state is None):
        return None
    if overwrite:
        return 0
    if state is not None:
        raise ConfigError(f"{out} holds an unfinished extraction of split {files.split} that differs "
                          f"({_differences(state.get('identity', {}), identity)}); run it again with its options to "
                          "resume it, or pass --overwrite to start this one")
    if files.ims.exists() or files.boxes.exists():
        found = files.ims if files.ims.exists() else files.boxes
        why = (f"a different extraction: {_differences(manifest.get('identity', {}), identity)}"
               if manifest is not None else "features from elsewhere")
        raise ConfigError(f"{out} already holds {found.name} ({why}); pass --overwrite to replace it, or choose "
                          "another --out or --split")
    if files.ids.exists() and files.ids.read_bytes() != ids_text:
        raise ConfigError(f"{files.ids} lists other photos than this extraction; pass --list {files.ids} to extract "
                          "them in its order, --overwrite to replace it, or choose another --out")
    return 0


def _check_headers(folder: Path, names: Sequence[str]) -> dict[int, str]:
    """Row -> error line for every photo that cannot even be opened (empty, not an image, decompression bomb)."""
    bad = {}
    for i, name in enumerate(names):
        try:
            open_photo(folder / name).close()
        except DataError as e:
            bad[i] = str(e)
    return bad


def _check_range(values: np.ndarray, dtype: str, names: list[str]) -> None:
    """DataError for NaN / inf features, and for values that ``dtype`` would turn into inf (float16: |v| > 65504)."""
    finite = np.isfinite(values).all(axis=(1, 2))
    if not finite.all():
        raise DataError(f"the backbone gave NaN or inf features for photo {names[int(np.argmin(finite))]}; check the "
                        "backbone's weights")
    largest, limit = float(np.abs(values).max(initial=0.0)), float(np.finfo(dtype).max)
    if largest > limit:
        raise ConfigError(f"features reach {largest:.4g}, beyond {dtype}'s range ({limit:.0f}); run "
                          "again with --dtype float32 --overwrite")


def _write_state(files: _Files, identity: dict, rows_done: int, skipped: dict[int, str]) -> None:
    state = dict(identity=identity, rows_done=rows_done, skipped={str(i): why for i, why in sorted(skipped.items())})
    write_bytes(files.state, (json.dumps(state, indent=1) + "\n").encode("utf-8"))


def _write_rows(path: Path, start: int, rows: np.ndarray) -> None:
    """Rows ``[start, start + len(rows))`` into the ``.npy`` at ``path``, flushed; the mapping is closed again so that
    the pages written do not accumulate in this process."""
    array = np.lib.format.open_memmap(path, mode="r+")
    array[start:start + len(rows)] = rows
    array.flush()
    del array


def _copy_rows(source: Path, target: Path, keep: np.ndarray, shape: tuple[int, ...], dtype: str,
               chunk: int = 256) -> None:
    """``target`` = ``source[keep]``, ``chunk`` rows at a time (bounded memory)."""
    create_npy(target, dtype, (len(keep), *shape[1:]))
    rows = np.load(source, mmap_mode="r")
    for start in range(0, len(keep), chunk):
        _write_rows(target, start, np.asarray(rows[keep[start:start + chunk]]))


def _finish(files: _Files, identity: dict, names: list[str], skipped: dict[int, str], grid: int, dtype: str) -> int:
    """Compact out skipped rows, write boxes, ids and manifest, then rename the features into place (last)."""
    keep = np.array([i for i in range(len(names)) if i not in skipped], dtype=np.int64)
    features = files.partial
    if skipped:
        features = files.partial.with_name(files.partial.name + ".kept")
        _copy_rows(files.partial, features, keep, (len(names), grid * grid, identity["dim"]), dtype)
    boxes = create_npy(files.boxes.with_name(files.boxes.name + ".partial"), dtype, (len(keep), grid * grid, 4))
    boxes[:] = cell_boxes(grid).astype(dtype)
    boxes.flush()
    boxes_partial = Path(boxes.filename)
    del boxes
    kept_names = [names[i] for i in keep]
    versions = dict(torch=torch.__version__, numpy=np.__version__, python=platform.python_version())
    manifest = dict(identity=identity, num_rows=len(keep), skipped=len(skipped), versions=versions)
    # nothing may look finished before everything is: the old features go first, the new ones come last
    files.ims.unlink(missing_ok=True)
    write_bytes(files.ids, ("".join(n + "\n" for n in kept_names)).encode("utf-8"))
    os.replace(boxes_partial, files.boxes)
    write_bytes(files.manifest, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    if skipped:
        write_bytes(files.skipped, "".join(f"{names[i]}\t{why}\n" for i, why in sorted(skipped.items())).encode())
    else:
        files.skipped.unlink(missing_ok=True)
    files.state.unlink()
    os.replace(features, files.ims)
    if skipped:
        files.partial.unlink()
    return len(keep)


def extract_features(images: str | Path, out: str | Path, split: str, *, list_file: str | Path | None = None,
                     backbone: str = "efficientnet_lite0", normalize: str = "backbone", grid: int = 6,
                     size: int = 448, dtype: str = "float16",
                     batch_size: int = 8, workers: int = 0, device: str | torch.device = "cpu",
                     overwrite: bool = False, skip_bad: bool = False, pretrained: bool = True,
                     progress: Progress | None = None) -> Extraction:
    """Extract ``[N, grid * grid, D]`` features of the photos in ``images`` into ``out`` (see the module docstring).

    Args:
        images: the photo folder; ``list_file`` (one name per line, relative to it) gives the photos and their order,
            else every photo of the folder sorted by name.
        backbone: a registered backbone name; ``pretrained=False`` uses seeded random weights (tests only).
        normalize: the input scaling, a name in :data:`~.backbones.NORMALIZATIONS`, or ``backbone`` (default) for the
            one its weights were trained with (``tf_lite`` for EfficientNet-Lite); ``imagenet`` with
            ``efficientnet_lite0`` reproduces ``flickr8k_mini_precomp``.
        size: photos are resized to ``size x size``; grid: the cells per side; dtype: ``float16`` or ``float32``.
        batch_size, workers, device: photos per forward pass, decoding processes (0 = in this process), where the
            backbone runs. None of them changes what is extracted (beyond float rounding across batch sizes).
        overwrite: replace another extraction found in ``out``; a run of the same extraction resumes without it.
        skip_bad: leave out photos that cannot be read (listed in ``{split}_skipped.txt``) instead of stopping.
        progress: called with (rows done, rows in all).

    Raises ConfigError (options, ``out``) or DataError (photos); the rows done so far stay resumable.
    """
    _check_options(split, grid, size, dtype, batch_size, workers)
    folder, out = Path(images), Path(out)
    names = list_photos(folder, list_file)
    for name in names:
        check_photo_id(name, f"photo folder {folder}" if list_file is None else str(list_file))
    net = build_backbone(backbone, pretrained=pretrained)
    normalize = net.normalize if normalize == "backbone" else normalize
    photos = _Photos(folder, names, size, normalization(normalize))
    identity = _identity(backbone, net, normalize, size, grid, dtype, names)
    files = _Files(out, split)
    ids_text = "".join(n + "\n" for n in names).encode("utf-8")
    with FolderLock.acquire(out, "--out"):  # one extraction writes into a folder at a time
        start = _prepare_out(files, out, identity, ids_text, overwrite)
        regions = grid * grid
        if start is None:
            manifest = _read_json(files.manifest)
            if progress is not None:
                progress(len(names), len(names))
            return Extraction(out, split, len(names), manifest["num_rows"], regions, net.dim, len(names))
        skipped = _start_rows(files, identity, photos, start, skip_bad)
        device = torch.device(device)
        loader = DataLoader(photos, batch_size=batch_size, num_workers=workers, sampler=range(start, len(names)),
                            collate_fn=_collate)
        _extract_rows(files, identity, net.to(device), loader, start, skipped, skip_bad, device, progress)
        num_rows = _finish(files, identity, names, skipped, grid, dtype)
        skipped_list = [(names[i], why) for i, why in sorted(skipped.items())]
        return Extraction(out, split, len(names), num_rows, regions, net.dim, start, skipped_list)


def _start_rows(files: _Files, identity: dict, photos: _Photos, start: int, skip_bad: bool) -> dict[int, str]:
    """The photos left out so far, row -> reason: those that cannot be opened and, resuming at row ``start > 0``,
    those the run before recorded; a fresh start creates the partial features. DataError for a photo that cannot be
    opened unless ``skip_bad``."""
    skipped = _check_headers(photos.folder, photos.names)
    if skipped and not skip_bad:
        first = skipped[min(skipped)]
        more = f" (and {len(skipped) - 1} more photos that cannot be read)" if len(skipped) > 1 else ""
        raise DataError(first + more)
    if start == 0:
        create_npy(files.partial, identity["dtype"], (len(photos), identity["grid"] ** 2, identity["dim"]))
        _write_state(files, identity, 0, skipped)
    else:
        state = _read_json(files.state)
        skipped.update({int(i): why for i, why in state["skipped"].items()})
    return skipped


def _extract_rows(files: _Files, identity: dict, net: Backbone, loader: DataLoader, start: int,
                  skipped: dict[int, str], skip_bad: bool, device: torch.device, progress: Progress | None) -> None:
    """Run the backbone over the photos from row ``start`` on, one batch at a time: its rows go into the partial
    features, then the state records them (and the photos skipped, added to ``skipped``)."""
    names, total = loader.dataset.names, len(loader.dataset)
    if progress is not None:
        progress(start, total)
    done = start
    with torch.no_grad():
        for batch in loader:
            rows = _batch_rows(files, identity, net, batch, names, done, skipped, skip_bad, device)
            _write_rows(files.partial, done, rows)
            done += len(batch)
            _write_state(files, identity, done, skipped)
            if progress is not None:
                progress(done, total)


def _batch_rows(files: _Files, identity: dict, net: Backbone, batch: list, names: Sequence[str], done: int,
                skipped: dict[int, str], skip_bad: bool, device: torch.device) -> np.ndarray:
    """``[len(batch), regions, dim]`` rows of one batch, zeros for a photo that cannot be read (added to ``skipped``
    with ``skip_bad``; else a DataError, which keeps the ``done`` rows before it resumable, or, with none done,
    removes the partial files)."""
    dtype = identity["dtype"]
    rows = np.zeros((len(batch), identity["grid"] ** 2, net.dim), dtype=dtype)
    for i, _, error in batch:
        if error and not skip_bad:
            if done == 0:  # nothing worth resuming: leave the folder as it was
                files.state.unlink()
                files.partial.unlink()
                raise DataError(error)
            raise DataError(f"{error}; the {done} photos before it are kept: run the same command again to resume")
        if error:
            skipped[i] = error
    good = [k for k, (_, tensor, _) in enumerate(batch) if tensor is not None]
    if good:
        photos = torch.stack([batch[k][1] for k in good]).to(device)
        values = grid_features(net(photos), identity["grid"]).float().cpu().numpy()
        _check_range(values, dtype, [names[batch[k][0]] for k in good])
        rows[good] = values.astype(dtype)
    return rows
