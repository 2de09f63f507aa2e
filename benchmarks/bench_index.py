"""Vector index benchmark: build time, memory, single-query latency and recall@20 of VectorIndex's FAISS indexes.

For each size (default 10^5 and 10^6) the script draws synthetic clustered unit vectors of 768
float32 (``clustered``: 64 clusters x 32 sub-clusters in a 16-dim latent space, mapped linearly to
768 dims, plus isotropic noise), holds out ``--queries`` of them as queries, and for each method
builds the FAISS index that :meth:`terrafm.analysis.VectorIndex.build` builds for that many vectors
(:func:`terrafm.analysis.index.index_params` / ``new_faiss_index``; the same training sample rule and
add batches; the zarr reading is not timed). Exact ground truth is FAISS ``IndexFlatIP``.

Reported per (size, method): build seconds (training + adding; wall clock and process CPU time),
index bytes ÷ raw float32 bytes (``faiss.write_index`` size), p50 / p95 single-query latency (one
query per call, k=20, FAISS on one thread; wall clock and the thread's CPU time), recall@20 against
the exact top 20. The machine's load average is recorded: on a shared machine the wall-clock
figures are upper bounds and the CPU times are what an idle core would take.

Run:  python benchmarks/bench_index.py [--sizes 100000 1000000] [--methods exact hnsw ivfpq] [--out index.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

K = 20


def clustered(n: int, dim: int = 768, seed: int = 0, clusters: int = 64, sub: int = 32, latent: int = 16) -> np.ndarray:
    """(n, dim) float32 unit vectors around ``clusters * sub`` centres of a ``latent``-dim space."""
    rng = np.random.default_rng(seed)
    lift = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
    centres = rng.normal(0, 3.0, (clusters, latent))
    subs = (centres[:, None] + rng.normal(0, 1.0, (clusters, sub, latent))).reshape(-1, latent).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        z = subs[rng.integers(0, len(subs), m)] + rng.normal(0, 0.5, (m, latent)).astype(np.float32)
        out[start:start + m] = z @ lift + rng.normal(0, 0.05, (m, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def build(method: str, vectors: np.ndarray, seed: int = 0):
    from terrafm.analysis.index import ADD_BATCH, index_params, new_faiss_index

    n, dim = vectors.shape
    params = index_params(method, n, dim)
    start, cpu = time.perf_counter(), time.process_time()
    index = new_faiss_index(params, dim, seed)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        index.train(vectors[np.sort(rng.choice(n, params["training"], replace=False))])
    for s in range(0, n, ADD_BATCH):
        index.add(vectors[s:s + ADD_BATCH])
    return index, params, time.perf_counter() - start, time.process_time() - cpu


def index_bytes(index) -> int:
    import faiss

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def measure(index, queries: np.ndarray, truth: np.ndarray) -> dict:
    """Single-query latency, wall clock and CPU time of the calling thread (FAISS on one thread: a
    single query does not use more, and the CPU time does not count the waits of a shared machine)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    wall, cpu, hits = [], [], 0
    try:
        for i in range(len(queries)):
            start, start_cpu = time.perf_counter(), time.thread_time()
            _, ids = index.search(queries[i:i + 1], K)
            cpu.append(time.thread_time() - start_cpu)
            wall.append(time.perf_counter() - start)
            hits += len(set(ids[0].tolist()) & set(truth[i].tolist()))
    finally:
        faiss.omp_set_num_threads(threads)
    ms = lambda values, q: float(np.percentile(values, q) * 1e3)  # noqa: E731
    return {"p50_ms": ms(wall, 50), "p95_ms": ms(wall, 95), "p50_cpu_ms": ms(cpu, 50), "p95_cpu_ms": ms(cpu, 95),
            "recall_at_20": hits / (K * len(queries))}


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["exact", "hnsw", "ivfpq"])
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    results = []
    for n in args.sizes:
        everything = clustered(n + args.queries, args.dim)
        vectors, queries = everything[:n], np.ascontiguousarray(everything[n:])
        del everything
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(vectors)
        _, truth = flat.search(queries, K)
        del flat
        for method in args.methods:
            load = os.getloadavg()[0]
            index, params, seconds, cpu_seconds = build(method, vectors)
            row = {"n": n, "dim": args.dim, "method": method, "factory": params["factory"],
                   "search": params["search"], "build_s": seconds, "build_cpu_s": cpu_seconds,
                   "memory_ratio": index_bytes(index) / (n * args.dim * 4), **measure(index, queries, truth),
                   "load_before": load, "load_after": os.getloadavg()[0], "threads": faiss.omp_get_max_threads()}
            print(json.dumps(row), flush=True)
            results.append(row)
            del index
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
