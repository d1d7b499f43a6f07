"""Vocabulary and tokenizer, compatible with the SCAN / SGRAF / HSC vocabulary files.

The JSON layout is the one of the official ``f30k_precomp_vocab.json`` and ``coco_precomp_vocab.json``::

    {"word2idx": {"<pad>": 0, ...}, "idx2word": {"0": "<pad>", ...}, "idx": 8481}

``idx2word`` keys are strings (JSON objects have string keys); ``idx`` is the number of entries. The four specials
come first: ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3.

Build a vocabulary file from a dataset's train captions::

    hsc-pyg vocab --data_path data --data_name synthetic_precomp --out vocab/synthetic_vocab.json
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from nltk.tokenize import NLTKWordTokenizer

from ..errors import ConfigError, VocabError
from ..io import read_json, write_json

PAD, START, END, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
#: The byte order mark some editors put at the start of a UTF-8 file; it is not text, so readers drop it.
BOM = "\ufeff"
#: how to make a vocabulary file, for messages
BUILD = "hsc-pyg vocab --data_path DIR --data_name NAME --out FILE"

_WORD_TOKENIZER = NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words with NLTK's word tokenizer; needs no NLTK data download.

    This is ``nltk.word_tokenize(text.lower(), preserve_line=True)``: the improved Treebank tokenizer that
    ``nltk.word_tokenize`` uses, run on the whole caption. ``nltk.word_tokenize`` with its default
    ``preserve_line=False`` first splits the text into sentences with the Punkt model, which is a data download
    (``punkt_tab``) and is not available offline. The only difference: a period inside a multi-sentence caption stays
    attached to its word (``"ok. then"`` -> ``["ok.", "then"]`` instead of ``["ok", ".", "then"]``); the final
    period of the caption is split off either way (``"a dog ."`` -> ``["a", "dog", "."]``). Captions are single
    sentences, and on lower-cased text Punkt rarely splits anyway: the out-of-vocabulary rate of the Flickr30K test
    captions against the official vocabulary is about 1% of tokens.

    Examples: ``"A man's dog doesn't run."`` -> ``["a", "man", "'s", "dog", "does", "n't", "run", "."]``;
    quotes become ``` `` ``` and ``''`` as in the Treebank convention.
    """
    return _WORD_TOKENIZER.tokenize(text.lower())


class Vocabulary:
    """Word <-> id map; the four specials always hold ids 0-3.

    Attributes ``word2idx``, ``idx2word`` (int keys in memory, string keys on disk) and ``idx`` (the next free id, equal
    to the size) are those of the SCAN ``Vocabulary`` class, so code written against it keeps working.
    """

    def __init__(self, words: Iterable[str] = ()) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        self.idx: int = 0
        for word in SPECIALS:
            self.add_word(word)
        for word in words:
            self.add_word(word)

    def add_word(self, word: str) -> int:
        """Add ``word`` if it is new; return its id."""
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1
        return self.word2idx[word]

    def __len__(self) -> int:
        return self.idx

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, UNK)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def encode(self, text: str) -> list[int]:
        """``[<start>] + ids of tokenize(text) + [<end>]``; unknown words map to ``<unk>``."""
        return [START] + [self(word) for word in tokenize(text)] + [END]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids`` (ints or a 1-D tensor), specials included."""
        words = []
        for i in ids:
            i = int(i)
            if i not in self.idx2word:
                raise VocabError(f"token id {i} is outside the vocabulary (ids 0..{self.idx - 1}); "
                                 "the ids come from a different vocabulary than this one")
            words.append(self.idx2word[i])
        return words

    # ---- SCAN JSON layout --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in self.idx2word.items()},
            "idx": self.idx,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "vocabulary") -> "Vocabulary":
        """Rebuild from the SCAN layout, checking it is complete and consistent (``source`` names it in errors)."""
        fix = f"rebuild it with `{BUILD}` or use the official SCAN file"
        if not isinstance(d, dict):
            raise VocabError(f"{source}: expected a JSON object with keys word2idx, idx2word, idx; "
                             f"found {type(d).__name__}; {fix}")
        missing = [k for k in ("word2idx", "idx2word", "idx") if k not in d]
        if missing:
            raise VocabError(f"{source}: missing key(s) {', '.join(missing)}; expected the SCAN layout "
                             f"{{word2idx, idx2word, idx}}, found keys {', '.join(map(str, d)) or 'none'}; {fix}")
        word2idx, idx2word, size = d["word2idx"], d["idx2word"], d["idx"]
        if not isinstance(word2idx, dict) or not isinstance(idx2word, dict):
            raise VocabError(f"{source}: word2idx and idx2word must be JSON objects; {fix}")
        if not word2idx:
            raise VocabError(f"{source}: the vocabulary is empty (word2idx has no entries); {fix}")
        for i, word in enumerate(SPECIALS):
            if word2idx.get(word) != i:
                raise VocabError(f"{source}: special {word} must have id {i}, found {word2idx.get(word)!r} "
                                 f"(expected <pad>=0 <start>=1 <end>=2 <unk>=3); {fix}")
        ids = sorted(word2idx.values()) if all(type(v) is int for v in word2idx.values()) else None
        if ids != list(range(len(word2idx))):
            raise VocabError(f"{source}: word2idx ids must be the integers 0..{len(word2idx) - 1}, each once; {fix}")
        if type(size) is not int or size != len(word2idx):
            raise VocabError(f"{source}: idx is {size!r} but word2idx has {len(word2idx)} entries; "
                             f"expected them equal; {fix}")
        try:
            inverse = {int(k): w for k, w in idx2word.items()}
        except (TypeError, ValueError):
            raise VocabError(f"{source}: idx2word keys must be integer strings (\"0\", \"1\", ...); {fix}") from None
        if inverse != {i: w for w, i in word2idx.items()}:
            raise VocabError(f"{source}: idx2word is not the inverse of word2idx; {fix}")
        vocab = cls()
        vocab.word2idx = dict(word2idx)
        vocab.idx2word = dict(sorted(inverse.items()))
        vocab.idx = size
        return vocab

    def save(self, path: str | Path) -> None:
        """Write the SCAN JSON layout (creating the parent folder)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read a vocabulary JSON file (hsc_pyg's or the official SCAN/SGRAF ones, unchanged)."""
        p = Path(path)
        d = read_json(p, "vocabulary file", f"build one with `{BUILD}` or pass the official SCAN file",
                      error=VocabError)
        return cls.from_dict(d, source=f"vocabulary file {p}")


def build_vocab(captions: Iterable[str], threshold: int = 4) -> Vocabulary:
    """Vocabulary of the words seen at least ``threshold`` times in ``captions``.

    Specials first, then the kept words by decreasing count, ties in alphabetical order: the result depends only on the
    word counts, not on the order of the captions.
    """
    if type(threshold) is not int or threshold < 1:
        raise ConfigError(f"vocabulary threshold must be a positive integer, found {threshold!r}; the SCAN default is 4")
    counts: Counter[str] = Counter()
    num_captions = 0
    for caption in captions:
        counts.update(tokenize(caption))
        num_captions += 1
    if num_captions == 0:
        raise VocabError("cannot build a vocabulary from no captions; check that the train captions file has lines")
    kept = sorted((w for w, c in counts.items() if c >= threshold and w not in SPECIALS), key=lambda w: (-counts[w], w))
    if not kept:
        raise VocabError(f"no word occurs {threshold} times or more in the {num_captions} captions "
                         f"(most frequent: {counts.most_common(1)[0][1] if counts else 0} times); lower --threshold")
    return Vocabulary(kept)


if __name__ == "__main__":
    from ..errors import refuse_as_command

    refuse_as_command(__spec__.name, "vocab")
