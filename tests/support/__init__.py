"""Shared test infrastructure: real Sentinel COGs, a real STAC API, a local blob store.

Session-scoped pytest fixtures (defined in ``tests/conftest.py``; use them by name):

``sentinel_scene`` -> :class:`tests.support.scene.SentinelScene`
    Where the test imagery is: ``epsg`` (32618), ``bounds`` (UTM), ``bbox`` (lon/lat of the whole
    10.2 km crop), ``aoi_bbox`` (a ~5 x 5 km lon/lat box, larger than a 224 px chip),
    ``start``/``end`` ("2021-06-01", "2021-07-31": five S2 dates, four S1 dates), ``s2_dates``,
    ``s1_dates``, ``baseline4_date`` (2022-02-14, baseline 04.00 with +1000 DN), ``root``
    (the served directory) and ``manifest`` (per asset: path, shape, transform); the known change
    from ``change_date`` (``change_step``) on an 840 m block (``change_bounds`` UTM, ``change_bbox``
    lon/lat). Builds on first use (~3 s), cached in ``$TERRAFM_TEST_DATA`` or ``~/.cache/terrafm-tests``.

``storage_server`` -> :class:`tests.support.storage_server.StorageServer`
    Range-capable COG server + SAS token endpoint + fault injection on 127.0.0.1.
    ``cog_server_url`` (str) is its base URL; files are at ``{cog_server_url}/{manifest path}``.

``pc_sas_url`` -> str
    The local SAS endpoint. The ``stac_api_url`` fixture sets ``PC_SDK_SAS_URL`` to it and routes
    ``*.blob.core.windows.net`` to the storage server with ``http_proxy`` (``no_proxy`` keeps
    127.0.0.1 direct) for the whole session, so Planetary Computer signing runs for real.

``stac_api_url`` -> str
    stac-fastapi-pgstac over pgstac (PostgreSQL 15 + PostGIS) holding collections
    ``sentinel-2-l2a`` (6 items; 5 in 2021, one 2022 with baseline 04.00), ``sentinel-1-rtc`` (5),
    ``esa-worldcover`` (1), all Planetary Computer-shaped with blob hrefs that need signing, and
    ``sentinel-2-l1c`` (1 Earth Search-shaped item, real L1C, direct hrefs).

``pgstac_server`` -> :class:`tests.support.pgstac_server.PgstacServer` (``add_items`` to load more).

``local_cluster`` -> ``distributed.LocalCluster``
    Two single-threaded worker processes, started once; open a ``distributed.Client`` on it in the
    test and ``wait_for_workers(2)`` (a test may kill a worker: its nanny starts a new one).

Example
-------
>>> def test_something(stac_api_url, sentinel_scene):          # doctest: +SKIP
...     import terrafm
...     ds = terrafm.open_sentinel(sentinel_scene.aoi_bbox, sentinel_scene.start,
...                                sentinel_scene.end, url=stac_api_url)
...     assert ds.sizes["x"] >= 224

Real vs made data is documented in :mod:`tests.support.scene`; item shapes in
:mod:`tests.support.stac_items`.
"""

from .scene import SentinelScene, get_scene  # noqa: F401
