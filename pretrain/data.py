"""Pretraining data: Major-TOM Core parquet shards and folders of co-registered GeoTIFFs.

Both yield tiles as ``{"images": {key: (C, T, T) float32 normalized}, "masks": {key: (T, T) bool},
"landcover": int, "id": str}``; invalid pixels are filled with 0.5 (the band mean after
normalization) and flagged False in the mask.
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
           "MAJORTOM_DIRS", "MAJORTOM_COLUMNS", "decode_band", "sampling_weights",
           "frequent_classes", "read_cell_stats"]

MAJORTOM_DIRS = {"s2_l2a": ("Core-S2L2A", "S2L2A"), "s2_l1c": ("Core-S2L1C", "S2L1C"),
                 "s1": ("Core-S1RTC", "S1RTC")}
"""Sub-directories of a Major-TOM root holding each modality's ``images/part_*.parquet``."""

MAJORTOM_COLUMNS = {"s2_l2a": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                               "B09", "B11", "B12"),
                    "s1": ("vv", "vh")}
MAJORTOM_COLUMNS["s2_l1c"] = MAJORTOM_COLUMNS["s2_l2a"]


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
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile

    with MemoryFile(data) as memfile, memfile.open() as src:
        method = Resampling.nearest if nearest else Resampling.bilinear
        return src.read(1, out_shape=out_shape, resampling=method).astype(np.float32)


def _band_shape(data: bytes) -> tuple[int, int]:
    from rasterio.io import MemoryFile

    with MemoryFile(data) as memfile, memfile.open() as src:
        return src.height, src.width


def _normalize_tile(stored: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
    from terrafm.sensors import MODALITIES, normalize

    spec = MODALITIES[key]
    valid = np.isfinite(stored).all(0) & (stored != spec.nodata).all(0)
    if spec.to_db:
        valid &= (stored > 0).all(0)
    safe = np.where(valid[None], stored, 1.0)
    out = normalize(safe, key, channel_axis=0).astype(np.float32)
    out[:, ~valid] = 0.5
    return out, valid


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
        ``Core-S1RTC``; see :data:`MAJORTOM_DIRS`), each holding ``images/*.parquet``.
    modalities : sequence of str
        Modality keys to join.
    tile_size : int
        Each cell (1068 px at 10 m) is cut into four ``tile_size`` tiles (534).
    cell_stats : DataFrame or None
        Priors table from :func:`read_cell_stats` (land cover per cell etc.).
    on_missing : "error" | "drop"
        A cell that lacks a modality raises :class:`MissingModalityError` or is dropped.
    subtract_s2_offset : bool
        Remove the +1000 DN offset of processing baseline 04.00+ products (by
        ``product_datetime`` >= 2022-01-25). Off by default: the statistics are on raw DN.

    Examples
    --------
    >>> ds = MajorTOMCore("/data/majortom", ["s2_l2a", "s1"])  # doctest: +SKIP
    >>> ds[0]["images"]["s1"].shape                             # doctest: +SKIP
    torch.Size([2, 534, 534])
    """

    def __init__(self, root: str | Path, modalities: Sequence[str], tile_size: int = 534,
                 cell_stats=None, on_missing: str = "error", subtract_s2_offset: bool = False) -> None:
        import pyarrow.parquet as pq

        self.root = Path(root)
        self.modalities = list(modalities)
        self.tile_size = tile_size
        self.cell_stats = cell_stats
        self.subtract_s2_offset = subtract_s2_offset
        self._refs: dict[str, dict[str, _RowRef]] = {}
        for key in self.modalities:
            folder = next((self.root / d for d in MAJORTOM_DIRS[key] if (self.root / d).is_dir()), None)
            if folder is None:
                raise FileNotFoundError(f"no {key} data under {self.root}: expected one of "
                                        f"{[str(self.root / d) for d in MAJORTOM_DIRS[key]]} with "
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

    def tile_weights(self, ocean_keep: float = 0.02) -> np.ndarray:
        """Sampling weight of every tile (its cell's weight split over its four tiles)."""
        return np.repeat(sampling_weights(self.cells, self.cell_stats, ocean_keep), 4) / 4

    def _read_row(self, key: str, cell: str) -> dict:
        import pyarrow.parquet as pq

        ref = self._refs[key][cell]
        columns = list(MAJORTOM_COLUMNS[key])
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

    def _cell(self, cell: str) -> dict[str, np.ndarray]:
        if self._cache is not None and self._cache[0] == cell:
            return self._cache[1]
        stacks = {}
        for key in self.modalities:
            row = self._read_row(key, cell)
            columns = MAJORTOM_COLUMNS[key]
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
            stack = np.stack(bands)
            if self.subtract_s2_offset and key.startswith("s2") and _after_offset(row.get("product_datetime")):
                stack = np.where(stack > 0, np.maximum(stack - 1000, 1), stack)
            stacks[key] = stack
        sizes = {k: v.shape[-1] for k, v in stacks.items()}
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
        for key, stack in stacks.items():
            norm, valid = _normalize_tile(stack[:, top:top + t, left:left + t], key)
            images[key], masks[key] = torch.from_numpy(norm), torch.from_numpy(valid)
        return {"images": images, "masks": masks, "landcover": self.landcover(cell),
                "id": f"{cell}/{tile}"}


def _after_offset(value) -> bool:
    if value is None:
        return False
    import pandas as pd
    from terrafm.sensors import S2_OFFSET_START
    return pd.Timestamp(value).date() >= S2_OFFSET_START


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

    def __getitem__(self, index: int) -> dict:
        import rasterio
        import torch
        from terrafm.sensors import MODALITIES

        sample = self.samples[index]
        images, masks, shapes = {}, {}, {}
        for key in self.modalities:
            path = self.root / sample / f"{key}.tif"
            with rasterio.open(path) as src:
                stack = src.read().astype(np.float32)
            if stack.shape[0] != MODALITIES[key].n_bands:
                raise ValueError(f"{path}: {stack.shape[0]} bands, expected {MODALITIES[key].n_bands} "
                                 f"({list(MODALITIES[key].bands)})")
            norm, valid = _normalize_tile(stack, key)
            images[key], masks[key] = torch.from_numpy(norm), torch.from_numpy(valid)
            shapes[key] = stack.shape[1:]
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{self.root / sample}: modalities are not co-registered, sizes {shapes}")
        return {"images": images, "masks": masks, "landcover": self.landcovers.get(sample, 0),
                "label": self.labels.get(sample, -1), "id": sample}
