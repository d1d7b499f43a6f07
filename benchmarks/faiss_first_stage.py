"""The first stage over a large gallery: brute force against FAISS indexes (build time, memory, query latency, recall
of the shortlist), on synthetic or real first-stage vectors.

    OMP_NUM_THREADS=2 python benchmarks/faiss_first_stage.py --out benchmarks/results/faiss_first_stage.json
    python benchmarks/faiss_first_stage.py --gallery around_real --model M.pth --data_path DIR \\
        --data_name flickr8k_precomp --splits train,dev,test --out benchmarks/results/faiss_first_stage_real.json

``--gallery`` says what the vectors are (unit length, inner product = cosine, as the gallery cache keeps them):

``clusters``     ``--vectors`` synthetic vectors of ``--dim`` (256: the first-stage size of the Flickr8k-mini recipes)
                 around ``--clusters`` random centres (``normalise(centre + noise)``, the noise's norm ``--spread``
                 times the centre's); ``--queries`` queries drawn the same way (other seeds). With 10,000 centres and
                 spread 1 (cosine to the centre about 0.71) a query's 50 nearest are its own cluster's members, at
                 cosine ~0.5 among each other and ~0 +- 0.06 to the rest: nearly structureless, hard for IVF and HNSW.
``real``         the real image vectors of a model over the images of ``--splits`` (the gallery cache of
                 ``python -m hsc_pyg.search``, built if missing); the queries are the real caption vectors of
                 ``--query_split`` (text queries, as the explorer gets them).
``around_real``  ``--vectors`` vectors drawn around those real image vectors (``normalise(real + noise)``, Gaussian
                 noise of norm about ``--spread`` with the real vectors' own covariance), with the real caption vectors
                 as queries: a million-item gallery with the geometry of real embeddings (a large common direction,
                 about 70 of 256 directions holding 90 % of the variance), searched by real text queries.

Every kind goes through :mod:`hsc_pyg.engine.vector_index`, the code the gallery cache uses: ``brute`` (one product and
an exact top-n, timed on ``--brute_queries`` queries), FAISS ``flat``, ``ivf`` and ``ivf_sq8`` for each ``--nlist``
at each ``--nprobe``, ``hnsw`` for each ``--hnsw_m`` at each ``--ef_search``. Reported per kind: build time
(``--build_threads`` threads), the index's size in memory (its serialised bytes; brute force: the vectors), the time of
one query searched alone (``--query_threads`` threads; median and 99th percentile), and the shortlist's recall@
``--shortlist`` against the exact top ``--shortlist`` (the fraction of it that the index returns; the exact top is
computed once, by blocks of a matrix product). ``geometry`` describes the data (:func:`geometry`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
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


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def around(bases: np.ndarray, n: int, spread: float, seed: int, shaped: bool = False) -> np.ndarray:
    """``n`` unit vectors ``normalise(base + noise)``, each around a random row of ``bases`` (unit length), the noise
    of norm about ``spread``: isotropic, or (``shaped``) Gaussian with the covariance of ``bases`` around their mean,
    so that it spreads along the directions the real vectors use."""
    rng = np.random.default_rng(seed)
    dim = bases.shape[1]
    if shaped:
        values, directions = np.linalg.eigh(np.cov(bases.astype(np.float64), rowvar=False))
        shape = (directions * np.sqrt(np.clip(values, 0, None))).T * (spread / np.sqrt(values.clip(0).sum()))
    else:
        shape = np.eye(dim) * (spread / np.sqrt(dim))
    shape = shape.astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for i0 in range(0, n, 65_536):
        rows = min(65_536, n - i0)
        x = bases[rng.integers(len(bases), size=rows)].astype(np.float32)
        x += rng.standard_normal((rows, dim)).astype(np.float32) @ shape
        out[i0:i0 + rows] = normalised(x)
    return out


def synthetic_vectors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` fixed random centres (centres from seed 0, members from ``seed``)."""
    centres = normalised(np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32))
    return around(centres, n, spread, seed)


def real_vectors(args) -> tuple[np.ndarray, np.ndarray]:
    """The image vectors of ``--splits`` and the caption vectors of ``--query_split`` (their gallery caches)."""
    from hsc_pyg import load_checkpoint
    from hsc_pyg.data.precomp import PrecompSplit
    from hsc_pyg.engine.retrieval import open_gallery

    model = load_checkpoint(args.model)
    images, captions = [], None
    for name in dict.fromkeys(args.splits.split(",") + [args.query_split]):
        split = PrecompSplit.open(args.data_path, args.data_name, name)
        gallery, _ = open_gallery(model, split, index="brute", progress=True)
        if name in args.splits.split(","):
            images.append(gallery.image_vectors.numpy())
        if name == args.query_split:
            captions = gallery.caption_vectors.numpy()
    return np.concatenate(images).astype(np.float32), np.asarray(captions, dtype=np.float32)


def exact_top(vectors: np.ndarray, queries: np.ndarray, n: int) -> list[np.ndarray]:
    """The rows of the ``n`` largest inner products of each query, by blocks of 65,536 rows."""
    best_scores = np.full((0, len(queries)), -np.inf, dtype=np.float32)
    best_rows = np.zeros((0, len(queries)), dtype=np.int64)
    for i0 in range(0, len(vectors), 65_536):
        scores = np.concatenate([best_scores, vectors[i0:i0 + 65_536] @ queries.T])
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(i0, min(i0 + 65_536, len(vectors)))[:, None],
                                                          (min(65_536, len(vectors) - i0), len(queries)))])
        keep = np.argpartition(-scores, min(n, len(scores)) - 1, axis=0)[:n]
        best_scores, best_rows = np.take_along_axis(scores, keep, 0), np.take_along_axis(rows, keep, 0)
    return [best_rows[:, q] for q in range(len(queries))]


def geometry(vectors: np.ndarray, queries: np.ndarray, truth: list[np.ndarray]) -> dict:
    """How structured the data is: the mean cosine of random pairs, the median cosine of a query to its 1st and its
    ``n``-th nearest vector, and how many principal directions hold 90 % of the variance (of 20,000 vectors)."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(len(vectors), size=(2, 5000))
    sample = vectors[np.sort(rng.choice(len(vectors), size=min(20_000, len(vectors)), replace=False))]
    variance = np.linalg.svd(sample - sample.mean(0), compute_uv=False) ** 2
    nearest = np.array([[queries[q] @ vectors[rows].T] for q, rows in enumerate(truth)]).reshape(len(truth), -1)
    return {"random_pair_cosine_mean": float(np.mean(np.sum(vectors[a] * vectors[b], 1))),
            "query_1st_nearest_cosine_median": float(np.median(nearest.max(1))),
            "query_nth_nearest_cosine_median": float(np.median(nearest.min(1))),
            "directions_for_90pct_variance": int(np.searchsorted(np.cumsum(variance) / variance.sum(), 0.9) + 1)}


def percentile(times: list[float], q: float) -> float:
    return float(np.percentile(np.array(times) * 1000, q))


def measure(shortlister, queries: np.ndarray, n: int, truth: list[np.ndarray]) -> dict:
    shortlister.search(queries[0], n)                    # warm-up
    times, recall = [], []
    for q, t_rows in zip(queries, truth):
        t = time.perf_counter()
        rows = shortlister.search(q, n)
        times.append(time.perf_counter() - t)
        recall.append(len(np.intersect1d(rows, t_rows)) / len(t_rows))
    return {"query_ms": {"median": percentile(times, 50), "p99": percentile(times, 99), "max": max(times) * 1000},
            "recall_at_shortlist": float(np.mean(recall)), "recall_min": float(np.min(recall))}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", choices=("clusters", "real", "around_real"), default="clusters")
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256, help="clusters: the vectors' size")
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=1.0, help="the noise's norm relative to the centre's")
    parser.add_argument("--model", help="real, around_real: the model whose first-stage vectors are used")
    parser.add_argument("--data_path", default=str(cm.ROOT.parent / "shared" / "data"))
    parser.add_argument("--data_name", default="flickr8k_mini_precomp")
    parser.add_argument("--splits", default="test", help="real, around_real: the splits whose images are used")
    parser.add_argument("--query_split", default="test", help="real, around_real: the split whose captions query")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--brute_queries", type=int, default=20, help="queries brute force is timed on")
    parser.add_argument("--shortlist", type=int, default=50)
    parser.add_argument("--build_threads", type=int, default=2)
    parser.add_argument("--query_threads", type=int, default=1)
    parser.add_argument("--kinds", default="brute,flat,ivf,ivf_sq8,hnsw")
    parser.add_argument("--nlist", default="0", help="IVF lists, comma-separated (0: the library's rule)")
    parser.add_argument("--nprobe", default="16,32,64,128,256")
    parser.add_argument("--hnsw_m", default="16")
    parser.add_argument("--ef_construction", type=int, default=IndexSettings.ef_construction)
    parser.add_argument("--ef_search", default="64,128,256,512")
    parser.add_argument("--train_size", type=int, default=IndexSettings.train_size,
                        help="vectors the IVF k-means is trained on")
    parser.add_argument("--index_dir", default="",
                        help="keep each built index here and read it back on the next run with the same data and "
                             "build settings (its build time is then reported as null)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.gallery != "clusters" and not args.model:
        parser.error(f"--gallery {args.gallery} needs --model")

    import faiss

    from hsc_pyg.io import write_text

    def save(report: dict) -> None:          # after every kind: a long run keeps what it measured
        if args.out:
            write_text(args.out, cm.dump(report) + "\n")

    t = time.perf_counter()
    rng = np.random.default_rng(2)
    if args.gallery == "clusters":
        vectors = synthetic_vectors(args.vectors, args.dim, args.clusters, args.spread, seed=1)
        queries = synthetic_vectors(args.queries, args.dim, args.clusters, args.spread, seed=2)
    else:
        real, captions = real_vectors(args)
        vectors = real if args.gallery == "real" else around(real, args.vectors, args.spread, seed=1, shaped=True)
        queries = captions[np.sort(rng.choice(len(captions), size=min(args.queries, len(captions)), replace=False))]
    report = {"environment": cm.environment("cpu", "fp32"), "gallery": args.gallery, "vectors": len(vectors),
              "dim": vectors.shape[1], "queries": len(queries), "shortlist": args.shortlist,
              "build_threads": args.build_threads, "query_threads": args.query_threads,
              "data_s": time.perf_counter() - t, "kinds": {}}
    if args.gallery == "clusters":
        report.update(clusters=args.clusters, spread=args.spread)
    else:
        report.update(model=args.model, data=args.data_name, splits=args.splits, query_split=args.query_split,
                      real_images=len(real), spread=args.spread if args.gallery == "around_real" else None)
    t = time.perf_counter()
    truth = exact_top(vectors, queries, args.shortlist)
    report["exact_top_s"] = time.perf_counter() - t
    report["geometry"] = geometry(vectors, queries, truth)
    print(f"data: {len(vectors)} x {vectors.shape[1]} in {report['data_s']:.1f} s, exact top in "
          f"{report['exact_top_s']:.1f} s", file=sys.stderr)

    torch.set_num_threads(args.query_threads)
    faiss.omp_set_num_threads(args.query_threads)
    kinds = args.kinds.split(",")
    if "brute" in kinds:
        few = min(args.brute_queries, len(queries))
        brute = measure(Shortlister(vectors), queries[:few], args.shortlist, truth[:few])
        report["kinds"]["brute"] = {"build_s": 0.0, "memory_mb": vectors.nbytes / 2**20, **brute, "timed_queries": few}
        print("brute", report["kinds"]["brute"], file=sys.stderr)
        save(report)

    builds = [("flat", None, [None])] if "flat" in kinds else []
    builds += [(kind, nlist, ints(args.nprobe)) for kind in ("ivf", "ivf_sq8") if kind in kinds
               for nlist in ints(args.nlist)]
    builds += [("hnsw", m, ints(args.ef_search)) for m in ints(args.hnsw_m)] if "hnsw" in kinds else []
    for kind, size, sweep in builds:
        faiss.omp_set_num_threads(args.build_threads)
        ivf = kind.startswith("ivf")
        settings = IndexSettings(nlist=size if ivf else 0, train_size=args.train_size,
                                 hnsw_m=size if kind == "hnsw" else IndexSettings.hnsw_m,
                                 ef_construction=args.ef_construction)
        key = {"data": {k: report.get(k) for k in ("gallery", "vectors", "dim", "clusters", "spread", "model", "data",
                                                   "splits")}, "kind": kind,
               "build": {k: v for k, v in settings.as_dict().items() if k not in ("nprobe", "ef_search")}}
        saved = Path(args.index_dir) / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}" \
            f"-{kind}.faiss" if args.index_dir else None
        t = time.perf_counter()
        if saved is not None and saved.is_file():           # built by an earlier run: its build time is not measured
            index, build_s = faiss.read_index(str(saved)), None
        else:
            index = build_faiss_index(vectors, kind, settings)
            build_s = time.perf_counter() - t
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                faiss.write_index(index, str(saved))
        memory_mb = faiss.serialize_index(index).nbytes / 2**20
        faiss.omp_set_num_threads(args.query_threads)
        for value in sweep:
            if ivf:
                settings = IndexSettings(nlist=size, train_size=args.train_size, nprobe=value)
                name = f"{kind}(nlist={index.nlist},nprobe={value})"
            elif kind == "hnsw":
                settings = IndexSettings(hnsw_m=size, ef_construction=args.ef_construction, ef_search=value)
                name = f"hnsw(M={size},ef={value})"
            else:
                name = kind
            configure(index, settings)
            result = measure(Shortlister(vectors, index, kind), queries, args.shortlist, truth)
            report["kinds"][name] = {"build_s": build_s, "memory_mb": memory_mb, **result,
                                     "settings": settings.as_dict(),
                                     "nlist": int(index.nlist) if ivf else None}
            print(name, report["kinds"][name], file=sys.stderr)
            save(report)
        del index
    report["load_average_1_5_15_at_end"] = list(os.getloadavg())
    print(cm.dump(report))
    save(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
