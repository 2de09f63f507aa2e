"""Benchmark terrafm.analysis: UMAP colouring of 1e6 x 768 vectors and kNN classification throughput.

Ours: ``to_rgb(method="umap", sample=S)`` fits UMAP on S vectors and transforms all N chunk by
chunk. Baseline (same run): fitting UMAP on all N vectors. When that is impractical
(``--baseline-max`` < N) its time is projected from fits on increasing subsamples with a power law
t = a * n^b fitted in log space, and labelled as projected.

kNN: ``terrafm.evaluate.knn_scores`` (DINO-weighted cosine kNN) vs scikit-learn
``KNeighborsClassifier(metric="cosine", algorithm="brute")`` on the same data.

Lazy stores (``--lazy``, same run): ``to_rgb`` / ``similarity`` / ``cluster`` on a zarr store read
lazily (``open_embedding``) at two sizes, the base and 10x its area. Each (function, store) runs in
a fresh child process and reports its peak RSS (VmHWM, whole process, and above its post-import
baseline); the goal is peak(10x) / peak(base) <= 1.2. Throughput (positions/s) of the lazy path on
the base store is divided by the in-memory path (the same store loaded into numpy first, load time
excluded); the goal is >= 0.8. Both paths fit on the same ``--lazy-sample`` vectors.

Usage: python benchmarks/bench_analysis.py [--n 1000000 --dim 768 --sample 20000]
       python benchmarks/bench_analysis.py --lazy-only [--lazy-side 160 --lazy-dim 768]
The CPU is shared: numba/BLAS threads are capped with --threads (default 2).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors to colour (a square grid)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--sample", type=int, default=20_000, help="UMAP fit sample (ours)")
    p.add_argument("--baseline-sizes", default="2500,5000,10000,20000", help="subsample sizes for projection")
    p.add_argument("--baseline-max", type=int, default=20_000, help="largest full fit actually run")
    p.add_argument("--knn-train", type=int, default=20_000)
    p.add_argument("--knn-query", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-umap", action="store_true")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="also benchmark to_rgb/similarity/cluster on lazy zarr stores")
    p.add_argument("--lazy-only", action="store_true", help="only the lazy-store benchmark")
    p.add_argument("--lazy-side", type=int, default=160, help="base store side (positions); the large one is ~sqrt(10)x")
    p.add_argument("--lazy-dim", type=int, default=768)
    p.add_argument("--lazy-chunk", type=int, default=64, help="zarr chunk side (positions)")
    p.add_argument("--lazy-sample", type=int, default=10_000, help="fit sample of to_rgb and cluster")
    p.add_argument("--lazy-dir", default="", help="where the stores go (default: a temporary folder)")
    p.add_argument("--phase", default="", help=argparse.SUPPRESS)
    return p.parse_args()


def synthetic_embedding(n: int, dim: int, seed: int = 0):
    """Mixture of 40 Gaussian clusters on a georeferenced (y, x, embedding) grid, float32."""
    import numpy as np
    import rioxarray  # noqa: F401
    import xarray as xr
    from affine import Affine

    side = int(round(n ** 0.5))
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim)).astype(np.float32)
    values = np.empty((side * side, dim), dtype=np.float32)
    for start in range(0, len(values), 100_000):
        stop = min(start + 100_000, len(values))
        values[start:stop] = centres[rng.integers(0, 40, stop - start)]
        values[start:stop] += 0.5 * rng.standard_normal((stop - start, dim), dtype=np.float32)
    da = xr.DataArray(values.reshape(side, side, dim), dims=("y", "x", "embedding"),
                      coords={"y": 5_000_000 - 160 * (np.arange(side) + 0.5), "x": 400_000 + 160 * (np.arange(side) + 0.5)},
                      name="embedding")
    da.rio.write_crs("EPSG:32633", inplace=True)  # inplace: no copy of a multi-GiB array
    da.rio.write_transform(Affine(160, 0, 400_000, 0, -160, 5_000_000), inplace=True)
    return da


def timed(fn, trace: bool = False):
    """Run fn; return (result, seconds, traced numpy/python peak GiB or None).

    tracemalloc slows numba-heavy code (UMAP) tenfold, so UMAP phases run untraced in their own
    child process and report that process's peak RSS instead.
    """
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    peak = None
    if trace:
        peak = tracemalloc.get_traced_memory()[1] / 2**30
        tracemalloc.stop()
    return out, elapsed, peak


def _warm_up_umap(dim: int) -> float:
    """JIT-compile umap/pynndescent once so timings measure the algorithm, not numba."""
    import numpy as np
    import umap

    t0 = time.perf_counter()
    x = np.random.default_rng(9).normal(size=(600, dim)).astype(np.float32)
    umap.UMAP(n_components=3, metric="cosine", random_state=0, n_epochs=20).fit(x[:400]).transform(x[400:])
    return time.perf_counter() - t0


def _rss_gib() -> float:
    """Peak RSS of this process image (VmHWM: unlike ru_maxrss it does not inherit the parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux), so the next _rss_gib() is the peak of one phase."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def phase_ours(args) -> dict:
    import numpy as np

    from terrafm.analysis import fit_rgb

    emb = synthetic_embedding(args.n, args.dim)
    rss_data = _rss_gib()
    jit = _warm_up_umap(args.dim)
    _reset_peak()
    reducer, t_fit, _ = timed(lambda: fit_rgb(emb, method="umap", sample=args.sample, seed=0))
    rgb, t_tr, _ = timed(lambda: reducer.transform(emb))
    assert np.isfinite(rgb.values).all() and rgb.rio.crs == emb.rio.crs
    return {"n": emb.sizes["y"] * emb.sizes["x"], "gib": emb.nbytes / 2**30, "fit": t_fit, "transform": t_tr,
            "jit": jit, "rss_data": rss_data, "rss": _rss_gib()}


def phase_baseline(args, size: int) -> dict:
    import numpy as np
    import umap

    emb = synthetic_embedding(size, args.dim, seed=0)
    rss_data = _rss_gib()
    jit = _warm_up_umap(args.dim)
    vectors = emb.values.reshape(-1, args.dim)
    _reset_peak()
    _, t, _ = timed(lambda: umap.UMAP(n_components=3, metric="cosine", random_state=0).fit(vectors))
    return {"n": len(vectors), "fit": t, "jit": jit, "rss_data": rss_data, "rss": _rss_gib()}


def _child(args, phase: str) -> dict:
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--phase", phase] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("phase", "skip_umap")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_umap(args):
    import numpy as np

    ours = _child(args, "ours")
    n = ours["n"]
    total = ours["fit"] + ours["transform"]
    print(f"UMAP colouring: {n:,} vectors x {args.dim} (synthetic 40-cluster mixture, {ours['gib']:.2f} GiB float32)")
    print(f"  ours  fit on {args.sample:,} + transform all in chunks: {total:8.1f} s "
          f"(fit {ours['fit']:.1f} s, transform {ours['transform']:.1f} s = {n / ours['transform']:,.0f} vectors/s), "
          f"peak RSS during fit+transform {ours['rss']:.2f} GiB (input alone {ours['rss_data']:.2f} GiB); JIT warm-up "
          f"{ours['jit']:.0f} s excluded")
    sizes = [int(s) for s in args.baseline_sizes.split(",") if int(s) <= min(args.baseline_max, n)]
    fits = []
    for size in sizes:
        res = _child(args, f"baseline:{size}")
        fits.append(res)
        print(f"  baseline UMAP fit on all of {res['n']:>9,}: {res['fit']:8.1f} s, peak RSS during fit {res['rss']:.2f} GiB "
              f"(input alone {res['rss_data']:.2f} GiB)")
    if fits and fits[-1]["n"] == n:
        base, label = fits[-1]["fit"], "measured"
    else:
        ns = np.array([f["n"] for f in fits], float)
        ts = np.array([f["fit"] for f in fits], float)
        b, log_a = np.polyfit(np.log(ns), np.log(ts), 1)
        base = float(np.exp(log_a) * n ** b)
        label = f"projected: t ~ n^{b:.2f} fitted to {len(fits)} subsample fits ({int(ns[0]):,}-{int(ns[-1]):,})"
    print(f"  baseline fit on all {n:,}: {base:8.1f} s [{label}]")
    print(f"  ratio baseline / ours (time): {base / total:.1f}x")


def bench_knn(args):
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier

    from terrafm.evaluate import knn_scores

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(10, args.dim)).astype(np.float32)
    labels = rng.integers(0, 10, args.knn_train + args.knn_query)
    x = centres[labels] + rng.standard_normal((len(labels), args.dim), dtype=np.float32)
    train, query = x[: args.knn_train], x[args.knn_train:]
    print(f"kNN classification: {args.knn_train:,} train x {args.knn_query:,} queries x {args.dim}, k=20")
    probs, t_ours, m_ours = timed(lambda: knn_scores(train, labels[: args.knn_train], query, k=20), trace=True)
    sk = KNeighborsClassifier(20, metric="cosine", algorithm="brute").fit(train, labels[: args.knn_train])
    pred, t_sk, m_sk = timed(lambda: sk.predict(query), trace=True)
    agree = float((probs.argmax(1) == pred).mean())
    print(f"  ours (DINO-weighted): {args.knn_query / t_ours:10,.0f} queries/s, traced peak {m_ours:.2f} GiB")
    print(f"  sklearn brute cosine: {args.knn_query / t_sk:10,.0f} queries/s, traced peak {m_sk:.2f} GiB")
    print(f"  ratio ours / sklearn throughput: {t_sk / t_ours:.2f}x; prediction agreement {agree:.3f}")


LAZY_FUNCTIONS = ("to_rgb", "similarity", "cluster")


def write_lazy_store(path, side: int, dim: int, chunk: int, seed: int = 0):
    """A (side, side, dim) float32 embedding store (40-cluster mixture, a cloudy block invalid), written chunk-wise."""
    import dask.array as dsa
    import numpy as np
    import rioxarray  # noqa: F401
    import xarray as xr
    from affine import Affine

    from terrafm.store import EMBEDDING_VAR, embedding_to_dataset

    centres = np.random.default_rng(seed).normal(size=(40, dim)).astype(np.float32)

    def block(block_info=None):
        (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
        rng = np.random.default_rng([seed, r0, c0])
        out = centres[rng.integers(0, 40, (r1 - r0, c1 - c0))]
        out += 0.5 * rng.standard_normal(out.shape, dtype=np.float32)
        return out

    chunks = tuple(tuple(min(chunk, side - i) for i in range(0, side, chunk)) for _ in range(2)) + ((dim,),)
    values = dsa.map_blocks(block, chunks=chunks, dtype=np.float32)
    valid = np.ones((side, side), bool)
    valid[: side // 10, : side // 10] = False                      # a cloud: NaN vectors, valid=False
    values = dsa.where(dsa.from_array(valid, chunks=chunks[:2])[..., None], values, np.float32(np.nan))
    da = xr.DataArray(values, dims=("y", "x", "embedding"), name="embedding",
                      coords={"y": 5_000_000 - 160 * (np.arange(side) + 0.5), "x": 400_000 + 160 * (np.arange(side) + 0.5)})
    da = da.assign_coords(valid=(("y", "x"), dsa.from_array(valid, chunks=chunks[:2])))
    da = da.rio.write_crs("EPSG:32633").rio.write_transform(Affine(160, 0, 400_000, 0, -160, 5_000_000))
    ds = embedding_to_dataset(da)
    ds[EMBEDDING_VAR].encoding["compressors"] = None    # uncompressed; keeps the grid_mapping encoding (CRS)
    ds.to_zarr(path, mode="w", consolidated=False)
    return path


def _lazy_call(name: str, emb, sample: int):
    """Run one analysis function to the end (a computed numpy result)."""
    import numpy as np

    from terrafm.analysis import cluster, similarity, to_rgb

    if name == "to_rgb":
        out = to_rgb(emb, sample=sample, seed=0)
    elif name == "similarity":
        query = np.asarray(emb.isel(y=emb.sizes["y"] // 2, x=emb.sizes["x"] // 2).values, dtype=np.float32)
        out = similarity(emb, query)
    else:
        out = cluster(emb, k=8, sample=sample, seed=0)
    return np.asarray(out.values)


def phase_lazy(args, name: str, path: str, mode: str) -> dict:
    """One (function, store, lazy|memory) measurement in this fresh process."""
    import dask
    import numpy as np

    import terrafm

    dask.config.set(scheduler="threads", num_workers=args.threads)
    if mode == "memory":
        emb = terrafm.open_embedding(path, chunks=None)
    else:
        emb = terrafm.open_embedding(path, chunks={})               # the stored chunks
    _lazy_call(name, terrafm.open_embedding(path, chunks=None).isel(y=slice(-8, None), x=slice(-8, None)), 16)  # warm-up
    rss_before = _rss_gib()
    _reset_peak()
    t0 = time.perf_counter()
    out = _lazy_call(name, emb, args.lazy_sample)
    elapsed = time.perf_counter() - t0
    assert np.isfinite(out).any()
    return {"seconds": elapsed, "positions": emb.sizes["y"] * emb.sizes["x"], "rss": _rss_gib(),
            "rss_before": rss_before, "checksum": float(np.nansum(out, dtype=np.float64))}


def bench_lazy(args):
    import json
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    folder = Path(args.lazy_dir or tempfile.mkdtemp(prefix="bench-analysis-"))
    folder.mkdir(parents=True, exist_ok=True)
    sides = {"base": args.lazy_side, "10x": int(round(args.lazy_side * 10 ** 0.5))}
    stores = {}
    for label, side in sides.items():
        t0 = time.perf_counter()
        stores[label] = str(write_lazy_store(folder / f"{label}.zarr", side, args.lazy_dim, args.lazy_chunk))
        gib = side * side * args.lazy_dim * 4 / 2**30
        print(f"  store {label}: {side}x{side} positions x {args.lazy_dim} = {gib:.2f} GiB float32, "
              f"{args.lazy_chunk}-position chunks, written in {time.perf_counter() - t0:.0f} s")

    def child(name, label, mode):
        cmd = [sys.executable, __file__, "--phase", f"lazy:{name}:{mode}:{stores[label]}",
               f"--threads={args.threads}", f"--lazy-sample={args.lazy_sample}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{name} on {label} ({mode}) failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    print(f"Lazy stores (open_embedding, dask threads={args.threads}), fit samples {args.lazy_sample:,}:")
    print(f"  {'function':<11} {'peak RSS base':>14} {'peak RSS 10x':>13} {'ratio':>6} {'above import':>22} "
          f"{'lazy pos/s':>11} {'memory pos/s':>13} {'ratio':>6}")
    for name in LAZY_FUNCTIONS:
        base, large = child(name, "base", "lazy"), child(name, "10x", "lazy")
        memory = child(name, "base", "memory")
        assert abs(base["checksum"] - memory["checksum"]) <= 1e-4 * max(1.0, abs(memory["checksum"])), (base, memory)
        lazy_rate, memory_rate = base["positions"] / base["seconds"], memory["positions"] / memory["seconds"]
        above = f"{(base['rss'] - base['rss_before']) * 1024:.0f} -> {(large['rss'] - large['rss_before']) * 1024:.0f} MiB"
        print(f"  {name:<11} {base['rss']:>10.2f} GiB {large['rss']:>9.2f} GiB {large['rss'] / base['rss']:>6.2f} "
              f"{above:>22} {lazy_rate:>11,.0f} {memory_rate:>13,.0f} {lazy_rate / memory_rate:>6.2f}")
    if not args.lazy_dir:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    args = _args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    if args.phase:
        import json
        import warnings

        warnings.filterwarnings("ignore")
        if args.phase.startswith("lazy:"):
            _, name, mode, path = args.phase.split(":", 3)
            result = phase_lazy(args, name, path, mode)
        elif args.phase == "ours":
            result = phase_ours(args)
        else:
            result = phase_baseline(args, int(args.phase.split(":")[1]))
        print(json.dumps(result))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs visible, threads capped at {args.threads}")
    if args.lazy_only:
        bench_lazy(args)
        return
    bench_knn(args)
    if not args.skip_umap:
        bench_umap(args)
    print(f"parent process peak RSS (kNN part): {_rss_gib():.2f} GiB")
    if args.lazy:
        bench_lazy(args)


if __name__ == "__main__":
    main()
