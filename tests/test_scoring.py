"""Scoring library: the captions' layout, block scoring, retrieve-then-rerank and the whole protocol on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hsc_pyg.config import Config, ModelConfig
from hsc_pyg.data.graphs import collate_graphs
from hsc_pyg.data.precomp import ImageDataset, PrecompSplit, TextDataset
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import build_vocab
from hsc_pyg.engine import blocking
from hsc_pyg.engine.scoring import (Reranked, encode_split, evaluate, first_stage_matrix, pair_scores,
                                    rerank, rerank_scores, score_matrix)
from hsc_pyg.engine.metrics import METRIC_KEYS, i2t_ranks, recall_metrics, t2i_ranks
from hsc_pyg.errors import ConfigError, DataError, VocabError
from hsc_pyg.nn.model import CaptionEncoding, ImageEncoding, build_model
from reference_protocol import fold5_metrics  # noqa: E402  (tests/reference_protocol.py)


IMG_DIM, REGIONS = 16, 16


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root / "synthetic_precomp", num_train=40, num_dev=12, num_test=20, img_dim=IMG_DIM,
                   num_regions=REGIONS)
    return root


@pytest.fixture(scope="module")
def split(data_path):
    return PrecompSplit.open(data_path, "synthetic_precomp", "test")


@pytest.fixture(scope="module")
def model(data_path):
    vocab = build_vocab(PrecompSplit.open(data_path, "synthetic_precomp", "train").captions, threshold=1)
    torch.manual_seed(0)
    net = build_model(Config(img_dim=IMG_DIM, num_regions=REGIONS, vocab_size=len(vocab), embed_size=32, word_dim=8,
                             sim_dim=8))
    net.vocab = vocab
    return net.eval()


def direct_encodings(model, split):
    """Every image and every caption of the split in one batch each, in split order."""
    with torch.no_grad():
        images = model.encode_images(collate_graphs([ImageDataset(split)[i] for i in range(split.num_images)]))
        captions = model.encode_captions(collate_graphs(
            [TextDataset(split, model.vocab)[k] for k in range(split.num_captions)]))
    return images, captions


def random_captions(lengths, levels=2, dim=4, seed=0):
    """Captions of ``lengths`` words with random states, their words stored caption by caption in a shuffled order
    (not in caption order): the encoding and each caption's words ``[n, V, d]``."""
    g = torch.Generator().manual_seed(seed)
    per_caption = [torch.randn(n, levels, dim, generator=g) for n in lengths]
    order = torch.randperm(len(lengths), generator=g)
    stored = torch.tensor(lengths)[order]
    starts = torch.empty(len(lengths), dtype=torch.long)
    starts[order] = stored.cumsum(0) - stored
    words = torch.cat([per_caption[j] for j in order.tolist()])
    glo = torch.randn(len(lengths), levels, dim, generator=g)
    return CaptionEncoding(words, starts, torch.tensor(lengths), glo), per_caption


def plain_padding(per_caption):
    """Captions' words ``[n, V, d]`` each -> ``[M, V, L, d]`` zero at padding and the mask ``[M, L]``, one by one."""
    longest = max(len(w) for w in per_caption)
    levels, dim = per_caption[0].shape[1:]
    words = torch.zeros(len(per_caption), levels, longest, dim)
    mask = torch.zeros(len(per_caption), longest, dtype=torch.bool)
    for j, w in enumerate(per_caption):
        words[j, :, :len(w)] = w.transpose(0, 1)
        mask[j, :len(w)] = True
    return words, mask


class FakeScorer(torch.nn.Module):
    """Scores a pair by ``img.glo . masked mean of the caption's words`` (level 0): cheap, exact, and sensitive to the
    padding and to the order of captions."""

    config = ModelConfig(img_dim=4, vocab_size=10, embed_size=4, sim_dim=2, num_regions=3)

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.pair_calls = []

    def score_block(self, img, cap, positions=None):
        words, mask = cap.padded()
        means = (words[:, 0] * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
        return self.weight * img.glo[:, 0] @ means.T

    def score_pairs(self, img, cap, images):
        """The same score from the words back to back: ``img.glo . mean of the pair's words``."""
        cap = cap.contiguous()
        self.pair_calls.append((len(cap), len(cap.words)))
        pair = torch.repeat_interleave(torch.arange(len(cap)), cap.lengths)
        means = torch.zeros(len(cap), cap.words.size(-1)).index_add_(0, pair, cap.words[:, 0]) / cap.lengths[:, None]
        return self.weight * (img.glo[images, 0] * means).sum(-1)


def fake_encodings(num_images, per_image=5, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (num_images * per_image,), generator=g).tolist()
    images = ImageEncoding(torch.randn(num_images, 1, 3, dim, generator=g), torch.randn(num_images, 1, dim, generator=g))
    return images, random_captions(lengths, levels=1, dim=dim, seed=seed + 1)[0]


# ---- the captions' layout ------------------------------------------------------------------------------------------
def test_the_padded_view_is_a_plain_padding_of_the_captions():
    enc, per_caption = random_captions([3, 7, 1, 5, 7, 2])
    assert enc.words.shape == (3 + 7 + 1 + 5 + 7 + 2, 2, 4)
    words, mask = enc.padded()
    want_words, want_mask = plain_padding(per_caption)
    assert torch.equal(mask, want_mask)
    assert torch.equal(words, want_words)
    pick = torch.tensor([5, 2, 0, 2])                           # a selection is padded to its own longest caption
    words, mask = enc[pick].padded()
    want_words, want_mask = plain_padding([per_caption[j] for j in pick.tolist()])
    assert mask.shape == (4, 3) and torch.equal(mask, want_mask) and torch.equal(words, want_words)
    assert torch.equal(enc[pick].glo, enc.glo[pick])
    assert torch.equal(enc[3].padded()[0], plain_padding([per_caption[3]])[0])


def test_contiguous_puts_the_selected_captions_words_back_to_back():
    enc, per_caption = random_captions([3, 7, 1, 5, 7, 2], seed=1)
    pick = [4, 1, 1, 3]
    sub = enc[torch.tensor(pick)].contiguous()
    assert torch.equal(sub.words, torch.cat([per_caption[j] for j in pick]))
    assert sub.starts.tolist() == [0, 7, 14, 21] and sub.lengths.tolist() == [7, 7, 7, 5]
    assert sub.contiguous() is sub
    assert not torch.equal(enc.starts, enc.lengths.cumsum(0) - enc.lengths)     # (stored in a shuffled order)
    joined = CaptionEncoding.cat([enc[:2], enc[2:]])
    assert torch.equal(joined.words, torch.cat(per_caption))
    assert torch.equal(joined.padded()[0], enc.padded()[0]) and torch.equal(joined.glo, enc.glo)


def test_encode_captions_keeps_the_encoders_words_without_their_padding(model, split):
    batch = collate_graphs([TextDataset(split, model.vocab)[k] for k in (4, 0, 9, 2)])
    with torch.no_grad():
        enc = model.encode_captions(batch)
        states = model.text_encoder(batch, model.levels)
    words, mask = enc.padded()
    assert torch.equal(mask, states.mask)
    assert torch.equal(words, torch.stack([states.levels[lv] for lv in model.levels], 1) * mask[:, None, :, None])
    assert enc.starts.tolist() == (enc.lengths.cumsum(0) - enc.lengths).tolist()


# ---- block scoring -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [(3, 4), (100, 1000), (1, 1)])
def test_score_matrix_equals_one_dense_call_whatever_the_blocks(blocks, monkeypatch):
    images, captions = fake_encodings(7)
    scorer = FakeScorer()
    want = scorer.score_block(images, captions).detach().numpy()
    monkeypatch.setattr(blocking, "CPU_BLOCK_CAPTIONS", blocks[1])
    got = score_matrix(scorer, images, captions, block_images=blocks[0], progress=False)
    assert got.dtype == np.float32 and got.shape == (7, 35)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_pair_scores_follow_the_given_pairs(monkeypatch):
    images, captions = fake_encodings(6)
    full = FakeScorer().score_block(images, captions).detach().numpy()
    monkeypatch.setattr(blocking, "words_per_call", lambda config, chunk_mb, device: 12)
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 6, 50), rng.integers(0, 30, 50)
    scorer = FakeScorer()
    got = pair_scores(scorer, images, captions, rows, cols)
    np.testing.assert_allclose(got, full[rows, cols], rtol=0, atol=1e-6)
    assert sum(n for n, _ in scorer.pair_calls) == 50 and len(scorer.pair_calls) > 1   # in pieces of <= 12 words,
    assert all(words <= 12 or n == 1 for n, words in scorer.pair_calls)              # or one longer caption
    assert pair_scores(scorer, images, captions, rows[:0], cols[:0]).shape == (0,)


@pytest.mark.parametrize("dim", [0, 6])
def test_first_stage_matrix_is_the_cosine_of_the_first_stage_vectors(dim):
    from hsc_pyg.nn.first_stage import FirstStage

    images, captions = fake_encodings(5)
    holder = torch.nn.Module()
    holder.first_stage = FirstStage(images.glo.size(-1), dim)
    holder.weight = torch.nn.Parameter(torch.ones(()))
    img, cap = images.glo.mean(1), captions.glo.mean(1)
    if dim:
        img, cap = holder.first_stage.image_proj(img), holder.first_stage.caption_proj(cap)
    img, cap = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(cap, dim=-1)
    np.testing.assert_allclose(first_stage_matrix(holder, images, captions, block_images=2),
                               (img @ cap.T).detach().numpy(), atol=1e-6)


# ---- re-ranking ----------------------------------------------------------------------------------------------------
def reference_rerank_rank(cosine_line, exact_line, k, positives):
    """One query: its top k by cosine re-ordered by the exact score, then the rest in cosine order."""
    by_cosine = list(np.argsort(-cosine_line, kind="stable"))
    head = sorted(by_cosine[:k], key=lambda j: -exact_line[j])
    order = head + by_cosine[k:]
    return min(order.index(j) for j in positives)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_rerank_ranks_match_a_per_query_reference(k):
    rng = np.random.default_rng(k)
    n, per = 12, 5
    exact = rng.standard_normal((n, per * n)).astype(np.float32)
    cosine = (0.6 * exact + 0.8 * rng.standard_normal((n, per * n))).astype(np.float32)
    calls = []

    def scorer(rows, cols):
        calls.append(len(rows))
        return exact[rows, cols]

    result = rerank_scores(cosine, k, scorer)
    assert len(calls) == 1
    union = np.zeros((n, per * n), dtype=bool)
    for i in range(n):
        union[i, np.argsort(-cosine[i])[:k]] = True
    for j in range(per * n):
        union[np.argsort(-cosine[:, j])[:k], j] = True
    assert result.num_exact_pairs == calls[0] == union.sum()
    want_i2t = [reference_rerank_rank(cosine[i], exact[i], k, range(per * i, per * i + per)) for i in range(n)]
    want_t2i = [reference_rerank_rank(cosine[:, j], exact[:, j], k, [j // per]) for j in range(per * n)]
    assert i2t_ranks(result.i2t, per)[0].tolist() == want_i2t
    assert t2i_ranks(result.t2i, per).tolist() == want_t2i
    # shared: every pair of the union at its exact score in both directions, the rest below in cosine order
    shared = result.shared()
    np.testing.assert_array_equal(shared[union], exact[union])
    for i in range(n):
        scored, rest = np.flatnonzero(union[i]), np.flatnonzero(~union[i])
        assert scored.size >= k and shared[i, rest].max() < shared[i, scored].min()
        assert np.all(np.diff(shared[i, rest[np.argsort(-cosine[i, rest])]]) <= 0)
    assert union.sum(1).mean() > k   # the captions' shortlists add candidates to the images' rankings
    assert result.shared_metrics(per) == recall_metrics(shared, per)


def test_rerank_keeps_exact_scores_above_and_cosine_order_below():
    rng = np.random.default_rng(7)
    exact = rng.uniform(0, 1, (8, 40)).astype(np.float32)
    cosine = rng.uniform(-1, 1, (8, 40)).astype(np.float32)
    result = rerank_scores(cosine, 4, lambda r, c: exact[r, c])
    for i in range(8):
        top = np.argsort(-cosine[i])[:4]
        rest = np.setdiff1d(np.arange(40), top)
        np.testing.assert_array_equal(result.i2t[i, top], exact[i, top])
        assert result.i2t[i, rest].max() < result.i2t[i, top].min()
        assert np.all(np.diff(result.i2t[i, rest[np.argsort(-cosine[i, rest])]]) <= 0)


def test_rerank_with_k_at_least_the_number_of_items_is_exact():
    rng = np.random.default_rng(3)
    exact = rng.standard_normal((6, 30)).astype(np.float32)
    cosine = rng.standard_normal((6, 30)).astype(np.float32)
    result = rerank_scores(cosine, 30, lambda r, c: exact[r, c])
    assert result.num_exact_pairs == 180
    np.testing.assert_array_equal(result.i2t, exact)
    np.testing.assert_array_equal(result.t2i, exact)
    np.testing.assert_array_equal(result.shared(), exact)
    assert result.metrics() == recall_metrics(exact) == result.shared_metrics()


def test_rerank_needs_a_positive_k():
    with pytest.raises(ConfigError, match="rerank_k"):
        rerank_scores(np.zeros((2, 10), dtype=np.float32), 0, lambda r, c: np.zeros(len(r)))


def test_rerank_of_the_real_model_with_k_all_equals_exact_scoring(model, split):
    images, captions = encode_split(model, split, batch_size=8, progress=False)
    exact = score_matrix(model, images, captions, progress=False)
    result = rerank(model, images, captions, k=split.num_captions)
    assert isinstance(result, Reranked)
    assert result.num_exact_pairs == split.num_images * split.num_captions
    np.testing.assert_allclose(result.i2t, exact, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.t2i, exact, rtol=0, atol=1e-6)
    assert result.metrics() == recall_metrics(exact)
    small = rerank(model, images, captions, k=3)
    assert small.num_exact_pairs < 3 * (split.num_images + split.num_captions)


def test_several_rerank_k_score_the_largest_shortlist_once_and_equal_each_k_alone(model, split, monkeypatch):
    from hsc_pyg.engine import scoring
    images, captions = encode_split(model, split, batch_size=8, progress=False)
    alone = {k: rerank(model, images, captions, k=k) for k in (2, 5)}
    calls = []
    real = scoring.pair_scores
    monkeypatch.setattr(scoring, "pair_scores", lambda *a, **kw: calls.append(len(a[3])) or real(*a, **kw))
    both = scoring.rerank_ensemble([(model, images, captions)], [2, 5])
    assert len(calls) == 1 and calls[0] == alone[5].num_exact_pairs          # one pass, the K = 5 shortlist
    for k, result in zip((2, 5), both):
        assert result.k == k and result.num_exact_pairs == alone[k].num_exact_pairs
        np.testing.assert_allclose(result.i2t, alone[k].i2t, rtol=0, atol=1e-6)
        np.testing.assert_allclose(result.t2i, alone[k].t2i, rtol=0, atol=1e-6)


# ---- the real model ------------------------------------------------------------------------------------------------
def test_encode_split_equals_encoding_everything_at_once(model, split):
    images, captions = encode_split(model, split, batch_size=7, progress=False)
    want_images, want_captions = direct_encodings(model, split)
    assert len(images) == split.num_images and len(captions) == split.num_captions
    torch.testing.assert_close(images.regions, want_images.regions, rtol=0, atol=1e-6)
    torch.testing.assert_close(images.glo, want_images.glo, rtol=0, atol=1e-6)
    (words, mask), (want_words, want_mask) = captions.padded(), want_captions.padded()
    assert torch.equal(captions.lengths, want_captions.lengths) and torch.equal(mask, want_mask)
    torch.testing.assert_close(words, want_words, rtol=0, atol=1e-6)
    torch.testing.assert_close(captions.glo, want_captions.glo, rtol=0, atol=1e-6)


def test_score_matrix_equals_the_model_dense_scorer(model, split, monkeypatch):
    images, captions = encode_split(model, split, progress=False)
    monkeypatch.setattr(blocking, "CPU_BLOCK_CAPTIONS", 17)
    got = score_matrix(model, images, captions, block_images=6, progress=False)
    with torch.no_grad():
        want = blocking.score(model, *direct_encodings(model, split)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_float16_storage_stays_close_to_float32(model, split):
    full = score_matrix(model, *encode_split(model, split, progress=False), progress=False)
    half = score_matrix(model, *encode_split(model, split, store_dtype=torch.float16, progress=False), progress=False)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=0, atol=2e-3)


def test_evaluate_on_the_first_images_keeps_the_model_mode(model, split):
    model.train()
    try:
        metrics = evaluate(model, split, max_images=8)
        assert model.training
    finally:
        model.eval()
    images, captions = direct_encodings(model, split)
    with torch.no_grad():
        want = blocking.score(model, images[:8], captions[:40])
    assert metrics == recall_metrics(want.numpy())


def test_a_model_without_vocabulary_asks_for_one(model, split):
    vocab, model.vocab = model.vocab, None
    try:
        with pytest.raises(VocabError, match="--vocab_path"):
            encode_split(model, split, progress=False)
        images, _ = encode_split(model, split, vocab=vocab, max_images=2, progress=False)
        assert len(images) == 2
    finally:
        model.vocab = vocab


def test_features_of_another_size_are_refused(model, tmp_path):
    make_synthetic(tmp_path / "other", num_train=2, num_dev=2, num_test=2, img_dim=IMG_DIM + 1, num_regions=REGIONS)
    other = PrecompSplit.open(tmp_path, "other", "test")
    with pytest.raises(DataError, match=r"\[2, 16, 17\].*\[\*, 16, 16\]"):
        encode_split(model, other, progress=False)


def test_fold5_scores_only_the_diagonal_blocks_with_the_metrics_of_the_full_matrix(model, split, monkeypatch):
    # 20 test images in folds of 4: five diagonal blocks of 4 x 20 pairs = a fifth of the 20 x 100 matrix
    scored = []
    real_score = type(model).score_block

    def counting_score(self, img, cap, positions=None):
        scored.append(len(img) * len(cap))
        return real_score(self, img, cap, positions)

    monkeypatch.setattr(type(model), "score_block", counting_score)
    folds = evaluate(model, split, fold5=True, fold_size=4)
    fold_pairs, scored[:] = sum(scored), []
    full = score_matrix(model, *encode_split(model, split, progress=False), progress=False)
    full_pairs = sum(scored)
    assert (full_pairs, fold_pairs) == (20 * 100, 5 * 4 * 20)
    expected = fold5_metrics(full, split.per_image, fold_size=4)
    assert len(folds["folds"]) == 5
    for key in METRIC_KEYS:
        assert folds[key] == pytest.approx(expected[key], abs=1e-9), key
