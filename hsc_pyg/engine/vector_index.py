"""The first stage's shortlist over a gallery's vectors: brute force, or a FAISS index kept beside the vectors.

Every kind returns the ``n`` gallery rows whose first-stage vectors have the largest inner product (= cosine, the
vectors are unit length) with the query; the exact scorer then ranks them (:mod:`hsc_pyg.engine.retrieval`).

``brute``  one matrix-vector product over all vectors and an exact top-n (ties at the cut go to the lower row), the
           same shortlist as a stable sort; the default below :data:`AUTO_INDEX_FROM` vectors (at 200,000 it cost
           a median 54 ms a query on a busy 2-vCPU machine; at 1,000,000, 600-660 ms).
``flat``   FAISS ``IndexFlatIP``: the same exhaustive inner products, FAISS's SIMD scan.
``ivf``    FAISS ``IndexIVFFlat`` (inner product): k-means into ``nlist`` lists, each query scans the ``nprobe``
           nearest lists; approximate, exact scores for what it finds. ``auto`` from :data:`AUTO_INDEX_FROM` on
           (where FAISS is installed).
``ivf_sq8`` FAISS ``IndexIVFScalarQuantizer`` (8 bits a dimension): the same lists holding each vector in a quarter
           of the bytes (256 instead of 988 MB at a million), ranked by the quantised scores; it finds a little less
           of the exact shortlist at the same ``nprobe`` (the shortlist's exact re-ranking is unchanged).
``hnsw``   FAISS ``IndexHNSWFlat`` (inner product): a navigable small-world graph, ``M`` links per vector,
           ``ef_search`` candidates per query; approximate.

The numbers behind the defaults are in ``benchmarks/results/faiss_first_stage_*.json`` (README, "Explore").
FAISS is the optional extra ``faiss`` (``pip install -e '.[faiss]'``, PyPI ``faiss-cpu``).
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..config import INDEX_KINDS
from ..errors import ConfigError

#: From this many gallery vectors on, ``auto`` builds an IVF index; below it, brute force is fast enough.
AUTO_INDEX_FROM = 200_000


@dataclass(frozen=True)
class IndexSettings:
    """How a FAISS index is built and searched. ``nlist`` 0: about ``4 sqrt(N)`` lists, rounded to a power of 2
    (4,096 for a million vectors). The defaults are the benchmark's trade-off at 1,000,000 vectors (README,
    "Explore"): 4,096 lists searched with ``nprobe`` 128 (3 % of the vectors scanned) found 0.96 and 0.97 of the
    exact top 50 on the two synthetic sets, as much as 1,024 lists with ``nprobe`` 256 (25 % scanned) on the harder
    one; HNSW (``hnsw_m`` 16, ``ef_search`` 512) found 0.84 there after a longer build."""

    nlist: int = 0
    nprobe: int = 128
    train_size: int = 163_840        # vectors the IVF k-means is trained on (a fixed-seed sample; 40 per list)
    hnsw_m: int = 16
    ef_construction: int = 40
    ef_search: int = 512

    def lists(self, n: int) -> int:
        return self.nlist or max(1, 2 ** round(np.log2(max(4 * np.sqrt(n), 1))))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_kind(kind: str, n: int) -> str:
    """The index kind ``kind`` means for ``n`` vectors: ``auto`` is brute force below :data:`AUTO_INDEX_FROM`, from
    there on ``ivf`` where FAISS is installed (else still brute force)."""
    if kind not in INDEX_KINDS:
        raise ConfigError(f"--index {kind!r} is unknown; choose one of {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        return "ivf" if n >= AUTO_INDEX_FROM and importlib.util.find_spec("faiss") is not None else "brute"
    return kind


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("FAISS indexes need the faiss extra (PyPI faiss-cpu): pip install -e '.[faiss]'; or pass "
                          "--index brute") from None
    return faiss


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """The rows of the ``n`` largest ``scores``, largest first, ties by lower row: ``argsort(-scores, stable)[:n]``
    without sorting everything."""
    n = min(n, len(scores))
    if n == len(scores):
        return np.argsort(-scores, kind="stable")
    cut = np.partition(scores, len(scores) - n)[len(scores) - n]      # the n-th largest value
    candidates = np.flatnonzero(scores >= cut)                         # every row tied at the cut, in row order
    return candidates[np.argsort(-scores[candidates], kind="stable")][:n]


def build_faiss_index(vectors: np.ndarray, kind: str, settings: IndexSettings = IndexSettings()):
    """A FAISS index of ``kind`` (flat, ivf, ivf_sq8 or hnsw) over ``vectors [N, d]`` (float32, unit length), searched
    with ``settings``."""
    faiss = import_faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind in ("ivf", "ivf_sq8"):
        nlist = min(settings.lists(n), n)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, size=min(n, max(settings.train_size, nlist)), replace=False)
        index.train(vectors[np.sort(sample)])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
    else:
        raise ConfigError(f"no FAISS index of kind {kind!r}; choose flat, ivf, ivf_sq8 or hnsw")
    index.add(vectors)
    configure(index, settings)
    return index


def configure(index, settings: IndexSettings) -> None:
    """Set the search-time parameters (``nprobe``, ``efSearch``) of a built or loaded index."""
    faiss = import_faiss()
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(settings.nprobe, index.nlist)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = settings.ef_search


class Shortlister:
    """The ``n`` best gallery rows for a query vector: brute force over ``vectors`` (``index`` None) or FAISS."""

    def __init__(self, vectors, index=None, kind: str = "brute"):
        self.vectors, self.index, self.kind = vectors, index, kind

    def search(self, query: np.ndarray, n: int) -> np.ndarray:
        """Rows ``[n']`` (``n' <= n``; FAISS may find fewer), best first by first-stage score."""
        query = np.asarray(query, dtype=np.float32)
        if self.index is None:
            scores = np.asarray(self.vectors @ query, dtype=np.float32)
            return top_n(scores, n)
        _, rows = self.index.search(query[None], min(n, self.index.ntotal))
        return rows[0][rows[0] >= 0]
