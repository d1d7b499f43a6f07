"""Throughput, memory and scaling of hsc_pyg, and the same work done the original way, side by side.

    python benchmarks/run.py --out benchmarks/results/latest.json            # `make bench`: everything, full size
    python benchmarks/run.py --quick --out /tmp/bench.json                    # the same code paths, small and fast
    python benchmarks/run.py --only scoring,baseline --presets sgraf_saf      # some sections
    python benchmarks/run.py --device cuda --dtype bf16                       # on a GPU, bf16 autocast

Sections (``--only``): ``scoring`` (exact pair scoring pairs/s and peak memory, 64x320 ... 400x2000, and the scaling
ratios), ``baseline`` (the original-style per-caption loop re-implemented in ``original_style.py``: exact scoring and
the HSC training step, each asserted equal to ours first, then timed interleaved with ours on the same machine),
``encoding`` (images/s, captions/s), ``training`` (steps/s and peak memory at batch 32 and 128), ``layers`` (training
steps/s at batch 32 of HSC with every registered layer type on the region graph, the word graph kept ``hsc_text``: on
the ``full`` graph, and on the graphs of ``--layer_edges``, by the dense path and by sparse message passing where the
layer has both, and with the ``spatial`` builder's edge features for the layers that take them; ``--layers`` picks
some), ``rerank`` (retrieve-then-rerank with
K = 20 on 1,000 x 5,000: exact pair scores needed and time).

    python benchmarks/run.py --only layers --threads 2 --out benchmarks/results/layers_train_cpu.json

Every measurement runs in its own subprocess (a clean allocator and a meaningful peak memory), warms up first, and
reports the median of ``--repeats`` runs (wall and process CPU seconds). Weights are random (the cost does not depend
on training); caption lengths are drawn from the real Flickr30K test captions. The JSON goes to stdout and ``--out``
(rewritten after each measurement, so an interrupted run keeps what it measured); a short table goes to stderr.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as cm  # noqa: E402
import original_style as og  # noqa: E402
from hsc_pyg.config import SCORE_CHUNK_MB  # noqa: E402
from hsc_pyg.engine import blocking  # noqa: E402
from hsc_pyg.nn.layers import LAYERS  # noqa: E402

SECTIONS = ("scoring", "baseline", "encoding", "training", "layers", "rerank", "bf16")
SCORE_SIZES = ((64, 320), (128, 640), (100, 500), (200, 1000), (400, 2000))
QUICK_SCORE_SIZES = ((8, 40), (16, 80), (12, 60), (24, 120))
SCALING_PAIRS = (((64, 320), (128, 640)), ((100, 500), (200, 1000)), ((100, 500), (400, 2000)),
                 ((8, 40), (16, 80)), ((12, 60), (24, 120)))


# =========================================================================== workers (run in a subprocess each)
def _setup(spec: dict[str, Any]) -> str:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32 (the exact reference)
        torch.backends.cudnn.allow_tf32 = False
    return device


def _vocab_dims(quick: bool) -> tuple[int, int]:
    sizes = cm.QUICK if quick else cm.FULL
    return sizes["img_dim"], sizes["vocab_size"]


def _inputs(n_img: int, n_cap: int, quick: bool, seed: int = 0):
    img_dim, vocab = _vocab_dims(quick)
    return cm.synthetic_images(n_img, img_dim, seed=seed), cm.synthetic_captions(n_cap, vocab, seed=seed)


def _timed_runs(fn, device: str, repeats: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = cm.time_call(fn, device)
        walls.append(w)
        cpus.append(c)
    return walls, cpus


def worker_score(spec: dict[str, Any]) -> dict[str, Any]:
    """Exact scoring of ``n_img`` x ``n_cap`` (``blocking.score``), optionally against the original-style loop."""
    device = _setup(spec)
    quick, dtype, repeats = spec["quick"], spec["dtype"], spec["repeats"]
    n_img, n_cap = spec["n_img"], spec["n_cap"]
    model = cm.make_model(spec["preset"], quick, device)
    images, captions = _inputs(n_img, n_cap, quick)
    with cm.amp_context(device, dtype):
        img, cap = cm.encode(model, images, captions, device=device)
    del images
    lengths = cap.lengths
    out: dict[str, Any] = {"preset": spec["preset"], "n_img": n_img, "n_cap": n_cap, "pairs": n_img * n_cap,
                           "mean_caption_tokens": float(lengths.float().mean()), "max_caption_tokens": int(lengths.max()),
                           "threads": torch.get_num_threads(), "chunk_mb": spec.get("chunk_mb")}

    def ours():
        with torch.no_grad(), cm.amp_context(device, dtype):
            return blocking.score(model, img, cap, chunk_mb=spec.get("chunk_mb") or SCORE_CHUNK_MB)

    with torch.no_grad(), cm.amp_context(device, dtype):   # warm-up: every caption block's shapes, one image block
        blocking.score(model, img[:min(n_img, 16)], cap, chunk_mb=spec.get("chunk_mb") or SCORE_CHUNK_MB)
    if not spec.get("original"):
        with cm.PeakMemory(device) as mem:
            walls, cpus = _timed_runs(ours, device, repeats)
        out.update(_rates(walls, cpus, n_img * n_cap), peak_memory=mem.result)
        return out

    # ---- side by side with the original-style per-caption loop (same weights, same encodings)
    small_img, small_cap = img[:7].to(dtype=torch.float32), cap[:13].to(dtype=torch.float32)
    out["check_max_abs_diff"] = og.check_scores_match(model, small_img, small_cap, atol=1e-5 if dtype == "fp32" else 5e-2)
    # the original keeps its embeddings in float64 NumPy arrays and converts each shard to float32
    regions64, words64 = img.regions[:, 0].double(), cap.padded()[0][:, 0].double()
    cap_lens = lengths.tolist()

    def original():
        with torch.no_grad(), cm.amp_context(device, dtype):
            return og.shard_scores(model.similarity, regions64, words64, cap_lens, shard_size=100)

    original()   # warm-up
    walls_o, cpus_o, walls_u, cpus_u = [], [], [], []
    for _ in range(repeats):                         # interleaved, so that a change in machine load hits both
        w, c = cm.time_call(original, device)
        walls_o.append(w)
        cpus_o.append(c)
        w, c = cm.time_call(ours, device)
        walls_u.append(w)
        cpus_u.append(c)
    ours_r, orig_r = _rates(walls_u, cpus_u, n_img * n_cap), _rates(walls_o, cpus_o, n_img * n_cap)
    out.update(ours=ours_r, original=orig_r, label=og.LABEL,
               speedup_wall=ours_r["pairs_per_s"] / orig_r["pairs_per_s"],
               speedup_cpu=ours_r["pairs_per_cpu_s"] / orig_r["pairs_per_cpu_s"])
    return out


def _rates(walls: list[float], cpus: list[float], pairs: int) -> dict[str, Any]:
    wall, cpu = cm.summary(walls), cm.summary(cpus)
    return {"wall_s": wall, "cpu_s": cpu, "pairs_per_s": pairs / wall["median"], "pairs_per_cpu_s": pairs / cpu["median"]}


def worker_encode(spec: dict[str, Any]) -> dict[str, Any]:
    device = _setup(spec)
    quick, dtype, repeats, batch = spec["quick"], spec["dtype"], spec["repeats"], spec["batch_size"]
    model = cm.make_model(spec["preset"], quick, device)
    images, captions = _inputs(spec["n_img"], spec["n_cap"], quick)
    t0 = time.perf_counter()
    img_batches = [cm.image_batch(images[i:i + batch]) for i in range(0, len(images), batch)]
    order = sorted(range(len(captions)), key=lambda k: len(captions[k]))   # as evaluation batches them
    cap_batches = [cm.caption_batch([captions[k] for k in order[i:i + batch]]) for i in range(0, len(captions), batch)]
    collate_s = time.perf_counter() - t0
    img_batches = [b.to(device) for b in img_batches]
    cap_batches = [b.to(device) for b in cap_batches]

    def run(fn, batches):
        def call():
            with torch.no_grad(), cm.amp_context(device, dtype):
                for b in batches:
                    fn(b)
        return call

    out: dict[str, Any] = {"preset": spec["preset"], "batch_size": batch, "n_img": len(images), "n_cap": len(captions),
                           "collate_s_host": collate_s, "threads": torch.get_num_threads()}
    for what, fn, batches, n in (("images", model.encode_images, img_batches, len(images)),
                                 ("captions", model.encode_captions, cap_batches, len(captions))):
        call = run(fn, batches)
        with torch.no_grad(), cm.amp_context(device, dtype):
            fn(batches[0])                              # warm-up
        with cm.PeakMemory(device) as mem:
            walls, cpus = _timed_runs(call, device, repeats)
        w, c = cm.summary(walls), cm.summary(cpus)
        out[what] = {"wall_s": w, "cpu_s": c, "per_s": n / w["median"], "per_cpu_s": n / c["median"],
                     "peak_memory": mem.result}
    return out


def _train_inputs(batch: int, quick: bool, device: str, equal_lengths: int | None = None, seed: int = 0,
                  img_edges: str = "full"):
    img_dim, vocab = _vocab_dims(quick)
    images = cm.synthetic_images(batch, img_dim, seed=seed)
    if equal_lengths:
        rng = np.random.default_rng(seed)
        captions = [[1] + rng.integers(4, vocab, size=equal_lengths - 2).tolist() + [2] for _ in range(batch)]
    else:
        captions = cm.synthetic_captions(batch, vocab, seed=seed)
    pairs = cm.pair_batch(images, captions, img_edges).to(device)
    lengths = torch.tensor([len(c) for c in captions])
    tokens = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
    for i, c in enumerate(captions):
        tokens[i, :len(c)] = torch.tensor(c)
    return images.to(device), pairs, tokens.to(device), lengths


def check_training_matches(device: str, preset: str = "hsc", batch: int = 6, length: int = 7,
                           dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """Our training forward/backward equals the original-style padded step on a batch where the two are defined to
    agree (dropout off, equal caption lengths, distinct images): the loss, every gradient, and the SAF BatchNorm's
    running statistics (one update per caption, in caption order). Quick size, in ``dtype`` (float64: differences are
    rounding only, so the tolerances are tight; float32 also exercises the oneDNN products). AssertionError if not."""
    from hsc_pyg.nn.loss import ContrastiveLoss

    ours = cm.make_model(preset, quick=True, device=device).to(dtype).train()
    for mod in ours.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    theirs = copy.deepcopy(ours)
    # HSC's word blocks divide by the padded length in the original (MODEL.md §3): equal lengths there; SGRAF has no
    # such blocks, so its captions have different lengths (which exercises our sorting of captions by length)
    equal = length if ours.config.txt_layers > 0 else None
    images, pairs, tokens, lengths = _train_inputs(batch, True, device, equal_lengths=equal, seed=3)
    result_lengths = lengths.tolist()
    images = images.to(dtype)
    pairs.images.x = pairs.images.x.to(dtype)
    loss_ours = ContrastiveLoss(0.2, True)(blocking.BatchScores(ours)(pairs).scores)
    loss_ours.backward()
    loss_theirs = og.forward_loss(theirs, images, tokens, lengths)
    loss_theirs.backward()
    lo, lt = float(loss_ours.detach()), float(loss_theirs.detach())
    result: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "caption_lengths": result_lengths,
                              "loss_ours": lo, "loss_original": lt,
                              "loss_abs_diff": abs(lo - lt)}
    # gradient differences relative to the largest gradient of the model (biases in front of a BatchNorm or a softmax
    # have gradients that are zero up to rounding, so a per-parameter ratio would measure noise)
    grads = [(name, p.grad if p.grad is not None else torch.zeros_like(p),
              q.grad if q.grad is not None else torch.zeros_like(q))
             for (name, p), q in zip(ours.named_parameters(), theirs.parameters())]
    top = max(float(b.abs().max()) for _, _, b in grads)
    worst, worst_name = max((float((a - b).abs().max()) / top, name) for name, a, b in grads)
    result.update(grad_max_diff_over_largest_grad=worst, grad_worst_parameter=worst_name)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    norm_ours = getattr(ours.similarity.head, "norm", None)
    if norm_ours is not None:
        norm_theirs = theirs.similarity.head.norm
        result["bn_running_mean_diff"] = float((norm_ours.running_mean - norm_theirs.running_mean).abs().max())
        result["bn_running_var_diff"] = float((norm_ours.running_var - norm_theirs.running_var).abs().max())
        assert result["bn_running_mean_diff"] < tol and result["bn_running_var_diff"] < tol, result
    assert result["loss_abs_diff"] < tol * max(1.0, abs(lt)), result
    assert worst < tol, result
    return result


def worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    device = _setup(spec)
    quick, dtype, batch = spec["quick"], spec["dtype"], spec["batch_size"]
    steps = spec["steps"]
    from hsc_pyg.engine.train import train_step
    from hsc_pyg.nn.loss import ContrastiveLoss

    options = spec.get("model", {})
    model = cm.make_model(spec["preset"], quick, device, **options).train()
    amp = "bf16" if dtype == "bf16" and device.startswith("cuda") else "off"
    config = cm.Config(model.config, amp=amp)   # the run's options around the model's config
    criterion = ContrastiveLoss(config.margin, config.max_violation)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=False)
    images, pairs, tokens, lengths = _train_inputs(batch, quick, device, img_edges=config.img_edges)
    if spec.get("sparse"):
        pairs.images.complete = pairs.images.looped = False   # the same graphs, by sparse message passing
    stack = model.image_encoder.stack
    dense = stack.takes_dense_path(pairs.images)
    dev = torch.device(device)
    out: dict[str, Any] = {"preset": spec["preset"], "batch_size": batch, "amp": amp, "model": options,
                           "region_path": "dense" if dense else "sparse",
                           "region_edges_per_image": pairs.images.edge_index.size(1) // pairs.images.num_graphs,
                           "parameters": sum(p.numel() for p in model.parameters()),
                           "mean_caption_tokens": float(lengths.float().mean()), "threads": torch.get_num_threads()}
    cpu_amp = dtype == "bf16" and not device.startswith("cuda")
    net = blocking.BatchScores(model, config.score_chunk_mb)

    def ours():
        with cm.amp_context(device, "bf16" if cpu_amp else "fp32"):
            train_step(net, pairs, criterion, optimizer, scaler, config, dev, True)

    if spec.get("original"):
        out["check_float64"] = check_training_matches(device, spec["preset"], dtype=torch.float64)
        out["check_float32"] = check_training_matches(device, spec["preset"], dtype=torch.float32)
        optimizer_o = torch.optim.Adam(model.parameters(), lr=config.learning_rate)

        def original():
            with cm.amp_context(device, dtype):
                og.train_step(model, optimizer_o, images, tokens, lengths, grad_clip=config.grad_clip)

        ours()
        original()                                  # warm-ups
        walls_o, cpus_o, walls_u, cpus_u = [], [], [], []
        for _ in range(steps):
            w, c = cm.time_call(original, device)
            walls_o.append(w)
            cpus_o.append(c)
            w, c = cm.time_call(ours, device)
            walls_u.append(w)
            cpus_u.append(c)
        u, o = _steps(walls_u, cpus_u), _steps(walls_o, cpus_o)
        out.update(ours=u, original=o, label=og.LABEL, speedup_wall=u["steps_per_s"] / o["steps_per_s"],
                   speedup_cpu=u["steps_per_cpu_s"] / o["steps_per_cpu_s"])
        return out
    ours()                                          # warm-up
    with cm.PeakMemory(device) as mem:
        walls, cpus = _timed_runs(ours, device, steps)
    out.update(_steps(walls, cpus), peak_memory=mem.result)
    return out


def _steps(walls: list[float], cpus: list[float]) -> dict[str, Any]:
    wall, cpu = cm.summary(walls), cm.summary(cpus)
    return {"wall_s": wall, "cpu_s": cpu, "steps_per_s": 1 / wall["median"], "steps_per_cpu_s": 1 / cpu["median"]}


def worker_rerank(spec: dict[str, Any]) -> dict[str, Any]:
    """Retrieve-then-rerank through the real evaluation code (``hsc_pyg.engine.scoring.rerank``)."""
    from hsc_pyg.engine import scoring as ev

    device = _setup(spec)
    quick, dtype, k = spec["quick"], spec["dtype"], spec["k"]
    n_img, n_cap = spec["n_img"], spec["n_cap"]
    model = cm.make_model(spec["preset"], quick, device)
    images, captions = _inputs(n_img, n_cap, quick)
    amp = "bf16" if dtype == "bf16" and device.startswith("cuda") else "off"
    cpu_amp = "bf16" if dtype == "bf16" and not device.startswith("cuda") else "fp32"
    t0 = time.perf_counter()
    with cm.amp_context(device, dtype):
        img, cap = cm.encode(model, images, captions, device=device)
    cm.sync(device)
    encode_s = time.perf_counter() - t0
    del images
    box: dict[str, Any] = {}

    def call():
        box["result"] = ev.rerank(model, img, cap, k=k, amp=amp)

    with cm.amp_context(device, cpu_amp):
        ev.rerank(model, img[:8], cap[:40], k=min(k, 8), amp=amp)   # warm-up
        with cm.PeakMemory(device) as mem:
            w, c = cm.time_call(call, device)
        # the exact alternative, from the scoring rate on a slice of the same encodings
        sub_i, sub_c = min(n_img, 100), min(n_cap, 500)
        with torch.no_grad():
            blocking.score(model, img[:16], cap[:sub_c])
            ws, cs = cm.time_call(lambda: blocking.score(model, img[:sub_i], cap[:sub_c]), device)
    exact_pairs = int(box["result"].num_exact_pairs)
    full_rate = sub_i * sub_c / ws
    return {"preset": spec["preset"], "n_img": n_img, "n_cap": n_cap, "k": k, "threads": torch.get_num_threads(),
            "encode_s": encode_s, "rerank_wall_s": w, "rerank_cpu_s": c, "exact_pairs_scored": exact_pairs,
            "fraction_of_all_pairs": exact_pairs / (n_img * n_cap),
            "rerank_exact_pairs_per_s": exact_pairs / w,
            "full_exact_scoring_pairs_per_s": full_rate,
            "full_exact_scoring_estimated_s": n_img * n_cap / full_rate,
            "full_exact_estimate_from": f"blocking.score on {sub_i} x {sub_c} of the same encodings",
            "peak_memory": mem.result}


def gemm_rates(device: str, repeats: int, calls: int = 20) -> dict[str, Any]:
    """GFLOP/s of ``torch.randn(4096, 1024) @ torch.randn(1024, 256)`` in float32 and bfloat16 (median of ``repeats``
    runs of ``calls`` products): the machine's matrix rate at about the scorer's local-alignment shape."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(4096, 1024, device=device).to(dtype)
        b = torch.randn(1024, 256, device=device).to(dtype)
        for _ in range(3):
            a @ b                                                    # warm-up

        def call():
            for _ in range(calls):
                a @ b

        walls, _ = _timed_runs(call, device, repeats)
        out[str(dtype).replace("torch.", "")] = {"gflop_per_s": 2 * 4096 * 1024 * 256 * calls / 1e9 / cm.summary(walls)["median"],
                                                 "wall_s": cm.summary(walls)}
    return out


def flop_per_pair(mean_words: float, d: int, m: int, regions: int) -> float:
    """Multiply-adds x 2 of one SAF pair with ``mean_words`` words (benchmarks/NOTES.md): the word-region scores and the
    attended context (``2 R d L``), the local alignment (``L d m``), the global alignment (``d m``)."""
    return 2 * (2 * regions * d * mean_words + mean_words * d * m + d * m)


def worker_bf16(spec: dict[str, Any]) -> dict[str, Any]:
    """float32 exact, bf16 and bf16 with exact ranking (``evaluate.py --amp off``, ``--amp bf16 --rescore_k 0``,
    ``--amp bf16``) through the real evaluation code, side by side with the original-style loop (asserted equal to
    float32 first) on the same encodings, interleaved; the machine's float32 and bf16 GEMM rates; encoding, ours vs
    the original-style encoders (asserted equal first)."""
    from hsc_pyg.engine import scoring as ev
    from hsc_pyg.engine.device import cpu_bf16_instructions
    from hsc_pyg.engine.metrics import recall_metrics
    from hsc_pyg.config import DEFAULT_RESCORE_K

    device = _setup(spec)
    quick, repeats, k = spec["quick"], spec["repeats"], spec.get("rescore_k", DEFAULT_RESCORE_K)
    n_img, n_cap = spec["n_img"], spec["n_cap"]
    model = cm.make_model(spec["preset"], quick, device)
    images, captions = _inputs(n_img, n_cap, quick)
    img, cap = cm.encode(model, images, captions, device=device)
    lengths = cap.lengths
    sizes = model.config
    out: dict[str, Any] = {
        "preset": spec["preset"], "n_img": n_img, "n_cap": n_cap, "pairs": n_img * n_cap, "rescore_k": k,
        "threads": torch.get_num_threads(), "mean_caption_tokens": float(lengths.float().mean()),
        "cpu": cm.cpu_model(), "cpu_bf16_instructions": cpu_bf16_instructions(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    per_pair = flop_per_pair(float(lengths.float().mean()), sizes.embed_size, sizes.sim_dim, sizes.num_regions)
    out["gemm"] = gemm_rates(device, repeats)
    out["flop_per_pair"] = per_pair
    out["float32_gemm_floor_pairs_per_s"] = out["gemm"]["float32"]["gflop_per_s"] * 1e9 / per_pair
    out["bf16_gemm_floor_pairs_per_s"] = out["gemm"]["bfloat16"]["gflop_per_s"] * 1e9 / per_pair

    box: dict[str, Any] = {}

    def float32():
        box["float32"] = ev.score_matrix(model, img, cap, progress=False)

    def bf16():
        box["bf16"] = ev.score_matrix(model, img, cap, amp="bf16", progress=False)

    def exact_ranking():
        scores = ev.score_matrix(model, img, cap, amp="bf16", progress=False)
        box["exact_ranking"] = ev.rescore_ranking(scores, k, 5, lambda r, c: ev.pair_scores(model, img, cap, r, c))

    out["check_original_max_abs_diff"] = og.check_scores_match(model, img[:7], cap[:13], atol=1e-5)
    regions64, words64 = img.regions[:, 0].double(), cap.padded()[0][:, 0].double()
    cap_lens = lengths.tolist()

    def original():
        with torch.no_grad():
            box["original"] = og.shard_scores(model.similarity, regions64, words64, cap_lens, shard_size=100)

    runs = {"original": original, "float32": float32, "bf16": bf16, "exact_ranking": exact_ranking}
    for fn in runs.values():
        fn()                                                              # warm-up
    timings: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runs}
    for _ in range(repeats):                                              # interleaved
        for name, fn in runs.items():
            w, c = cm.time_call(fn, device)
            timings[name][0].append(w)
            timings[name][1].append(c)
    rates = {name: _rates(w, c, n_img * n_cap) for name, (w, c) in timings.items()}
    base = rates["original"]["pairs_per_s"]
    out["scoring"] = {name: dict(r, vs_original=r["pairs_per_s"] / base) for name, r in rates.items()}
    out["float32_vs_gemm_floor"] = out["float32_gemm_floor_pairs_per_s"] / rates["float32"]["pairs_per_s"]
    exact, rescored = box["float32"], box["exact_ranking"]
    out["bf16_max_abs_diff"] = float(np.abs(box["bf16"] - exact).max())
    out["exact_ranking_float32_pairs"] = rescored.num_float32_pairs
    out["exact_ranking_recall_table_equals_float32"] = rescored.metrics(5) == recall_metrics(exact, 5)
    out["encoding"] = _encoding_side_by_side(model, images, captions, device, repeats)
    return out


def _encoding_side_by_side(model, images: torch.Tensor, captions: list[list[int]], device: str,
                           repeats: int, batch: int = 128) -> dict[str, Any]:
    """``encode_images`` + ``encode_captions`` (with the global vectors) against the original-style encoders (without:
    the original computes them inside its similarity), on the same batches, asserted equal, timed interleaved. Our
    graph batches are collated outside the timing, as the original's padded tensors are."""
    order = sorted(range(len(captions)), key=lambda k: len(captions[k]))
    captions = [captions[k] for k in order]
    img_batches = [cm.image_batch(images[i:i + batch]).to(device) for i in range(0, len(images), batch)]
    cap_batches = [cm.caption_batch(captions[i:i + batch]).to(device) for i in range(0, len(captions), batch)]
    padded = []
    for i in range(0, len(captions), batch):
        part = captions[i:i + batch]
        tokens = torch.zeros(len(part), max(map(len, part)), dtype=torch.long)
        for j, c in enumerate(part):
            tokens[j, :len(c)] = torch.tensor(c)
        padded.append((tokens.to(device), torch.tensor([len(c) for c in part])))
    image_chunks = [images[i:i + batch].to(device) for i in range(0, len(images), batch)]

    def ours():
        return ([model.encode_images(b) for b in img_batches], [model.encode_captions(b) for b in cap_batches])

    def ours_without_global_vectors():
        """The same work as the original's encoders: our region and word encoders without VisualSA / TextSA."""
        return ([model.image_encoder(b) for b in img_batches], [model.text_encoder(b) for b in cap_batches])

    def original():
        return ([og.encode_images(model, x) for x in image_chunks], [og.encode_captions(model, t, n) for t, n in padded])

    def original_with_global_vectors():
        """The original-style encoders plus VisualSA / TextSA once per item, as the original's similarity computes
        them (images: a batch; captions: one caption at a time, cut to its length)."""
        sim = model.similarity
        out_img = [og.visual_sa(sim.visual_sa, v, v.mean(1)) for v in (og.encode_images(model, x) for x in image_chunks)]
        out_cap = []
        for tokens, lengths in padded:
            words = og.encode_captions(model, tokens, lengths)
            out_cap.append([og.text_sa(sim.text_sa, words[i:i + 1, :n], words[i:i + 1, :n].mean(1))
                            for i, n in enumerate(lengths.tolist())])
        return out_img, out_cap

    with torch.no_grad():
        (ours_img, ours_cap), (og_img, og_cap) = ours(), original()
        ours_words = [a.padded()[0][:, 0] for a in ours_cap]
        diff = max([float((a.regions[:, 0] - b).abs().max()) for a, b in zip(ours_img, og_img)]
                   + [float((a - b[:, :a.size(1)]).abs().max()) for a, b in zip(ours_words, og_cap)])
        if diff > 1e-5:
            raise AssertionError(f"our encoders differ from the original-style ones by {diff:.3g}")
        runs = {"original": original, "original_with_global_vectors": original_with_global_vectors, "ours": ours,
                "ours_without_global_vectors": ours_without_global_vectors}
        walls: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                walls[name].append(cm.time_call(fn, device)[0])
    w = {name: cm.summary(v) for name, v in walls.items()}
    return {"images": len(images), "captions": len(captions), "max_abs_diff": diff, "ours_wall_s": w["ours"],
            "original_wall_s": w["original"], "original_with_global_vectors_wall_s": w["original_with_global_vectors"],
            "ours_without_global_vectors_wall_s": w["ours_without_global_vectors"],
            "speed_vs_original": w["original"]["median"] / w["ours"]["median"],
            "speed_vs_original_same_work": (w["original"]["median"]
                                            / w["ours_without_global_vectors"]["median"]),
            "speed_vs_original_with_global_vectors": (w["original_with_global_vectors"]["median"]
                                                      / w["ours"]["median"]),
            "what": "ours: encode_images + encode_captions, which include the global vectors (VisualSA / TextSA); "
                    "original-style: EncoderImage + EncoderText (benchmarks/original_style.py), whose global vectors "
                    "the original computes in its similarity, once per shard; with_global_vectors: plus VisualSA / "
                    "TextSA once per item; same_work: our encoders without the global vectors against the "
                    "original's encoders"}


WORKERS = {"score": worker_score, "encode": worker_encode, "train": worker_train, "rerank": worker_rerank,
           "bf16": worker_bf16}


# =========================================================================== the parent
def run_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """A measurement in this process (CUDA: peak memory from the allocator's own counters, reset per measurement;
    saves the ~5 s of process and CUDA start-up per measurement)."""
    import gc
    import traceback

    t0 = time.perf_counter()
    try:
        result = json.loads(json.dumps(WORKERS[spec["kind"]](spec), default=float))
    except Exception as e:  # noqa: BLE001 - one failed measurement must not stop the others
        result = {"spec": spec, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result["subprocess_wall_s"] = time.perf_counter() - t0
    return result


def run_worker(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"spec": spec, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    result = json.loads(lines[-1])
    result["subprocess_wall_s"] = time.perf_counter() - t0
    return result


def plan(args) -> list[tuple[str, dict[str, Any]]]:
    base = {"device": args.device, "dtype": args.dtype, "quick": args.quick, "threads": args.threads}
    presets = args.presets
    todo: list[tuple[str, dict[str, Any]]] = []
    sections = args.only
    if "scoring" in sections:
        sizes = QUICK_SCORE_SIZES if args.quick else SCORE_SIZES
        for preset in presets:
            for n_img, n_cap in sizes:
                todo.append(("scoring", dict(base, kind="score", preset=preset, n_img=n_img, n_cap=n_cap,
                                             repeats=args.repeats, chunk_mb=args.chunk_mb)))
    if "baseline" in sections:
        n_img, n_cap = (12, 60) if args.quick else (100, 500)
        for preset in presets:
            todo.append(("baseline_scoring", dict(base, kind="score", preset=preset, n_img=n_img, n_cap=n_cap,
                                                  repeats=args.repeats, chunk_mb=args.chunk_mb, original=True)))
        for batch in ((8,) if args.quick else (32, 128)):
            todo.append(("baseline_training", dict(base, kind="train", preset="hsc", batch_size=batch,
                                                   steps=args.train_steps if batch <= 32 else max(1, args.train_steps - 1),
                                                   original=True)))
    if "encoding" in sections:
        n_img, n_cap = (32, 160) if args.quick else (512, 2560)
        for preset in presets:
            todo.append(("encoding", dict(base, kind="encode", preset=preset, n_img=n_img, n_cap=n_cap,
                                          batch_size=128, repeats=args.repeats)))
    if "training" in sections:
        for preset in presets:
            for batch in ((8, 16) if args.quick else (32, 128)):
                todo.append(("training", dict(base, kind="train", preset=preset, batch_size=batch,
                                              steps=args.train_steps if batch <= 32 else max(1, args.train_steps - 1))))
    if "layers" in sections:
        for options, sparse in layer_variants(args.layers, args.layer_edges):
            todo.append(("layers", dict(base, kind="train", preset="hsc", batch_size=8 if args.quick else 32,
                                        steps=args.train_steps, model=options, sparse=sparse)))
    if "bf16" in sections:
        for n_img, n_cap in ((12, 60),) if args.quick else args.bf16_sizes:
            todo.append(("bf16", dict(base, kind="bf16", preset="sgraf_saf", n_img=n_img, n_cap=n_cap,
                                      repeats=args.repeats)))
    if "rerank" in sections:
        n_img, n_cap = (40, 200) if args.quick else (1000, 5000)
        for preset in args.rerank_presets:
            todo.append(("rerank", dict(base, kind="rerank", preset=preset, n_img=n_img, n_cap=n_cap, k=20)))
    return todo


def layer_variants(names: list[str], edges: tuple[str, ...] = ("full",)) -> list[tuple[dict[str, Any], bool]]:
    """(model options, force the sparse path) of the ``layers`` section: each layer on the graphs of each edge spec in
    ``edges`` (dense path where it has one, and sparse), and on ``spatial`` edges with their features where it takes
    them."""
    variants = []
    for name in names:
        if not LAYERS.capability(name, "needs_edge_attr"):
            for spec in edges:
                options = {"img_gnn": name} if spec == "full" else {"img_gnn": name, "img_edges": spec}
                if LAYERS.capability(name, "supports_dense"):
                    variants.append((options, False))
                variants.append((options, True))
        if LAYERS.capability(name, "supports_edge_attr"):
            variants.append(({"img_gnn": name, "img_edges": "spatial", "img_edge_features": True}, True))
    return variants


def scaling(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Time ratios between sizes (4x the pairs should take about 4x the time if the cost is linear in pairs)."""
    out: dict[str, Any] = {}
    by = {(r["preset"], r["n_img"], r["n_cap"]): r for r in results if "error" not in r and "wall_s" in r}
    for preset in sorted({r["preset"] for r in by.values()}):
        rows = {}
        for small, big in SCALING_PAIRS:
            a, b = by.get((preset, *small)), by.get((preset, *big))
            if a and b:
                rows[f"{small[0]}x{small[1]} -> {big[0]}x{big[1]}"] = {
                    "pairs_ratio": b["pairs"] / a["pairs"],
                    "time_ratio_wall": b["wall_s"]["median"] / a["wall_s"]["median"],
                    "time_ratio_cpu": b["cpu_s"]["median"] / a["cpu_s"]["median"],
                    "note": "captions differ between sizes (drawn afresh), so mean length differs slightly: "
                            f"{a['mean_caption_tokens']:.2f} vs {b['mean_caption_tokens']:.2f} tokens"}
        if rows:
            out[preset] = rows
    return out


def table(report: dict[str, Any]) -> str:
    lines = [f"# hsc_pyg benchmark: {report['environment'].get('device')} {report['environment'].get('dtype')}, "
             f"{report['environment'].get('threads')} threads, {report['environment'].get('cpu')}"]
    for r in report.get("scoring", []):
        if "error" in r:
            lines.append(f"scoring  {r['spec']['preset']:10s} {r['spec']['n_img']}x{r['spec']['n_cap']}: {r['error'][:80]}")
            continue
        mem = r["peak_memory"].get("above_start_mb", float("nan"))
        lines.append(f"scoring  {r['preset']:10s} {r['n_img']:>4}x{r['n_cap']:<5} {r['pairs_per_s']:>10.0f} pairs/s "
                     f"(cpu {r['pairs_per_cpu_s']:.0f}/cpu-s)  peak +{mem:.0f} MB")
    for preset, rows in report.get("scaling", {}).items():
        for name, row in rows.items():
            lines.append(f"scaling  {preset:10s} {name}: pairs x{row['pairs_ratio']:.0f}, time x{row['time_ratio_wall']:.2f}")
    for r in report.get("baseline_scoring", []):
        if "error" in r:
            lines.append(f"baseline scoring {r['spec']['preset']}: {r['error'][:80]}")
            continue
        lines.append(f"vs orig  {r['preset']:10s} scoring {r['n_img']}x{r['n_cap']}: ours {r['ours']['pairs_per_s']:.0f} vs "
                     f"original-style {r['original']['pairs_per_s']:.0f} pairs/s -> x{r['speedup_wall']:.2f} wall, "
                     f"x{r['speedup_cpu']:.2f} cpu")
    for r in report.get("baseline_training", []):
        if "error" in r:
            lines.append(f"baseline training: {r['error'][:80]}")
            continue
        lines.append(f"vs orig  {r['preset']:10s} train B={r['batch_size']}: ours {r['ours']['steps_per_s']:.3f} vs "
                     f"original-style {r['original']['steps_per_s']:.3f} steps/s -> x{r['speedup_wall']:.2f} wall, "
                     f"x{r['speedup_cpu']:.2f} cpu")
    for r in report.get("encoding", []):
        if "error" in r:
            continue
        lines.append(f"encoding {r['preset']:10s} {r['images']['per_s']:.0f} images/s, {r['captions']['per_s']:.0f} captions/s")
    for r in report.get("training", []):
        if "error" in r:
            lines.append(f"training {r['spec']['preset']} B={r['spec']['batch_size']}: {r['error'][:80]}")
            continue
        mem = r["peak_memory"].get("above_start_mb", float("nan"))
        lines.append(f"training {r['preset']:10s} B={r['batch_size']:<4} {r['steps_per_s']:.3f} steps/s  peak +{mem:.0f} MB")
    for r in report.get("layers", []):
        if "error" in r:
            lines.append(f"layers   {json.dumps(r['spec']['model'])}: {r['error'][:80]}")
            continue
        options = r["model"]
        edges = f"{options.get('img_edges', 'full')}{' +features' if options.get('img_edge_features') else ''}"
        lines.append(f"layers   {options['img_gnn']:12s} {edges:17s} {r['region_path']:6s} B={r['batch_size']:<4} "
                     f"{r['steps_per_s']:.3f} steps/s  peak +{r['peak_memory'].get('above_start_mb', float('nan')):.0f} MB")
    for r in report.get("bf16", []):
        if "error" in r:
            lines.append(f"bf16: {r['error'][:80]}")
            continue
        sc = r["scoring"]
        lines.append(f"bf16     {r['preset']:10s} {r['n_img']}x{r['n_cap']}: original-style {sc['original']['pairs_per_s']:.0f}, "
                     f"float32 {sc['float32']['pairs_per_s']:.0f} (x{sc['float32']['vs_original']:.2f}), bf16 "
                     f"{sc['bf16']['pairs_per_s']:.0f} (x{sc['bf16']['vs_original']:.2f}), bf16 exact ranking "
                     f"{sc['exact_ranking']['pairs_per_s']:.0f} pairs/s (x{sc['exact_ranking']['vs_original']:.2f}); "
                     f"GEMM floor float32 {r['float32_gemm_floor_pairs_per_s']:.0f}, bf16 {r['bf16_gemm_floor_pairs_per_s']:.0f}; "
                     f"encoding x{r['encoding']['speed_vs_original']:.2f} the original's speed "
                     f"(x{r['encoding']['speed_vs_original_with_global_vectors']:.2f} with its global vectors; "
                     f"x{r['encoding']['speed_vs_original_same_work']:.2f} ours without them)")
    for r in report.get("rerank", []):
        if "error" in r:
            lines.append(f"rerank: {r['error'][:80]}")
            continue
        lines.append(f"rerank   {r['preset']:10s} {r['n_img']}x{r['n_cap']} K={r['k']}: {r['exact_pairs_scored']} exact pairs "
                     f"({100 * r['fraction_of_all_pairs']:.1f}%), {r['rerank_wall_s']:.1f} s; exact full est. "
                     f"{r['full_exact_scoring_estimated_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="fp32, or bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="small sizes, the same code paths")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--presets", default="hsc,sgraf_saf,sgraf_sgr")
    parser.add_argument("--rerank_presets", default="hsc")
    parser.add_argument("--layers", default="", help="comma-separated region-graph layer types of the layers section "
                                                     "(default: every registered one)")
    parser.add_argument("--layer_edges", default="full",
                        help="comma-separated region edge builders of the layers section, each trained by the dense "
                             "and the sparse path (default: %(default)s; e.g. full,knn:8,spatial)")
    parser.add_argument("--bf16_sizes", default="100x500,200x1000",
                        help="images x captions of the bf16 section, comma-separated (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--train_steps", type=int, default=3, help="timed steps at batch 32 (one fewer at 128)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--chunk_mb", type=int, default=None, help="score_chunk_mb of blocking.score (default: config)")
    parser.add_argument("--max_seconds", type=float, default=420.0,
                        help="skip a scoring size whose estimated time (from the previous size) exceeds this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement subprocess")
    parser.add_argument("--inprocess", default="auto", choices=("auto", "yes", "no"),
                        help="run the measurements in this process (auto: on CUDA) instead of one subprocess each")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec), default=float))
        return 0

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        parser.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    args.presets = [p for p in args.presets.split(",") if p]
    args.rerank_presets = [p for p in args.rerank_presets.split(",") if p]
    args.layers = [name for name in args.layers.split(",") if name] or LAYERS.names()
    args.layer_edges = tuple(spec for spec in args.layer_edges.split(",") if spec)
    args.bf16_sizes = [tuple(int(n) for n in size.split("x")) for size in args.bf16_sizes.split(",") if size]
    if args.threads:
        torch.set_num_threads(args.threads)
    env = cm.environment(args.device, args.dtype)
    lengths, source = cm.caption_lengths_source()
    report: dict[str, Any] = {
        "environment": env,
        "settings": {"quick": args.quick, "sections": args.only, "presets": args.presets, "repeats": args.repeats,
                     "sizes": "quick" if args.quick else "full: " + json.dumps(cm.FULL),
                     "caption_lengths": f"{source}; mean {float(np.mean(lengths)):.2f} tokens with <start>/<end>",
                     "weights": "random (the cost does not depend on training)",
                     "timing": "each measurement in its own subprocess, warmed up, median of the runs; wall and "
                               "process CPU seconds (CPU seconds are less sensitive to other load on the machine)"},
    }
    out_path = Path(args.out) if args.out else None

    def save() -> None:
        report["scaling"] = scaling(report.get("scoring", []))
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_suffix(out_path.suffix + ".tmp")
            tmp.write_text(cm.dump(report) + "\n")
            tmp.replace(out_path)

    inprocess = args.inprocess == "yes" or (args.inprocess == "auto" and args.device.startswith("cuda"))
    report["settings"]["measurements_in"] = "this process" if inprocess else "one subprocess each"
    last_rate: dict[str, float] = {}
    for section, spec in plan(args):
        if spec["kind"] == "score" and not spec.get("original"):
            rate = last_rate.get(spec["preset"])
            if rate:
                estimate = spec["n_img"] * spec["n_cap"] / rate * (spec["repeats"] + 0.2)
                if estimate > args.max_seconds and spec["repeats"] > 1:
                    spec["repeats"] = 1
                    estimate = spec["n_img"] * spec["n_cap"] / rate * 1.2
                if estimate > args.max_seconds:
                    report.setdefault(section, []).append(
                        {"spec": spec, "error": f"skipped: estimated {estimate:.0f} s > --max_seconds {args.max_seconds:.0f}"})
                    save()
                    continue
        print(f"[bench] {section}: {json.dumps({k: v for k, v in spec.items() if k not in ('device', 'dtype', 'quick', 'threads')})}",
              file=sys.stderr, flush=True)
        result = run_in_process(spec) if inprocess else run_worker(spec, args.timeout)
        if "error" in result:
            print(f"[bench]   failed: {result['error'][-500:]}", file=sys.stderr, flush=True)
        elif spec["kind"] == "score" and not spec.get("original"):
            last_rate[spec["preset"]] = result["pairs_per_s"]
        report.setdefault(section, []).append(result)
        save()
    report["environment"]["load_average_1_5_15_at_end"] = list(os.getloadavg())
    save()
    print(cm.dump(report))
    print(table(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
