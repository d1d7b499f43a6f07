"""The first stage (its loss, its training, its vectors), re-ranking by it, the gallery cache and the search calls."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hsc_pyg.config import Config
from hsc_pyg.data.graphs import collate_pairs
from hsc_pyg.data.precomp import CaptionDataset, PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import build_vocab
from hsc_pyg.engine.blocking import BatchScores
from hsc_pyg.engine.checkpoint import save_checkpoint
from hsc_pyg.engine.scoring import encode_split, score_matrix
from hsc_pyg.engine.retrieval import CacheError, encode_query, open_gallery, search_image, search_text
from hsc_pyg.errors import ConfigError
from hsc_pyg.nn.loss import ContrastiveLoss, ImageTextContrastive
from hsc_pyg.nn.model import build_model

ROOT = Path(__file__).resolve().parents[1]
NAME = "synthetic_precomp"
SMALL = dict(embed_size=16, word_dim=8, sim_dim=8, img_layers=1, txt_layers=1)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root / NAME, num_train=12, num_dev=4, num_test=8, img_dim=8, num_regions=16)
    return root


@pytest.fixture(scope="module")
def split(data_path):
    return PrecompSplit.open(data_path, NAME, "test")


def small_model(data_path, seed=0, **overrides):
    vocab = build_vocab(PrecompSplit.open(data_path, NAME, "train").captions, threshold=1)
    torch.manual_seed(seed)
    model = build_model(Config(img_dim=8, num_regions=16, vocab_size=len(vocab), **{**SMALL, **overrides}))
    model.vocab = vocab
    return model.eval()


@pytest.fixture(scope="module")
def model(data_path):
    return small_model(data_path)


# ---- the loss ------------------------------------------------------------------------------------------------------
def _two_way_cross_entropy(cosine, scale):
    logits = (scale * cosine).double()
    n = cosine.size(0)
    rows = -torch.stack([logits[i].log_softmax(0)[i] for i in range(n)]).mean()
    cols = -torch.stack([logits[:, j].log_softmax(0)[j] for j in range(n)]).mean()
    return ((rows + cols) / 2).item()


def test_infonce_equals_the_two_way_cross_entropy_written_out():
    cosine = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scale = torch.tensor(14.3)
    got = ImageTextContrastive("infonce")(cosine, scale)
    assert got.item() == pytest.approx(_two_way_cross_entropy(cosine, scale), rel=1e-6)


def test_infonce_plus_hinge_is_the_sum_of_the_two_losses():
    cosine = torch.rand(6, 6, generator=torch.Generator().manual_seed(2)) * 2 - 1
    scale = torch.tensor(14.3)
    hinge = ContrastiveLoss(0.2, True)(cosine).item()
    got = ImageTextContrastive("infonce+hinge", 0.2, True)(cosine, scale).item()
    assert hinge > 0
    assert got == pytest.approx(hinge + _two_way_cross_entropy(cosine, scale), rel=1e-6)


def test_distill_is_the_two_way_kl_to_the_exact_scores_softmax_and_leaves_the_exact_scores_alone():
    g = torch.Generator().manual_seed(3)
    cosine = (torch.rand(5, 5, generator=g) * 2 - 1).requires_grad_()
    scores = torch.rand(5, 5, generator=g).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    got = ImageTextContrastive("distill")(cosine, scale, scores=scores)
    p, q = (scale * scores).detach(), (scale * cosine).detach()
    rows = sum(sum(torch.softmax(p[i], 0)[j] * (torch.log_softmax(p[i], 0)[j] - torch.log_softmax(q[i], 0)[j])
                   for j in range(5)) for i in range(5)) / 5
    cols = sum(sum(torch.softmax(p[:, j], 0)[i] * (torch.log_softmax(p[:, j], 0)[i] - torch.log_softmax(q[:, j], 0)[i])
                   for i in range(5)) for j in range(5)) / 5
    assert got.item() == pytest.approx(((rows + cols) / 2).item(), rel=1e-5) and got.item() > 0
    got.backward()
    assert cosine.grad.abs().sum() > 0 and scale.grad.abs() > 0 and scores.grad is None    # the teacher is detached
    same = ImageTextContrastive("distill")(scores.detach() + 0.3, scale, scores=scores)      # same softmax: no loss
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    both = ImageTextContrastive("infonce+hinge+distill", 0.2, True)(cosine, scale, scores=scores).item()
    parts = [ImageTextContrastive(k, 0.2, True)(cosine, scale, scores=scores).item() for k in ("infonce", "hinge")]
    assert both == pytest.approx(sum(parts) + got.item(), rel=1e-5)
    with pytest.raises(ValueError, match="exact scores"):
        ImageTextContrastive("distill")(cosine, scale)


def test_hinge_variant_is_the_hinge_loss_of_the_cosine_matrix():
    cosine = torch.rand(5, 5, generator=torch.Generator().manual_seed(1))
    want = ContrastiveLoss(0.2, True)(cosine)
    assert ImageTextContrastive("hinge", 0.2, True)(cosine, torch.tensor(1.0)).item() == want.item()
    assert want.item() > 0


def test_an_unknown_contrastive_loss_is_refused():
    with pytest.raises(ValueError, match="infonce"):
        ImageTextContrastive("cosface")


# ---- the first stage inside the model ------------------------------------------------------------------------------
def a_batch(data_path, model, size=6):
    split = PrecompSplit.open(data_path, NAME, "train")
    dataset = CaptionDataset(split, model.vocab)
    return collate_pairs([dataset[k] for k in range(0, 5 * size, 5)])


def test_the_training_forward_gives_first_stage_cosines_of_the_model_vectors(data_path, model):
    pairs = a_batch(data_path, model)
    with torch.no_grad():
        out = BatchScores(model)(pairs)
        img = model.first_stage.image_vectors(model.encode_images(pairs.images).glo)[pairs.img_index]
        cap = model.first_stage.caption_vectors(model.encode_captions(pairs.captions).glo)
    assert out.scores.shape == out.cosine.shape == (6, 6)
    torch.testing.assert_close(out.cosine, img @ cap.T)
    assert out.scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


@pytest.mark.parametrize("dim", [0, 12])
def test_the_joint_loss_sends_gradient_to_both_stages(data_path, dim):
    model = small_model(data_path, first_stage_dim=dim).train()
    pairs = a_batch(data_path, model)
    out = BatchScores(model)(pairs)
    loss = ContrastiveLoss()(out.scores) + 0.5 * ImageTextContrastive()(out.cosine, out.scale)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["first_stage.logit_scale"].abs().item() > 0
    if dim:
        assert grads["first_stage.image_proj.weight"].abs().sum() > 0
        assert grads["first_stage.caption_proj.weight"].abs().sum() > 0
    encoder = [g for n, g in grads.items() if n.startswith("image_encoder.") and g is not None]
    head = [g for n, g in grads.items() if n.startswith("similarity.") and g is not None]
    assert encoder and any(g.abs().sum() > 0 for g in encoder)
    assert head and any(g.abs().sum() > 0 for g in head)


def test_the_contrastive_loss_alone_reaches_the_encoders(data_path):
    model = small_model(data_path).train()
    out = BatchScores(model)(a_batch(data_path, model))
    ImageTextContrastive()(out.cosine, out.scale).backward()
    for side in ("image_encoder.", "text_encoder."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(side) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), side


def tiny_train(data_path, tmp_path, **overrides):
    from hsc_pyg.engine.train import train

    config = Config(data_path=str(data_path), data_name=NAME, vocab_threshold=1, batch_size=5, num_epochs=1,
                    val_step=1000, model_name=str(tmp_path / "ckpt"), logger_name=str(tmp_path / "log"),
                    device="cpu", seed=3, **SMALL, **overrides)
    return train(config, max_iters=3, overwrite=True)


def test_itc_weight_zero_is_the_hinge_loss_alone(data_path, tmp_path, monkeypatch):
    """With --itc_weight 0 the loss is the hinge loss of the exact scores (the papers'), the contrastive loss is never
    computed, and the first stage keeps its initial parameters and stays marked untrained."""
    hinge = []
    original = ContrastiveLoss.forward

    def recorded(self, scores, max_violation=None):
        hinge.append(original(self, scores, max_violation).item())
        return original(self, scores, max_violation)

    monkeypatch.setattr(ContrastiveLoss, "forward", recorded)
    monkeypatch.setattr(ImageTextContrastive, "forward", lambda *a, **k: pytest.fail("the contrastive loss ran"))
    result = tiny_train(data_path, tmp_path, itc_weight=0.0)
    assert [loss for _, loss in result.losses] == hinge[:len(result.losses)] and len(result.losses) == 3
    state = torch.load(tmp_path / "ckpt" / "checkpoint.pth", weights_only=False)["model"]
    assert state["first_stage.logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    assert not bool(state["first_stage.trained"])


@pytest.mark.parametrize("kind", ["infonce", "infonce+hinge+distill"])
def test_a_positive_itc_weight_trains_the_first_stage_and_marks_it(data_path, tmp_path, kind):
    result = tiny_train(data_path, tmp_path, itc_weight=1.0, itc_loss=kind, first_stage_dim=12)
    state = torch.load(tmp_path / "ckpt" / "checkpoint.pth", weights_only=False)["model"]
    assert bool(state["first_stage.trained"])
    assert state["first_stage.logit_scale"].item() != pytest.approx(math.log(1 / 0.07), abs=1e-7)
    assert all(math.isfinite(loss) for _, loss in result.losses)


@pytest.mark.parametrize("bad", [dict(itc_weight=-1.0), dict(itc_weight=float("nan")), dict(itc_loss="cosface")])
def test_bad_first_stage_options_are_one_line_errors(data_path, tmp_path, bad):
    with pytest.raises(ConfigError, match="itc"):
        tiny_train(data_path, tmp_path, **bad)


def test_a_checkpoint_without_a_first_stage_loads_untrained(data_path, tmp_path, model):
    from hsc_pyg import load_checkpoint

    path = tmp_path / "old.pth"
    save_checkpoint(path, model)
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("first_stage.")}
    torch.save(ckpt, path)
    loaded = load_checkpoint(path)
    assert not bool(loaded.first_stage.trained)
    torch.testing.assert_close(loaded.first_stage.logit_scale, torch.tensor(math.log(1 / 0.07)))


# ---- the gallery and its cache -------------------------------------------------------------------------------------
def exact_scores(model, split):
    images, captions = encode_split(model, split, progress=False)
    return score_matrix(model, images, captions, progress=False)


def test_search_with_the_whole_gallery_shortlisted_is_the_exact_ranking(model, split, tmp_path):
    gallery, built = open_gallery(model, split, cache=tmp_path / "g", store_dtype="float32")
    assert built and len(gallery) == split.num_images
    exact = exact_scores(model, split)
    caption = 7
    result = search_text(model, gallery, split.captions[caption], k=4, shortlist=split.num_images)
    want = np.argsort(-exact[:, caption], kind="stable")[:4]
    assert [h.index for h in result.hits] == want.tolist()
    np.testing.assert_allclose([h.score for h in result.hits], exact[want, caption], atol=1e-5)
    result = search_image(model, gallery, 3, k=6, shortlist=split.num_captions)
    want = np.argsort(-exact[3], kind="stable")[:6]
    assert [h.index for h in result.hits] == want.tolist()
    assert [h.text for h in result.hits] == [split.captions[j] for j in want]


def test_a_short_shortlist_returns_its_best_in_exact_order(model, split, tmp_path):
    gallery, _ = open_gallery(model, split, cache=tmp_path / "g")
    result = search_text(model, gallery, split.captions[0], k=2, shortlist=3)
    query, _ = encode_query(model, model.vocab, split.captions[0])
    first = gallery.image_vectors.float() @ model.first_stage.caption_vectors(query.glo).detach()[0]
    shortlisted = set(torch.topk(first, 3).indices.tolist())
    assert {h.index for h in result.hits} <= shortlisted and result.shortlist == 3
    assert result.hits[0].score >= result.hits[1].score


def test_the_cache_is_read_back_for_the_same_model_and_files(model, split, tmp_path):
    first, built = open_gallery(model, split, cache=tmp_path / "g")
    again, built_again = open_gallery(model, split, cache=tmp_path / "g")
    assert built and not built_again
    assert torch.equal(first.images.regions, again.images.regions)
    assert again.images.regions.dtype == torch.float16


def test_a_cache_of_another_model_is_refused_then_rebuilt(data_path, split, tmp_path):
    a, b = small_model(data_path, seed=0), small_model(data_path, seed=1)
    open_gallery(a, split, cache=tmp_path / "g")
    before = {p.name: p.read_bytes() for p in (tmp_path / "g").iterdir()}
    with pytest.raises(CacheError, match="another model"):
        open_gallery(b, split, cache=tmp_path / "g")
    assert {p.name: p.read_bytes() for p in (tmp_path / "g").iterdir()} == before
    gallery, built = open_gallery(b, split, cache=tmp_path / "g", rebuild=True)
    images, _ = encode_split(b, split, progress=False)
    assert built
    torch.testing.assert_close(gallery.image_vectors, b.first_stage.image_vectors(images.glo).detach())


def test_default_cache_folders_follow_the_model_and_the_features(data_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HSC_PYG_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "copy"
    make_synthetic(root / NAME, num_train=12, num_dev=4, num_test=8, img_dim=8, num_regions=16)
    split = PrecompSplit.open(root, NAME, "test")
    model = small_model(data_path)
    g1, built1 = open_gallery(model, split)
    g2, built2 = open_gallery(model, split)
    assert built1 and not built2 and g1.folder == g2.folder
    features = np.load(split.file("ims.npy"))
    np.save(split.file("ims.npy"), features[::-1].copy())         # same size, other content
    g3, built3 = open_gallery(model, PrecompSplit.open(root, NAME, "test"))
    assert built3 and g3.folder != g1.folder
    assert not torch.equal(g3.images.regions, g1.images.regions)


def test_changed_features_behind_an_explicit_cache_are_refused(data_path, tmp_path):
    root = tmp_path / "copy"
    make_synthetic(root / NAME, num_train=12, num_dev=4, num_test=8, img_dim=8, num_regions=16)
    split = PrecompSplit.open(root, NAME, "test")
    model = small_model(data_path)
    open_gallery(model, split, cache=tmp_path / "g")
    features = np.load(split.file("ims.npy"))
    np.save(split.file("ims.npy"), features + 1)
    with pytest.raises(CacheError, match="another ims file"):
        open_gallery(model, PrecompSplit.open(root, NAME, "test"), cache=tmp_path / "g")


@pytest.mark.parametrize("damage", ["truncate", "flip_header", "meta"])
def test_a_damaged_cache_is_a_one_line_error(model, split, tmp_path, damage):
    open_gallery(model, split, cache=tmp_path / "g")
    target = tmp_path / "g" / ("gallery.json" if damage == "meta" else "img_regions.npy")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip_header":
        target.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    else:
        target.write_text("{not json")
    with pytest.raises(CacheError) as info:
        open_gallery(model, split, cache=tmp_path / "g")
    assert "--rebuild" in str(info.value) and "\n" not in str(info.value)


def test_a_folder_that_is_not_a_cache_is_left_alone(model, split, tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a gallery cache"):
        open_gallery(model, split, cache=tmp_path / "g")
    assert (tmp_path / "g" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("query, message", [("", "empty"), ("   ", "empty"), ("zzqx qqzz", "no word of the query")])
def test_queries_without_known_words_are_refused(model, split, tmp_path, query, message):
    gallery, _ = open_gallery(model, split, cache=tmp_path / "g")
    with pytest.raises(ConfigError, match=message):
        search_text(model, gallery, query)


def test_unknown_words_are_reported_and_k_is_clamped(model, split, tmp_path):
    gallery, _ = open_gallery(model, split, cache=tmp_path / "g")
    known = split.captions[0]
    result = search_text(model, gallery, known + " zzqx", k=100)
    assert result.unknown_words == ["zzqx"] and result.clamped and len(result.hits) == split.num_images
    with pytest.raises(ConfigError, match="--k"):
        search_text(model, gallery, known, k=0)
    with pytest.raises(ConfigError, match="out of range"):
        search_image(model, gallery, split.num_images)
    with pytest.raises(ConfigError, match="no image with id"):
        search_image(model, gallery, "no-such-photo.jpg")


# ---- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(path, model)
    return path


def search_cli(*args, cwd):
    env = {**os.environ, "HSC_PYG_CACHE": str(Path(cwd) / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "hsc_pyg.search", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_the_command_answers_a_text_query_and_writes_json(checkpoint, data_path, split, tmp_path):
    status, out, err = search_cli("--model", checkpoint, "--data_path", data_path, "--data_name", NAME,
                                  "--query", split.captions[5] + " zzqx", "--k", 3, "--json", tmp_path / "r.json",
                                  "--no_progress", cwd=tmp_path)
    assert status == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["results"]) == 3 and {"index", "id", "score"} <= set(report["results"][0])
    assert "zzqx" in err and "untrained cosine" in err
    assert len(out.strip().splitlines()) == 3


@pytest.mark.parametrize("args, message", [
    (["--query", ""], "--query is empty"),
    (["--query", "zzqx qqzz"], "no word of the query"),
    (["--query", "a cube", "--k", "0"], "k=0 is invalid: expected an integer >= 1"),
    (["--image", "99"], "out of range"),
    (["--query", "a cube", "--image_root", "{tmp}/photos"], "does not exist"),
])
def test_bad_searches_are_one_line_errors(checkpoint, data_path, tmp_path, args, message):
    (tmp_path / "photos").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    status, _, err = search_cli("--model", checkpoint, "--data_path", data_path, "--data_name", NAME,
                                "--no_progress", *args, cwd=tmp_path)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "search.png").exists()


def test_the_command_draws_a_contact_sheet_of_the_photos_it_found(checkpoint, data_path, split, tmp_path):
    import matplotlib.image

    photos = tmp_path / "photos"
    photos.mkdir()
    ids = split.ids or [str(i) for i in range(split.num_images)]
    for i, name in enumerate(ids):
        matplotlib.image.imsave(photos / name, np.full((12, 16, 3), i / len(ids)), format="png")
    status, _, err = search_cli("--model", checkpoint, "--data_path", data_path, "--data_name", NAME,
                                "--query", split.captions[0], "--k", 3, "--image_root", photos,
                                "--sheet", tmp_path / "sheet.png", "--no_progress", cwd=tmp_path)
    assert status == 0, err
    sheet = matplotlib.image.imread(tmp_path / "sheet.png")
    assert sheet.shape[0] > 100 and sheet.shape[1] > 500          # one row of five 3.2-inch cells at 100 dpi
    status, _, err = search_cli("--model", checkpoint, "--data_path", data_path, "--data_name", NAME,
                                "--image", 2, "--k", 3, "--image_root", photos, "--sheet", tmp_path / "sheet.png",
                                "--no_progress", cwd=tmp_path)
    assert status == 2 and "already exists" in err


def test_eval_mode_switches_a_training_model_and_leaves_an_eval_model_untouched(monkeypatch):
    """Inside eval_mode every module is in eval mode and gradients are off; after it the model's mode is back. A model
    already wholly in eval mode (a server's, shared by request threads) has no module's mode set at all."""
    from hsc_pyg.engine.device import eval_mode

    model = build_model(Config(preset="hsc", img_dim=16, embed_size=8, word_dim=8, sim_dim=8, vocab_size=20,
                               num_regions=4))
    model.train()
    model.similarity.eval()                   # a mixed model: some modules already in eval mode
    with eval_mode(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    model.text_encoder.gru.train()            # root in eval mode, one module not: switched inside too
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())
    calls = []
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: calls.append(mode) or self)
    with eval_mode(model):
        assert not torch.is_grad_enabled()
    assert calls == []
