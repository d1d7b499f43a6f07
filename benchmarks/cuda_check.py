"""Correctness on CUDA: the checks of the test suite that matter for the GPU path, run on the GPU.

    python benchmarks/cuda_check.py [--device cuda] [--json OUT]

1. parity: the official SGRAF-SAF / SGRAF-SGR / HSC fixtures (``../shared/fixtures/reference``) through
   ``load_checkpoint(...).to(cuda).similarity_matrix`` match the original code's scores (1e-4), in fp32 and
   (looser, reported) under bf16 autocast;
2. exactness: the dense chunked scorer equals the one-pair-at-a-time reference of ``tests/test_similarity_exactness``
   on CUDA in float64 (1e-5) and float32 (1e-5), both heads, with and without ``align_levels``, several chunk sizes,
   and re-ranking's ``pair_scores``;
3. training: our forward/backward equals the original-style padded step (loss, gradients, SAF running statistics;
   ``benchmarks/run.py:check_training_matches``) on CUDA in float64 and float32, for the three presets;
4. the fused local-alignment backward passes ``torch.autograd.gradcheck`` on CUDA;
5. bf16 autocast: scores stay float32, close to fp32 (< 2e-2), without ties.

Prints one line per check and a final summary; exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

RESULTS: list[dict] = []


def check(name):
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                detail = fn(*args, **kwargs)
                RESULTS.append({"check": name, "ok": True, "detail": detail, "s": time.perf_counter() - t0})
                print(f"PASS {name}: {detail}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure and go on
                RESULTS.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                                "s": time.perf_counter() - t0})
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
        return run
    return wrap


def parity(device: str) -> None:
    from hsc_pyg import load_checkpoint

    ref = ROOT.parent / "shared" / "fixtures" / "reference"
    if not ref.is_dir():
        RESULTS.append({"check": "parity", "ok": None, "detail": f"skipped: {ref} absent"})
        print(f"SKIP parity: {ref} absent", flush=True)
        return
    for name in ("sgraf_saf", "sgraf_sgr", "lhsc"):
        @check(f"parity {name} fp32")
        def fp32():
            model = load_checkpoint(ref / f"{name}.pth.tar", map_location="cpu").to(device)
            case = torch.load(ref / f"{name}.case.pt", weights_only=True)
            sims = model.similarity_matrix(case["images"], case["captions"])
            diff = float((sims.double() - case["expected_sims"]).abs().max())
            assert diff < 1e-4, f"max abs diff {diff:.3g}"
            return f"max abs diff {diff:.2e}"

        @check(f"parity {name} bf16 autocast")
        def bf16():
            model = load_checkpoint(ref / f"{name}.pth.tar", map_location="cpu").to(device)
            case = torch.load(ref / f"{name}.case.pt", weights_only=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                sims = model.similarity_matrix(case["images"], case["captions"])
            diff = float((sims.double() - case["expected_sims"]).abs().max())
            assert sims.dtype == torch.float32 and diff < 5e-2, f"dtype {sims.dtype}, max abs diff {diff:.3g}"
            return f"max abs diff {diff:.2e} (bf16, reported)"

        fp32()
        bf16()


def exactness(device: str) -> None:
    import test_similarity_exactness as T

    for head in ("saf", "sgr"):
        for levels in ("higher", "object,relational,higher"):
            for dtype in (torch.float64, torch.float32):
                @check(f"exactness {head} levels={levels} {str(dtype)[6:]}")
                def one():
                    model = T.random_model(head, levels)
                    img, cap = T.random_encodings(5, T.LENGTHS, len(levels.split(",")))
                    with torch.no_grad():
                        expected = T.reference_matrix(model, img, cap)      # float64 on the CPU
                    model = model.to(device=device, dtype=dtype)
                    img, cap = img.to(device=device, dtype=dtype), cap.to(device=device, dtype=dtype)
                    worst = 0.0
                    with torch.no_grad():
                        for chunk in (1e-6, 0.002, 0.02, 512):
                            got = model.score(img, cap, chunk_mb=chunk).double().cpu()
                            worst = max(worst, float((got - expected).abs().max()))
                        pi, pj = torch.tensor([0, 4, 2, 2, 1]), torch.tensor([6, 0, 3, 1, 1])
                        paired = torch.from_numpy(T.pair_scores(model, img, cap, pi.numpy(), pj.numpy(), chunk_mb=1e-6)).double()
                        worst = max(worst, float((paired - expected[pi, pj]).abs().max()))
                    assert worst < 1e-5, f"max abs diff {worst:.3g}"
                    return f"max abs diff {worst:.2e}"

                one()


def training(device: str) -> None:
    import run

    for preset in ("hsc", "sgraf_saf", "sgraf_sgr"):
        for dtype in (torch.float64, torch.float32):
            @check(f"training step = original-style step, {preset} {str(dtype)[6:]}")
            def one():
                r = run.check_training_matches(device, preset, batch=9, dtype=dtype)
                return {k: r[k] for k in ("loss_abs_diff", "grad_max_diff_over_largest_grad")}

            one()


def gradcheck(device: str) -> None:
    @check("fused local alignment gradcheck")
    def one():
        from hsc_pyg.nn.kernels import Kernels, LocalAlignment

        g = torch.Generator(device=device).manual_seed(0)
        kw = dict(device=device, dtype=torch.float64)
        attn = torch.softmax(torch.randn(2, 4, 3, generator=g, **kw), -1).requires_grad_()
        args = (attn, torch.randn(2, 3, 5, generator=g, **kw).requires_grad_(),
                torch.randn(4, 5, generator=g, **kw).requires_grad_(),
                torch.randn(3, 5, generator=g, **kw).requires_grad_(), torch.randn(3, generator=g, **kw).requires_grad_(), Kernels())
        assert torch.autograd.gradcheck(LocalAlignment.apply, args)
        return "ok"

    one()


def bf16_scores(device: str) -> None:
    @check("bf16 autocast scores float32, close, no ties")
    def one():
        import test_similarity_exactness as T

        model = T.random_model("saf", "higher").float().to(device)
        img, cap = T.random_encodings(4, T.LENGTHS, 1)
        img, cap = img.to(device=device, dtype=torch.float32), cap.to(device=device, dtype=torch.float32)
        with torch.no_grad():
            exact = model.score(img, cap)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = model.score(img, cap)
        diff = float((low - exact).abs().max())
        assert low.dtype == torch.float32 and diff < 2e-2 and low.unique().numel() == low.numel(), diff
        return f"max abs diff {diff:.2e}"

    one()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", flush=True)
        return 1
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for part in (parity, exactness, training, gradcheck, bf16_scores):
        part(args.device)
    failed = [r for r in RESULTS if r["ok"] is False]
    print(f"cuda_check: {sum(r['ok'] is True for r in RESULTS)} passed, {len(failed)} failed, "
          f"{sum(r['ok'] is None for r in RESULTS)} skipped", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                                               else args.device, "results": RESULTS}, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
