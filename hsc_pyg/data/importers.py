"""Captions from the usual formats -> ``{split}_caps.txt`` aligned with ``{split}_ids.txt`` (the precomp layout).

Formats (``fmt``; ``auto`` tells them apart by the file):

- ``karpathy``: Karpathy's ``dataset_flickr8k.json`` / ``dataset_flickr30k.json`` / ``dataset_coco.json``
  (``images[].{filepath, filename, split, sentences[].raw}``), with SCAN's split conventions: ``train`` and
  ``restval`` -> ``train``, ``val`` -> ``dev``, ``test`` -> ``test`` (``testall`` for COCO, its 5,000 test images).
  A photo's id is ``filepath/filename`` when the file gives a ``filepath`` (COCO: ``val2014/COCO_val2014_...jpg``),
  else ``filename``: the path relative to the photo root that ``python -m hsc_pyg.features --images`` reads.
- ``coco``: COCO's ``captions_*.json`` (``images[].{id, file_name}``, ``annotations[].{image_id, caption}``), one split.
- ``csv``: ``image,caption`` rows (the Flickr8k ``captions.txt``; the header row is optional), one split.
- ``txt``: a folder with one ``NAME.txt`` per photo ``NAME.<ext>``, one caption per line, one split.

Policy:

- Order: when ``out/{split}_ids.txt`` exists (the features were extracted first) the captions follow it; otherwise
  the photos are sorted by id (code point order), as ``python -m hsc_pyg.features`` sorts a folder, and
  ``{split}_ids.txt`` is written too.
- Text: runs of whitespace (line breaks included) become one space, ends stripped; otherwise unchanged.
- More than ``per_image`` (5) captions: the first 5 in the file's order are kept (as SCAN did for COCO's photos with
  6 or 7); the report counts them.
- Fewer: an error listing the photos, unless ``fewer="repeat"``, which cycles a photo's captions up to 5 (a photo
  with none is always an error).
- Captions of photos outside the split's photos (``{split}_ids.txt``, or the ``images`` folder when given): an error
  listing them, unless ``ignore_extra``, which leaves them out (counted in the report).
- Split lists (``split_lists``, for the formats without splits of their own): one file of photo names per split (the
  official Flickr8k ``train_images.txt`` ...). Each split holds the photos of its list, in the list's order (unless
  ``{split}_ids.txt`` exists); the lists must be disjoint and every listed photo needs captions; captions of photos
  in no list are left out and counted (``unlisted``; Flickr8k has 91 such photos).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import ConfigError, DataError
from ..io import FolderLock, atomic_files, read_json
from .precomp import read_lines

#: file name endings that are photos (case-insensitive)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FORMATS = ("auto", "karpathy", "coco", "csv", "txt")
FEWER = ("error", "repeat")
#: Karpathy's split -> SCAN's split (COCO's test -> testall: SCAN's ``test`` is its first 1,000 images)
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}

Captions = dict[str, list[str]]  # photo id -> its captions in file order


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as "
                        "UTF-8") from None


def _read_text(path: Path) -> str:
    try:
        return _decode(path, path.read_bytes())
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check --captions") from None


def _read_json(path: Path) -> object:
    return read_json(path, "captions file", "check --captions")


def _json_type(value: object) -> str:
    return {dict: "object", list: "list", str: "text", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def check_photo_id(photo: str, where: str) -> None:
    """DataError for a photo id that would break the precomp layout: one id a line in ``{split}_ids.txt``, each a path
    under the photo folder. Refused: line breaks and other control characters, NULs, an absolute path, a backslash,
    ``.`` / ``..`` parts, empty parts."""
    bad = next((c for c in photo if ord(c) < 32 or c in "\x7f\x85\u2028\u2029"), None)
    if bad is not None:
        raise DataError(f"{where}: photo name {photo!r} holds the control character {bad!r}, which "
                        "{split}_ids.txt (one name a line) cannot hold; rename the photo")
    parts = photo.split("/")
    if "\\" in photo or photo.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise DataError(f"{where}: photo name {photo!r} is not a relative path inside the photo folder (no leading "
                        "/, backslash, '.', '..' or empty part); fix the name")


def check_split_name(split: str) -> None:
    """ConfigError for a split name that is not a plain name: its files would leave the output folder (a path
    separator, ``..``) or hide in it (a leading dot)."""
    if not split or split.startswith(".") or any(c in split for c in "/\\") or any(ord(c) < 32 for c in split):
        raise ConfigError(f"--split {split!r} is not a split name; use a plain name such as train, dev or test")


def clean_caption(text: str) -> str:
    """One line: whitespace runs (line breaks included) -> one space, ends stripped."""
    return " ".join(text.split())


def _add(captions: Captions, photo: str, text: object, where: str) -> None:
    check_photo_id(photo, where)
    if not isinstance(text, str) or not clean_caption(text):
        raise DataError(f"{where}: the caption of photo {photo!r} is empty or not text; write it or remove it")
    captions.setdefault(photo, []).append(clean_caption(text))


# --------------------------------------------------------------------------- readers: file -> {split: Captions}
def read_karpathy(path: Path) -> dict[str, Captions]:
    """Karpathy's dataset_*.json -> SCAN split -> photo id -> captions (``sentences[].raw``)."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not a Karpathy dataset JSON (expected {{\"images\": [...]}})")
    test = "testall" if data.get("dataset") == "coco" else "test"
    splits: dict[str, Captions] = {}
    seen: set[str] = set()
    for n, image in enumerate(data["images"]):
        try:
            photo = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
            split, sentences = image["split"], image["sentences"]
            raws = [s["raw"] for s in sentences]
        except (KeyError, TypeError, AttributeError):
            raise DataError(f"{path}: images[{n}] lacks filename, split or sentences[].raw; expected Karpathy's "
                            "layout") from None
        for key in ("filepath", "filename", "split"):
            if image.get(key) is not None and not isinstance(image[key], str):
                raise DataError(f"{path}: images[{n}].{key} is a {_json_type(image[key])}, not text; expected "
                                "Karpathy's layout")
        if split not in KARPATHY_SPLITS:
            raise DataError(f"{path}: images[{n}] ({photo}) has split {split!r}; expected one of "
                            f"{', '.join(KARPATHY_SPLITS)}")
        if photo in seen:
            raise DataError(f"{path}: photo {photo!r} appears twice (images[{n}]); remove the duplicate")
        seen.add(photo)
        captions = splits.setdefault(test if split == "test" else KARPATHY_SPLITS[split], {})
        captions[photo] = []
        for raw in raws:
            _add(captions, photo, raw, f"{path} images[{n}]")
    return splits


def read_coco(path: Path) -> Captions:
    """COCO captions_*.json -> photo file name -> captions (annotation order)."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise DataError(f"{path} is not a COCO captions JSON (expected \"images\" and \"annotations\" lists)")
    names: dict[object, str] = {}
    for n, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise DataError(f"{path}: images[{n}] lacks id or file_name (text)")
        if not isinstance(image["id"], (int, str)) or isinstance(image["id"], bool):
            raise DataError(f"{path}: images[{n}].id is a {_json_type(image['id'])}; expected a number or text")
        if image["file_name"] in names.values() or image["id"] in names:
            raise DataError(f"{path}: images[{n}] repeats photo {image['file_name']!r} (id {image['id']}); remove "
                            "the duplicate")
        names[image["id"]] = image["file_name"]
    captions: Captions = {}
    for n, note in enumerate(data["annotations"]):
        if isinstance(note, dict) and not isinstance(note.get("image_id"), (int, str, type(None))):
            raise DataError(f"{path}: annotations[{n}].image_id is a {_json_type(note['image_id'])}; expected the "
                            "id of one of images")
        if not isinstance(note, dict) or note.get("image_id") not in names:
            raise DataError(f"{path}: annotations[{n}] names image_id "
                            f"{note.get('image_id') if isinstance(note, dict) else None!r}, which is not in images")
        _add(captions, names[note["image_id"]], note.get("caption"), f"{path} annotations[{n}]")
    return captions


def read_csv(path: Path) -> Captions:
    """``image,caption`` rows (header optional, RFC 4180 quoting) -> photo -> captions."""
    rows = csv.reader(io.StringIO(_read_text(path), newline=""))
    captions: Captions = {}
    for row in rows:
        line = rows.line_num
        if line == 1 and [c.strip().lower() for c in row] == ["image", "caption"]:
            continue
        if not row:
            continue
        if len(row) < 2 or not row[0].strip():
            raise DataError(f"{path} line {line}: expected image,caption, found {len(row)} column; write the photo's "
                            "file name, a comma, then the caption")
        # an unquoted caption holding commas comes back whole: photo names hold no commas
        _add(captions, row[0].strip(), ",".join(row[1:]), f"{path} line {line}")
    return captions


def read_txt_folder(folder: Path, photos: Iterable[str]) -> Captions:
    """One ``NAME.txt`` per photo ``NAME.<ext>`` (one caption per line) -> photo -> captions."""
    by_stem: dict[str, str] = {}
    for photo in photos:
        stem = Path(photo).with_suffix("").as_posix()
        if stem in by_stem:
            raise DataError(f"photos {by_stem[stem]!r} and {photo!r} share the name {stem!r}, so {stem}.txt cannot "
                            "tell them apart; rename one")
        by_stem[stem] = photo
    captions: Captions = {}
    for text_file in sorted(folder.glob("*.txt")):
        stem = text_file.stem
        photo = by_stem.get(stem, f"{stem} (from {text_file.name})")
        lines = _read_text(text_file).splitlines()
        for number, line in enumerate(lines, 1):
            if line.strip():
                _add(captions, photo, line, f"{text_file} line {number}")
        captions.setdefault(photo, [])
    return captions


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "txt"
    if path.suffix.lower() in (".csv", ".txt", ".tsv"):
        return "csv"
    data = _read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        return "coco"
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return "karpathy"
    raise DataError(f"cannot tell the format of {path}; pass --format karpathy, coco, csv or txt")


# --------------------------------------------------------------------------- aligning with the photos
@dataclass
class SplitReport:
    """One split written: ``photos`` rows, ``per_image`` captions each; ``trimmed`` photos had more (first kept),
    ``repeated`` had fewer (cycled), ``extra`` photos' captions were left out (``ignore_extra``); ``unlisted``: with
    split lists, the captioned photos in none of them (left out; the same count in every split's report)."""

    split: str
    photos: int
    per_image: int
    trimmed: int
    repeated: int
    extra: int
    wrote_ids: bool
    unlisted: int = 0


def _listing(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _photo_folder_names(images: Path) -> list[str]:
    return sorted(p.name for p in images.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())


def _align(split: str, captions: Captions, ids: list[str] | None, ids_source: str, images: Path | None,
           per_image: int, fewer: str, ignore_extra: bool) -> tuple[list[str], list[str], SplitReport]:
    """Photo order and ``len(order) * per_image`` captions for one split; DataError by the policy above."""
    if ids is None:
        order = sorted(captions)
        if images is not None:
            missing = [p for p in order if not (images / p).is_file()]
            if missing and not ignore_extra:
                raise DataError(f"{len(missing)} captioned photos of split {split} are not in {images}: "
                                f"{_listing(missing)}; add the photos, fix the captions file, or pass --ignore_extra "
                                "to leave their captions out")
            order = [p for p in order if p not in set(missing)]
    else:
        order = ids
    extra = [p for p in captions if p not in set(order)]
    if extra and not ignore_extra:
        raise DataError(f"{len(extra)} captioned photos are not in {ids_source}: {_listing(extra)}; fix the captions "
                        "file, or pass --ignore_extra to leave their captions out")
    none = [p for p in order if not captions.get(p)]
    if none:
        raise DataError(f"{len(none)} photos of {ids_source} have no caption: {_listing(none)}; write captions for "
                        "them or leave them out of the photos")
    short = [p for p in order if len(captions[p]) < per_image]
    if short and fewer == "error":
        raise DataError(f"{len(short)} photos have fewer than {per_image} captions: "
                        f"{_listing([f'{p} ({len(captions[p])})' for p in short])}; write more, or pass "
                        "--fewer repeat to cycle their captions")
    lines = []
    for photo in order:
        texts = captions[photo]
        lines.extend(texts[k % len(texts)] for k in range(per_image))
    trimmed = sum(len(captions[p]) > per_image for p in order)
    return order, lines, SplitReport(split, len(order), per_image, trimmed, len(short), len(extra), wrote_ids=False)


def read_photo_names(path: str | Path) -> list[str]:
    """Photo names, one a line (an ids file or a list of photos), read as every one-item-per-line file is; DataError
    for a name given twice."""
    ids = read_lines(path, what="photo name")
    seen: dict[str, int] = {}
    for number, photo in enumerate(ids, 1):
        if photo in seen:
            raise DataError(f"{path} line {number} repeats photo {photo!r} (first on line {seen[photo]}); each photo "
                            "is one row: remove the duplicate")
        seen[photo] = number
    return ids


def _read_split_lists(split_lists: Mapping[str, str | Path]) -> dict[str, list[str]]:
    """Split name -> its photo names in list order; DataError for a photo in two lists."""
    lists: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name, path in split_lists.items():
        if not name or any(c in name for c in "/\\\0=") or name.startswith("."):
            raise ConfigError(f"--split_list {name}={path}: {name!r} is not a split name; use a plain name such as "
                              "train, dev or test")
        lists[name] = read_photo_names(path)
        for photo in lists[name]:
            if photo in owner:
                raise DataError(f"photo {photo!r} is in the split lists of both {owner[photo]} and {name} ({path}); "
                                "the lists must be disjoint: remove it from one")
            owner[photo] = name
    return lists


def import_captions(captions: str | Path, out: str | Path, *, fmt: str = "auto", split: str | None = None,
                    split_lists: Mapping[str, str | Path] | None = None, images: str | Path | None = None,
                    per_image: int = 5, fewer: str = "error", ignore_extra: bool = False,
                    overwrite: bool = False) -> list[SplitReport]:
    """Write ``{split}_caps.txt`` (and ``{split}_ids.txt`` when absent) into ``out`` for each split the source holds
    (Karpathy: train, dev, test / testall; only ``split`` when given), for ``split`` (the other formats), or for each
    split of ``split_lists`` (split name -> file of photo names; the other formats).

    Every split is checked before anything is written. ConfigError for options and for an existing
    ``{split}_caps.txt`` with other content (unless ``overwrite``); DataError for the inputs.
    """
    source, out = Path(captions), Path(out)
    fmt, images, lists = _check_import(source, fmt, split, split_lists, images, per_image, fewer)
    splits, unlisted = _read_splits(source, out, fmt, split, lists, images)
    with FolderLock.acquire(out, "--out"):  # the files already there are compared under the lock
        written: list[tuple[Path, bytes]] = []
        reports = []
        for name, caps in splits.items():
            ids_file, caps_file = out / f"{name}_ids.txt", out / f"{name}_caps.txt"
            ids = read_photo_names(ids_file) if ids_file.exists() else None
            if ids is None and lists:
                ids, source_name = lists[name], f"the split list {split_lists[name]}"
            elif ids is None and images is not None and fmt != "karpathy":
                ids, source_name = _photo_folder_names(images), f"photo folder {images}"
            else:
                source_name = str(ids_file) if ids is not None else f"the photos of split {name}"
            order, lines, report = _align(name, caps, ids, source_name, images, per_image, fewer, ignore_extra)
            caps_bytes = "".join(line + "\n" for line in lines).encode("utf-8")
            if caps_file.exists() and not overwrite and caps_file.read_bytes() != caps_bytes:
                raise ConfigError(f"{caps_file} already exists with other captions; pass --overwrite to replace it, "
                                  "or choose another --out")
            if not ids_file.exists():
                written.append((ids_file, "".join(p + "\n" for p in order).encode("utf-8")))
            report.wrote_ids, report.unlisted = not ids_file.exists(), unlisted
            written.append((caps_file, caps_bytes))
            reports.append(report)
        atomic_files({path: (lambda f, data=data: f.write(data)) for path, data in written})  # every split or none
    return reports


def _check_import(source: Path, fmt: str, split: str | None, split_lists: Mapping[str, str | Path] | None,
                  images: str | Path | None, per_image: int, fewer: str
                  ) -> tuple[str, Path | None, dict[str, list[str]] | None]:
    """The options of :func:`import_captions` checked: ``(format, photo folder or None, split lists or None)``, the
    format detected for ``auto`` and the folder of a ``txt`` source as its photo folder when none is given."""
    if not source.exists():
        raise DataError(f"captions {source} do not exist; pass --captions FILE (or a folder of NAME.txt files)")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if fewer not in FEWER:
        raise ConfigError(f"--fewer {fewer!r} is unknown; choose error or repeat")
    if type(per_image) is not int or per_image < 1:
        raise ConfigError(f"--per_image must be a positive integer, found {per_image!r}")
    images = Path(images) if images is not None else None
    if images is not None and not images.is_dir():
        raise DataError(f"photo folder {images} does not exist or is not a folder; fix --images")
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "txt" and images is None:
        images = source  # photos and their NAME.txt side by side
    if split_lists and (fmt == "karpathy" or split):
        raise ConfigError("--split_list cannot go with --split or Karpathy's JSON (which names its own splits); pass "
                          "either the split lists or one --split")
    lists = _read_split_lists(split_lists) if split_lists else None
    if fmt != "karpathy" and not split and not lists:
        raise ConfigError(f"--split is needed for the {fmt} format (it holds no splits); for example --split train, "
                          "or --split_list train=FILE per split")
    if split:
        check_split_name(split)
    return fmt, images, lists


def _read_splits(source: Path, out: Path, fmt: str, split: str | None, lists: dict[str, list[str]] | None,
                 images: Path | None) -> tuple[dict[str, Captions], int]:
    """Split name -> its captions, read from ``source``, and the number of captioned photos in no split list."""
    if fmt == "karpathy":
        splits = read_karpathy(source)
        if split:
            if split not in splits:
                raise DataError(f"{source} has no photos of split {split!r} (SCAN names: {', '.join(sorted(splits))})")
            splits = {split: splits[split]}
    elif fmt == "coco":
        splits = {split: read_coco(source)}
    elif fmt == "csv":
        splits = {split: read_csv(source)}
    elif lists:
        splits = {split: read_txt_folder(source, [p for names in lists.values() for p in names])}
    else:
        ids_file = out / f"{split}_ids.txt"
        photos = read_photo_names(ids_file) if ids_file.exists() else _photo_folder_names(images)
        splits = {split: read_txt_folder(source, photos)}
    if not lists:
        return splits, 0
    (everything,) = splits.values()  # the one set of captions read
    listed = {p for names in lists.values() for p in names}
    if images is not None:
        missing = [p for names in lists.values() for p in names if not (images / p).is_file()]
        if missing:
            raise DataError(f"{len(missing)} listed photos are not in {images}: {_listing(missing)}; fix the split "
                            "lists or --images")
    by_list = {name: {p: everything[p] for p in names if p in everything} for name, names in lists.items()}
    return by_list, sum(p not in listed for p in everything)
