"""Search a gallery: the first stage shortlists by cosine, the exact scorer ranks the shortlist.

A :class:`Gallery` is a split's images (and its captions, when it has them) encoded once by a model and kept in a cache
folder of ``.npy`` files that later calls memory-map (float16 by default). The cache records a fingerprint of what it
was made from: the model (its configuration, weights, buffers and vocabulary) and the input files (size, modification
time and a hash of sampled blocks). Opening a cache whose fingerprint differs from the model and files at hand is an
error (never a stale answer); the default cache folder is named by that fingerprint, so a changed model or changed
features simply get a new cache.

Queries (:func:`search_text`, :func:`search_image`): the query is encoded, compared by cosine with the gallery's
first-stage vectors (:class:`hsc_pyg.nn.first_stage.FirstStage`), the ``shortlist`` best are scored exactly, and the
top ``k`` of those are returned in exact-score order. Items outside the shortlist are never returned. For a text
query the shortlist over the images comes from the gallery's :class:`~hsc_pyg.engine.vector_index.Shortlister`: brute
force, or a FAISS index kept in the cache folder (``index-<kind>.faiss``, :mod:`hsc_pyg.engine.vector_index`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import DEFAULT_SHORTLIST
from ..data.graphs import caption_graph, collate_graphs
from ..data.precomp import ImageDataset, PrecompSplit, TextDataset
from ..data.vocab import Vocabulary, tokenize
from ..errors import ConfigError, HSCError
from ..io import FolderLock, atomic_files, atomic_folder, create_npy, file_fingerprint, parse_json
from ..nn.model import CaptionEncoding, HSCModel, ImageEncoding
from . import blocking
from .device import eval_mode
from .scoring import _bar, _model_device, check_compatible, score_matrix
from .vector_index import IndexSettings, Shortlister, build_faiss_index, configure, import_faiss, resolve_kind, top_n

CACHE_VERSION = 1
META = "gallery.json"


class CacheError(HSCError):
    """A gallery cache is damaged or belongs to another model or other features."""


# --------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: HSCModel) -> str:
    """SHA-256 of the model's configuration, every parameter and buffer, and its vocabulary."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    vocab = getattr(model, "vocab", None)
    if vocab is not None:
        digest.update(json.dumps(vocab.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the gallery
@dataclass
class Gallery:
    """Images (``[N, V, R, d]`` regions and ``[N, V, d]`` global vectors, as stored) with their first-stage vectors
    ``[N, k]`` and ids; for a split with captions also the captions (packed) with their vectors and texts."""

    folder: Path
    ids: list[str]
    images: ImageEncoding
    image_vectors: torch.Tensor
    captions: CaptionEncoding | None = None
    caption_vectors: torch.Tensor | None = None
    caption_texts: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    shortlister: Shortlister | None = None     # the first stage over the images (None: brute force)

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, image: int | str) -> int:
        """The row of an image given by row number or id; ConfigError when there is none."""
        if isinstance(image, str) and not image.lstrip("-").isdecimal():
            try:
                return self.ids.index(image)
            except ValueError:
                raise ConfigError(f"no image with id {image!r} in the gallery ({len(self)} images, ids like "
                                  f"{self.ids[0]!r}); pass an id of {{split}}_ids.txt or a row number") from None
        row = int(image)
        if not 0 <= row < len(self):
            raise ConfigError(f"image {row} is out of range: the gallery has {len(self)} images (0..{len(self) - 1})")
        return row


def _fingerprint(model: HSCModel, split: PrecompSplit, store_dtype: str) -> dict[str, Any]:
    files = {"ims": file_fingerprint(split.file("ims.npy"))}
    for suffix in ("caps.txt", "boxes.npy", "ids.txt"):
        if split.file(suffix).is_file():
            files[suffix.split(".")[0]] = file_fingerprint(split.file(suffix))
    return {"version": CACHE_VERSION, "model": model_fingerprint(model), "files": files, "dtype": store_dtype}


def default_cache_folder(split: PrecompSplit, fingerprint: dict[str, Any]) -> Path:
    """``$HSC_PYG_CACHE`` (default ``~/.cache/hsc_pyg``) ``/galleries/<data>-<split>-<fingerprint hash>``."""
    root = Path(os.environ.get("HSC_PYG_CACHE") or Path.home() / ".cache" / "hsc_pyg") / "galleries"
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{split.name}-{split.split}-{key}"


def _differences(found: dict[str, Any], want: dict[str, Any]) -> list[str]:
    what = []
    if found.get("model") != want["model"]:
        what.append("another model")
    for name, fp in want["files"].items():
        if found.get("files", {}).get(name) != fp:
            what.append(f"another {name} file")
    if found.get("dtype") != want["dtype"] or found.get("version") != want["version"]:
        what.append("another storage format")
    return what


def open_gallery(model: HSCModel, split: PrecompSplit, vocab: Vocabulary | None = None,
                 cache: str | Path | None = None, rebuild: bool = False, store_dtype: str = "float16",
                 batch_size: int = 128, progress: bool = False, index: str = "auto",
                 index_settings: IndexSettings = IndexSettings()) -> tuple[Gallery, bool]:
    """The gallery of ``split`` encoded by ``model``: read from its cache folder when the cache was made from this
    model and these files, else encoded and cached. Returns ``(gallery, built)``.

    ``cache``: the cache folder (default :func:`default_cache_folder`). A folder that holds the cache of another
    model or of other files, a damaged cache, or a folder that is not a cache is a :class:`CacheError` unless
    ``rebuild`` (then it is replaced, atomically: a failure leaves the old folder whole).
    ``index``: the first stage over the images (:mod:`hsc_pyg.engine.vector_index`: brute, flat, ivf, ivf_sq8, hnsw
    or auto); a FAISS index is kept in the cache folder beside the vectors, built on first use and whenever the
    vectors or the build settings change.
    """
    if store_dtype not in ("float16", "float32"):
        raise ConfigError(f"store_dtype must be float16 or float32, found {store_dtype!r}")
    resolve_kind(index, 0)     # an unknown kind fails before any work
    vocab = check_compatible(model, split, vocab) if split.num_captions else vocab
    want = _fingerprint(model, split, store_dtype)
    folder = Path(cache) if cache else default_cache_folder(split, want)
    if folder.exists() and not rebuild:
        meta_path = folder / META
        if not meta_path.is_file():
            raise CacheError(f"{folder} exists but is not a gallery cache (no {META}); choose another --cache folder "
                             "or pass --rebuild to replace it")
        meta = _read_meta(meta_path)
        differences = _differences(meta.get("fingerprint", {}), want)
        if differences:
            raise CacheError(f"the gallery cache {folder} was made from {' and '.join(differences)}; pass --rebuild "
                             "to replace it, or choose another --cache folder")
        built = False
    else:
        _build(model, split, vocab, folder, want, store_dtype, batch_size, progress)
        meta, built = _read_meta(folder / META), True
    gallery = _load(folder, meta)
    gallery.shortlister = _first_stage(gallery, resolve_kind(index, len(gallery)), index_settings)
    return gallery, built


def _first_stage(gallery: Gallery, kind: str, settings: IndexSettings) -> Shortlister:
    """Brute force, or the cache folder's FAISS index of ``kind``: read when it was built from these vectors with
    these build settings, else built and written beside them (index and description as one unit)."""
    vectors = gallery.image_vectors.numpy()
    if kind == "brute":
        return Shortlister(vectors)
    faiss = import_faiss()
    build = {k: v for k, v in settings.as_dict().items() if k not in ("nprobe", "ef_search")}
    want = {"kind": kind, "rows": len(gallery), "vectors_sample_sha256":
            gallery.meta["arrays"]["img_vectors"]["sample_sha256"], "build": build, "faiss": faiss.__version__}
    path, description = gallery.folder / f"index-{kind}.faiss", gallery.folder / f"index-{kind}.json"
    try:
        current = parse_json(description.read_text(encoding="utf-8")) == want and path.is_file()
    except (OSError, ValueError):
        current = False
    if current:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise CacheError(f"the FAISS index {path} is unreadable ({' '.join(str(e).split())[:120]}); delete it "
                             "or pass --rebuild") from None
    else:
        index = build_faiss_index(vectors, kind, settings)
        data = faiss.serialize_index(index)
        atomic_files({path: lambda f: f.write(data.tobytes()),
                      description: lambda f: f.write((json.dumps(want) + "\n").encode("utf-8"))})
    if index.ntotal != len(gallery):
        raise CacheError(f"the FAISS index {path} holds {index.ntotal} vectors for {len(gallery)} images; delete it "
                         "or pass --rebuild")
    configure(index, settings)
    return Shortlister(vectors, index, kind)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = parse_json(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), dict):
            raise ValueError("not a gallery description")
        return meta
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise CacheError(f"the gallery cache file {path} is damaged ({' '.join(str(e).split())}); pass --rebuild "
                         "to make the cache again") from None


def _load(folder: Path, meta: dict[str, Any]) -> Gallery:
    arrays: dict[str, torch.Tensor] = {}
    for name, spec in meta["arrays"].items():
        path = folder / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="c")      # copy-on-write: a writable view for torch, the file never changes
            damaged = (list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]
                       or file_fingerprint(path)["sample_sha256"] != spec["sample_sha256"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"the gallery cache file {path} is unreadable ({' '.join(str(e).split())}); pass "
                             "--rebuild to make the cache again") from None
        if damaged:
            raise CacheError(f"the gallery cache file {path} is damaged or truncated (its shape, type or content "
                             f"differs from {META}); pass --rebuild to make the cache again")
        arrays[name] = torch.from_numpy(array)
    _check_lists(folder, meta, arrays)
    images = ImageEncoding(arrays["img_regions"], arrays["img_glo"])
    captions = caption_vectors = None
    if "cap_words" in arrays:
        captions = CaptionEncoding(arrays["cap_words"], arrays["cap_starts"], arrays["cap_lengths"], arrays["cap_glo"])
        caption_vectors = arrays["cap_vectors"]
    return Gallery(folder, meta["ids"], images, arrays["img_vectors"], captions, caption_vectors,
                   meta.get("captions"), meta)


def _check_lists(folder: Path, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
    """CacheError unless the cache's id list has one text per image row and its caption list one per caption row
    (a list that does not match its arrays would give wrong ids, or an IndexError, later)."""
    rows = {"ids": len(arrays["img_regions"]) if "img_regions" in arrays else None,
            "captions": len(arrays["cap_lengths"]) if "cap_lengths" in arrays else None}
    for key, count in rows.items():
        values = meta.get(key)
        if count is None and values is None:
            continue
        if not isinstance(values, list) or len(values) != count or not all(isinstance(v, str) for v in values):
            found = f"{len(values)} entries" if isinstance(values, list) else f"a {type(values).__name__}"
            raise CacheError(f"the gallery cache file {folder / META} is damaged: its {key!r} holds {found} for "
                             f"{count} rows; pass --rebuild to make the cache again")


def _build(model: HSCModel, split: PrecompSplit, vocab: Vocabulary | None, folder: Path,
           fingerprint: dict[str, Any], store_dtype: str, batch_size: int, progress: bool) -> None:
    """Encode ``split`` into a new folder that replaces ``folder`` only once it is complete
    (:func:`hsc_pyg.io.atomic_folder`: a failure leaves the old cache whole)."""
    dtype = np.dtype(store_dtype)
    device, _ = _model_device(model)
    with FolderLock.acquire(folder, "--cache"), atomic_folder(folder) as work, eval_mode(model), torch.no_grad():
        arrays: dict[str, np.ndarray] = {}
        images = ImageDataset(split, img_edges=model.config.img_edges)
        batches = [list(range(i, min(i + batch_size, split.num_images))) for i in range(0, split.num_images, batch_size)]
        loader = DataLoader(images, batch_sampler=batches, collate_fn=images.collate_fn)
        with _bar(split.num_images, "encoding gallery images", "image", progress) as bar:
            for ids, batch in zip(batches, loader):
                enc = model.encode_images(batch.to(device))
                vec = model.first_stage.image_vectors(enc.glo)
                for name, value in (("img_regions", enc.regions), ("img_glo", enc.glo), ("img_vectors", vec)):
                    if name not in arrays:    # written into memory-mapped files as they come: bounded memory
                        shape = (split.num_images,) + tuple(value.shape[1:])
                        arrays[name] = create_npy(work / f"{name}.npy", np.float32 if name == "img_vectors" else dtype,
                                                  shape)  # its size reserved: a full disk fails here, not in a write
                    arrays[name][ids[0]:ids[-1] + 1] = value.float().cpu().numpy()
                bar.update(len(ids))
        for array in arrays.values():
            array.flush()
        del arrays
        if split.num_captions:
            for name, value in _encode_captions(model, split, vocab, batch_size, progress, dtype).items():
                np.save(work / f"{name}.npy", value)
        specs = {}
        for path in sorted(work.glob("*.npy")):
            array = np.load(path, mmap_mode="r")
            specs[path.stem] = {"shape": list(array.shape), "dtype": str(array.dtype),
                                "sample_sha256": file_fingerprint(path)["sample_sha256"]}
        meta = {"fingerprint": fingerprint, "arrays": specs, "ids": split.ids or [str(i) for i in range(split.num_images)],
                "captions": split.captions if split.num_captions else None, "per_image": split.per_image,
                "source": {"data": str(split.path), "split": split.split},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (work / META).write_text(json.dumps(meta) + "\n", encoding="utf-8")


def _encode_captions(model: HSCModel, split: PrecompSplit, vocab: Vocabulary, batch_size: int, progress: bool,
                     dtype: np.dtype) -> dict[str, np.ndarray]:
    """The split's captions, packed (words back to back in split order), with their first-stage vectors."""
    device, _ = _model_device(model)
    texts = TextDataset(split, vocab, txt_edges=model.config.txt_edges)
    batches = [list(range(i, min(i + batch_size, split.num_captions))) for i in range(0, split.num_captions, batch_size)]
    loader = DataLoader(texts, batch_sampler=batches, collate_fn=texts.collate_fn)
    words, glo, vectors, lengths = [], [], [], []
    with _bar(split.num_captions, "encoding gallery captions", "caption", progress) as bar:
        for ids, batch in zip(batches, loader):
            enc = model.encode_captions(batch.to(device))
            words.append(enc.words.float().cpu().numpy().astype(dtype))
            glo.append(enc.glo.float().cpu().numpy().astype(dtype))
            vectors.append(model.first_stage.caption_vectors(enc.glo).cpu().numpy())
            lengths.append(enc.lengths.cpu().numpy())
            bar.update(len(ids))
    lengths_all = np.concatenate(lengths).astype(np.int64)
    return {"cap_words": np.concatenate(words), "cap_glo": np.concatenate(glo), "cap_vectors": np.concatenate(vectors),
            "cap_lengths": lengths_all, "cap_starts": np.cumsum(lengths_all) - lengths_all}


# --------------------------------------------------------------------------- queries
@dataclass
class Hit:
    index: int
    id: str
    score: float
    first_stage: float
    text: str | None = None


@dataclass
class SearchResult:
    """The answer to one query: ``hits`` best first (exact scores); ``unknown_words``: query words outside the
    vocabulary (they were read as ``<unk>``); ``shortlist``: items scored exactly; ``clamped``: ``k`` was larger than
    the gallery and was reduced to its size; ``query_id``: the id of a query image."""

    query: str
    kind: str
    hits: list[Hit]
    shortlist: int
    gallery_size: int
    seconds: float
    unknown_words: list[str] = field(default_factory=list)
    clamped: bool = False
    first_stage_trained: bool = True
    query_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["results"] = out.pop("hits")
        return out


def _check_k(k: int, shortlist: int, size: int) -> tuple[int, int, bool]:
    if k < 1:
        raise ConfigError(f"--k must be at least 1, found {k}")
    if shortlist < 1:
        raise ConfigError(f"--shortlist must be at least 1, found {shortlist}")
    clamped = k > size
    k = min(k, size)
    return k, min(max(shortlist, k), size), clamped


def unknown_query_words(vocab: Vocabulary, text: str) -> list[str]:
    """The words of a free-text query outside the vocabulary. ConfigError for an empty query or one made only of
    unknown words."""
    words = tokenize(text)
    if not words:
        raise ConfigError("the query is empty; pass words to search for, e.g. --query \"a dog runs on the beach\"")
    unknown = [w for w in words if w not in vocab]
    if len(unknown) == len(words):
        raise ConfigError(f"no word of the query is in the model's vocabulary ({', '.join(unknown)}); "
                          f"rephrase it with common words (the vocabulary has {len(vocab)} entries)")
    return unknown


def encode_query(model: HSCModel, vocab: Vocabulary, text: str) -> tuple[CaptionEncoding, list[str]]:
    """Encode a free-text query; returns the encoding and the words outside the vocabulary (see
    :func:`unknown_query_words`)."""
    unknown = unknown_query_words(vocab, text)
    device, _ = _model_device(model)
    graph = caption_graph(vocab.encode(text), edges=model.config.txt_edges)
    with eval_mode(model), torch.no_grad():
        enc = model.encode_captions(collate_graphs([graph]).to(device))
    return enc, unknown


def search_text(model: HSCModel, gallery: Gallery, text: str, k: int = 5, shortlist: int = DEFAULT_SHORTLIST,
                vocab: Vocabulary | None = None) -> SearchResult:
    """The ``k`` gallery images that best match ``text``: first-stage cosine over all images, exact scores of the
    best ``shortlist`` of them."""
    start = time.perf_counter()
    vocab = vocab if vocab is not None else model.vocab
    if vocab is None:
        raise ConfigError("the model carries no vocabulary (official checkpoints do not); pass --vocab_path")
    k, shortlist, clamped = _check_k(k, shortlist, len(gallery))
    enc, unknown = encode_query(model, vocab, text)
    with torch.no_grad():
        query = model.first_stage.caption_vectors(enc.glo).cpu()
    shortlister = gallery.shortlister or Shortlister(gallery.image_vectors.numpy())
    top = shortlister.search(query[0].numpy(), shortlist)
    first = (gallery.image_vectors[torch.from_numpy(top)].float() @ query[0]).numpy()
    device, dtype = _model_device(model)
    with eval_mode(model):          # the one query stays where the model encoded it (blocking.score bounds the memory)
        shortlisted = gallery.images[torch.from_numpy(top)].to(device, dtype)
        exact = blocking.score(model, shortlisted, enc)[:, 0].float().cpu().numpy()
    order = np.argsort(-exact, kind="stable")[:k]
    hits = [Hit(int(top[o]), gallery.ids[top[o]], float(exact[o]), float(first[o])) for o in order]
    return SearchResult(text, "text", hits, len(top), len(gallery), time.perf_counter() - start, unknown, clamped,
                        bool(model.first_stage.trained))


def search_image(model: HSCModel, gallery: Gallery, image: int | str, k: int = 5,
                 shortlist: int = DEFAULT_SHORTLIST) -> SearchResult:
    """The ``k`` captions of the gallery that best match one of its images (by row or id)."""
    start = time.perf_counter()
    if gallery.captions is None:
        raise ConfigError("this gallery has no captions ({split}_caps.txt) to search; image queries need them")
    row = gallery.index_of(image)
    k, shortlist, clamped = _check_k(k, shortlist, len(gallery.captions))
    first = (gallery.caption_vectors.float() @ gallery.image_vectors[row].float()).numpy()
    top = top_n(first, shortlist)
    exact = score_matrix(model, gallery.images[row:row + 1], gallery.captions[torch.from_numpy(top)],
                         progress=False)[0]
    order = np.argsort(-exact, kind="stable")[:k]
    per_image = gallery.meta.get("per_image", 5) or 5
    hits = [Hit(int(top[o]), gallery.ids[int(top[o]) // per_image], float(exact[o]), float(first[top[o]]),
                gallery.caption_texts[int(top[o])]) for o in order]
    return SearchResult(str(image), "image", hits, shortlist, len(gallery.captions), time.perf_counter() - start,
                        clamped=clamped, first_stage_trained=bool(model.first_stage.trained), query_id=gallery.ids[row])
