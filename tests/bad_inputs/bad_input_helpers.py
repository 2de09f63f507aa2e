"""Helpers of the bad-input tables (tests/bad_inputs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import xarray as xr

SEE = r"see README, 'Validation rules'"
"""What every validation error ends with."""

RES, CRS, ORIGIN = 160.0, "EPSG:32632", (500_000.0, 5_000_000.0)


def run(ds, model, **kw):
    """``terrafm.embed`` with the small settings every table uses."""
    import terrafm

    return terrafm.embed(ds, model=model, chip_size=64, overlap=0, device="cpu", progress=False, **kw)


def make_embedding(values: np.ndarray) -> xr.DataArray:
    """An embedding DataArray (y, x, embedding) on a 160 m UTM grid, valid where every value is finite."""
    import rioxarray  # noqa: F401
    from affine import Affine

    ny, nx = values.shape[:2]
    da = xr.DataArray(values.astype(np.float32), dims=("y", "x", "embedding"),
                      coords={"y": ORIGIN[1] - RES * (np.arange(ny) + 0.5),
                              "x": ORIGIN[0] + RES * (np.arange(nx) + 0.5), "embedding": np.arange(values.shape[2])})
    da = da.assign_coords(valid=(("y", "x"), np.isfinite(values).all(-1)))
    return da.rio.write_crs(CRS).rio.write_transform(Affine(RES, 0, ORIGIN[0], 0, -RES, ORIGIN[1]))


class Interrupted(Exception):
    """Stands for a crash (out of memory, Ctrl-C) after some blocks were written."""


def snapshot(path) -> dict | None:
    """sha256 of every file under ``path`` (or of ``path`` itself), None if it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def interrupted_embed(monkeypatch, ds, out, after: int, **kw) -> None:
    """``embed(out=...)`` that stops (raises :class:`Interrupted`) after ``after`` blocks were written."""
    import pytest

    from terrafm import embed as embed_module

    original = embed_module._write_block
    written = []

    def write_then_stop(*args, **kwargs):
        if len(written) == after:
            raise Interrupted
        written.append(1)
        original(*args, **kwargs)

    monkeypatch.setattr(embed_module, "_write_block", write_then_stop)
    with pytest.raises(Interrupted):
        embed_module.embed(ds, out=out, **kw)
    monkeypatch.setattr(embed_module, "_write_block", original)
