"""Change between two dates, and over a whole series: the change layers, histogram, a time slider and,
on a click, the distance-over-time plot of the position with its first persistent change marked."""

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

    With three dates or more the app also follows the whole series
    (:mod:`terrafm.analysis.series`): a time slider over every date shows each date's distance to
    the baseline (layer ``distance to baseline``), the layer ``first persistent change`` colours
    where a change lasted ``min_steps`` valid dates, and a click draws that position's distance
    over time (bqplot) with the threshold and the date of its first persistent change marked.

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
    baseline : int, slice or sequence of int
        Series mode: the baseline dates (:func:`terrafm.analysis.series.baseline_distance`).
    min_steps : int
        Series mode: valid dates in a row a change must last.

    Attributes
    ----------
    result : xr.Dataset or None
        ``distance`` and ``changed`` of the current pair (``attrs["threshold"]``).
    histogram : (counts, edges)
        Of the valid distances.
    series : xr.Dataset or None
        Series mode: :func:`terrafm.analysis.series.first_persistent_change` of ``emb``
        (``distance`` to the baseline, ``first_change``, ``first_change_index``).
    step : int or None
        The date the time slider shows.
    trajectory : pandas.DataFrame or None
        The clicked position's ``baseline_distance`` per date (and ``above``); ``change_date`` is
        its first persistent change (NaT if none).

    Examples
    --------
    >>> app = ChangeExplorer(emb)                  # doctest: +SKIP
    >>> app.set_dates(0, 3); app.set_threshold(0.2)  # what the widgets do  # doctest: +SKIP
    >>> float(app.result["changed"].mean())        # doctest: +SKIP
    >>> app.set_step(5); app.click(11.57, 48.12)   # series: slider, then the trajectory plot  # doctest: +SKIP
    >>> app.trajectory, app.change_date            # doctest: +SKIP
    """

    def __init__(self, emb: Any, date_a: int = 0, date_b: int = -1, threshold: float | str = "otsu",
                 bins: int = 40, map: Any = None, baseline: Any = 1, min_steps: int = 2, **kwargs: Any) -> None:
        self.result = None
        self.histogram = None
        self.series = None
        self.step: int | None = None
        self.trajectory = None
        self.change_date = None
        self._series_options = (baseline, min_steps)
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
        if n >= 3:
            self._setup_series()

    def _setup_series(self) -> None:
        from ..analysis.series import first_persistent_change

        baseline, min_steps = self._series_options
        self.series = first_persistent_change(self.emb, baseline=baseline, min_steps=min_steps).load()
        first = self.series["first_change_index"].where(self.series["first_change_index"] >= 0)
        add_embedding_layer(self.map, first.astype(np.float32).rename("first persistent change"),
                            "first persistent change", kind="continuous", cmap="plasma", vmin=0.0,
                            vmax=float(len(self.dates) - 1), opacity=0.8)
        self.set_step(len(self.dates) - 1)

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
        controls = [ipywidgets.HBox([pickers, self.hist_figure])]
        if self.series is not None:
            controls.append(self._series_controls())
        return controls

    def _series_controls(self):
        import bqplot
        import ipywidgets

        self.time_slider = ipywidgets.SelectionSlider(
            options=list(zip(self.dates, range(len(self.dates)))), value=self.step, description="date",
            continuous_update=False, layout=ipywidgets.Layout(width="520px"))
        self.time_slider.observe(lambda change: self.set_step(change["new"]), names="value")
        x_scale, y_scale = bqplot.DateScale(), bqplot.LinearScale(min=0.0)
        times = self.emb["time"].values.astype("datetime64[ms]")
        threshold = float(self.series.attrs["threshold"])
        self.trajectory_line = bqplot.Lines(x=times, y=np.zeros(len(times)), scales={"x": x_scale, "y": y_scale},
                                            marker="circle", colors=["#1f77b4"])
        self.trajectory_threshold = bqplot.Lines(x=times[[0, -1]], y=[threshold, threshold],
                                                 scales={"x": x_scale, "y": y_scale}, colors=["#888888"],
                                                 line_style="dashed")
        self.trajectory_change = bqplot.Lines(x=times[[0, 0]], y=[0.0, 0.0], scales={"x": x_scale, "y": y_scale},
                                              colors=["#d62728"], stroke_width=3, visible=False)
        self.trajectory_figure = bqplot.Figure(
            marks=[self.trajectory_line, self.trajectory_threshold, self.trajectory_change],
            axes=[bqplot.Axis(scale=x_scale, label="date"),
                  bqplot.Axis(scale=y_scale, orientation="vertical", label="distance to baseline")],
            title="click the map for a position's distance over time",
            layout=ipywidgets.Layout(width="620px", height="240px"),
            fig_margin={"top": 40, "bottom": 40, "left": 50, "right": 10},
        )
        return ipywidgets.VBox([self.time_slider, self.trajectory_figure])

    @guarded
    def set_step(self, step: int) -> None:
        """Series mode: show date ``step``'s distance to the baseline (what the time slider does)."""
        if self.series is None:
            raise ValueError("the time slider needs a series of at least three dates")
        step = int(step) % len(self.dates)
        distance = self.series["distance"].isel(time=step)
        finite = distance.values[np.isfinite(distance.values)]
        top = float(np.percentile(finite, 99)) if finite.size else 1.0
        add_embedding_layer(self.map, distance.rename("distance to baseline"), "distance to baseline",
                            kind="continuous", cmap="magma", vmin=0.0, vmax=top or 1.0, opacity=0.7)
        self.step = step
        if hasattr(self, "time_slider") and self.time_slider.value != step:
            self.time_slider.value = step

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
        text = f"({lon:.5f}, {lat:.5f}): distance {value:.3f}, {verdict} at threshold {self.threshold:.3f}."
        if self.series is not None:
            text += " " + self._show_trajectory(row, col)
        self.show_info(text)

    def _show_trajectory(self, row: int, col: int) -> str:
        import pandas as pd

        distance = self.series["distance"].values[:, row, col]
        threshold = float(self.series.attrs["threshold"])
        self.trajectory = pd.DataFrame({"baseline_distance": distance, "above": distance > threshold},
                                       index=pd.DatetimeIndex(self.emb["time"].values, name="time"))
        self.change_date = self.series["first_change"].values[row, col]
        if hasattr(self, "trajectory_line"):
            top = float(np.nanmax(distance)) if np.isfinite(distance).any() else threshold
            self.trajectory_line.y = np.where(np.isfinite(distance), distance, np.nan)
            self.trajectory_change.visible = not np.isnat(self.change_date)
            if not np.isnat(self.change_date):
                when = self.change_date.astype("datetime64[ms]")
                self.trajectory_change.x = [when, when]
                self.trajectory_change.y = [0.0, max(top, threshold) * 1.05]
            self.trajectory_figure.title = f"distance to baseline at row {row}, col {col}"
        if np.isnat(self.change_date):
            return f"No persistent change over the series (threshold {threshold:.3f})."
        return f"First persistent change: {str(self.change_date)[:10]}."

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
