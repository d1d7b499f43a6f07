"""The built-in dataset: synthetic scenes in the exact SCAN precomp format, deterministic from a seed.

A scene is 2 or 3 objects (a class, a colour, a size) placed on the cells of a ``G x G`` grid (G = sqrt(regions), 6 by
default); a small object covers one cell, a large one a 2 x 2 block. The regions are the grid cells, row-major, with
boxes ``[c/G, r/G, (c+1)/G, (r+1)/G]`` (the layout of the flickr8k_mini grid features). A cell's feature is the sum of
fixed random prototypes (drawn from the seed): class + colour + size for a cell an object covers, one of a few
background textures otherwise, plus its row and column prototypes, plus Gaussian noise.

Images come in pairs: a scene and its twin, which is either the scene mirrored along the axis of its main relation
(every "left of" becomes "right of", or "above" becomes "below") or the scene with the colours of its two main objects
swapped. Both get captions from the same plan, so the twin's captions differ from the scene's only by the relation
words or by the swapped colours ("a red cube left of a blue ball" / "a red cube right of a blue ball" / "a blue cube
left of a red ball"): a model that ignores relations or attribute binding cannot tell the twins apart.

Files per split (``train``, ``dev``, ``test``): ``{split}_ims.npy`` float32 ``[N, R, D]``, ``{split}_caps.txt`` (5 per
image), ``{split}_boxes.npy`` float32 ``[N, R, 4]``, ``{split}_ids.txt`` (``synth_000123``), and ``{split}_scenes.json``
(the objects of every image and its twin, for analysis); ``synthetic.json`` records the generation options.

    hsc-pyg synthetic --out data/synthetic_precomp
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..io import FolderLock, atomic_folder

CLASSES = ("cube", "ball", "cone", "cylinder", "ring", "pyramid")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
#: Phrase variants per direction; variant v of "left" and of "right" differ by the one direction word.
RELATIONS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
SPLITS = ("train", "dev", "test")
CAPTIONS_PER_IMAGE = 5
NUM_BACKGROUNDS = 3
# Prototype weights and noise (each prototype has norm ~1): object identity dominates, position is readable, noise
# keeps nearby features from being identical.
POSITION_WEIGHT = 0.5
NOISE = 0.3
DEFAULTS = dict(num_train=1000, num_dev=100, num_test=100, img_dim=64, num_regions=36)


def _span(obj: dict) -> int:
    return 2 if obj["size"] == "large" else 1


def _centre(obj: dict) -> tuple[float, float]:
    s = _span(obj)
    return obj["col"] + s / 2, obj["row"] + s / 2


def relation(a: dict, b: dict) -> str:
    """Direction of ``a`` relative to ``b`` along the dominant axis: left, right, above or below."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    if abs(ax - bx) > abs(ay - by):
        return "left" if ax < bx else "right"
    return "above" if ay < by else "below"


def _where(obj: dict, grid: int) -> str:
    x, y = _centre(obj)
    row = "top" if y < 0.4 * grid else "bottom" if y > 0.6 * grid else ""
    col = "left" if x < 0.4 * grid else "right" if x > 0.6 * grid else ""
    return " ".join(w for w in (row, col) if w) or "middle"


def _cells(obj: dict) -> list[tuple[int, int]]:
    s = _span(obj)
    return [(obj["row"] + dr, obj["col"] + dc) for dr in range(s) for dc in range(s)]


def _placeable(objects: list[dict]) -> bool:
    cells = [cell for obj in objects for cell in _cells(obj)]
    if len(cells) != len(set(cells)):
        return False
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            (ax, ay), (bx, by) = _centre(a), _centre(b)
            if abs(abs(ax - bx) - abs(ay - by)) < 1:  # the dominant axis must be clear
                return False
    return True


def _sample_scene(rng: np.random.Generator, grid: int) -> list[dict]:
    while True:
        n = int(rng.integers(2, 4))
        classes = rng.choice(len(CLASSES), n, replace=False)
        colours = rng.choice(len(COLOURS), n, replace=False)
        sizes = rng.integers(0, 2, n)
        objects = [dict(cls=CLASSES[c], colour=COLOURS[k], size=SIZES[s], row=0, col=0)
                   for c, k, s in zip(classes, colours, sizes)]
        for _ in range(100):
            for obj in objects:
                obj["row"], obj["col"] = (int(v) for v in rng.integers(0, grid - _span(obj) + 1, 2))
            if _placeable(objects):
                return objects


def _mirror(objects: list[dict], grid: int) -> list[dict]:
    """Mirror along the axis of the main relation (objects 0 and 1): that relation flips, the others on its axis too."""
    key = "col" if relation(objects[0], objects[1]) in ("left", "right") else "row"
    return [dict(obj, **{key: grid - _span(obj) - obj[key]}) for obj in objects]


def _swap_colours(objects: list[dict]) -> list[dict]:
    twin = [dict(obj) for obj in objects]
    twin[0]["colour"], twin[1]["colour"] = objects[1]["colour"], objects[0]["colour"]
    return twin


def captions(objects: list[dict], variants: Sequence[int], grid: int) -> list[str]:
    """The 5 captions of a scene; ``variants[t]`` picks the relation phrase of caption t (the caption plan)."""
    a, b = objects[0], objects[1]
    c = objects[2] if len(objects) > 2 else None

    def rel(x, y, t):
        return RELATIONS[relation(x, y)][variants[t]]

    last = (f"a {c['size']} {c['colour']} {c['cls']} is {rel(c, a, 4)} the {a['colour']} {a['cls']}" if c else
            f"a {b['size']} {b['colour']} {b['cls']} {rel(b, a, 4)} a {a['size']} {a['colour']} {a['cls']}")
    return [
        f"a {a['colour']} {a['cls']} {rel(a, b, 0)} a {b['colour']} {b['cls']}",
        f"there is a {a['size']} {a['colour']} {a['cls']} {rel(a, b, 1)} the {b['colour']} {b['cls']}",
        f"the {b['colour']} {b['cls']} is {rel(b, a, 2)} the {a['size']} {a['cls']}",
        f"a {a['colour']} {a['cls']} at the {_where(a, grid)} and a {b['colour']} {b['cls']} at the {_where(b, grid)}",
        last,
    ]


class _Prototypes:
    """Fixed random feature prototypes, each of norm ~1, drawn from the seed."""

    def __init__(self, rng: np.random.Generator, dim: int, grid: int) -> None:
        def draw(n):
            return rng.standard_normal((n, dim)) / math.sqrt(dim)

        self.cls, self.colour, self.size = draw(len(CLASSES)), draw(len(COLOURS)), draw(len(SIZES))
        self.background, self.row, self.col = draw(NUM_BACKGROUNDS), draw(grid), draw(grid)


def _split(rng: np.random.Generator, protos: _Prototypes, num_images: int, dim: int, grid: int, first_id: int):
    scenes, caps, twins = [], [], []
    for i in range(num_images):
        if i % 2 == 0:
            objects = _sample_scene(rng, grid)
            variants = [int(v) for v in rng.integers(0, 2, CAPTIONS_PER_IMAGE)]  # the plan, shared with the twin
            twins.append(None)
        else:
            base = scenes[i - 1]
            kind = "mirror" if (i // 2) % 2 == 0 else "colour_swap"
            objects = _mirror(base, grid) if kind == "mirror" else _swap_colours(base)
            twins[i - 1] = dict(of=i, kind=kind)
            twins.append(dict(of=i - 1, kind=kind))
        scenes.append(objects)
        caps.extend(captions(objects, variants, grid))

    regions = grid * grid
    # per cell: object part (class + colour + size) or a background texture
    identity = np.empty((num_images, regions, dim))
    background = rng.integers(0, NUM_BACKGROUNDS, (num_images, regions))
    identity[:] = protos.background[background]
    for i, objects in enumerate(scenes):
        for obj in objects:
            part = (protos.cls[CLASSES.index(obj["cls"])] + protos.colour[COLOURS.index(obj["colour"])]
                    + protos.size[SIZES.index(obj["size"])])
            for r, c in _cells(obj):
                identity[i, r * grid + c] = part
    rows, cols = np.divmod(np.arange(regions), grid)
    position = POSITION_WEIGHT * (protos.row[rows] + protos.col[cols])
    noise = NOISE * rng.standard_normal((num_images, regions, dim)) / math.sqrt(dim)
    ims = (identity + position + noise).astype(np.float32)

    cell_boxes = np.stack([cols / grid, rows / grid, (cols + 1) / grid, (rows + 1) / grid], axis=1)
    boxes = np.broadcast_to(cell_boxes, (num_images, regions, 4)).astype(np.float32)
    ids = [f"synth_{first_id + i:06d}" for i in range(num_images)]
    scene_records = [dict(id=ids[i], objects=objects, twin=twins[i]) for i, objects in enumerate(scenes)]
    return ims, boxes, caps, ids, scene_records


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def make_synthetic(out_dir: str | Path, seed: int = 0, num_train: int = DEFAULTS["num_train"],
                   num_dev: int = DEFAULTS["num_dev"], num_test: int = DEFAULTS["num_test"],
                   img_dim: int = DEFAULTS["img_dim"], num_regions: int = DEFAULTS["num_regions"],
                   overwrite: bool = False) -> Path:
    """Write the built-in dataset into ``out_dir`` (a ``<data_path>/<data_name>`` folder) and return it.

    Same arguments, same bytes. ConfigError if ``out_dir`` already holds one of its files and not ``overwrite``.
    """
    sizes = dict(train=num_train, dev=num_dev, test=num_test)
    for split, n in sizes.items():
        if type(n) is not int or n < 1:
            raise ConfigError(f"synthetic {split} size must be a positive number of images, found {n!r}")
    if type(img_dim) is not int or img_dim < 1:
        raise ConfigError(f"synthetic img_dim must be a positive integer, found {img_dim!r}")
    grid = math.isqrt(num_regions) if type(num_regions) is int and num_regions > 0 else 0
    if grid < 4 or grid * grid != num_regions:
        raise ConfigError(f"synthetic regions must be a square grid of at least 4 x 4 (16, 25, 36, 49, ...), "
                          f"found {num_regions!r}")
    out = Path(out_dir)
    names = ["synthetic.json"] + [f"{s}_{suffix}" for s in SPLITS
                                  for suffix in ("ims.npy", "caps.txt", "boxes.npy", "ids.txt", "scenes.json")]
    with FolderLock.acquire(out, "--out"):  # one writer; the files already there are checked under the lock
        existing = [n for n in names if (out / n).exists()]
        if existing and not overwrite:
            raise ConfigError(f"{out} already holds a dataset ({', '.join(existing[:3])}"
                              f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace it or choose "
                              "another --out")
        if not os.access(out, os.W_OK):
            raise ConfigError(f"cannot write into {out} (the folder is not writable); choose a writable --out")

        protos = _Prototypes(np.random.default_rng([seed, 0]), img_dim, grid)
        files: dict[str, bytes] = {}
        first_id = 0
        for k, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, k + 1])  # a split does not change when another split's size does
            ims, boxes, caps, ids, scenes = _split(rng, protos, sizes[split], img_dim, grid, first_id)
            first_id += sizes[split]
            files[f"{split}_caps.txt"] = ("\n".join(caps) + "\n").encode("utf-8")
            files[f"{split}_ids.txt"] = ("\n".join(ids) + "\n").encode("utf-8")
            files[f"{split}_boxes.npy"] = _npy_bytes(boxes)
            files[f"{split}_scenes.json"] = (json.dumps(scenes) + "\n").encode("utf-8")
            files[f"{split}_ims.npy"] = _npy_bytes(ims)
        options = dict(generator="hsc_pyg.data.synthetic", version=1, seed=seed, img_dim=img_dim,
                       num_regions=num_regions, captions_per_image=CAPTIONS_PER_IMAGE,
                       **{f"num_{s}": n for s, n in sizes.items()})
        files["synthetic.json"] = (json.dumps(options, indent=2) + "\n").encode("utf-8")
        with atomic_folder(out) as folder:  # the whole dataset at once: never new captions beside old features
            for name, data in files.items():
                (folder / name).write_bytes(data)
    return out


if __name__ == "__main__":
    from ..errors import refuse_as_command

    refuse_as_command(__spec__.name, "synthetic")
