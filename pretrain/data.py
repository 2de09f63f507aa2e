"""Pretraining data: Major-TOM Core parquet shards and folders of co-registered GeoTIFFs.

Both yield tiles as ``{"images": {key: (C, T, T) float32 normalized}, "masks": {key: (T, T) bool},
"landcover": int, "id": str}``. Every sensor rule comes from the modality registry
(:data:`terrafm.sensors.MODALITIES`), exactly as in loading and inference: a pixel's validity is
decided on its stored values (:meth:`~terrafm.sensors.Modality.pixel_valid`), the baseline DN
offset is removed, when asked, by :meth:`~terrafm.sensors.Modality.harmonize`, values are
normalized by :meth:`~terrafm.sensors.Modality.normalize`, and invalid pixels are filled with 0.5
(the band mean after normalization) and flagged False in the mask.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["MajorTOMCore", "GeoTIFFFolder", "MajorTOMError", "MissingModalityError",
           "decode_band", "model_input", "product_offset", "sampling_weights",
           "frequent_classes", "read_cell_stats", "FILL_VALUE"]

from terrafm.sensors import FILL_VALUE  # noqa: E402  (re-exported: the normalized value of invalid pixels)


class MajorTOMError(RuntimeError):
    """A Major-TOM shard or row that cannot be read."""


class MissingModalityError(MajorTOMError):
    """A grid cell lacks one of the requested modalities."""


def decode_band(data: bytes, out_shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Decode a single-band GeoTIFF held in ``data`` and resample it to ``out_shape`` (10 m).

    Examples
    --------
    >>> decode_band(b"not a tiff", (4, 4))
    Traceback (most recent call last):
    ...
    rasterio.errors.RasterioIOError: ...
    """
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile

    with MemoryFile(data) as memfile, memfile.open() as src:
        method = Resampling.nearest if nearest else Resampling.bilinear
        return src.read(1, out_shape=out_shape, resampling=method).astype(np.float32)


def _band_shape(data: bytes) -> tuple[int, int]:
    from rasterio.io import MemoryFile

    with MemoryFile(data) as memfile, memfile.open() as src:
        return src.height, src.width


def product_offset(modality, product_id=None, product_datetime=None) -> int:
    """DN offset a Major-TOM row's stored values carry, by the modality's offset rule.

    The processing baseline is read from the product name when it states one (``_N0509_``:
    05.09; ESA's reprocessed archive carries the offset on old dates too), else the acquisition
    date decides (:meth:`terrafm.sensors.Modality.stored_offset`). 0 for a modality without
    an offset rule.

    Examples
    --------
    >>> from terrafm.sensors import MODALITIES
    >>> s2 = MODALITIES["s2_l2a"]
    >>> product_offset(s2, "S2A_MSIL2A_20190102T103431_N0500_R108_T32TMT_20230101T000000", "2019-01-02")
    1000
    >>> product_offset(s2, "S2A_MSIL2A_20190102T103431_N0211_R108_T32TMT_20190102T121914", "2019-01-02")
    0
    >>> product_offset(s2, "no baseline in this name", "2023-06-15"), product_offset(MODALITIES["s1"], None, "2023-06-15")
    (1000, 0)
    """
    if modality.offset is None:
        return 0
    baseline = modality.offset.baseline_in(name=product_id)
    acquired = None
    if product_datetime is not None:
        import pandas as pd

        acquired = pd.Timestamp(product_datetime).date()
    return modality.stored_offset(baseline=baseline, acquired=acquired)


def model_input(stored: np.ndarray, key: str, offset=None) -> tuple[np.ndarray, np.ndarray]:
    """Stored values ``(C, H, W)`` of one modality -> normalized float32 and pixel validity.

    :meth:`terrafm.sensors.Modality.model_input`, the path ``terrafm.prepare.normalize_block`` takes
    too: validity on the stored values, then the baseline offset ``offset`` (DN still in the values;
    None or 0 keeps them) removed, then normalization; invalid pixels become :data:`FILL_VALUE`.

    Examples
    --------
    >>> dn = np.array([0, 500, 1000, 3000], "uint16").reshape(1, 1, 4).repeat(12, 0)
    >>> x, valid = model_input(dn, "s2_l2a", offset=1000)
    >>> valid.tolist(), [round(float(v), 4) for v in x[3, 0]]   # B04: 0 nodata; 500, 1000 -> DN 1; 3000 -> 2000
    ([[False, True, True, True]], [0.5, 0.1877, 0.1877, 0.5968])
    """
    from terrafm.sensors import MODALITIES

    return MODALITIES[key].model_input(stored, offset=offset or None)


def read_cell_stats(path: str | Path | None):
    """Per-cell priors table (columns ``grid_cell`` and any of ``worldcover, climate, region,
    ocean_fraction``) from CSV or parquet, indexed by ``grid_cell``; None passes through.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "cells.csv")
    >>> import pandas as pd
    >>> pd.DataFrame({"grid_cell": ["1U_2R", "1U_3R"], "worldcover": [10, 80]}).to_csv(path, index=False)
    >>> int(read_cell_stats(path).loc["1U_3R", "worldcover"])
    80
    """
    if path is None:
        return None
    import pandas as pd

    path = Path(path)
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if "grid_cell" not in table:
        raise ValueError(f"{path}: cell statistics need a 'grid_cell' column; found {list(table.columns)}")
    return table.set_index("grid_cell")


def frequent_classes(cell_stats, n: int = 3) -> list[int]:
    """The ``n`` most frequent dominant WorldCover classes of the cells (ties: lower class first).

    Examples
    --------
    >>> import pandas as pd
    >>> frequent_classes(pd.DataFrame({"worldcover": [10, 10, 30, 80, 80, 80, 40]}), n=2)
    [80, 10]
    """
    counts = Counter(int(c) for c in cell_stats["worldcover"])
    return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def sampling_weights(cells: Sequence[str], cell_stats, ocean_keep: float = 0.02,
                     columns: Iterable[str] = ("worldcover", "climate", "region")) -> np.ndarray:
    """Per-cell sampling weights: inverse category frequency for each prior, ocean down-weighted.

    Each of ``columns`` present in ``cell_stats`` contributes ``1 / count(category)``, so every
    land-cover class, climate zone and region gets the same expected share; cells whose
    ``ocean_fraction`` exceeds 0.5 keep ``ocean_keep`` of their weight (the paper drops 98 % of
    ocean-majority cells). Cells missing from the table get the median weight. Sums to 1.

    Examples
    --------
    >>> import pandas as pd
    >>> stats = pd.DataFrame({"worldcover": [10, 10, 30]}, index=["a", "b", "c"])
    >>> sampling_weights(["a", "b", "c"], stats).round(3).tolist()
    [0.25, 0.25, 0.5]
    """
    n = len(cells)
    if cell_stats is None:
        return np.full(n, 1.0 / n)
    table = cell_stats.reindex(list(cells))
    weights = np.ones(n)
    for column in columns:
        if column in table:
            values = table[column].astype("object").where(table[column].notna(), "unknown")
            counts = values.map(values.value_counts())
            weights *= 1.0 / counts.to_numpy(dtype=float)
    if "ocean_fraction" in table:
        weights = np.where(table["ocean_fraction"].fillna(0).to_numpy() > 0.5, weights * ocean_keep, weights)
    known = table.notna().any(axis=1).to_numpy() if len(table.columns) else np.zeros(n, bool)
    if known.any() and not known.all():
        weights[~known] = np.median(weights[known])
    return weights / weights.sum()


@dataclass
class _RowRef:
    file: Path
    row_group: int
    row: int


class MajorTOMCore:
    """Tiles of Major-TOM Core cells with all requested modalities, joined by ``grid_cell``.

    Parameters
    ----------
    root : path
        Directory with one sub-directory per modality (``Core-S2L2A``, ``Core-S2L1C``,
        ``Core-S1RTC``: the modality's ``majortom.dirs`` in the registry), each holding
        ``images/*.parquet`` with the band columns ``majortom.columns``.
    modalities : sequence of str
        Modality keys to join (registered modalities with a Major-TOM layout).
    tile_size : int
        Each cell (1068 px at 10 m) is cut into four ``tile_size`` tiles (534).
    cell_stats : DataFrame or None
        Priors table from :func:`read_cell_stats` (land cover per cell etc.).
    on_missing : "error" | "drop"
        A cell that lacks a modality raises :class:`MissingModalityError` or is dropped.
    s2_offset : {"raw", "harmonize"}
        ``"raw"`` (default: the DN the statistics were computed on) keeps stored values;
        ``"harmonize"`` removes the DN offset a product carries (:func:`product_offset`: its
        processing baseline from ``product_id``, else ``product_datetime``) by the registry's
        one rule, :meth:`terrafm.sensors.Modality.harmonize`, after validity was decided on the
        stored DN: the same value and validity as ``terrafm.stac.load(s2_offset="harmonize")``
        and ``terrafm.prepare.normalize``. Modalities without an offset rule are unaffected.

    Examples
    --------
    >>> ds = MajorTOMCore("/data/majortom", ["s2_l2a", "s1"])  # doctest: +SKIP
    >>> ds[0]["images"]["s1"].shape                             # doctest: +SKIP
    torch.Size([2, 534, 534])
    """

    def __init__(self, root: str | Path, modalities: Sequence[str], tile_size: int = 534,
                 cell_stats=None, on_missing: str = "error", s2_offset: str = "raw") -> None:
        import pyarrow.parquet as pq
        from terrafm.sensors import get_modality

        if s2_offset not in ("raw", "harmonize"):
            raise ValueError(f"s2_offset must be 'raw' or 'harmonize', got {s2_offset!r}")
        self.root = Path(root)
        self.modalities = list(modalities)
        self.specs = {key: get_modality(key) for key in self.modalities}
        unmapped = [key for key, spec in self.specs.items() if spec.majortom is None]
        if unmapped:
            raise ValueError(f"modalities {unmapped} have no Major-TOM layout in the registry "
                             "(Modality.majortom); register one or read them with GeoTIFFFolder")
        self.tile_size = tile_size
        self.cell_stats = cell_stats
        self.s2_offset = s2_offset
        self._refs: dict[str, dict[str, _RowRef]] = {}
        for key, spec in self.specs.items():
            dirs = spec.majortom.dirs
            folder = next((self.root / d for d in dirs if (self.root / d).is_dir()), None)
            if folder is None:
                raise FileNotFoundError(f"no {key} data under {self.root}: expected one of "
                                        f"{[str(self.root / d) for d in dirs]} with "
                                        "images/*.parquet, or drop it from data.modalities")
            files = sorted((folder / "images").glob("*.parquet")) or sorted(folder.glob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"{folder} holds no parquet shards (images/part_*.parquet)")
            refs = {}
            for file in files:
                try:
                    meta = pq.ParquetFile(file)
                    for rg in range(meta.num_row_groups):
                        cells = meta.read_row_group(rg, columns=["grid_cell"]).column(0).to_pylist()
                        for row, cell in enumerate(cells):
                            refs[str(cell)] = _RowRef(file, rg, row)
                except Exception as exc:
                    raise MajorTOMError(f"{file}: not a readable Major-TOM parquet shard with a "
                                        f"'grid_cell' column ({exc}); re-download it or remove it") from exc
            self._refs[key] = refs
        all_cells = sorted(set().union(*(set(r) for r in self._refs.values())))
        missing = {c: [k for k in self.modalities if c not in self._refs[k]] for c in all_cells}
        missing = {c: ks for c, ks in missing.items() if ks}
        if missing and on_missing == "error":
            example = ", ".join(f"{c} lacks {ks}" for c, ks in list(missing.items())[:5])
            raise MissingModalityError(
                f"{len(missing)} of {len(all_cells)} grid cells lack a requested modality ({example}); "
                "add the missing shards, remove the modality from data.modalities, or pass "
                "on_missing='drop' to skip those cells")
        self.cells = [c for c in all_cells if c not in missing]
        if not self.cells:
            raise MissingModalityError(f"no grid cell under {self.root} has all of {self.modalities}")
        self._cache: tuple[str, dict] | None = None

    def __len__(self) -> int:
        return 4 * len(self.cells)

    def landcover(self, cell: str) -> int:
        if self.cell_stats is None or "worldcover" not in self.cell_stats or cell not in self.cell_stats.index:
            return 0
        return int(self.cell_stats.loc[cell, "worldcover"])

    def landcover_table(self):
        """The table whose ``worldcover`` column gives the cells' land cover (``cell_stats``), or
        None when the cells' land cover is unknown."""
        if self.cell_stats is None or "worldcover" not in self.cell_stats:
            return None
        return self.cell_stats

    def tile_weights(self, ocean_keep: float = 0.02) -> np.ndarray:
        """Sampling weight of every tile (its cell's weight split over its four tiles)."""
        return np.repeat(sampling_weights(self.cells, self.cell_stats, ocean_keep), 4) / 4

    def _read_row(self, key: str, cell: str) -> dict:
        import pyarrow.parquet as pq

        ref = self._refs[key][cell]
        columns = list(self.specs[key].majortom.columns)
        try:
            table = pq.ParquetFile(ref.file).read_row_group(ref.row_group)
        except Exception as exc:
            raise MajorTOMError(f"{ref.file} row group {ref.row_group}: unreadable ({exc}); "
                                "re-download the shard") from exc
        absent = [c for c in columns if c not in table.column_names]
        if absent:
            raise MajorTOMError(f"{ref.file}: {key} shard lacks band columns {absent}; "
                                f"expected {columns}")
        row = {c: table.column(c)[ref.row].as_py() for c in table.column_names if c != "thumbnail"}
        return row

    def _cell(self, cell: str) -> dict[str, tuple[np.ndarray, int]]:
        """Each modality's stored values (C, H, W) on the 10 m grid and the DN offset to remove."""
        if self._cache is not None and self._cache[0] == cell:
            return self._cache[1]
        stacks = {}
        for key, spec in self.specs.items():
            row = self._read_row(key, cell)
            columns = spec.majortom.columns
            ref = self._refs[key][cell]
            def corrupt(column, exc):
                return MajorTOMError(
                    f"{ref.file} row {ref.row} (cell {cell}), {key} band {column}: not a readable "
                    f"GeoTIFF ({type(exc).__name__}: {exc}); the row is corrupt - re-download "
                    "the shard or exclude the cell")

            size = 0  # the 10 m size of the cell: the largest (finest) band
            for column in columns:
                try:
                    size = max(size, *_band_shape(row[column]))
                except Exception as exc:
                    raise corrupt(column, exc) from exc
            bands = []
            for column in columns:
                try:
                    bands.append(decode_band(row[column], (size, size)))
                except Exception as exc:
                    raise corrupt(column, exc) from exc
            offset = 0
            if self.s2_offset == "harmonize":
                offset = product_offset(spec, row.get("product_id"), row.get("product_datetime"))
            stacks[key] = (np.stack(bands), offset)
        sizes = {k: v.shape[-1] for k, (v, _) in stacks.items()}
        if len(set(sizes.values())) != 1:
            raise MajorTOMError(f"cell {cell}: modalities have different 10 m sizes {sizes}; "
                                "they must cover the same grid cell")
        if next(iter(sizes.values())) < 2 * self.tile_size:
            raise MajorTOMError(f"cell {cell} is {next(iter(sizes.values()))} px, too small for four "
                                f"{self.tile_size} px tiles; lower data.tile_size")
        self._cache = (cell, stacks)
        return stacks

    def __getitem__(self, index: int) -> dict:
        import torch

        cell = self.cells[index // 4]
        tile = index % 4
        stacks = self._cell(cell)
        t = self.tile_size
        top, left = (tile // 2) * t, (tile % 2) * t
        images, masks = {}, {}
        for key, (stack, offset) in stacks.items():
            norm, valid = model_input(stack[:, top:top + t, left:left + t], key, offset)
            images[key], masks[key] = torch.from_numpy(norm), torch.from_numpy(valid)
        return {"images": images, "masks": masks, "landcover": self.landcover(cell),
                "id": f"{cell}/{tile}"}


class GeoTIFFFolder:
    """Samples stored as ``root/<sample>/<modality>.tif`` (multi-band, TerraFM band order, stored
    values, all modalities of a sample on the same grid); optional ``root/labels.csv`` with
    columns ``sample,label`` (labels for the kNN monitor) and ``landcover``.

    Examples
    --------
    >>> ds = GeoTIFFFolder("/data/patches", ["s2_l2a", "s1"])  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, modalities: Sequence[str]) -> None:
        self.root = Path(root)
        self.modalities = list(modalities)
        if not self.root.is_dir():
            raise FileNotFoundError(f"GeoTIFF folder {self.root} does not exist")
        self.samples = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.samples:
            raise FileNotFoundError(f"{self.root} has no sample sub-directories (<sample>/<modality>.tif)")
        for sample in self.samples:
            absent = [k for k in self.modalities if not (self.root / sample / f"{k}.tif").exists()]
            if absent:
                raise MissingModalityError(f"{self.root / sample} lacks {[f'{k}.tif' for k in absent]}; "
                                           "add the files or remove those modalities")
        self.labels: dict[str, int] = {}
        self.landcovers: dict[str, int] = {}
        labels = self.root / "labels.csv"
        if labels.exists():
            import pandas as pd
            table = pd.read_csv(labels, dtype={"sample": str})
            self.labels = dict(zip(table["sample"], table["label"].astype(int)))
            if "landcover" in table:
                self.landcovers = dict(zip(table["sample"], table["landcover"].astype(int)))

    def __len__(self) -> int:
        return len(self.samples)

    def tile_weights(self, ocean_keep: float = 0.02) -> np.ndarray:
        return np.full(len(self), 1.0 / len(self))

    def landcover_table(self):
        """The samples' land cover (``labels.csv`` column ``landcover``) as a ``worldcover``
        column, or None when ``labels.csv`` has none."""
        if not self.landcovers:
            return None
        import pandas as pd

        return pd.DataFrame({"worldcover": list(self.landcovers.values())}, index=list(self.landcovers))

    def __getitem__(self, index: int) -> dict:
        import rasterio
        import torch
        from terrafm.sensors import MODALITIES

        sample = self.samples[index]
        images, masks, shapes = {}, {}, {}
        for key in self.modalities:
            path = self.root / sample / f"{key}.tif"
            with rasterio.open(path) as src:
                stack = src.read()
            if stack.shape[0] != MODALITIES[key].n_bands:
                raise ValueError(f"{path}: {stack.shape[0]} bands, expected {MODALITIES[key].n_bands} "
                                 f"({list(MODALITIES[key].bands)})")
            norm, valid = model_input(stack, key)
            images[key], masks[key] = torch.from_numpy(norm), torch.from_numpy(valid)
            shapes[key] = stack.shape[1:]
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{self.root / sample}: modalities are not co-registered, sizes {shapes}")
        return {"images": images, "masks": masks, "landcover": self.landcovers.get(sample, 0),
                "label": self.labels.get(sample, -1), "id": sample}
