"""Shared machinery of the interactive apps: a map, a message line, guarded handlers.

Each app is a plain class that holds its state; widget events call its public handlers
(``click(lon, lat)``, ``set_dates(a, b)``, ...). A handler that fails shows the reason in the
app's message line instead of a traceback in the kernel log.
"""

from __future__ import annotations

import functools
import html
import logging
from typing import Any, Callable, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def guarded(handler: F) -> F:
    """Run ``handler``; on an exception show ``"<Type>: <message>"`` in ``self.message`` and return None."""

    @functools.wraps(handler)
    def wrapper(self, *args, **kwargs):
        try:
            result = handler(self, *args, **kwargs)
        except Exception as exc:  # every failure must reach the user, not just the log
            self.show_error(exc)
            logger.info("%s.%s failed: %s", type(self).__name__, handler.__name__, exc)
            return None
        return result

    return wrapper  # type: ignore[return-value]


class MapApp:
    """Base of the apps: ``self.map`` (leafmap), ``self.message`` (HTML), ``self.widget`` (VBox).

    Subclasses implement ``_setup()`` (may raise: the message then explains why the app is
    empty) and ``_controls()`` (widgets above the map).
    """

    title = ""
    date_index = 0  # which date of a time series the app shows (subclasses set it before __init__)

    def __init__(self, emb: Any, map: Any = None, toolbar: bool = False, height: str = "520px",
                 background: Any = None) -> None:
        import ipywidgets

        self.emb = emb
        self.background = background
        self.error: str | None = None
        self.message = ipywidgets.HTML(value="", layout=ipywidgets.Layout(min_height="1.6em"))
        self.map = map
        self._toolbar, self._height = toolbar, height
        try:
            self._check_input(emb)
            if background is not None:
                self._check_background(background)
            if self.map is None:
                from .layers import new_map

                self.map = new_map(emb, toolbar=toolbar, height=height)
            self.map.on_interaction(self._on_interaction)
            self._setup()
        except Exception as exc:
            self.show_error(exc)
            if self.map is None:
                from .layers import new_map

                self.map = new_map(None, toolbar=toolbar, height=height)
        self.widget = self._build_widget(self._controls())

    # ----- overridable -------------------------------------------------------------------
    def _setup(self) -> None:
        """Compute the initial layers."""

    def _controls(self) -> list:
        return []

    def _build_widget(self, controls: list):
        import ipywidgets

        return ipywidgets.VBox([*controls, self.map, self.message])

    # ----- messages ----------------------------------------------------------------------
    def show_error(self, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.error = text
        self.message.value = (f"<div class='terrafm-message terrafm-error' style='color:#b00020'>"
                              f"&#9888; {html.escape(text)}</div>")

    def show_info(self, text: str) -> None:
        self.error = None
        self.message.value = f"<div class='terrafm-message' style='color:#333'>{html.escape(text)}</div>"

    # ----- input checks ------------------------------------------------------------------
    @staticmethod
    def _check_input(emb: Any) -> None:
        from ..analysis._grid import check_embedding

        check_embedding(emb)

    # ----- data ----------------------------------------------------------------------------
    def current(self):
        """The single-date embedding the app shows (``emb`` at ``date_index`` when it has time)."""
        emb = self.emb
        if "time" in emb.dims:
            emb = emb.isel(time=self.date_index)
        return emb

    @staticmethod
    def _check_background(background: Any) -> None:
        from .render import _rgb_unit, as_layer_array

        try:
            data, _ = as_layer_array(background, "rgb")
            _rgb_unit(np.asarray(data.values))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"background: {exc}") from None

    def _add_background(self, rgb: Any = None) -> None:
        """The picture under the app's layers: ``background`` when given, else the PCA colours."""
        from .layers import add_embedding_layer

        if self.background is not None:
            add_embedding_layer(self.map, self.background, "background", kind="rgb", opacity=0.9, legend=False)
            return
        if rgb is None:
            from ..analysis import to_rgb

            rgb = to_rgb(self.current())
        add_embedding_layer(self.map, rgb, "embedding (PCA)", opacity=0.9, legend=False)

    # ----- geometry helpers --------------------------------------------------------------
    def cell_of(self, emb: Any, lon: float, lat: float) -> tuple[int, int]:
        """(row, col) of the grid cell containing (lon, lat); a clear error when outside the data."""
        from pyproj import Transformer

        x, y = Transformer.from_crs("EPSG:4326", emb.rio.crs, always_xy=True).transform(lon, lat)
        inverse = ~emb.rio.transform(recalc=True)
        col_f, row_f = inverse * (x, y)
        row, col = int(np.floor(row_f)), int(np.floor(col_f))
        if not (0 <= row < emb.sizes["y"] and 0 <= col < emb.sizes["x"]):
            raise ValueError(
                f"the point ({lon:.5f}, {lat:.5f}) is outside the data; click inside the coloured area"
            )
        return row, col

    def _on_interaction(self, **event: Any) -> None:
        if event.get("type") == "click":
            lat, lon = event["coordinates"]
            self.click(lon, lat)

    def click(self, lon: float, lat: float) -> None:  # pragma: no cover - overridden
        """Handle a map click at (lon, lat)."""

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def check_index(index: Any, emb: Any) -> Any:
    """``index`` (a :class:`terrafm.analysis.VectorIndex`) when it can answer queries made of ``emb``'s
    vectors: a clear error otherwise (not an index, empty, another embedding dimension)."""
    if index is None:
        return None
    if not (callable(getattr(index, "search", None)) and hasattr(index, "dim")):
        raise TypeError(f"index must be a terrafm.analysis.VectorIndex (VectorIndex.build(stores) or "
                        f"VectorIndex.open(path)), got {type(index).__name__}")
    if len(index) == 0:
        raise ValueError("the index holds no vectors; add embedding stores with index.add(store) first")
    depth = getattr(emb, "sizes", {}).get("embedding")
    if depth is not None and int(index.dim) != int(depth):
        raise ValueError(f"the index holds {index.dim}-dim vectors but emb has {depth}-dim embeddings: build the "
                         "index from stores embedded with the same model as emb")
    return index


def hit_label(hit: Any) -> str:
    """One line for a search hit (a row of ``VectorIndex.search``): store name, date, score.

    Examples
    --------
    >>> import pandas as pd
    >>> hit_label(pd.Series({"store": "/data/june.zarr", "time": pd.Timestamp("2023-06-05"), "score": 0.98765}))
    'june.zarr, 2023-06-05, score 0.988'
    """
    from pathlib import PurePath

    import pandas as pd

    time = hit.get("time")
    date = "" if time is None or pd.isna(time) else f", {str(pd.Timestamp(time).date())}"
    return f"{PurePath(str(hit['store'])).name}{date}, score {float(hit['score']):.3f}"
