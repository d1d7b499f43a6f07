"""The explanation of one (query, image) pair: the same numbers as the pictures and the model's score."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from hsc_pyg import build_model
from hsc_pyg.config import Config
from hsc_pyg.data.graphs import caption_graph, collate_graphs, image_graph
from hsc_pyg.data.precomp import PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import build_vocab
from hsc_pyg.errors import ConfigError
from hsc_pyg.viz import pair_graph, region_graph, strongest_edges
from hsc_pyg.viz.explain import explain_pair

REGIONS, IMG_DIM = 16, 12


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_data")
    make_synthetic(root / "tiny", seed=2, num_train=6, num_dev=2, num_test=4, img_dim=IMG_DIM, num_regions=REGIONS)
    return PrecompSplit.open(root, "tiny", "test")


@pytest.fixture(scope="module")
def model(split):
    vocab = build_vocab(split.captions, threshold=1)
    torch.manual_seed(0)
    m = build_model(Config(img_dim=IMG_DIM, num_regions=REGIONS, vocab_size=len(vocab), embed_size=16, word_dim=8,
                           sim_dim=8, img_layers=2, txt_layers=1, align_levels="relational,higher"))
    m.vocab = vocab
    return m.eval()


def test_score_is_the_models_score_of_the_pair_and_the_mean_of_its_levels(model, split):
    text = split.captions[6] + " zebra"
    e = explain_pair(model, split, 1, text)
    img = collate_graphs([image_graph(split.features(1), split.box_tensor(1), model.config.img_edges)])
    cap = collate_graphs([caption_graph(model.vocab.encode(text), model.config.txt_edges)])
    with torch.no_grad():
        want = float(model.score_block(model.encode_images(img), model.encode_captions(cap))[0, 0])
    assert e["score"] == pytest.approx(want, abs=1e-6)
    assert set(e["alignment"]) == {"relational", "higher"}
    assert e["score"] == pytest.approx(sum(a["score"] for a in e["alignment"].values()) / 2, abs=1e-7)
    assert e["unknown_words"] == ["zebra"] and e["tokens"][-2] == "<unk>"
    json.dumps(e)   # every value is a JSON type


def test_attention_is_the_pair_pictures_attention(model, split):
    e = explain_pair(model, split, 2, split.captions[9])
    for level in ("relational", "higher"):
        g = pair_graph(model, split, 2, 9, level)
        attention = e["attention"][level]
        assert len(attention) == len(e["tokens"]) and all(len(row) == REGIONS for row in attention)
        for k, row in enumerate(attention):
            assert sum(row) == pytest.approx(1.0, abs=1e-5)
            assert row == pytest.approx([g.edges[f"w{k}", f"r{j}"]["weight"] for j in range(REGIONS)], abs=1e-7)


def test_local_and_global_cosines_follow_their_definition(model, split):
    e = explain_pair(model, split, 0, split.captions[1])
    item_img = collate_graphs([image_graph(split.features(0), split.box_tensor(0), model.config.img_edges)])
    item_cap = collate_graphs([caption_graph(model.vocab.encode(split.captions[1]), model.config.txt_edges)])
    with torch.no_grad():
        regions = model.image_encoder(item_img, ("higher",)).levels["higher"][0].double()         # [R, d]
        states = model.text_encoder(item_cap, ("higher",))
        words = states.levels["higher"][0].double()                                             # [L, d]
        img_glo = model.similarity.visual_sa(regions[None].float())[0].double()
        cap_glo = model.similarity.text_sa(words[None].float(), states.mask)[0].double()
    attention = torch.tensor(e["attention"]["higher"], dtype=torch.float64)
    for k in range(len(words)):
        context = sum(attention[k, r] * regions[r] for r in range(REGIONS))
        cosine = float(context @ words[k] / (context.norm() * words[k].norm()))
        assert e["alignment"]["higher"]["local"][k] == pytest.approx(cosine, abs=1e-5)
    assert e["alignment"]["higher"]["global"] == pytest.approx(
        float(img_glo @ cap_glo / (img_glo.norm() * cap_glo.norm())), abs=1e-5)


def test_relations_are_the_pictures_strongest_edges_per_layer(model, split):
    e = explain_pair(model, split, 3, split.captions[0], top_k=5)
    assert [(r["level"], r["layer"]) for r in e["relations"]] == [("relational", 1), ("higher", 2)]
    for r in e["relations"]:
        g = region_graph(model, split, 3, r["level"])
        assert [(x["source"], x["target"]) for x in r["edges"]] == strongest_edges(g, 5)
        assert [x["weight"] for x in r["edges"]] == [g.edges[u, v]["weight"] for u, v in strongest_edges(g, 5)]
    boxes = split.box_tensor(3)
    assert e["box_units"] == "normalised" and len(e["regions"]) == REGIONS
    assert e["regions"][4]["x1"] == pytest.approx(float(boxes[4, 0]))


@pytest.mark.parametrize("text, top_k, match", [("", 5, "empty"), ("qwxz vvqq", 5, "vocabulary"),
                                                ("a ball", -1, "top_k")])
def test_bad_requests_say_what_is_wrong(model, split, text, top_k, match):
    with pytest.raises(ConfigError, match=match):
        explain_pair(model, split, 0, text, top_k=top_k)


def test_without_boxes_the_regions_are_laid_on_a_circle(model, split, tmp_path):
    shutil.copytree(split.path, tmp_path / "noboxes")
    (tmp_path / "noboxes" / "test_boxes.npy").unlink()
    e = explain_pair(model, PrecompSplit.open(tmp_path, "noboxes", "test"), 1, split.captions[5])
    assert e["node_positions"] == "circular_layout" and e["box_units"] is None
    assert all(set(r) == {"index", "x", "y"} for r in e["regions"])
    assert e["score"] == pytest.approx(explain_pair(model, split, 1, split.captions[5])["score"], abs=1e-6)
