"""The benchmark code paths run at a tiny size and report the fields the README and the issue quote (no timing is
asserted), and the original-style baseline they compare against computes the same numbers as the library."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common as cm  # noqa: E402
import longest_functions  # noqa: E402
import original_style as og  # noqa: E402
import run  # noqa: E402
from hsc_pyg.engine.device import cpu_bf16_instructions  # noqa: E402


def _spec(**kw):
    return dict(device="cpu", dtype="fp32", quick=True, threads=0, **kw)


@pytest.mark.parametrize("preset", ["hsc", "sgraf_saf", "sgraf_sgr"])
def test_original_style_loop_gives_the_model_scores(preset):
    model = cm.make_model(preset, quick=True)
    images, captions = run._inputs(5, 11, quick=True)
    img, cap = cm.encode(model, images, captions)
    assert og.check_scores_match(model, img, cap, atol=1e-5) < 1e-5


@pytest.mark.parametrize("preset", ["hsc", "sgraf_saf", "sgraf_sgr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_step_equals_the_original_style_step(preset, dtype, device):
    """Loss, every gradient and the SAF BatchNorm's running statistics (captions sorted by length inside the scorer,
    statistics still updated in caption order)."""
    result = run.check_training_matches(device, preset, batch=7, dtype=dtype)
    assert result["loss_abs_diff"] < 1e-4


def test_score_and_train_workers_report_their_fields():
    score = run.worker_score(_spec(kind="score", preset="sgraf_saf", n_img=6, n_cap=20, repeats=1))
    for key in ("pairs", "pairs_per_s", "pairs_per_cpu_s", "wall_s", "cpu_s", "peak_memory", "mean_caption_tokens"):
        assert key in score
    base = run.worker_score(_spec(kind="score", preset="hsc", n_img=6, n_cap=20, repeats=1, original=True))
    assert base["check_max_abs_diff"] < 1e-5 and base["speedup_wall"] > 0 and "original" in base
    train = run.worker_train(_spec(kind="train", preset="hsc", batch_size=6, steps=1))
    assert train["steps_per_s"] > 0 and "peak_memory" in train
    enc = run.worker_encode(_spec(kind="encode", preset="hsc", n_img=8, n_cap=20, batch_size=8, repeats=1))
    assert enc["images"]["per_s"] > 0 and enc["captions"]["per_s"] > 0
    rr = run.worker_rerank(_spec(kind="rerank", preset="hsc", n_img=10, n_cap=50, k=3))
    assert 0 < rr["exact_pairs_scored"] <= 10 * 50 and rr["fraction_of_all_pairs"] <= 1


def test_layers_section_trains_every_layer_on_the_path_it_names():
    variants = run.layer_variants(["gat", "gine", "hsc", "transformer"])
    assert variants == [({"img_gnn": "gat"}, False), ({"img_gnn": "gat"}, True),
                        ({"img_gnn": "gat", "img_edges": "spatial", "img_edge_features": True}, True),
                        ({"img_gnn": "gine", "img_edges": "spatial", "img_edge_features": True}, True),
                        ({"img_gnn": "hsc"}, False), ({"img_gnn": "hsc"}, True),
                        ({"img_gnn": "transformer"}, False), ({"img_gnn": "transformer"}, True),
                        ({"img_gnn": "transformer", "img_edges": "spatial", "img_edge_features": True}, True)]
    paths = []
    for options, sparse in variants[:3]:
        train = run.worker_train(_spec(kind="train", preset="hsc", batch_size=6, steps=1, model=options, sparse=sparse))
        assert train["steps_per_s"] > 0 and train["model"] == options
        paths.append((train["region_path"], train["region_edges_per_image"]))
    assert paths[:2] == [("dense", 36 * 36), ("sparse", 36 * 36)]
    assert paths[2][0] == "sparse" and paths[2][1] < 36 * 36   # spatial: the 8-neighbourhood of the grid cells
    # other edge builders with self-loops: the dense path over their own adjacency, and the sparse one
    knn = run.layer_variants(["hsc", "gine"], ("full", "knn:8"))
    on_knn = {"img_gnn": "hsc", "img_edges": "knn:8"}
    assert knn[2:4] == [(on_knn, False), (on_knn, True)]
    paths = [run.worker_train(_spec(kind="train", preset="hsc", batch_size=6, steps=1, model=options, sparse=sparse))
             ["region_path"] for options, sparse in knn[2:4]]
    assert paths == ["dense", "sparse"]


@pytest.mark.skipif(not cpu_bf16_instructions(),
                    reason="torch finds no native bf16 matrix instructions on this CPU (bf16 scoring is refused)")
def test_bf16_worker_reports_the_side_by_side_fields():
    r = run.worker_bf16(_spec(kind="bf16", preset="sgraf_saf", n_img=6, n_cap=30, repeats=1))
    assert set(r["scoring"]) == {"original", "float32", "bf16", "exact_ranking"}
    assert r["check_original_max_abs_diff"] < 1e-5 and 0 < r["bf16_max_abs_diff"] < 0.05
    assert r["exact_ranking_recall_table_equals_float32"] and r["cpu_bf16_instructions"]
    assert r["gemm"]["float32"]["gflop_per_s"] > 0 and r["float32_gemm_floor_pairs_per_s"] > 0
    assert r["encoding"]["max_abs_diff"] < 1e-5 and r["encoding"]["speed_vs_original_with_global_vectors"] > 0
    assert r["encoding"]["speed_vs_original_same_work"] > 0


def test_runner_writes_json_with_environment_and_scaling(tmp_path):
    out = tmp_path / "bench.json"
    assert run.main(["--quick", "--only", "scoring", "--presets", "sgraf_saf", "--repeats", "1",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    env = report["environment"]
    for key in ("device", "dtype", "torch", "torch_geometric", "threads", "cpu"):
        assert key in env
    assert len(report["scoring"]) == len(run.QUICK_SCORE_SIZES)
    assert all("error" not in r for r in report["scoring"])
    assert "sgraf_saf" in report["scaling"]


def test_coco5k_eval_small(tmp_path):
    import coco5k_eval

    out = tmp_path / "coco.json"
    assert coco5k_eval.main(["--scale", "0.004", "--preset", "sgraf_saf", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 20 and report["captions"] == 100
    assert report["stages"]["score"]["pairs_per_s"] > 0
    assert "EXTRAPOLATED" in report["extrapolated_to_5000x25000"]["label"]


def test_epoch_ranking_reads_the_dev_curves_and_compares_each_cutoff_with_the_test_order(tmp_path, capsys):
    import epoch_ranking
    curves = {"a": [100, 200, 210, 220], "b": [150, 160, 170, 300]}     # b leads after 1 and 4 epochs, a after 3
    runs = []
    for name, curve in curves.items():
        folder = tmp_path / "runs" / name / "seed0"
        folder.mkdir(parents=True)
        folder.joinpath("train.log").write_text("".join(
            f"epoch {e} iter {10 * e} dev: i2t R@1/5/10 1 / 2 / 3 | t2i R@1/5/10 1 / 2 / 3 | rsum {v} (best)\n"
            for e, v in enumerate(curve)) + "done: epoch 4\n")
        runs.append({"name": name, "seed": 0, "test_rsum": {"a": 180.0, "b": 190.0}[name]})
    (tmp_path / "study.json").write_text(json.dumps({"runs": runs}))
    out = tmp_path / "order.json"
    assert epoch_ranking.main(["--study", str(tmp_path / "study.json"), "--out", str(tmp_path / "runs"),
                               "--cutoffs", "1,3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["order_by_test"] == ["b", "a"]
    assert report["configurations"]["a"]["dev_best_first_3"] == [210.0]
    assert report["cutoffs"]["dev_best_first_1"] == {"order": ["b", "a"], "kendall_tau_vs_test": 1.0}
    assert report["cutoffs"]["dev_best_first_3"] == {"order": ["a", "b"], "kendall_tau_vs_test": -1.0}
    assert report["cutoffs"]["dev_best"]["kendall_tau_vs_test"] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu_check.sh would run")
def test_gpu_check_refuses_to_run_without_cuda_in_one_line(tmp_path):
    env = dict(os.environ, GPU_CHECK_PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no CUDA device here" in proc.stderr
    assert "GPU_CHECK_DEVICE=cpu" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_longest_library_function_is_under_80_lines():
    """Issue 30's bound on the library, measured as ``benchmarks/longest_functions.py`` prints it."""
    lines, where = longest_functions.function_lengths(longest_functions.ROOT / "hsc_pyg")[0]
    assert 20 < lines < 80, f"{where} has {lines} lines; split it into named steps"


def _bench(kind: str, rate: float) -> dict:
    """A run.py report with one scoring measurement at 10x50 (and, for fp32, the original-style baseline there)."""
    scoring = {"preset": "hsc", "n_img": 10, "n_cap": 50, "pairs": 500, "pairs_per_s": rate, "pairs_per_cpu_s": rate,
               "peak_memory": {"above_start_mb": 3.0}}
    report = {"environment": {"device": "cuda", "dtype": kind}, "scoring": [scoring]}
    if kind == "fp32":
        report["baseline_scoring"] = [{"preset": "hsc", "n_img": 10, "n_cap": 50, "ours": {"pairs_per_s": rate},
                                       "original": {"pairs_per_s": 100.0}, "speedup_wall": rate / 100,
                                       "speedup_cpu": rate / 100}]
    return report


def test_gpu_report_gathers_the_parts_into_one_json_named_after_the_card(tmp_path, capsys):
    import gpu_report

    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    (out / "parts.tsv").write_text("setup\tOK\t3\t0\nbench_fp32\tOK\t40\t150\ncoco5k\tTIMEOUT\t170\t170\n")
    (out / "bench_fp32.json").write_text(json.dumps(_bench("fp32", 2000.0)))
    (out / "bench_bf16.json").write_text(json.dumps(_bench("bf16", 7000.0)))
    table = {"metrics": {"rsum": 500.0, "r1_i2t": 60.0}, "first_stage_metrics": {"rsum": 450.0},
             "rerank": [{"k": 10, "metrics": {"rsum": 495.0}}]}
    (out / "evaluate_off.json").write_text(json.dumps(table))
    (out / "evaluate_bf16.json").write_text(json.dumps(table))
    (out / "evaluate_ddp.json").write_text(json.dumps(dict(table, metrics={"rsum": 499.0, "r1_i2t": 60.0})))
    (out / "cuda_check.json").write_text(json.dumps({"results": [{"check": "a", "ok": True},
                                                                 {"check": "b", "ok": False}]}))
    (out / "pytest_cuda.log").write_text("....\n======= 11 passed, 730 deselected in 30.1s =======\n")
    assert gpu_report.main([str(out), "--card", "NVIDIA H100 80GB HBM3", "--results_dir", str(results)]) == 0
    written = json.loads((results / "gpu_check_nvidia_h100_80gb_hbm3.json").read_text())
    assert written == json.loads((out / "gpu_check_nvidia_h100_80gb_hbm3.json").read_text())
    assert written["card"] == "NVIDIA H100 80GB HBM3"
    assert written["exact_scoring"] == [{
        "preset": "hsc", "size": "10x50", "original_fp32_pairs_per_s": 100.0, "fp32_pairs_per_s": 2000.0,
        "fp32_vs_original": 20.0, "bf16_pairs_per_s": 7000.0, "bf16_vs_original": 70.0, "largest_size": "10x50",
        "largest_fp32_pairs_per_s": 2000.0, "largest_fp32_peak_mb": 3.0}]
    assert written["pipeline"]["bf16_recall_table_equals_float32"] is True
    assert written["pipeline"]["ddp_recall_table_equals_single_process"] is False
    assert written["missing_files"] == ["bench_layers", "search", "coco5k"]
    assert written["cuda_check"] == {"passed": 1, "failed": ["b"], "skipped": []}
    assert written["pytest_cuda"] == "11 passed, 730 deselected in 30.1s"
    assert written["parts"][2] == {"part": "coco5k", "status": "TIMEOUT", "seconds": 170, "limit_s": 170}
    printed = capsys.readouterr().out
    assert "ours fp32 2,000 (x20.0), bf16 7,000 (x70.0)" in printed and "= one process: False" in printed


def test_gpu_report_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    import gpu_report

    assert gpu_report.main([str(tmp_path / "absent"), "--card", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err
