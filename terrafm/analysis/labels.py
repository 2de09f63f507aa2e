"""Bring training labels (points, polygons or a label raster) onto the embedding grid."""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from ._grid import EMBEDDING_DIM, check_embedding

logger = logging.getLogger(__name__)

NODATA = -1


def _grid_2d(emb: xr.DataArray) -> xr.DataArray:
    template = emb.isel({EMBEDDING_DIM: 0}, drop=True)
    if "time" in template.dims:
        template = template.isel(time=0, drop=True)
    return template


def labels_to_grid(emb: xr.DataArray, labels, column: str = "class") -> tuple[np.ndarray, list]:
    """Rasterise labels to an integer (y, x) array of class indices (-1 = unlabelled) + class values.

    ``labels`` may be a GeoDataFrame of points or polygons with a ``column`` (any CRS: it is
    reprojected; no CRS is an error) or a label raster DataArray (e.g. ESA WorldCover, any CRS and
    resolution): coarser-to-finer uses nearest, finer-to-coarser uses the mode of the covered
    pixels. Raster value 0 (WorldCover "no data") and the raster's nodata are unlabelled.
    """
    check_embedding(emb)
    template = _grid_2d(emb)
    shape = (template.sizes["y"], template.sizes["x"])
    if isinstance(labels, xr.DataArray):
        return _raster_to_grid(template, labels)
    import geopandas as gpd

    if not isinstance(labels, gpd.GeoDataFrame):
        raise TypeError("labels must be a GeoDataFrame (points/polygons) or a label raster xr.DataArray")
    if column not in labels.columns:
        raise ValueError(f"labels have no column {column!r} (columns: {list(labels.columns)}); pass column=...")
    if labels.crs is None:
        raise ValueError("labels have no CRS; set it with labels.set_crs('EPSG:4326') (or their real CRS)")
    if labels.crs != template.rio.crs:
        logger.info("reprojecting labels from %s to %s", labels.crs, template.rio.crs)
        labels = labels.to_crs(template.rio.crs)
    classes = sorted(labels[column].dropna().unique().tolist())
    index = {c: i for i, c in enumerate(classes)}
    grid = np.full(shape, NODATA, dtype=np.int64)
    transform = template.rio.transform(recalc=True)
    points = labels[labels.geometry.geom_type == "Point"]
    if len(points):
        inv = ~transform
        cols, rows = inv @ (points.geometry.x.values, points.geometry.y.values)
        rows, cols = np.floor(rows).astype(int), np.floor(cols).astype(int)
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        if not inside.all():
            logger.warning("%d label points fall outside the embedding area and are ignored", (~inside).sum())
        grid[rows[inside], cols[inside]] = [index[c] for c in points[column].values[inside]]
    areas = labels[labels.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if len(areas):
        from rasterio.features import rasterize

        burned = rasterize(
            ((g, index[c]) for g, c in zip(areas.geometry, areas[column])),
            out_shape=shape, transform=transform, fill=NODATA, dtype="int32",
        )
        grid = np.where(burned != NODATA, burned, grid)
    return grid, classes


def _raster_to_grid(template: xr.DataArray, raster: xr.DataArray) -> tuple[np.ndarray, list]:
    from rasterio.enums import Resampling

    if raster.rio.crs is None:
        raise ValueError("label raster has no CRS; set it with raster.rio.write_crs(...)")
    if "band" in raster.dims:
        raster = raster.isel(band=0, drop=True)
    if "time" in raster.dims:
        raster = raster.isel(time=0, drop=True)
    nodata = raster.rio.nodata
    src_res = abs(raster.rio.resolution()[0])
    dst_res = abs(template.rio.resolution()[0])
    if raster.rio.crs != template.rio.crs:
        src_res = abs(raster.rio.reproject(template.rio.crs).rio.resolution()[0])
    resampling = Resampling.mode if src_res < dst_res else Resampling.nearest
    raster = raster.fillna(0).astype("int32").rio.write_nodata(0 if nodata is None else int(nodata))
    on_grid = raster.rio.reproject_match(template, resampling=resampling)
    values = np.asarray(on_grid.values)
    unlabeled = values == 0
    if nodata is not None:
        unlabeled |= values == int(nodata)
    classes = sorted(np.unique(values[~unlabeled]).tolist())
    index = np.full(int(values.max()) + 2, NODATA, dtype=np.int64)
    index[classes] = np.arange(len(classes))
    grid = np.where(unlabeled, NODATA, index[np.clip(values, 0, None)])
    return grid, classes
