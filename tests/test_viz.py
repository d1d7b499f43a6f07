"""Relation pictures: the exported weights are the model's own, the ranking is right, the files are valid."""
from __future__ import annotations

import json
import shutil

import matplotlib.image
import networkx as nx
import numpy as np
import pytest
import torch

from hsc_pyg import build_model
from hsc_pyg.config import Config
from hsc_pyg.data.graphs import caption_graph, image_graph
from hsc_pyg.data.precomp import PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import build_vocab
from hsc_pyg.engine.checkpoint import save_checkpoint
from hsc_pyg.errors import DataError
from hsc_pyg.viz import (
    NoEdgeWeightsError,
    VizError,
    make_pictures,
    mark_strongest,
    pair_graph,
    region_graph,
    strongest_edges,
    weighted_layer_types,
    word_graph,
    write_graph,
)
from hsc_pyg.cli.viz import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REGIONS, IMG_DIM = 16, 12
WITH_WEIGHTS = ["hsc", "gat", "gatv2", "transformer"]
WITHOUT_WEIGHTS = ["gcn", "sage", "graphconv", "gin", "none"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A 4 x 4-region synthetic dataset (with boxes), and the same without its boxes file."""
    root = tmp_path_factory.mktemp("viz_data")
    make_synthetic(root / "tiny", seed=1, num_train=4, num_dev=2, num_test=4, img_dim=IMG_DIM, num_regions=REGIONS)
    shutil.copytree(root / "tiny", root / "tiny_noboxes")
    for split in ("train", "dev", "test"):
        (root / "tiny_noboxes" / f"{split}_boxes.npy").unlink()
    return root


@pytest.fixture(scope="module")
def split(data_root):
    return PrecompSplit.open(data_root, "tiny", "test")


@pytest.fixture(scope="module")
def split_noboxes(data_root):
    return PrecompSplit.open(data_root, "tiny_noboxes", "test")


def tiny_model(split, img_gnn="hsc", txt_gnn="hsc_text", seed=0):
    vocab = build_vocab(split.captions, threshold=1)
    config = Config(img_dim=IMG_DIM, num_regions=REGIONS, vocab_size=len(vocab), embed_size=16, word_dim=8, sim_dim=8,
                    img_gnn=img_gnn, txt_gnn=txt_gnn, img_layers=3, txt_layers=2)
    torch.manual_seed(seed)
    model = build_model(config)
    # the hsc blocks' BatchNorm starts at zero (identity blocks): give it weight so that each layer sees new states
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    model.vocab = vocab
    return model.eval()


def recomputed_image_weights(model, split, image):
    """Each relational layer called directly on the image's own graph: ``(edge_index, [weights per layer])``."""
    graph = image_graph(split.features(image), split.box_tensor(image), model.config.img_edges)
    x, weights = model.image_encoder.fc(graph.x), []
    with torch.no_grad():
        for layer in model.image_encoder.stack.layers:
            x, w = layer(x, graph.edge_index, None, return_weights=True)
            weights.append(w)
    return graph.edge_index, weights


def assert_weights_match(edges: dict, edge_index, expected):
    """``edges[(source, target)]`` = exported weight; ``expected [E]`` aligned with ``edge_index``."""
    assert len(edges) == edge_index.size(1)
    got = torch.tensor([edges[(j, i)] for j, i in edge_index.t().tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, expected.double(), rtol=1e-5, atol=1e-7)


def exported_edges(stem):
    """Edge weights read back from the written GraphML and JSON."""
    graphml = nx.read_graphml(f"{stem}.graphml", node_type=int)
    data = json.loads(open(f"{stem}.json").read())
    from_graphml = {(u, v): d["weight"] for u, v, d in graphml.edges(data=True)}
    from_json = {(e["source"], e["target"]): e["weight"] for e in data["edges"]}
    return from_graphml, from_json, graphml, data


# --------------------------------------------------------------------------- weights are the model's
@pytest.mark.parametrize("layer_type", WITH_WEIGHTS)
def test_exported_region_weights_equal_the_layers_recomputed_on_the_item(split, tmp_path, layer_type):
    model = tiny_model(split, img_gnn=layer_type)
    edge_index, expected = recomputed_image_weights(model, split, 2)
    for k in range(1, model.config.img_layers + 1):
        g = region_graph(model, split, 2, layer=k)
        mark_strongest(g, 5)
        stem = tmp_path / f"region_{k}"
        write_graph(g, stem)
        from_graphml, from_json, graphml, data = exported_edges(stem)
        assert_weights_match(from_graphml, edge_index, expected[k - 1])
        assert_weights_match(from_json, edge_index, expected[k - 1])
        assert from_graphml == from_json  # the two files hold the same numbers
        again = nx.node_link_graph(data, edges="edges")
        assert nx.utils.graphs_equal(again, g)   # the JSON holds the whole graph: nodes, edges, attributes
        assert graphml.graph["layer"] == data["graph"]["layer"] == k
        assert graphml.graph["layer_type"] == layer_type
    # levels name layers: relational = the first, higher = the last
    relational = region_graph(model, split, 2, level="relational")
    higher = region_graph(model, split, 2, level="higher")
    assert_weights_match({(u, v): d["weight"] for u, v, d in relational.edges(data=True)}, edge_index, expected[0])
    assert_weights_match({(u, v): d["weight"] for u, v, d in higher.edges(data=True)}, edge_index, expected[-1])
    assert (relational.graph["layer"], higher.graph["layer"]) == (1, 3)


def test_exported_word_weights_equal_the_text_layers_and_words_run_left_to_right(split, tmp_path):
    model = tiny_model(split)
    caption = 7
    ids = model.vocab.encode(split.captions[caption])
    graph = caption_graph(ids, model.config.txt_edges)
    with torch.no_grad():
        x, expected = model.text_encoder.embed(graph.x), []
        for layer in model.text_encoder.stack.layers:
            x, w = layer(x, graph.edge_index, None, return_weights=True)
            expected.append(w)
    for level, k in (("relational", 1), ("higher", 2)):
        g = word_graph(model, split, caption, level=level)
        mark_strongest(g, 4)
        stem = tmp_path / f"words_{level}"
        write_graph(g, stem)
        from_graphml, from_json, graphml, _ = exported_edges(stem)
        assert_weights_match(from_graphml, graph.edge_index, expected[k - 1])
        assert_weights_match(from_json, graph.edge_index, expected[k - 1])
        order = sorted(graphml.nodes, key=lambda n: graphml.nodes[n]["x"])
        assert [graphml.nodes[n]["label"] for n in order] == model.vocab.decode(ids)
        assert model.vocab.decode(ids)[0] == "<start>" and split.captions[caption].split()[0].lower() in \
            [graphml.nodes[n]["label"] for n in order]


def test_object_level_has_nodes_and_no_learned_edges(split):
    model = tiny_model(split)
    g = region_graph(model, split, 0, level="object")
    assert g.number_of_nodes() == REGIONS and g.number_of_edges() == 0
    assert g.graph["layer"] == 0


def test_pair_graph_holds_the_cross_attention_and_the_single_pair_score(split):
    model = tiny_model(split)
    image, caption = 1, 3   # caption 3 belongs to image 0: a mismatched pair
    g = pair_graph(model, split, image, caption)
    ids = model.vocab.encode(split.captions[caption])
    expected_score = model.similarity_matrix(split.features_batch([image]), [ids])[0, 0]
    assert g.graph["score"] == pytest.approx(float(expected_score), abs=1e-6)
    attention = np.zeros((len(ids), REGIONS))
    for u, v, d in g.edges(data=True):
        attention[g.nodes[u]["index"], g.nodes[v]["index"]] = d["weight"]
    np.testing.assert_allclose(attention.sum(1), 1.0, atol=1e-5)   # softmax over the regions, per word
    assert g.number_of_edges() == len(ids) * REGIONS
    assert g.graph["caption_of_image"] == 0 and g.graph["attention_level"] == "higher"


def test_pair_graph_shows_the_attention_the_scorer_uses(split):
    """The picture's word-to-region weights are the ones the fast scorer computes for the pair inside a block."""
    from hsc_pyg.data.graphs import collate_graphs
    from hsc_pyg.nn.kernels import Kernels
    from hsc_pyg.nn.similarity import cross_attention

    model = tiny_model(split).eval()
    image, caption = 2, 5
    g = pair_graph(model, split, image, caption)
    ids = model.vocab.encode(split.captions[caption])
    with torch.no_grad():
        img = model.encode_images(collate_graphs([image_graph(split.features(i), edges=model.config.img_edges)
                                                  for i in (0, image)]))
        cap = model.encode_captions(collate_graphs([caption_graph(ids, edges=model.config.txt_edges)]))
        words, mask = cap.padded()
        attn = cross_attention(img.regions[:, -1, None], words[None, :, -1], mask[None],
                               model.config.lambda_softmax, Kernels())
    shown = np.array([[g.edges[f"w{k}", f"r{j}"]["weight"] for j in range(REGIONS)] for k in range(len(ids))])
    np.testing.assert_allclose(shown, attn[1, 0].numpy(), atol=1e-6)


def test_regions_are_shaded_by_the_chosen_words_attention(split):
    model = tiny_model(split)
    caption = 5
    words = model.vocab.decode(model.vocab.encode(split.captions[caption]))
    pair = pair_graph(model, split, 1, caption)
    for word, position in ((words[2], words.index(words[2])), ("3", 3)):
        g = region_graph(model, split, 1, caption=caption, word=word)
        assert g.graph["word_position"] == position
        shading = [g.nodes[j]["attention"] for j in range(REGIONS)]
        np.testing.assert_allclose(shading, [pair.edges[f"w{position}", f"r{j}"]["weight"] for j in range(REGIONS)])
    with pytest.raises(Exception, match="not in the caption; its tokens are"):
        region_graph(model, split, 1, caption=caption, word="zebra")


# --------------------------------------------------------------------------- ranking
def test_strongest_edges_rank_by_absolute_weight_without_self_loops():
    g = nx.DiGraph()
    weights = {(0, 1): 0.5, (1, 0): -0.9, (1, 1): 5.0, (2, 0): 0.1, (0, 2): -0.5, (2, 1): 0.7}
    for e, ((u, v), w) in enumerate(weights.items()):
        g.add_edge(u, v, weight=w, edge_id=e)
    assert strongest_edges(g, 3) == [(1, 0), (2, 1), (0, 1)]          # |-0.9| > 0.7 > 0.5 = |-0.5|: tie by edge order
    assert strongest_edges(g, 2, self_loops=True) == [(1, 1), (1, 0)]
    assert strongest_edges(g, 100) == [(1, 0), (2, 1), (0, 1), (0, 2), (2, 0)]
    assert strongest_edges(g, 0) == []
    chosen = mark_strongest(g, 2)
    assert {(u, v): d["rank"] for u, v, d in g.edges(data=True) if d["rank"]} == {(1, 0): 1, (2, 1): 2}
    assert chosen == [(1, 0), (2, 1)] and g.graph["top_k_edges"] == 2


def test_written_ranks_are_the_top_k_of_the_model_weights(split, tmp_path):
    model = tiny_model(split)
    edge_index, expected = recomputed_image_weights(model, split, 0)
    w = expected[-1]
    real = edge_index[0] != edge_index[1]
    order = sorted(torch.nonzero(real).flatten().tolist(), key=lambda e: (-abs(float(w[e])), e))[:7]
    pictures = make_pictures(model, split, out=tmp_path, image=0, top_k=7)
    data = json.loads(pictures[0].paths[2].read_text())
    ranked = sorted((e["rank"], e["edge_id"]) for e in data["edges"] if e["rank"])
    assert [e for _, e in ranked] == order
    assert data["graph"]["top_k_edges"] == 7


# --------------------------------------------------------------------------- files
def assert_valid_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4) and min(pixels.shape[:2]) >= 200
    return pixels


@pytest.mark.parametrize("boxes", [True, False], ids=["boxes", "no_boxes"])
def test_pictures_are_valid_pngs_with_and_without_boxes(split, split_noboxes, tmp_path, boxes):
    data = split if boxes else split_noboxes
    model = tiny_model(data)
    pictures = make_pictures(model, data, out=tmp_path, image=1, caption=6, level="all", top_k=6)
    kinds = [(p.graph.graph["kind"], p.graph.graph.get("level")) for p in pictures]
    assert kinds == [("region", "object"), ("region", "relational"), ("region", "higher"),
                     ("words", "object"), ("words", "relational"), ("words", "higher"), ("pair", None)]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 * len(pictures) == len(set(names))
    for picture in pictures:
        assert_valid_png(picture.paths[0])
    region = nx.read_graphml(pictures[2].paths[1], node_type=int)
    if boxes:
        assert region.graph["node_positions"] == "box_centres"
        box = data.box_tensor(1)[5]
        assert (region.nodes[5]["x"], region.nodes[5]["y"]) == pytest.approx(
            (float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2))
    else:
        assert region.graph["node_positions"] == "circular_layout"
        assert "x1" not in region.nodes[5]
    assert sum(1 for *_, d in region.edges(data=True) if d["rank"]) == 6


def test_region_graph_is_drawn_over_the_photo(split, tmp_path):
    model = tiny_model(split)
    root = tmp_path / "photos"
    root.mkdir()
    photo = np.zeros((60, 90, 3), dtype=np.uint8)
    photo[..., 1] = 255                                           # pure green
    matplotlib.image.imsave(root / split.ids[3], photo, format="png")
    pictures = make_pictures(model, split, out=tmp_path / "out", image=3, image_root=root, top_k=3)
    pixels = assert_valid_png(pictures[0].paths[0])[..., :3]
    green = (pixels[..., 1] > 0.9) & (pixels[..., 0] < 0.1) & (pixels[..., 2] < 0.1)
    assert green.mean() > 0.2
    with pytest.raises(DataError, match="does not exist"):
        make_pictures(model, split, out=tmp_path / "out2", image=2, image_root=root)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("layer_type", WITHOUT_WEIGHTS)
def test_layer_type_without_weights_gives_a_clear_message(split, layer_type):
    model = tiny_model(split, img_gnn=layer_type)
    with pytest.raises(NoEdgeWeightsError) as info:
        region_graph(model, split, 0, level="higher")
    message = str(info.value)
    assert f"img_gnn={layer_type!r} learns no per-edge weights" in message
    assert "gat, gatv2, hsc, hsc_geo, hsc_text, transformer" in message and "\n" not in message
    assert region_graph(model, split, 0, level="object").number_of_edges() == 0   # nodes only still work


def test_weighted_layer_types_are_the_attention_and_hsc_layers():
    assert weighted_layer_types() == ["gat", "gatv2", "hsc", "hsc_geo", "hsc_text", "transformer"]


def test_command_line_writes_refuses_to_overwrite_and_reports_errors(split, data_root, tmp_path, capsys):
    model = tiny_model(split)
    ckpt = tmp_path / "model.pth"
    save_checkpoint(ckpt, model)
    base = ["--model", str(ckpt), "--data_path", str(data_root), "--data_name", "tiny", "--split", "test",
            "--out", str(tmp_path / "graphs")]
    assert main(base + ["--image", "2", "--caption", "10", "--level", "higher", "--word", "1"]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "graphs").iterdir())
    assert names == sorted(f"{stem}{suffix}" for suffix in (".graphml", ".json", ".png") for stem in (
        "tiny_test_image2_region_higher-layer3_caption10-word1", "tiny_test_caption10_words_higher-layer2",
        "tiny_test_image2_caption10_pair_higher"))
    assert out.count("wrote ") == 3 and "score" in out

    assert main(base + ["--image", "2", "--caption", "10", "--word", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exist" in err and "--overwrite" in err and err.count("\n") == 1
    assert main(base + ["--image", "2", "--caption", "10", "--word", "1", "--overwrite"]) == 0
    assert main(base + ["--image", "2", "--layer", "2"]) == 0
    assert (tmp_path / "graphs" / "tiny_test_image2_region_layer2.png").is_file()
    capsys.readouterr()

    for args, message in (
        (["--image", "99"], "image 99 is out of range: tiny/test has 4 images, numbered 0..3"),
        (["--image", "0", "--layer", "4"], "layer 4 does not exist: the stack has 3 relational layer(s)"),
        (["--image", "0", "--level", "higher", "--layer", "1"], "not both"),
        (["--caption", "0", "--word", "x", "--image_root", "."], "--image_root"),
        (["--image", "0", "--word", "a"], "--word needs --caption"),
        ([], "nothing to draw"),
        (["--image", "0", "--out", str(ckpt)], "is not a folder"),
    ):
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)

    gcn = tmp_path / "gcn.pth"
    save_checkpoint(gcn, tiny_model(split, img_gnn="gcn"))
    assert main(["--model", str(gcn)] + base[2:] + ["--image", "0", "--level", "all"]) == 2
    err = capsys.readouterr().err
    assert "img_gnn='gcn' learns no per-edge weights" in err and err.count("\n") == 1


def test_existing_files_are_checked_before_anything_is_written(split, tmp_path):
    model = tiny_model(split)
    (tmp_path / "tiny_test_caption0_words_object.json").write_text("{}")
    with pytest.raises(VizError, match="already exist"):
        make_pictures(model, split, out=tmp_path, caption=0, level="all")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_test_caption0_words_object.json"]


def test_per_node_ranking_takes_each_nodes_strongest_edge_first():
    g = nx.DiGraph(kind="region")
    weights = {(1, 0): 0.9, (2, 0): 0.8, (0, 1): 0.1, (2, 1): -0.3, (0, 2): 0.05, (1, 2): 0.5}
    for e, ((u, v), w) in enumerate(weights.items()):
        g.add_edge(u, v, weight=w, edge_id=e)
    # targets 0, 1, 2: strongest incoming 0.9, |-0.3|, 0.5 (ordered by |weight|), then the second strongest of each
    assert strongest_edges(g, 6, ranking="per_node") == [(1, 0), (1, 2), (2, 1), (2, 0), (0, 1), (0, 2)]
    pair = nx.DiGraph(kind="pair")
    for e, ((u, v), w) in enumerate({("w0", "r0"): 0.9, ("w0", "r1"): 0.8, ("w1", "r0"): 0.4, ("w1", "r1"): 0.6
                                     }.items()):
        pair.add_edge(u, v, weight=w, edge_id=e)
    assert strongest_edges(pair, 2) == [("w0", "r0"), ("w0", "r1")]
    assert strongest_edges(pair, 2, ranking="per_node") == [("w0", "r0"), ("w1", "r1")]   # one line per word
    assert strongest_edges(pair, 3, ranking="per_node") == [("w0", "r0"), ("w1", "r1"), ("w0", "r1")]
