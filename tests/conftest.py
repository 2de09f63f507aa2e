"""Session-scoped fixtures shared by all test areas. Documented in ``tests/support/__init__.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.scene import get_scene  # noqa: E402


@pytest.fixture(scope="session")
def sentinel_scene():
    """The built test scene (real Sentinel COGs); see tests/support/scene.py."""
    return get_scene()


@pytest.fixture(scope="session")
def storage_server(sentinel_scene):
    """Local blob store: COGs with Range, SAS token endpoint, fault injection."""
    from support.storage_server import StorageServer

    server = StorageServer(root=sentinel_scene.root).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cog_server_url(storage_server) -> str:
    return storage_server.url


@pytest.fixture(scope="session")
def pc_sas_url(storage_server) -> str:
    return storage_server.sas_url


@pytest.fixture(scope="session")
def pc_environment(storage_server):
    """Route blob hosts to the local store and point planetary-computer at the local SAS endpoint."""
    names = ("http_proxy", "no_proxy", "NO_PROXY", "PC_SDK_SAS_URL")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["http_proxy"] = storage_server.url
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    os.environ["PC_SDK_SAS_URL"] = storage_server.sas_url
    from planetary_computer import settings
    from planetary_computer.sas import TOKEN_CACHE

    settings.Settings.get.cache_clear()
    TOKEN_CACHE.clear()
    yield storage_server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    settings.Settings.get.cache_clear()
    TOKEN_CACHE.clear()


@pytest.fixture(scope="session")
def pgstac_server(sentinel_scene, storage_server, pc_environment):
    """stac-fastapi-pgstac over pgstac on PostgreSQL + PostGIS, loaded with the scene's items."""
    from support import stac_items
    from support.pgstac_server import PgstacServer

    server = PgstacServer(stac_items.collections(sentinel_scene),
                          stac_items.all_items(sentinel_scene, storage_server.url)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stac_api_url(pgstac_server) -> str:
    return pgstac_server.url
