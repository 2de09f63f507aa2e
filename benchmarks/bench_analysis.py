"""Benchmark terrafm.analysis: UMAP colouring of 1e6 x 768 vectors and kNN classification throughput.

Ours: ``to_rgb(method="umap", sample=S)`` fits UMAP on S vectors and transforms all N chunk by
chunk. Baseline (same run): fitting UMAP on all N vectors. When that is impractical
(``--baseline-max`` < N) its time is projected from fits on increasing subsamples with a power law
t = a * n^b fitted in log space, and labelled as projected.

kNN: ``terrafm.evaluate.knn_scores`` (DINO-weighted cosine kNN) vs scikit-learn
``KNeighborsClassifier(metric="cosine", algorithm="brute")`` on the same data.

Usage: python benchmarks/bench_analysis.py [--n 1000000 --dim 768 --sample 20000]
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


def main():
    args = _args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    if args.phase:
        import json
        import warnings

        warnings.filterwarnings("ignore")
        result = phase_ours(args) if args.phase == "ours" else phase_baseline(args, int(args.phase.split(":")[1]))
        print(json.dumps(result))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs visible, threads capped at {args.threads}")
    bench_knn(args)
    if not args.skip_umap:
        bench_umap(args)
    print(f"parent process peak RSS (kNN part): {_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
