"""Change between two dates: pick the dates and a threshold; the change layers and histogram follow."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ._app import MapApp, guarded
from .layers import add_embedding_layer

logger = logging.getLogger(__name__)


class ChangeExplorer(MapApp):
    """Cosine-distance change between two dates with an adjustable threshold.

    Layers: ``change distance`` (continuous, colour bar) and ``changed`` (positions above the
    threshold, red). A bqplot histogram of the distances shows the threshold as a vertical line.
    A click on the map reports that position's distance and whether it changed.

    Parameters
    ----------
    emb : xr.DataArray
        Embeddings with a ``time`` dim of at least two dates, from :func:`terrafm.embed`.
    date_a, date_b : int
        Initial pair (indices into ``emb.time``); default first and last.
    threshold : float or "otsu"
        Initial threshold; "otsu" picks it from the histogram (:func:`terrafm.analysis.change`).
    bins : int
        Histogram bins.

    Attributes
    ----------
    result : xr.Dataset or None
        ``distance`` and ``changed`` of the current pair (``attrs["threshold"]``).
    histogram : (counts, edges)
        Of the valid distances.

    Examples
    --------
    >>> app = ChangeExplorer(emb)                  # doctest: +SKIP
    >>> app.set_dates(0, 3); app.set_threshold(0.2)  # what the widgets do  # doctest: +SKIP
    >>> float(app.result["changed"].mean())        # doctest: +SKIP
    """

    def __init__(self, emb: Any, date_a: int = 0, date_b: int = -1, threshold: float | str = "otsu",
                 bins: int = 40, map: Any = None, **kwargs: Any) -> None:
        self.result = None
        self.histogram = None
        self.bins = int(bins)
        self.threshold: float | None = None
        self._initial = (date_a, date_b, threshold)
        self.dates: list[str] = []
        self.pair: tuple[int, int] | None = None
        self._syncing = False
        super().__init__(emb, map=map, **kwargs)

    @staticmethod
    def _check_input(emb: Any) -> None:
        MapApp._check_input(emb)
        if "time" not in emb.dims or emb.sizes["time"] < 2:
            raise ValueError(
                "change needs an embedding with a 'time' dim of at least two dates; embed a date range "
                "(terrafm.open_sentinel(bbox, start, end)) instead of one date"
            )

    def _setup(self) -> None:
        self.dates = [str(t)[:19].replace("T", " ") for t in self.emb["time"].values]
        a, b, threshold = self._initial
        n = len(self.dates)
        self.set_dates(a % n, b % n, threshold=threshold)

    def _controls(self) -> list:
        import bqplot
        import ipywidgets

        options = list(zip(self.dates, range(len(self.dates)))) or [("-", 0)]
        a, b = self.pair or (0, 0)
        self.date_a_picker = ipywidgets.Dropdown(options=options, value=a, description="before")
        self.date_b_picker = ipywidgets.Dropdown(options=options, value=b, description="after")
        top = self._slider_max()
        self.threshold_slider = ipywidgets.FloatSlider(value=min(self.threshold or 0.0, top), min=0.0, max=top,
                                                       step=top / 400, readout_format=".4f", description="threshold",
                                                       continuous_update=False)
        self.otsu_button = ipywidgets.Button(description="Otsu threshold")
        self.date_a_picker.observe(self._on_pickers, names="value")
        self.date_b_picker.observe(self._on_pickers, names="value")
        self.threshold_slider.observe(self._on_slider, names="value")
        self.otsu_button.on_click(lambda _: self.set_threshold("otsu"))

        x_scale, y_scale = bqplot.LinearScale(), bqplot.LinearScale()
        counts, edges = self.histogram if self.histogram is not None else (np.zeros(1), np.array([0.0, 1.0]))
        self.hist_bars = bqplot.Bars(x=(edges[:-1] + edges[1:]) / 2, y=counts,
                                     scales={"x": x_scale, "y": y_scale}, colors=["#5577aa"], padding=0.0)
        top = float(counts.max()) if counts.size else 1.0
        self.hist_threshold = bqplot.Lines(x=[self.threshold or 0.0] * 2, y=[0.0, top],
                                           scales={"x": x_scale, "y": y_scale}, colors=["#d62728"],
                                           stroke_width=3)
        self.hist_figure = bqplot.Figure(
            marks=[self.hist_bars, self.hist_threshold],
            axes=[bqplot.Axis(scale=x_scale, label="cosine distance"),
                  bqplot.Axis(scale=y_scale, orientation="vertical", label="positions")],
            layout=ipywidgets.Layout(width="420px", height="220px"),
            fig_margin={"top": 10, "bottom": 40, "left": 50, "right": 10},
        )
        pickers = ipywidgets.VBox([self.date_a_picker, self.date_b_picker, self.threshold_slider, self.otsu_button])
        return [ipywidgets.HBox([pickers, self.hist_figure])]

    def _on_pickers(self, _change: dict) -> None:
        if not self._syncing:
            self.set_dates(self.date_a_picker.value, self.date_b_picker.value)

    def _on_slider(self, change: dict) -> None:
        if self._syncing:
            return
        if self.threshold is None or abs(change["new"] - self.threshold) > 1e-12:
            self.set_threshold(change["new"])

    @guarded
    def set_dates(self, a: int, b: int, threshold: float | str | None = None) -> None:
        """Compare date ``a`` with date ``b`` (indices into ``emb.time``)."""
        from ..analysis import change

        a, b = int(a), int(b)
        if a == b:
            raise ValueError(f"both dates are {self.dates[a]}; pick two different dates")
        first, second = self.emb.isel(time=a), self.emb.isel(time=b)
        try:
            result = change(first, second, threshold="otsu" if threshold is None else threshold)
        except ValueError as exc:
            if "no position is valid on both" in str(exc):
                raise ValueError(
                    f"{self.dates[a]} and {self.dates[b]} have no valid position in common (clouds or no data); "
                    "pick another date pair"
                ) from None
            raise
        self.pair = (a, b)
        self.result = result
        values = result["distance"].values[np.isfinite(result["distance"].values)]
        # 1 - cos can come out a hair below 0 for identical vectors: keep those in the first bin
        low = min(0.0, float(values.min()))
        self.histogram = np.histogram(values, bins=self.bins, range=(low, max(float(values.max()), low + 1e-6)))
        self.threshold = float(result.attrs["threshold"])
        add_embedding_layer(self.map, result["distance"], "change distance", kind="continuous", cmap="viridis",
                            vmin=0.0, vmax=float(np.percentile(values, 99)) or 1.0, opacity=0.7)
        self._draw_changed()
        self._sync_widgets()

    @guarded
    def click(self, lon: float, lat: float) -> None:
        """What a map click does: report the clicked position's change distance and verdict."""
        if self.result is None:
            raise ValueError("no date pair is shown yet; pick two dates with valid data in common")
        distance = self.result["distance"].transpose("y", "x")
        row, col = self.cell_of(distance, lon, lat)
        value = float(distance.values[row, col])
        if not np.isfinite(value):
            raise ValueError(f"the clicked position ({lon:.5f}, {lat:.5f}) is not valid on both dates "
                             "(cloud or no data); click a coloured cell")
        verdict = "changed" if value > self.threshold else "unchanged"
        self.clicked = (row, col)
        self.show_info(f"({lon:.5f}, {lat:.5f}): distance {value:.3f}, {verdict} at threshold {self.threshold:.3f}.")

    @guarded
    def set_threshold(self, threshold: float | str) -> None:
        """New threshold (a distance, or "otsu"); only the ``changed`` layer is redrawn."""
        if self.result is None:
            raise ValueError("no date pair loaded yet; pick two dates first")
        distance = self.result["distance"]
        if threshold == "otsu":
            from ..analysis import otsu_threshold

            threshold = otsu_threshold(distance.values)
        threshold = float(threshold)
        if not 0.0 <= threshold <= 2.0:
            raise ValueError(f"a cosine-distance threshold lies in [0, 2], got {threshold}")
        import xarray as xr

        changed = xr.where(np.isfinite(distance), (distance > threshold).astype(np.float32), np.nan)
        self.result["changed"] = changed.astype(np.float32)
        self.result.attrs["threshold"] = threshold
        self.threshold = threshold
        self._draw_changed()
        self._sync_widgets()

    def _draw_changed(self) -> None:
        changed = self.result["changed"].rename("changed")
        add_embedding_layer(self.map, changed, "changed", kind="mask", colour="#ff1744", opacity=0.85,
                            classes=[f"changed (distance > {self.threshold:.3f})"])
        fraction = float(np.nanmean(changed.values))
        a, b = self.pair
        self.show_info(f"{self.dates[a]} → {self.dates[b]}: threshold {self.threshold:.3f}, "
                       f"{100 * fraction:.1f}% of valid positions changed.")

    def _sync_widgets(self) -> None:
        if not hasattr(self, "threshold_slider"):
            return
        self._syncing = True
        try:
            self._sync_widget_values()
        finally:
            self._syncing = False

    def _slider_max(self) -> float:
        """Slider range: up to just above the largest distance of the pair (at most 2), so an
        untrained or very stable pair with distances ~0.01 still gets a usable slider."""
        if self.histogram is None:
            return 2.0
        largest = float(self.histogram[1][-1])
        return float(min(2.0, max(largest * 1.05, 1e-4)))

    def _sync_widget_values(self) -> None:
        top = self._slider_max()
        if self.threshold_slider.max != top:
            if top < self.threshold_slider.min:
                self.threshold_slider.min = 0.0
            self.threshold_slider.max = top
            self.threshold_slider.step = top / 400
        self.threshold_slider.value = min(self.threshold, top)
        counts, edges = self.histogram
        with self.hist_bars.hold_sync():
            self.hist_bars.x = (edges[:-1] + edges[1:]) / 2
            self.hist_bars.y = counts
        self.hist_threshold.x = [self.threshold, self.threshold]
        self.hist_threshold.y = [0.0, float(counts.max())]
        a, b = self.pair
        if self.date_a_picker.value != a:
            self.date_a_picker.value = a
        if self.date_b_picker.value != b:
            self.date_b_picker.value = b
