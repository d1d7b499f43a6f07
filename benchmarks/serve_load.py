"""The explorer under load, on loopback: concurrent clients searching the Flickr8k-mini test gallery through the API.

    python benchmarks/serve_load.py --model runs/f8k/checkpoint/model_best.pth \\
        --out benchmarks/results/serve_load.json

Starts ``python -m hsc_pyg.serve`` on 127.0.0.1 (a free port, the gallery cache in a temporary folder, built before the
clock starts), then ``--clients`` threads each send ``--queries`` requests ``/api/search?q=...&k=10`` one after the
other (the test split's real captions, cycled; each search scores a shortlist of ``--shortlist`` exactly). Reported:
the latency of every request as the client sees it (median, 90th, 99th percentile, maximum), requests per second,
the failed requests (any status but 200, any connection error), the server's CPU time per request (user and system,
all its threads: what a request costs whatever else runs on the machine), and its resident memory sampled every 0.2 s
(at the start, the largest, at the end, and at each tenth of the run: flat once the worker threads are warm). The
server is then stopped with SIGTERM and must exit with 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

import common as cm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model trained on Flickr8k-mini")
    parser.add_argument("--data_path", default=str(cm.ROOT.parent / "shared" / "data"))
    parser.add_argument("--data_name", default="flickr8k_mini_precomp")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=200, help="requests per client")
    parser.add_argument("--shortlist", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=2, help="the server's --parallel")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    captions = (Path(args.data_path) / args.data_name / "test_caps.txt").read_text().splitlines()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(cm.ROOT)}
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        cache = str(Path(tmp) / "cache")
        command = [sys.executable, "-m", "hsc_pyg.serve", "--model", args.model, "--data_path", args.data_path,
                   "--data_name", args.data_name, "--split", "test", "--port", "0", "--cache", cache,
                   "--shortlist", str(args.shortlist), "--parallel", str(args.parallel), "--no_progress"]
        server = subprocess.Popen(command, cwd=cm.ROOT, env=env, stderr=subprocess.PIPE, text=True)
        address, said = None, []
        for line in server.stderr:
            said.append(line)
            found = re.search(r"serving (http://\S+)/", line)
            if found:
                address = found.group(1)
                break
        if address is None:
            raise SystemExit(f"the server did not start: {''.join(said)}")
        process = psutil.Process(server.pid)
        memory: list[float] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                memory.append(process.memory_info().rss / 2**20)
                time.sleep(0.2)

        def client(c: int) -> list[tuple[float, bool]]:
            out = []
            for i in range(args.queries):
                text = captions[(c * args.queries + i) % len(captions)]
                url = f"{address}/api/search?q={urllib.parse.quote_plus(text[:300])}&k=10"
                t = time.perf_counter()
                try:
                    with urllib.request.urlopen(url, timeout=60) as response:
                        ok = response.status == 200 and len(json.loads(response.read())["results"]) == 10
                except (OSError, ValueError):
                    ok = False
                out.append((time.perf_counter() - t, ok))
            return out

        with urllib.request.urlopen(f"{address}/api/search?q=a+dog&k=10", timeout=120) as response:   # warm-up
            response.read()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load_before, cpu_before = os.getloadavg(), process.cpu_times()
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [r for part in pool.map(client, range(args.clients)) for r in part]
        wall = time.perf_counter() - start
        cpu_after = process.cpu_times()
        sampling.set()
        sampler.join()
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=60)
    times = np.array([t for t, _ in results]) * 1000
    report = {
        "environment": cm.environment("cpu", "fp32"), "model": args.model, "data": args.data_name,
        "clients": args.clients, "queries_per_client": args.queries, "requests": len(results), "k": 10,
        "shortlist": args.shortlist, "server_parallel": args.parallel, "server_omp_threads": args.threads,
        "load_average_1_5_15_before": list(load_before),
        "failed": sum(1 for _, ok in results if not ok), "wall_s": wall, "requests_per_s": len(results) / wall,
        "server_cpu_ms_per_request": 1000 * (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system)
                                     / len(results),
        "latency_ms": {"median": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
                       "p99": float(np.percentile(times, 99)), "max": float(times.max())},
        "server_rss_mb": {"start": memory[0], "max": max(memory), "end": memory[-1], "samples": len(memory),
                          "at_each_tenth_of_the_run": [memory[round(i * (len(memory) - 1) / 10)] for i in range(11)]},
        "server_exit_code_after_sigterm": exit_code,
    }
    cm.publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
