"""Correctness on CUDA that the test suite's CUDA-marked tests (``pytest -m cuda``) do not cover.

    python benchmarks/cuda_check.py [--device cuda] [--json OUT]

1. parity: the official SGRAF-SAF / SGRAF-SGR / HSC fixtures (``../shared/fixtures/reference``, absent from a user's
   clone) through ``load_checkpoint(...).to(cuda).similarity_matrix`` match the original code's scores (1e-4), in
   fp32 and (looser, reported) under bf16 autocast;
2. the fused local-alignment backward passes ``torch.autograd.gradcheck`` on CUDA.

Exact scoring against the one-pair reference, bf16 autocast, the training step against the original-style step and
bf16's recall table on CUDA are tests (``tests/conftest.py``'s ``device`` fixture). Prints one line per check and a
final summary; exit status 1 if any check failed, 2 (one line) without CUDA.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hsc_pyg.io import write_text  # noqa: E402

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
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                sims = model.similarity_matrix(case["images"], case["captions"])
            diff = float((sims.double() - case["expected_sims"]).abs().max())
            assert sims.dtype == torch.float32 and diff < 5e-2, f"dtype {sims.dtype}, max abs diff {diff:.3g}"
            return f"max abs diff {diff:.2e} (bf16, reported)"

        fp32()
        bf16()


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"cuda_check.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or "
              f"--device cpu", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for part in (parity, gradcheck):
        part(args.device)
    failed = [r for r in RESULTS if r["ok"] is False]
    print(f"cuda_check: {sum(r['ok'] is True for r in RESULTS)} passed, {len(failed)} failed, "
          f"{sum(r['ok'] is None for r in RESULTS)} skipped", flush=True)
    if args.json:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        write_text(args.json, json.dumps({"device": device, "results": RESULTS}, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
