"""HNSW efSearch sweep: VectorIndex's approximate index (HNSW32,Flat, efConstruction 64) on n x 768
clustered unit vectors (bench_index.clustered), recall@20 against FAISS IndexFlatIP and single-query
CPU time on one thread, for efSearch 128 .. 2048.

    python benchmarks/bench_index_ef_sweep.py 1000000     # ~3 GB of vectors, ~8 min to build on 2 cores
"""
import json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import numpy as np, faiss
from bench_index import clustered
n, dim, nq, k = int(sys.argv[1]), 768, 200, 20
t = time.time(); x = clustered(n + nq, dim, seed=0); q = x[n:].copy(); x = x[:n]
faiss.normalize_L2(x); faiss.normalize_L2(q)
print("data", time.time() - t, flush=True)
flat = faiss.IndexFlatIP(dim); flat.add(x)
t = time.time(); _, truth = flat.search(q, k); print("truth", time.time() - t, flush=True)
del flat
index = faiss.index_factory(dim, "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
index.hnsw.efConstruction = 64
t0, c0 = time.time(), time.process_time(); index.add(x); print("build wall/cpu", time.time() - t0, time.process_time() - c0, flush=True)
faiss.omp_set_num_threads(1)
rows = []
for ef in (128, 256, 512, 1024, 2048):
    index.hnsw.efSearch = ef
    lat = []
    found = []
    for i in range(nq):
        c = time.process_time(); _, ids = index.search(q[i:i + 1], k); lat.append(time.process_time() - c)
        found.append(len(set(ids[0]) & set(truth[i])) / k)
    row = dict(n=n, ef=ef, recall=float(np.mean(found)), p50_ms=1000 * float(np.median(lat)), p95_ms=1000 * float(np.percentile(lat, 95)))
    print(json.dumps(row), flush=True); rows.append(row)

