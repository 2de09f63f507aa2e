"""Put embedding products on a leafmap (ipyleaflet) map: overlay, opacity, legend or colour bar.

leafmap, ipyleaflet and ipywidgets are imported inside the functions, so ``import terrafm.viz``
stays cheap.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from .render import MAX_SIZE, MIN_SIZE, Overlay, render_overlay

logger = logging.getLogger(__name__)

__all__ = ["add_embedding_layer", "new_map", "legend_html", "EmbeddingLayer", "get_layer"]


@dataclass
class EmbeddingLayer:
    """What :func:`add_embedding_layer` put on a map: the ImageOverlay, its legend and pixels."""

    name: str
    image: Any      # ipyleaflet.ImageOverlay
    legend: Any     # ipyleaflet.WidgetControl or None
    overlay: Overlay


def new_map(data: Any = None, toolbar: bool = True, height: str = "520px", **kwargs: Any):
    """A leafmap map (ipyleaflet backend), zoomed to ``data`` when given.

    Parameters
    ----------
    data : xr.DataArray, optional
        Any georeferenced array; the map is centred on its footprint.
    toolbar : bool
        leafmap's toolbar. It needs the ipyevents front end, which has no offline bundle; pass
        False for Voila without internet.
    height : str
        CSS height of the map.
    **kwargs
        Passed to ``leafmap.leafmap.Map``.

    Examples
    --------
    >>> m = new_map(emb, toolbar=False)   # doctest: +SKIP
    """
    from leafmap.leafmap import Map

    kwargs.setdefault("draw_control", False)
    kwargs.setdefault("measure_control", False)
    kwargs.setdefault("scroll_wheel_zoom", True)
    m = Map(toolbar_control=toolbar, height=height, **kwargs)
    if data is not None:
        fit_to(m, data)
    return m


def fit_to(m: Any, data: Any) -> None:
    """Zoom ``m`` to the lon/lat footprint of a georeferenced array."""
    from pyproj import Transformer

    if getattr(data, "rio", None) is None or data.rio.crs is None:
        raise ValueError("data has no CRS; set it with data.rio.write_crs(...) before putting it on a map")
    left, bottom, right, top = data.rio.bounds()
    to_lonlat = Transformer.from_crs(data.rio.crs, "EPSG:4326", always_xy=True)
    west, south, east, north = to_lonlat.transform_bounds(left, bottom, right, top)
    zoom_to(m, ((south, west), (north, east)))


def zoom_to(m: Any, bounds: tuple, width_px: int = 800, height_px: int = 480) -> None:
    """Centre ``m`` on ((south, west), (north, east)) at the largest zoom that shows it all.

    Computed here rather than with ``Map.fit_bounds``, which needs a running asyncio loop and a
    browser round trip; ``width_px``/``height_px`` is the assumed map size.
    """
    import math

    (south, west), (north, east) = bounds

    def merc_y(lat: float) -> float:
        lat = max(min(lat, 85.0), -85.0)
        return math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))

    lon_span = max(east - west, 1e-9) / 360.0
    lat_span = max(merc_y(north) - merc_y(south), 1e-9) / (2 * math.pi)
    zoom = math.floor(min(math.log2(width_px / 256 / lon_span), math.log2(height_px / 256 / lat_span)))
    m.center = ((south + north) / 2, (west + east) / 2)
    m.zoom = max(0, min(zoom, 18))


def legend_html(name: str, legend: dict) -> str:
    """HTML of a legend (class swatches) or a colour bar (gradient with its range).

    Examples
    --------
    >>> html_text = legend_html("similarity", {"type": "colorbar", "stops": ["#000004", "#fcfdbf"],
    ...                                       "vmin": 0.0, "vmax": 1.0})
    >>> "terrafm-colorbar" in html_text and ">1</span>" in html_text
    True
    """
    title = f"<div style='font-weight:600;margin-bottom:2px'>{html.escape(name)}</div>"
    box = "background:rgba(255,255,255,0.88);padding:4px 8px;border-radius:4px;font:12px sans-serif;"
    if legend.get("type") == "colorbar":
        gradient = ", ".join(legend["stops"])
        bar = (f"<div class='terrafm-colorbar' style='width:160px;height:12px;"
               f"background:linear-gradient(to right, {gradient})'></div>")
        ticks = (f"<div style='display:flex;justify-content:space-between;width:160px'>"
                 f"<span>{legend['vmin']:.3g}</span><span>{legend['vmax']:.3g}</span></div>")
        return f"<div class='terrafm-legend' style='{box}'>{title}{bar}{ticks}</div>"
    if legend.get("type") == "categorical":
        rows = "".join(
            f"<div><span style='display:inline-block;width:12px;height:12px;background:{colour};"
            f"margin-right:6px;vertical-align:middle'></span>{html.escape(label)}</div>"
            for label, colour in legend["entries"]
        )
        return f"<div class='terrafm-legend' style='{box}'>{title}{rows}</div>"
    return ""


def _registry(m: Any) -> dict:
    registry = getattr(m, "_terrafm_layers", None)
    if registry is None:
        registry = {}
        m._terrafm_layers = registry
    return registry


def get_layer(m: Any, name: str) -> EmbeddingLayer | None:
    """The :class:`EmbeddingLayer` called ``name`` on ``m`` (None if absent).

    Examples
    --------
    >>> add_embedding_layer(m, to_rgb(emb), "pca")                           # doctest: +SKIP
    >>> get_layer(m, "pca").kind                                              # doctest: +SKIP
    'rgb'
    """
    return _registry(m).get(name)


def add_embedding_layer(
    m: Any,
    data: Any,
    name: str = "embedding",
    kind: str | None = None,
    opacity: float = 0.8,
    cmap: str | Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    classes: Sequence[str] | None = None,
    colour: str = "#ff2d2d",
    legend: bool = True,
    legend_position: str = "bottomright",
    fit_bounds: bool = False,
    max_size: int = MAX_SIZE,
    min_size: int = MIN_SIZE,
) -> EmbeddingLayer:
    """Show an RGB, similarity, change or class map on a leafmap map, georeferenced, with a legend.

    The array is warped to Web Mercator (what Leaflet displays), resampled so its longest side
    lies in [``min_size``, ``max_size``] pixels (large areas are averaged down, never a giant
    PNG; small 160 m grids are upsampled with nearest so cells stay sharp) and sent as a PNG
    ``ImageOverlay`` with exact lon/lat bounds. Calling again with the same ``name`` replaces the
    image and legend of that layer in place.

    Parameters
    ----------
    m : leafmap.leafmap.Map or ipyleaflet.Map
        The map (see :func:`new_map`).
    data : xr.DataArray or xr.Dataset
        Embeddings (coloured by PCA), ``to_rgb`` output, ``similarity`` map, ``change`` Dataset
        (its ``changed`` mask) or DataArray ``distance``, ``Classifier.predict`` Dataset (its
        ``class`` map), ``cluster`` ids, or any (y, x) map. Must carry a CRS.
    name : str
        Layer name in the layer control; also the key for later updates.
    kind : {"rgb", "continuous", "categorical", "mask"}, optional
        Guessed when omitted.
    opacity : float
        0 (invisible) .. 1 (opaque).
    cmap, vmin, vmax, classes, colour
        Colours: matplotlib colormap name (or list of class colours), continuous range, class
        names for the legend, mask colour.
    legend : bool
        Add a legend (classes, masks) or colour bar (continuous) as a map control.
    fit_bounds : bool
        Zoom the map to the layer.

    Returns
    -------
    EmbeddingLayer
        ``.image`` (ipyleaflet.ImageOverlay), ``.legend`` (WidgetControl or None), ``.overlay``
        (RGBA pixels, bounds).

    Examples
    --------
    >>> import terrafm, terrafm.viz as viz
    >>> m = viz.new_map(emb)                                           # doctest: +SKIP
    >>> viz.add_embedding_layer(m, terrafm.to_rgb(emb), "PCA")          # doctest: +SKIP
    >>> viz.add_embedding_layer(m, terrafm.change(a, b), "changed", opacity=0.6)  # doctest: +SKIP
    >>> m                                                                # doctest: +SKIP
    """
    import ipyleaflet
    import ipywidgets

    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity}")
    overlay = render_overlay(data, kind=kind, cmap=cmap, vmin=vmin, vmax=vmax, classes=classes,
                             colour=colour, max_size=max_size, min_size=min_size)
    registry = _registry(m)
    existing = registry.get(name)
    url = overlay.data_url()
    if existing is not None and existing.image in m.layers:
        image = existing.image
        with image.hold_trait_notifications():
            image.bounds = overlay.bounds
            image.url = url
            image.opacity = float(opacity)
    else:
        image = ipyleaflet.ImageOverlay(url=url, bounds=overlay.bounds, opacity=float(opacity), name=name)
        m.add_layer(image)
    control = existing.legend if existing is not None else None
    content = legend_html(name, overlay.legend) if legend else ""
    if content:
        if control is not None and control in m.controls:
            control.widget.value = content
        else:
            control = ipyleaflet.WidgetControl(widget=ipywidgets.HTML(content), position=legend_position)
            m.add_control(control)
    elif control is not None and control in m.controls:
        m.remove_control(control)
        control = None
    layer = EmbeddingLayer(name=name, image=image, legend=control, overlay=overlay)
    registry[name] = layer
    if fit_bounds:
        zoom_to(m, overlay.bounds)
    logger.debug("layer %r: %s %s px, bounds %s", name, overlay.kind, overlay.rgba.shape[:2], overlay.bounds)
    return layer


def remove_embedding_layer(m: Any, name: str) -> None:
    """Remove the layer ``name`` and its legend from ``m`` (no-op if absent)."""
    layer = _registry(m).pop(name, None)
    if layer is None:
        return
    if layer.image in m.layers:
        m.remove_layer(layer.image)
    if layer.legend is not None and layer.legend in m.controls:
        m.remove_control(layer.legend)
