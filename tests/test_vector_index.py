"""The first stage's shortlist: the exact top-n, FAISS indexes against brute force, and the index in the gallery
cache (built once, read back, rebuilt when the vectors change; the search answers unchanged)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hsc_pyg.config import Config
from hsc_pyg.data.precomp import PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import build_vocab
from hsc_pyg.engine.retrieval import CacheError, open_gallery, search_text
from hsc_pyg.engine.vector_index import (
    AUTO_INDEX_FROM,
    IndexSettings,
    Shortlister,
    build_faiss_index,
    resolve_kind,
    top_n,
)
from hsc_pyg.errors import ConfigError
from hsc_pyg.nn.model import build_model


def unit_vectors(n, dim=32, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.8 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 5, 17, 40])
def test_top_n_is_the_stable_sort_with_ties_at_the_cut(n):
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.5, 0.3] * 5, dtype=np.float32)
    assert top_n(scores, n).tolist() == np.argsort(-scores, kind="stable")[:n].tolist()


def test_auto_is_brute_force_below_the_threshold():
    assert resolve_kind("auto", AUTO_INDEX_FROM - 1) == "brute"
    assert resolve_kind("auto", AUTO_INDEX_FROM) == "ivf"
    assert resolve_kind("hnsw", 10) == "hnsw"
    with pytest.raises(ConfigError, match="unknown"):
        resolve_kind("annoy", 10)


faiss = pytest.importorskip("faiss", reason="the faiss extra is not installed (pip install -e '.[faiss]')")


def _brute_rows(vectors, queries, n):
    return [set(np.argsort(-(vectors.astype(np.float64) @ q), kind="stable")[:n].tolist()) for q in queries]


@pytest.mark.parametrize("kind, settings", [("flat", IndexSettings()),
                                            ("ivf", IndexSettings(nlist=16, nprobe=16))])   # every list: exhaustive
def test_exhaustive_faiss_indexes_find_the_brute_force_shortlist(kind, settings):
    vectors, queries = unit_vectors(3000), unit_vectors(20, seed=1)
    index = Shortlister(vectors, build_faiss_index(vectors, kind, settings), kind)
    for q, want in zip(queries, _brute_rows(vectors, queries, 25)):
        assert set(index.search(q, 25).tolist()) == want


@pytest.mark.parametrize("kind, settings", [("ivf", IndexSettings(nlist=32, nprobe=8)),
                                            ("ivf_sq8", IndexSettings(nlist=32, nprobe=8)),
                                            ("hnsw", IndexSettings(ef_search=64))])
def test_approximate_indexes_recall_most_of_the_shortlist(kind, settings):
    vectors, queries = unit_vectors(5000), unit_vectors(30, seed=2)
    index = Shortlister(vectors, build_faiss_index(vectors, kind, settings), kind)
    recall = np.mean([len(set(index.search(q, 20).tolist()) & want) / 20
                      for q, want in zip(queries, _brute_rows(vectors, queries, 20))])
    assert recall >= 0.9


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    make_synthetic(root / "s", seed=4, num_train=8, num_dev=2, num_test=30, img_dim=8, num_regions=16)
    split = PrecompSplit.open(root, "s", "test")
    vocab = build_vocab(PrecompSplit.open(root, "s", "train").captions, threshold=1)
    torch.manual_seed(0)
    model = build_model(Config(img_dim=8, num_regions=16, vocab_size=len(vocab), embed_size=16, word_dim=8,
                               sim_dim=8, img_layers=1, txt_layers=1)).eval()
    model.vocab = vocab
    return root, split, model


def test_the_cache_keeps_a_flat_index_and_the_answers_stay_the_same(setup):
    root, split, model = setup
    cache = root / "cache"
    brute, _ = open_gallery(model, split, cache=cache, index="brute")
    flat, built = open_gallery(model, split, cache=cache, index="flat")
    assert not built and flat.shortlister.kind == "flat" and (cache / "index-flat.faiss").is_file()
    stamp = (cache / "index-flat.faiss").stat().st_mtime_ns
    again, _ = open_gallery(model, split, cache=cache, index="flat")
    assert (cache / "index-flat.faiss").stat().st_mtime_ns == stamp          # read back, not built again
    for text in ("a red cube left of a blue ball", "a green cylinder", "a ball"):
        want = search_text(model, brute, text, k=5, shortlist=10)
        for gallery in (flat, again):
            got = search_text(model, gallery, text, k=5, shortlist=10)
            assert [h.index for h in got.hits] == [h.index for h in want.hits]
            assert [h.score for h in got.hits] == [h.score for h in want.hits]
            assert [h.first_stage for h in got.hits] == pytest.approx([h.first_stage for h in want.hits], abs=1e-6)


def test_an_index_of_other_vectors_is_rebuilt_and_a_damaged_one_refused(setup):
    root, split, model = setup
    cache = root / "cache2"
    open_gallery(model, split, cache=cache, index="ivf", index_settings=IndexSettings(nlist=4))
    description = (cache / "index-ivf.json").read_text()
    torch.manual_seed(1)
    other = build_model(model.config).eval()
    other.vocab = model.vocab
    open_gallery(other, split, cache=cache, rebuild=True, index="ivf", index_settings=IndexSettings(nlist=4))
    assert (cache / "index-ivf.json").read_text() != description            # other vectors: a new index
    (cache / "index-ivf.faiss").write_bytes(b"not an index")
    with pytest.raises(CacheError, match="index-ivf.faiss is unreadable"):
        open_gallery(other, split, cache=cache, index="ivf", index_settings=IndexSettings(nlist=4))
