"""Shared pieces of the benchmarks: full-size configs, synthetic inputs, timers, memory probes, environment record."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hsc_pyg.config import Config  # noqa: E402
from hsc_pyg.data.graphs import caption_graph, collate_graphs, collate_pairs, image_graph  # noqa: E402
from hsc_pyg.nn.model import CaptionEncoding, HSCModel, ImageEncoding, build_model  # noqa: E402

PRESETS = ("hsc", "sgraf_saf", "sgraf_sgr")
#: Full size (MODEL.md): img_dim 2048, d 1024, word_dim 300, sim_dim 256, 36 regions, F30K vocabulary.
FULL = dict(img_dim=2048, embed_size=1024, word_dim=300, sim_dim=256, num_regions=36, vocab_size=8481)
#: ``--quick``: the same code paths at a small size (for the smoke test and a fast look).
QUICK = dict(img_dim=64, embed_size=32, word_dim=16, sim_dim=8, num_regions=36, vocab_size=200)
F30K_CAPTIONS = ROOT.parent / "shared" / "data" / "scan_text" / "f30k_test_caps.txt"


def make_config(preset: str, quick: bool = False, **overrides) -> Config:
    sizes = QUICK if quick else FULL
    return Config(preset=preset, **sizes, **overrides)


def make_model(preset: str, quick: bool = False, device: str = "cpu", seed: int = 0, **overrides) -> HSCModel:
    """Random weights (the cost does not depend on training); BatchNorm running statistics randomised so that no
    normalisation is the identity. ``overrides``: model options over the preset (``img_gnn="gat"``, ...)."""
    torch.manual_seed(seed)
    model = build_model(make_config(preset, quick, **overrides))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                if mod.weight is not None and mod.weight.abs().sum() == 0:   # HSC's zero-initialised block norms
                    mod.weight.uniform_(0.05, 0.2)
    return model.to(device).eval()


# --------------------------------------------------------------------------- synthetic inputs
_LENGTHS: np.ndarray | None = None


def caption_lengths_source() -> tuple[np.ndarray, str]:
    """Token counts (with <start>/<end>) to draw caption lengths from: the real Flickr30K test captions tokenised
    with the project's tokenizer when ``../shared`` has them, else a fixed distribution of the same shape."""
    global _LENGTHS
    if F30K_CAPTIONS.is_file():
        from hsc_pyg.data.vocab import tokenize

        if _LENGTHS is None:
            lines = [line for line in F30K_CAPTIONS.read_text().split("\n") if line.strip()]
            _LENGTHS = np.array([len(tokenize(line)) + 2 for line in lines])
        return _LENGTHS, f"Flickr30K test captions ({len(_LENGTHS)}), tokenised"
    rng = np.random.default_rng(12345)
    lengths = np.clip(np.round(rng.gamma(8.0, 1.7, 5000)), 4, 77).astype(int) + 2
    return lengths, "fixed gamma(8, 1.7) + 2 distribution (F30K-like; shared captions absent)"


def sample_lengths(n: int, seed: int = 0) -> np.ndarray:
    source, _ = caption_lengths_source()
    return np.random.default_rng(seed).choice(source, size=n, replace=True)


def synthetic_images(n: int, img_dim: int, num_regions: int = 36, seed: int = 0) -> torch.Tensor:
    """Bottom-up-attention-like features: non-negative (post-ReLU), sparse-ish, ``[n, R, img_dim]`` float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, num_regions, img_dim, generator=g)) * 2.0


def synthetic_captions(n: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed + 1)
    return [[1] + rng.integers(4, vocab_size, size=int(k) - 2).tolist() + [2] for k in sample_lengths(n, seed)]


def image_batch(images: torch.Tensor, edges: str = "full"):
    return collate_graphs([image_graph(f, edges=edges) for f in images])


def caption_batch(captions: list[list[int]], edges: str = "full"):
    return collate_graphs([caption_graph(c, edges=edges) for c in captions])


def grid_boxes(num_regions: int) -> torch.Tensor:
    """Normalised boxes of the cells of a square grid, row-major, ``[num_regions, 4]`` (as the grid features of
    ``hsc_pyg.features`` and the built-in data have)."""
    side = round(num_regions ** 0.5)
    cell = torch.arange(num_regions)
    r, c = cell.div(side, rounding_mode="floor").float(), (cell % side).float()
    return torch.stack([c, r, c + 1, r + 1], dim=1) / side


def pair_batch(images: torch.Tensor, captions: list[list[int]], img_edges: str = "full"):
    """A training batch of distinct images, caption b with image b (as a batch of 128 random captions of F30K has);
    the images carry grid boxes (for ``spatial`` edges and the layers that read boxes)."""
    boxes = grid_boxes(images.shape[1])
    items = [(image_graph(images[b], boxes, img_edges), caption_graph(captions[b]), b, b)
             for b in range(len(captions))]
    return collate_pairs(items)


@torch.no_grad()
def encode(model: HSCModel, images: torch.Tensor, captions: list[list[int]], batch_size: int = 128,
           device: str = "cpu") -> tuple[ImageEncoding, CaptionEncoding]:
    img = ImageEncoding.cat([model.encode_images(image_batch(images[i:i + batch_size]).to(device))
                             for i in range(0, len(images), batch_size)])
    cap = CaptionEncoding.cat([model.encode_captions(caption_batch(captions[i:i + batch_size]).to(device))
                               for i in range(0, len(captions), batch_size)])
    return img, cap


# --------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """Wall seconds and process CPU seconds of one call (synchronised on CUDA)."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values),
            "all": [round(v, 6) for v in values]}


# --------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a section. CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before. CPU: the
    kernel's peak resident set size (VmHWM, reset at entry through ``/proc/self/clear_refs``; tracemalloc does not see
    torch's allocations) above the RSS at entry, after handing the allocator's free memory back (``malloc_trim``). No
    sampling thread: one would steal time slices from the OpenMP threads and slow the section being timed (measured:
    -12% on scoring, -40% on a training step with 2 threads on 2 cores). Where VmHWM cannot be reset, the process's
    ``ru_maxrss`` is reported instead (a whole-process peak)."""

    def __init__(self, device: str):
        self.device = str(device)
        self.result: dict[str, Any] = {}

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            malloc_trim()
            self.reset = _reset_peak_rss()
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.result = {"kind": "cuda max_memory_allocated", "peak_mb": peak / 2**20,
                           "above_start_mb": (peak - self.base) / 2**20}
            return
        maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        hwm = _status_kb("VmHWM")
        if self.reset and hwm is not None:
            self.result = {"kind": "host peak RSS of the section (VmHWM reset at entry)", "peak_mb": hwm / 1024,
                           "above_start_mb": hwm / 1024 - self.base / 2**20, "process_maxrss_mb": maxrss_mb}
        else:
            self.result = {"kind": "process ru_maxrss (peak of the whole process; VmHWM could not be reset)",
                           "peak_mb": maxrss_mb, "above_start_mb": maxrss_mb - self.base / 2**20}


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str, dtype: str) -> dict[str, Any]:
    import torch_geometric

    env: dict[str, Any] = {
        "device": str(device), "dtype": dtype, "torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


@contextmanager
def amp_context(device: str, dtype: str) -> Iterator[None]:
    """``fp32``: nothing; ``bf16``: autocast to bfloat16 on the device (the CPU too, for information)."""
    if dtype == "fp32":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=float)


def publish(report: Any, out: str | Path | None) -> None:
    """Print ``report`` as JSON and, with ``out``, write it there too (atomically)."""
    from hsc_pyg.io import write_text

    text = dump(report)
    if out:
        write_text(out, text + "\n")
    print(text)
