"""The analysis functions on real terrafm.embed output (tiny random-weight model)."""

import numpy as np
import pytest
import xarray as xr

from terrafm import sensors


def _two_dates(size: int = 128) -> xr.Dataset:
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    gbox = GeoBox.from_bbox((600_000, 5_000_000 - 10 * size, 600_000 + 10 * size, 5_000_000), "EPSG:32633",
                            resolution=10)
    coords = dict(xr_coords(gbox, crs_coord_name="spatial_ref"))
    coords["time"] = np.array(["2023-06-01", "2024-06-01"], "datetime64[ns]")
    yy, xx = np.indices((size, size))
    rng = np.random.default_rng(0)
    data = {}
    for i, band in enumerate(sensors.S2_BANDS):
        field = 1200 + 700 * np.sin(xx / (9 + i)) * np.cos(yy / (13 + i))
        cube = np.stack([field, field]) + rng.normal(0, 30, (2, size, size))
        cube[1, 64:, 64:] = 4000 - 0.5 * cube[1, 64:, 64:]  # the south-east quarter changes
        data[f"s2_l2a_{band}"] = (("time", "y", "x"), np.clip(cube, 1, None).astype("uint16"), {"modality": "s2_l2a"})
    return xr.Dataset(data, coords=coords)


@pytest.fixture(scope="module")
def embedded():
    import torch

    from terrafm import embed
    from terrafm.model import create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = create_model("terrafm_tiny").eval()
    return embed(_two_dates(), model=model, chip_size=64, device="cpu", progress=False)


def test_analysis_on_embed_output(embedded):
    from terrafm.analysis import change, cluster, similarity, to_rgb

    emb = embedded
    assert emb.dims == ("time", "y", "x", "embedding") and emb.sizes["y"] == 8
    rgb = to_rgb(emb.isel(time=0))
    assert rgb.rio.crs == emb.rio.crs
    assert tuple(rgb.rio.transform()) == pytest.approx(tuple(emb.rio.transform()))
    assert np.isfinite(rgb.values).all()
    ds = change(emb)  # consecutive dates
    dist = ds["distance"].isel(time=0).values
    assert dist[4:, 4:].mean() > 3 * dist[:4, :4].mean()
    assert ds.rio.crs == emb.rio.crs
    sim = similarity(emb.isel(time=0), emb.isel(time=0).values[2, 3])
    assert float(sim[2, 3]) == pytest.approx(1.0, abs=1e-5)
    ids = cluster(emb.isel(time=1), k=2)
    assert np.isfinite(ids.values).all() and set(np.unique(ids.values)) == {0.0, 1.0}
    assert ids.rio.crs == emb.rio.crs and ids.dims == ("y", "x")
