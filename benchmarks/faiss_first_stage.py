"""The first stage at 1,000,000 gallery vectors: brute force against FAISS indexes (build time, memory, query latency,
recall of the shortlist).

    OMP_NUM_THREADS=2 python benchmarks/faiss_first_stage.py --out benchmarks/results/faiss_first_stage.json

The gallery is ``--vectors`` synthetic unit vectors of ``--dim`` (256: the first-stage size of the Flickr8k-mini
recipes, ``embed_size`` 256 and no projection) drawn around ``--clusters`` random centres (``normalise(centre + noise)``
with the noise's norm ``--spread`` times the centre's), so that the data has the cluster structure that real image
vectors have and an IVF index relies on; ``--queries`` query vectors are drawn the same way (other seeds). Every
kind goes through :mod:`hsc_pyg.engine.vector_index`, the code the gallery cache uses: ``brute`` (one product and an
exact top-n), FAISS ``flat``, ``ivf`` at several ``nprobe`` and ``hnsw`` at several ``ef_search``. Reported per kind:
build time (``--build_threads`` threads), the index's size in memory (its serialised bytes; brute force: the vectors),
the time of one query searched alone (``--query_threads`` threads; median and 99th percentile) and the shortlist's
recall@``--shortlist`` against brute force (the fraction of brute force's top 50 that the index returns).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as cm  # noqa: E402
from hsc_pyg.engine.vector_index import IndexSettings, Shortlister, build_faiss_index, configure  # noqa: E402


def synthetic_vectors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` fixed random centres (centres from seed 0, members from ``seed``)."""
    centres = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for i0 in range(0, n, 65_536):
        rows = min(65_536, n - i0)
        x = centres[rng.integers(clusters, size=rows)]
        x += rng.standard_normal((rows, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        out[i0:i0 + rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def percentile(times: list[float], q: float) -> float:
    return float(np.percentile(np.array(times) * 1000, q))


def measure(shortlister, queries: np.ndarray, n: int, truth: list[np.ndarray] | None) -> dict:
    shortlister.search(queries[0], n)                    # warm-up
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        rows = shortlister.search(q, n)
        times.append(time.perf_counter() - t)
        found.append(rows)
    out = {"query_ms": {"median": percentile(times, 50), "p99": percentile(times, 99), "max": max(times) * 1000}}
    if truth is not None:
        out["recall_at_shortlist"] = float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))
    return out, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--shortlist", type=int, default=50)
    parser.add_argument("--build_threads", type=int, default=2)
    parser.add_argument("--query_threads", type=int, default=1)
    parser.add_argument("--nprobe", default="16,32,64,128,256")
    parser.add_argument("--ef_search", default="64,128,256,512")
    parser.add_argument("--kinds", default="brute,flat,ivf,hnsw")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (default 0: the library's rule)")
    parser.add_argument("--train_size", type=int, default=IndexSettings.train_size,
                        help="vectors the IVF k-means is trained on")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    import faiss

    from hsc_pyg.io import write_text

    def save(report: dict) -> None:          # after every kind: a long run keeps what it measured
        if args.out:
            write_text(args.out, cm.dump(report) + "\n")

    t = time.perf_counter()
    vectors = synthetic_vectors(args.vectors, args.dim, args.clusters, args.spread, seed=1)
    queries = synthetic_vectors(args.queries, args.dim, args.clusters, args.spread, seed=2)
    report = {"environment": cm.environment("cpu", "fp32"), "vectors": args.vectors, "dim": args.dim,
              "clusters": args.clusters, "spread": args.spread, "queries": args.queries, "shortlist": args.shortlist,
              "build_threads": args.build_threads, "query_threads": args.query_threads,
              "data_s": time.perf_counter() - t, "kinds": {}}
    print(f"data: {args.vectors} x {args.dim} in {report['data_s']:.1f} s", file=sys.stderr)

    torch.set_num_threads(args.query_threads)
    faiss.omp_set_num_threads(args.query_threads)
    brute, truth = measure(Shortlister(vectors), queries, args.shortlist, None)
    report["kinds"]["brute"] = {"build_s": 0.0, "memory_mb": vectors.nbytes / 2**20, **brute, "recall_at_shortlist": 1.0}
    print("brute", report["kinds"]["brute"], file=sys.stderr)
    save(report)

    for kind in [k for k in args.kinds.split(",") if k != "brute"]:
        faiss.omp_set_num_threads(args.build_threads)
        settings = IndexSettings(nlist=args.nlist, train_size=args.train_size)
        t = time.perf_counter()
        index = build_faiss_index(vectors, kind, settings)
        build_s = time.perf_counter() - t
        memory_mb = faiss.serialize_index(index).nbytes / 2**20
        faiss.omp_set_num_threads(args.query_threads)
        sweep = {"flat": [None], "ivf": [int(v) for v in args.nprobe.split(",")],
                 "hnsw": [int(v) for v in args.ef_search.split(",")]}[kind]
        for value in sweep:
            if kind == "ivf":
                settings = IndexSettings(nlist=args.nlist, train_size=args.train_size, nprobe=value)
            elif kind == "hnsw":
                settings = IndexSettings(ef_search=value)
            configure(index, settings)
            name = kind if value is None else f"{kind}(nprobe={value})" if kind == "ivf" else f"{kind}(ef={value})"
            result, _ = measure(Shortlister(vectors, index, kind), queries, args.shortlist, truth)
            report["kinds"][name] = {"build_s": build_s, "memory_mb": memory_mb, **result,
                                     "settings": settings.as_dict(),
                                     "nlist": int(index.nlist) if kind == "ivf" else None}
            print(name, report["kinds"][name], file=sys.stderr)
            save(report)
        del index
    print(cm.dump(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
