"""A persistent vector index over embedding stores (FAISS): similarity search across areas and dates.

:class:`VectorIndex` holds the valid positions of one or many embedding zarr stores (different areas,
different dates), L2-normalised so that the inner product is the cosine similarity. Below
``exact_below`` vectors it is an exact FAISS ``IndexFlatIP``; above, an approximate index (HNSW or
IVF-PQ with an 8-bit re-ranking, see :data:`APPROXIMATE`), chosen once at build and recorded. It is
saved as a directory beside the stores, checks on opening that the stores still hold what was
indexed, and grows with them (:meth:`VectorIndex.add`). FAISS is imported inside the functions
that use it (``pip install faiss-cpu``).

Examples
--------
>>> from terrafm.analysis import VectorIndex                                  # doctest: +SKIP
>>> index = VectorIndex.build(["2023.zarr", "2024.zarr"])                     # doctest: +SKIP
>>> index.save()                                # 2023.zarr.index/ beside the first store  # doctest: +SKIP
>>> index.search((13.40, 52.52), k=10)          # GeoDataFrame: store, time, lon, lat, score, ...  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..store import replace_with, temporary_sibling
from ._checks import require_int
from ._index_stores import (NO_TIME, Unit, changes, complete_units, count_valid, describe_store, open_store,
                            read_unit)

__all__ = ["VectorIndex", "StoreChangedError", "METHODS", "APPROXIMATE", "index_params", "new_faiss_index"]

logger = logging.getLogger(__name__)

METHODS = ("auto", "exact", "hnsw", "ivfpq")
APPROXIMATE = "hnsw"
"""The approximate method ``method="auto"`` chooses at ``exact_below`` vectors and above
(benchmarks/README.md, "Vector index": the one reaching recall@20 >= 0.95 under 20 ms at 10^6)."""

HNSW_M = 32
"""Neighbours per HNSW node (graph memory: about ``2 * M * 4`` bytes per vector on top of the vectors)."""
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 128
"""HNSW candidate list at query time (raised to ``k`` when ``k`` is larger)."""
IVF_NPROBE = 32
"""Inverted lists visited per IVF-PQ query."""
REFINE_K_FACTOR = 8
"""IVF-PQ re-ranks ``k * REFINE_K_FACTOR`` PQ candidates with 8-bit scalar-quantised vectors."""
MAX_TRAINING = 100_000
"""Largest training sample of IVF-PQ (drawn with ``seed`` from whole blocks)."""
ADD_BATCH = 65_536
"""Vectors handed to FAISS at once while building (the build's memory beyond the index itself)."""

FORMAT = "terrafm-vector-index"
FORMAT_VERSION = 1
VECTORS_FILE, POSITIONS_FILE, MANIFEST_FILE = "vectors.faiss", "positions.parquet", "manifest.json"


class StoreChangedError(ValueError):
    """A store's values differ from what the index holds: rebuild the index."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("terrafm's vector index needs FAISS: pip install faiss-cpu (or a faiss GPU build, "
                          "e.g. conda install -c pytorch faiss-gpu)") from None
    return faiss


# ---------------------------------------------------------------------- FAISS indexes
def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(m for m in range(1, max(1, limit) + 1) if n % m == 0)


def index_params(method: str, n: int, dim: int) -> dict:
    """The FAISS index of ``method`` for ``n`` vectors of ``dim``: factory string and search knobs.

    ``"exact"``: ``Flat`` (inner product). ``"hnsw"``: ``HNSW{M},Flat``. ``"ivfpq"``:
    ``IVF{nlist},PQ{m}x{bits},Refine(SQ8)`` with ``nlist`` the power of two nearest ``4 sqrt(n)``
    (at least 39 training vectors per list), ``m`` sub-quantisers of 8 dims,
    8 bits (fewer when ``n`` is too small to train 256 centroids), candidates re-ranked with 8-bit
    scalar-quantised vectors.

    Examples
    --------
    >>> index_params("ivfpq", 1_000_000, 768)["factory"]
    'IVF4096,PQ96x8,Refine(SQ8)'
    >>> index_params("hnsw", 10, 16)["factory"]
    'HNSW32,Flat'
    """
    if method == "exact":
        return {"method": "exact", "factory": "Flat", "search": {}}
    if method == "hnsw":
        return {"method": "hnsw", "factory": f"HNSW{HNSW_M},Flat", "ef_construction": HNSW_EF_CONSTRUCTION,
                "search": {"efSearch": HNSW_EF_SEARCH}}
    if method == "ivfpq":
        nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
        while nlist > 1 and n < 39 * nlist:
            nlist //= 2
        training = min(n, MAX_TRAINING, max(256 * nlist, 10_000))
        bits = int(min(8, max(1, math.floor(math.log2(max(2, training / 39))))))
        m = _largest_divisor_at_most(dim, dim // 8)
        return {"method": "ivfpq", "factory": f"IVF{nlist},PQ{m}x{bits},Refine(SQ8)", "training": training,
                "search": {"nprobe": min(IVF_NPROBE, nlist), "k_factor": REFINE_K_FACTOR}}
    raise ValueError(f"method={method!r}: choose one of {METHODS}")


def new_faiss_index(params: dict, dim: int, seed: int = 0):
    """An empty FAISS index for :func:`index_params` (inner-product metric), search knobs set.

    Examples
    --------
    >>> new_faiss_index(index_params("exact", 10, 4), 4).ntotal
    0
    """
    faiss = _faiss()
    index = faiss.index_factory(int(dim), params["factory"], faiss.METRIC_INNER_PRODUCT)
    if params["method"] == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = int(params["ef_construction"])
    if params["method"] == "ivfpq":
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = int(seed)
        faiss.downcast_index(ivf).pq.cp.seed = int(seed)
    set_search_params(index, params)
    return index


def set_search_params(index, params: dict) -> None:
    """Apply the recorded search knobs (``efSearch``, ``nprobe``, ``k_factor``) to ``index``."""
    faiss = _faiss()
    knobs = params.get("search", {})
    outer = faiss.downcast_index(index)
    if "k_factor" in knobs:
        outer.k_factor = float(knobs["k_factor"])
    if "efSearch" in knobs:
        outer.hnsw.efSearch = int(knobs["efSearch"])
    if "nprobe" in knobs:
        base = faiss.downcast_index(outer.base_index) if hasattr(outer, "base_index") else outer
        if hasattr(base, "nprobe"):
            base.nprobe = int(knobs["nprobe"])
        else:                                      # a GPU copy
            faiss.GpuParameterSpace().set_index_parameter(base, "nprobe", int(knobs["nprobe"]))


def _normalized(vectors: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    norms = np.linalg.norm(out.astype(np.float64), axis=1, keepdims=True)
    out /= np.where(norms > 0, norms, 1.0).astype(np.float32)
    return out


# ---------------------------------------------------------------------- paths
def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def default_index_path(first_store: str | os.PathLike) -> Path:
    """``<store parent>/<store name>.index``: where an index is saved when no path is given.

    Examples
    --------
    >>> default_index_path("/data/berlin_2023.zarr").as_posix()
    '/data/berlin_2023.zarr.index'
    """
    store = _resolve(first_store)
    return store.with_name(store.name + ".index")


def _manifest_at(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _check_index_path(target: Path, *, overwrite: bool, own_id: str | None, stores: Iterable[str]) -> None:
    """Raise unless ``target`` may receive this index (the rules of ``VectorIndex.save``)."""
    for store in stores:
        store = Path(store)
        if target == store or store in target.parents or target in store.parents:
            raise ValueError(f"{target} is (inside) the embedding store {store} or contains it: an index is saved "
                             "beside its stores; choose another path")
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        pass
    elif target.is_dir():
        manifest = _manifest_at(target)
        if manifest is None:
            raise IsADirectoryError(f"{target} is a directory that is not a terrafm vector index; an index never "
                                    "replaces another directory, whatever overwrite: choose another path")
        if manifest.get("id") != own_id and not overwrite:
            raise FileExistsError(f"{target} holds another vector index (not written by this one): pass "
                                  "overwrite=True to replace it, or choose another path")
    elif not overwrite:
        raise FileExistsError(f"{target} exists and was not written by this index: pass overwrite=True to replace "
                              "it, or choose another path")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot save an index at {target}: {parent} is not a writable directory")


# ---------------------------------------------------------------------- the index
_POSITION_COLUMNS = ("store", "time", "row", "col", "x", "y", "lon", "lat")


def _positions_frame(parts: list[dict]):
    import pandas as pd

    if not parts:
        return pd.DataFrame({"store": np.zeros(0, np.int32), "time": np.zeros(0, "datetime64[ns]"),
                             "row": np.zeros(0, np.int32), "col": np.zeros(0, np.int32),
                             **{c: np.zeros(0) for c in ("x", "y", "lon", "lat")}})
    return pd.DataFrame({c: np.concatenate([p[c] for p in parts]) for c in _POSITION_COLUMNS})


def _unit_positions(code: int, emb, data, transformer) -> dict:
    n = len(data.rows)
    xs = np.asarray(emb["x"].values, np.float64)[data.cols]
    ys = np.asarray(emb["y"].values, np.float64)[data.rows]
    lon, lat = transformer.transform(xs, ys)
    time = np.datetime64("NaT", "ns") if data.unit.time == NO_TIME else np.datetime64(data.unit.time, "ns")
    return {"store": np.full(n, code, np.int32), "time": np.full(n, time, "datetime64[ns]"),
            "row": data.rows.astype(np.int32), "col": data.cols.astype(np.int32), "x": xs, "y": ys,
            "lon": np.asarray(lon, np.float64), "lat": np.asarray(lat, np.float64)}


def _to_lonlat(crs):
    from pyproj import Transformer

    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


class VectorIndex:
    """Cosine-similarity search over the valid positions of one or many embedding stores.

    Build with :meth:`build`, reopen with :meth:`open`; ``len(index)`` vectors of ``index.dim``,
    ``index.method`` (``"exact"``, ``"hnsw"`` or ``"ivfpq"``), ``index.stores`` (paths),
    ``index.path`` (where :meth:`save` writes) and ``index.params`` (the FAISS factory string and
    search knobs) describe it.

    Examples
    --------
    >>> import tempfile, numpy as np, xarray as xr, rioxarray
    >>> from terrafm.analysis import to_zarr
    >>> emb = xr.DataArray(np.eye(4, dtype="float32").reshape(2, 2, 4), dims=("y", "x", "embedding"),
    ...                    coords={"y": [5_000_080.0, 4_999_920.0], "x": [500_080.0, 500_240.0]},
    ...                    name="embedding").rio.write_crs("EPSG:32633")
    >>> store = to_zarr(emb, Path(tempfile.mkdtemp()) / "a.zarr")
    >>> index = VectorIndex.build([store], progress=False)
    >>> len(index), index.dim, index.method
    (4, 4, 'exact')
    >>> index.search([0, 1, 0, 0], k=1)[["row", "col", "score"]].values.tolist()
    [[0.0, 1.0, 1.0]]
    """

    def __init__(self, *, faiss_index, params: dict, records: list[dict], positions, path: Path, dim: int,
                 exact_below: int, seed: int, index_id: str | None = None, may_replace: bool = False):
        self._index = faiss_index
        self.params = params
        self._records = records
        self._positions = positions
        self.path = Path(path)
        self.dim = int(dim)
        self.exact_below = int(exact_below)
        self.seed = int(seed)
        self._id = index_id or uuid.uuid4().hex
        self._may_replace = may_replace
        self._opened: dict[int, Any] = {}
        self._search_index = None

    # ---- description
    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return (f"VectorIndex({len(self)} vectors of {self.dim}, method={self.method!r}, "
                f"{len(self._records)} store(s), path={str(self.path)!r})")

    @property
    def method(self) -> str:
        """``"exact"``, ``"hnsw"`` or ``"ivfpq"`` (``"auto"`` resolved at build)."""
        return self.params["method"]

    @property
    def stores(self) -> list[str]:
        """The indexed stores (absolute paths), in the order they were added."""
        return [r["path"] for r in self._records]

    # ---- build
    @classmethod
    def build(cls, stores: Sequence[str | os.PathLike] | str | os.PathLike, path: str | os.PathLike | None = None,
              method: str = "auto", exact_below: int = 200_000, seed: int = 0, *, overwrite: bool = False,
              progress: bool = True) -> "VectorIndex":
        """Index the valid positions of embedding stores, streaming them block by block.

        Parameters
        ----------
        stores : list of paths
            Embedding zarr stores (``terrafm.embed(out=...)`` or ``analysis.to_zarr``) of the same
            embedding size; any CRS, area, dates. Only complete blocks and valid positions
            (``valid`` and finite) are indexed.
        path : path, optional
            Where :meth:`save` writes; default ``<first store>.index`` beside the first store.
            Checked now: an existing index there is replaced only with ``overwrite=True``.
        method : {"auto", "exact", "hnsw", "ivfpq"}
            ``"auto"``: exact below ``exact_below`` vectors, else :data:`APPROXIMATE`.
        exact_below : int
            The size at which ``"auto"`` turns approximate.
        seed : int
            Draws the IVF-PQ training sample and seeds its k-means: same call, same index.
        overwrite : bool
            Let :meth:`save` replace another index at ``path``.
        progress : bool
            A tqdm bar over the blocks read.

        Returns
        -------
        VectorIndex
            Not yet saved: call :meth:`save`.

        Examples
        --------
        >>> index = VectorIndex.build(["aoi_2023.zarr", "aoi_2024.zarr"], method="auto")  # doctest: +SKIP
        >>> index.save()                                                                   # doctest: +SKIP
        """
        if method not in METHODS:
            raise ValueError(f"method={method!r}: choose one of {METHODS} ('auto': exact below exact_below "
                             "vectors, approximate above)")
        exact_below = require_int("exact_below", exact_below, minimum=0, fix="e.g. exact_below=200_000")
        seed = require_int("seed", seed, minimum=0)
        paths = _store_list(stores)
        target = _resolve(path) if path is not None else default_index_path(paths[0])
        _check_index_path(target, overwrite=overwrite, own_id=None, stores=[str(p) for p in paths])
        opened, dim = [], None
        for store in paths:
            emb = open_store(store)
            depth = int(emb.sizes["embedding"])
            if dim is not None and depth != dim:
                raise ValueError(f"dimension mismatch: {store} holds {depth}-dim embeddings but {paths[0]} holds "
                                 f"{dim}; index stores of the same model together (one index per model)")
            dim = depth
            opened.append((store, emb, complete_units(store, emb)))
        total = sum(count_valid(emb, units) for _, emb, units in opened)
        if total == 0:
            raise ValueError(f"no valid position in {[str(p) for p in paths]} (every cell is cloud/nodata or no "
                             "block is complete): nothing to index; embed the stores first")
        chosen = method if method != "auto" else ("exact" if total < exact_below else APPROXIMATE)
        params = index_params(chosen, total, dim)
        logger.info("building a %s index (%s) of about %d vectors from %d store(s)", chosen, params["factory"],
                    total, len(paths))
        faiss_index = new_faiss_index(params, dim, seed)
        if not faiss_index.is_trained:
            faiss_index.train(_training_sample(opened, params["training"], seed))
        index = cls(faiss_index=faiss_index, params=params, records=[], positions=_positions_frame([]),
                    path=target, dim=dim, exact_below=exact_below, seed=seed, may_replace=overwrite)
        for store, emb, units in opened:
            index._records.append(describe_store(store, emb))
            index._add_units(len(index._records) - 1, emb, units, progress)
        return index

    def _add_units(self, code: int, emb, units: list[Unit], progress: bool) -> int:
        from tqdm.auto import tqdm

        record = self._records[code]
        transformer = _to_lonlat(emb.rio.crs)
        buffer, parts, pending, added = [], [], 0, 0

        def flush():
            nonlocal buffer, pending
            if buffer:
                self._index.add(_normalized(np.concatenate(buffer)))
            buffer, pending = [], 0

        bar = tqdm(units, desc=f"index {Path(record['path']).name}", unit="block", disable=not progress)
        for unit in bar:
            data = read_unit(emb, unit)
            record["units"][unit.key] = [data.digest, int(len(data.rows))]
            if len(data.rows):
                buffer.append(data.vectors)
                parts.append(_unit_positions(code, emb, data, transformer))
                pending += len(data.rows)
                added += len(data.rows)
            if pending >= ADD_BATCH:
                flush()
        flush()
        if parts:
            import pandas as pd

            self._positions = pd.concat([self._positions, _positions_frame(parts)], ignore_index=True)
        self._search_index = None
        return added

    # ---- grow
    def add(self, store: str | os.PathLike, *, progress: bool = True) -> int:
        """Add a new store, or the new blocks and dates of a store that grew; returns the vectors added.

        A store already indexed must hold what was indexed: the same grid, run and values of every
        block already indexed (their digests are spot-checked by re-reading the first and last
        one); otherwise :class:`StoreChangedError` says to rebuild. Call :meth:`save` afterwards.

        Examples
        --------
        >>> index = VectorIndex.open("aoi_2023.zarr.index")      # doctest: +SKIP
        >>> index.add("aoi_2025.zarr"); index.save()              # doctest: +SKIP
        """
        (path,) = _store_list([store])
        emb = open_store(path)
        depth = int(emb.sizes["embedding"])
        if depth != self.dim:
            raise ValueError(f"dimension mismatch: {path} holds {depth}-dim embeddings but the index holds {self.dim}; "
                             "build another index for this model's stores")
        units = complete_units(path, emb)
        code = self._code_of(path)
        if code is None:
            self._records.append(describe_store(path, emb))
            code = len(self._records) - 1
            new = units
        else:
            record = self._records[code]
            self._check_unchanged(record, path, emb, units, reread=2)
            new = [u for u in units if u.key not in record["units"]]
        added = self._add_units(code, emb, new, progress) if new else 0
        if self.method == "exact" and len(self) >= self.exact_below:
            logger.warning("the exact index now holds %d vectors (exact_below=%d): searches scan them all; "
                           "VectorIndex.build(index.stores) makes an approximate one", len(self), self.exact_below)
        logger.info("%s: %d new block(s), %d vectors added", path, len(new), added)
        return added

    def _code_of(self, path: Path) -> int | None:
        for code, record in enumerate(self._records):
            if record["path"] == str(path):
                return code
        return None

    def _check_unchanged(self, record: dict, path: Path, emb, units: list[Unit], reread: int) -> list[Unit]:
        """Raise StoreChangedError unless ``path`` still holds what was indexed; return its new units."""
        fix = (f"rebuild the index: VectorIndex.build({self.stores!r}, overwrite=True) (or "
               "VectorIndex.open(path, check=False) to search it as it is)")
        found = changes(record, describe_store(path, emb))
        if found:
            raise StoreChangedError(f"{path} changed since it was indexed: {'; '.join(found)}; {fix}")
        current = {u.key: u for u in units}
        gone = [key for key in record["units"] if key not in current]
        if gone:
            raise StoreChangedError(f"{path} changed since it was indexed: {len(gone)} indexed block(s) are no longer "
                                    f"complete or their date is gone (e.g. {gone[0]}); {fix}")
        keys = list(record["units"])
        for key in dict.fromkeys(keys[:1] + keys[-1:][: max(0, reread - 1)]) if reread else ():
            if read_unit(emb, current[key]).digest != record["units"][key][0]:
                raise StoreChangedError(f"{path} changed since it was indexed: the values of block {key} differ; {fix}")
        return [u for u in units if u.key not in record["units"]]

    # ---- persistence
    def save(self, path: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
        """Write the index directory (FAISS file, positions parquet, JSON manifest) atomically.

        Written into a temporary sibling and renamed onto ``path`` (default ``index.path``). An
        existing directory there is replaced only if it holds this same index (saved or opened
        from it), or another index with ``overwrite=True``; a directory that is not an index, or
        a path inside a store, never.

        Examples
        --------
        >>> VectorIndex.build(["aoi.zarr"]).save()                 # doctest: +SKIP
        PosixPath('.../aoi.zarr.index')
        """
        faiss = _faiss()
        target = _resolve(path) if path is not None else self.path
        _check_index_path(target, overwrite=overwrite or self._may_replace, own_id=self._id, stores=self.stores)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(target)
        try:
            tmp.mkdir()
            faiss.write_index(self._index, str(tmp / VECTORS_FILE))
            self._positions.to_parquet(tmp / POSITIONS_FILE, index=False)
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "id": self._id, "dim": self.dim,
                        "count": len(self), "method": self.method, "params": self.params,
                        "exact_below": self.exact_below, "seed": self.seed, "faiss": faiss.__version__,
                        "saved": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "stores": self._records}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
            replace_with(tmp, target)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = target
        logger.info("saved a %s index of %d vectors to %s", self.method, len(self), target)
        return target

    @classmethod
    def open(cls, path: str | os.PathLike, *, check: bool = True) -> "VectorIndex":
        """Open a saved index; check its stores still hold what was indexed.

        A store whose grid, run or indexed values changed raises :class:`StoreChangedError`
        (``check=False`` opens anyway); a store that is gone or grew (new blocks or dates not yet
        added) gives a warning naming the fix.

        Examples
        --------
        >>> index = VectorIndex.open("aoi_2023.zarr.index")      # doctest: +SKIP
        """
        import pandas as pd

        faiss = _faiss()
        target = _resolve(path)
        manifest = _manifest_at(target)
        if manifest is None:
            raise FileNotFoundError(f"{target} is not a terrafm vector index (no {MANIFEST_FILE} of format "
                                    f"{FORMAT!r}); build one with VectorIndex.build(stores).save()")
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{target} is a vector index of format version {manifest.get('version')}, this terrafm "
                             f"reads version {FORMAT_VERSION}; rebuild it with VectorIndex.build(stores)")
        faiss_index = faiss.read_index(str(target / VECTORS_FILE))
        params = manifest["params"]
        set_search_params(faiss_index, params)
        positions = pd.read_parquet(target / POSITIONS_FILE)
        if faiss_index.ntotal != len(positions) or faiss_index.ntotal != manifest["count"]:
            raise ValueError(f"{target} is damaged: {faiss_index.ntotal} vectors but {len(positions)} positions; "
                             "rebuild it with VectorIndex.build(stores)")
        index = cls(faiss_index=faiss_index, params=params, records=manifest["stores"], positions=positions,
                    path=target, dim=manifest["dim"], exact_below=manifest["exact_below"], seed=manifest["seed"],
                    index_id=manifest["id"])
        if check:
            for record in index._records:
                store = Path(record["path"])
                if not store.exists():
                    warnings.warn(f"{store} is gone: its {index._count_of(store)} positions stay searchable by vector "
                                  "but cannot be looked up by point/polygon; rebuild the index without it",
                                  UserWarning, stacklevel=2)
                    continue
                emb = open_store(store)
                new = index._check_unchanged(record, store, emb, complete_units(store, emb), reread=1)
                if new:
                    warnings.warn(f"{store} grew since it was indexed ({len(new)} new block(s)/dates): "
                                  f"index.add({str(store)!r}) adds them", UserWarning, stacklevel=2)
        return index

    def _count_of(self, store: Path) -> int:
        code = self._code_of(store)
        return int((self._positions["store"].to_numpy() == code).sum())

    # ---- search
    def search(self, query: Any = None, k: int = 20, *, positive: Any = None, negative: Any = None,
               stores: Sequence[str | os.PathLike] | None = None, exclude_query: bool = True):
        """The ``k`` positions most similar to a query, across every indexed store and date.

        Parameters
        ----------
        query, positive, negative
            Each one of: a ``(lon, lat)`` tuple; a shapely Point / Polygon / MultiPolygon in
            EPSG:4326; a GeoDataFrame / GeoSeries (in its CRS); one vector (1-D array or list of
            ``dim`` numbers) or several (2-D). A point or polygon is looked up in **every** store
            covering it, at all its dates (the valid positions only). ``query`` counts as positive
            examples. Every example vector is L2-normalised; the search vector is the mean of the
            positives minus the mean of the negatives (then normalised).
        k : int
            Number of results (fewer when fewer positions qualify).
        stores : list of paths, optional
            Only return positions of these indexed stores.
        exclude_query : bool
            Drop the positions the examples were read from (same store, date and cell): they would
            rank first with score 1. The same cell at another date is kept.

        Returns
        -------
        geopandas.GeoDataFrame
            Sorted by ``score`` (cosine similarity) descending, columns ``store`` (path), ``time``
            (NaT for a store without dates), ``row``, ``col``, ``x``, ``y`` (store CRS), ``lon``,
            ``lat``, ``score`` and point ``geometry`` in EPSG:4326. ``"ivfpq"`` scores come from
            8-bit codes (about 1e-2 off); the other methods' are exact in float32.

        Examples
        --------
        >>> index.search((13.40, 52.52), k=10)                              # doctest: +SKIP
        >>> index.search(positive=[(13.40, 52.52)], negative=field_polygon)  # doctest: +SKIP
        """
        k = require_int("k", k, fix="the number of results, e.g. k=20")
        wanted = self._store_filter(stores)
        if len(self) == 0:
            raise ValueError("the index is empty: nothing to search; build it from stores with valid positions")
        examples = [(query, "query", +1), (positive, "positive", +1), (negative, "negative", -1)]
        if all(spec is None for spec, _, _ in examples):
            raise ValueError("nothing to search for: pass query=, positive= or negative= (a (lon, lat), a polygon, "
                             "a GeoDataFrame or vectors)")
        sums = {+1: [], -1: []}
        taken: set[tuple] = set()
        for spec, role, sign in examples:
            if spec is None:
                continue
            vectors, positions = self._examples(spec, role)
            sums[sign].append(vectors)
            taken |= positions
        if not sums[+1]:
            raise ValueError("negative examples alone define no direction: add query= or positive= examples")
        vector = _normalized(np.concatenate(sums[+1])).mean(0)
        if sums[-1]:
            vector = vector - _normalized(np.concatenate(sums[-1])).mean(0)
        if not np.linalg.norm(vector) > 1e-12:
            raise ValueError("the positive and negative examples cancel out (same mean vector): nothing to search for")
        return self._nearest(_normalized(vector[None]), k, wanted, taken if exclude_query else set())

    def _store_filter(self, stores) -> np.ndarray | None:
        if stores is None:
            return None
        codes = []
        for store in ([stores] if isinstance(stores, (str, os.PathLike)) else stores):
            code = self._code_of(_resolve(store))
            if code is None:
                raise ValueError(f"stores: {store} is not in the index (it holds {self.stores}); index.add(store) "
                                 "adds it")
            codes.append(code)
        return np.array(codes, np.int32)

    def _searcher(self):
        if self._search_index is None:
            self._search_index = _on_gpu(self._index, self.params)
        return self._search_index

    def _nearest(self, vector: np.ndarray, k: int, wanted: np.ndarray | None, taken: set[tuple]):
        import geopandas as gpd

        total = len(self)
        table = self._positions
        codes, times = table["store"].to_numpy(), table["time"].to_numpy()
        rows, cols = table["row"].to_numpy(), table["col"].to_numpy()
        fetch = min(total, k + len(taken))
        while True:
            scores, ids = self._searcher().search(vector, fetch)
            keep = ids[0] >= 0
            scores, ids = scores[0][keep], ids[0][keep]
            if wanted is not None:
                inside = np.isin(codes[ids], wanted)
                scores, ids = scores[inside], ids[inside]
            if taken:
                mine = np.array([(int(codes[i]), _time_key(times[i]), int(rows[i]), int(cols[i])) not in taken
                                 for i in ids], bool)
                scores, ids = scores[mine], ids[mine] if len(ids) else ids
            if len(ids) >= k or fetch >= total:
                break
            fetch = min(total, fetch * 4)
        order = np.lexsort((cols[ids], rows[ids], times[ids], codes[ids], -scores.astype(np.float64)))[:k]
        ids, scores = ids[order], scores[order]
        found = table.iloc[ids].reset_index(drop=True)
        found["store"] = [self._records[c]["path"] for c in found["store"].to_numpy()]
        found["score"] = scores.astype(np.float64)
        return gpd.GeoDataFrame(found, geometry=gpd.points_from_xy(found["lon"], found["lat"]), crs="EPSG:4326")

    # ---- examples: locations and vectors
    def _examples(self, spec: Any, role: str) -> tuple[np.ndarray, set[tuple]]:
        """(m, dim) float32 vectors of one query argument, and the positions they were read from."""
        geometries = _geometries(spec)
        if geometries is None:
            return self._vectors(spec, role), set()
        vectors, positions = [], set()
        for geometry, crs in geometries:
            found_vectors, found_positions = self._lookup(geometry, crs, role)
            vectors.append(found_vectors)
            positions |= found_positions
        return np.concatenate(vectors), positions

    def _vectors(self, spec: Any, role: str) -> np.ndarray:
        if isinstance(spec, (str, bytes, dict)):
            raise TypeError(f"{role}={spec!r} is not a location or a vector; pass a (lon, lat) tuple, a shapely "
                            f"Point/Polygon (EPSG:4326), a GeoDataFrame, or vectors of length {self.dim}")
        values = getattr(spec, "values", spec)
        try:
            vectors = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{role} of type {type(spec).__name__} cannot be read as vectors ({exc}); pass a (lon, "
                            f"lat) tuple, a polygon, or vectors of length {self.dim}") from None
        vectors = np.atleast_2d(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"dimension mismatch: {role} vectors have shape {vectors.shape} but the index holds "
                             f"{self.dim}-dim embeddings; pass vectors of length {self.dim} (or a (lon, lat) tuple)")
        if not np.isfinite(vectors).all():
            raise ValueError(f"{role} vectors contain NaN/inf; pass finite vectors (an invalid position's vector is NaN)")
        return vectors

    def _store(self, code: int):
        if code not in self._opened:
            self._opened[code] = open_store(self._records[code]["path"])
        return self._opened[code]

    def _lookup(self, geometry, crs, role: str) -> tuple[np.ndarray, set[tuple]]:
        """Valid vectors at a point / inside a polygon in every store covering it, at every date."""
        import geopandas as gpd

        vectors, positions, covered = [], set(), False
        for code, record in enumerate(self._records):
            if not Path(record["path"]).exists():
                continue
            emb = self._store(code)
            local = gpd.GeoSeries([geometry], crs=crs).to_crs(emb.rio.crs).iloc[0]
            window = _cells(emb, local)
            if window is None:
                continue
            covered = True
            rows, cols = window
            if not len(rows):
                continue
            r0, c0 = rows.min(), cols.min()
            block = emb.isel(y=slice(r0, rows.max() + 1), x=slice(c0, cols.max() + 1))
            values = np.asarray(block.values, np.float32)
            valid = np.isfinite(values).all(-1)
            if "valid" in block.coords:
                valid &= np.asarray(block.coords["valid"].values, bool)
            if "time" not in block.dims:
                values, valid = values[None], valid[None]
            keys = [NO_TIME] if "time" not in emb.dims else [_time_key(t) for t in emb["time"].values]
            for t, key in enumerate(keys):
                ok = valid[t, rows - r0, cols - c0]
                vectors.append(values[t, rows[ok] - r0, cols[ok] - c0])
                positions |= {(code, key, int(r), int(c)) for r, c in zip(rows[ok], cols[ok])}
        if not covered:
            raise ValueError(f"{role} location {_describe(geometry, crs)} is outside every indexed store "
                             f"({len(self._records)} store(s)); pick a location inside one, or index.add(store) "
                             "a store covering it")
        vectors = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        if not len(vectors):
            raise ValueError(f"{role} location {_describe(geometry, crs)} covers only invalid (cloud/nodata) "
                             "positions in every store and date; move it")
        return vectors, positions


def _time_key(value) -> str:
    value = np.datetime64(value, "ns")
    return NO_TIME if np.isnat(value) else str(value)


def _store_list(stores) -> list[Path]:
    if isinstance(stores, (str, os.PathLike)):
        stores = [stores]
    try:
        paths = [_resolve(s) for s in stores]
    except TypeError:
        raise TypeError(f"stores must be a list of embedding store paths, got {type(stores).__name__}") from None
    if not paths:
        raise ValueError("stores is empty: pass the embedding zarr stores to index, e.g. ['aoi_2023.zarr']")
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"stores lists {twice} more than once; list every store once")
    return paths


def _geometries(spec) -> list[tuple[Any, Any]] | None:
    """Locations in ``spec`` as (shapely geometry, CRS), or None when it is not a location."""
    import numbers

    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(v, numbers.Real) for v in spec):
        from shapely.geometry import Point

        return [(Point(float(spec[0]), float(spec[1])), "EPSG:4326")]
    try:
        import geopandas as gpd
        from shapely.geometry.base import BaseGeometry
    except ImportError:  # pragma: no cover
        return None
    if isinstance(spec, BaseGeometry):
        return [(part, "EPSG:4326") for part in getattr(spec, "geoms", [spec])] if spec.geom_type == "MultiPoint" \
            else [(spec, "EPSG:4326")]
    if isinstance(spec, (gpd.GeoDataFrame, gpd.GeoSeries)):
        crs = spec.crs or "EPSG:4326"
        series = spec.geometry if isinstance(spec, gpd.GeoDataFrame) else spec
        out = []
        for geometry in series.dropna():
            out.extend((part, crs) for part in (geometry.geoms if geometry.geom_type == "MultiPoint" else [geometry]))
        if not out:
            raise ValueError("the GeoDataFrame query holds no geometry; pass points or polygons")
        return out
    if isinstance(spec, list) and spec and all(isinstance(s, tuple) and len(s) == 2 for s in spec):
        return [g for s in spec for g in _geometries(s)]     # a list of (lon, lat) points
    return None


def _describe(geometry, crs) -> str:
    if geometry.geom_type == "Point":
        return f"({geometry.x:.5f}, {geometry.y:.5f}) in {crs}"
    left, bottom, right, top = geometry.bounds
    return f"{geometry.geom_type} with bounds ({left:.5f}, {bottom:.5f}, {right:.5f}, {top:.5f}) in {crs}"


def _cells(emb, geometry) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, cols) of the cells at a point / inside a polygon (store CRS); None if outside the store."""
    from affine import Affine

    transform = emb.rio.transform(recalc=True)
    ny, nx = emb.sizes["y"], emb.sizes["x"]
    inverse = ~Affine(*tuple(transform)[:6])
    if geometry.geom_type == "Point":
        col, row = inverse * (geometry.x, geometry.y)
        row, col = math.floor(row), math.floor(col)
        if not (0 <= row < ny and 0 <= col < nx):
            return None
        return np.array([row]), np.array([col])
    if geometry.geom_type not in ("Polygon", "MultiPolygon"):
        raise TypeError(f"a {geometry.geom_type} is not a query location; pass points or polygons")
    from rasterio.features import geometry_mask
    from shapely.geometry import box

    left, bottom, right, top = emb.rio.bounds(recalc=True)
    if not geometry.intersects(box(left, bottom, right, top)):
        return None
    inside = geometry_mask([geometry], out_shape=(ny, nx), transform=transform, invert=True)
    rows, cols = np.nonzero(inside)
    return rows, cols


def _on_gpu(index, params: dict):
    """The index on every GPU when a FAISS GPU build sees one (flat and IVF; HNSW stays on CPU)."""
    faiss = _faiss()
    if params["method"] == "hnsw" or not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() < 1:
        return index
    try:
        gpu = faiss.index_cpu_to_all_gpus(index)
    except Exception as exc:       # e.g. the refine stage of IVF-PQ has no GPU version in this build
        logger.info("searching on CPU: this %s index does not move to the GPU (%s)", params["method"], exc)
        return index
    set_search_params(gpu, params)
    logger.info("searching the %s index on %d GPU(s)", params["method"], faiss.get_num_gpus())
    return gpu


def _training_sample(opened: list, size: int, seed: int) -> np.ndarray:
    """``size`` valid vectors (normalised) drawn with ``seed``: whole blocks in a seeded random order."""
    rng = np.random.default_rng(seed)
    units = [(emb, unit) for _, emb, units in opened for unit in units]
    chunks, total = [], 0
    for i in rng.permutation(len(units)):
        emb, unit = units[i]
        vectors = read_unit(emb, unit).vectors
        chunks.append(vectors)
        total += len(vectors)
        if total >= 4 * size:
            break
    sample = np.concatenate(chunks)
    if len(sample) > size:
        sample = sample[np.sort(rng.choice(len(sample), size, replace=False))]
    return _normalized(sample)
