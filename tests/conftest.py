"""Session-scoped fixtures shared by all test areas. Documented in ``tests/support/__init__.py``.

System packages: once the tests are collected, the Debian packages the selected tests need
(PostgreSQL + PostGIS for the local STAC API, Chromium for the browser tests) are checked. One
that is missing stops pytest before any test runs with one line naming the ``apt-get`` command;
``--install-system-packages`` runs that command (as root, or through ``sudo -n``) first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# precision="auto" is bf16 on CPUs with native bf16 (terrafm.model.cpu_features): the suite's bit-exact
# references assume fp32, so it pins the probe's answer on every machine; tests/model/test_precision.py
# clears this and fakes the CPU flags to test the probe and the bf16 default. Child processes inherit it.
os.environ.setdefault("TERRAFM_CPU_BF16", "0")

from support.scene import get_scene  # noqa: E402

CHROMIUM_PACKAGE = "chromium"


def pytest_addoption(parser):
    parser.addoption("--install-system-packages", action="store_true",
                     help="install the Debian packages the selected tests need (PostgreSQL + PostGIS, Chromium) "
                          "with apt-get before running them")


def pytest_configure(config):
    config.addinivalue_line("markers", "postgis: needs PostgreSQL + PostGIS without the pgstac_server fixture")


def _chromium() -> Path:
    return Path(os.environ.get("TERRAFM_CHROMIUM", "/usr/bin/chromium"))


def _missing_chromium() -> str | None:
    if _chromium().exists():
        return None
    return f"Chromium is missing ({_chromium()} not found): apt-get install -y {CHROMIUM_PACKAGE}"


def _needs(items) -> dict:
    """Debian package -> the check of it, for what the selected tests use."""
    from support.pgstac_server import PG_PACKAGE, missing_postgis

    needs = {}
    if any("pgstac_server" in item.fixturenames or item.get_closest_marker("postgis") for item in items):
        needs[PG_PACKAGE] = missing_postgis
    if any(item.get_closest_marker("browser") for item in items):
        needs[CHROMIUM_PACKAGE] = _missing_chromium
    return needs


def _apt_get_install(packages: list[str], say) -> str | None:
    """Run apt-get update + install; a one-line reason when it could not, else None."""
    apt = shutil.which("apt-get")
    if apt is None:
        return f"apt-get not found: install {' '.join(packages)} with this system's package manager"
    prefix = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return f"not root and no sudo: run `apt-get install -y {' '.join(packages)}` as root"
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for args in (["update", "-qq"], ["install", "-y", "-qq", *packages]):
        say(f"installing system packages: {' '.join(prefix + ['apt-get', *args])}")
        result = subprocess.run([*prefix, apt, *args], capture_output=True, text=True, env=env)
        if result.returncode:
            last = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()[-1]
            return f"`{' '.join(prefix + ['apt-get', *args])}` failed ({last})"
    return None


def pytest_collection_finish(session):
    """Stop before any test runs when a system package the selected tests need is missing
    (a usage error: one line on stderr, exit code 4)."""
    config = session.config
    if config.option.collectonly or not session.items:
        return
    needs = _needs(session.items)
    problems = [problem for check in needs.values() if (problem := check())]
    if not problems:
        return
    if not config.getoption("install_system_packages"):
        raise pytest.UsageError("; ".join(problems) + " (or run pytest with --install-system-packages)")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    failed = _apt_get_install([package for package, check in needs.items() if check()],
                              reporter.write_line if reporter is not None else print)
    problems = [problem for check in needs.values() if (problem := check())]
    if problems:
        why = f"--install-system-packages: {failed}" if failed else "still missing after apt-get install"
        raise pytest.UsageError(f"{'; '.join(problems)} ({why})")


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
    from support.pgstac_server import MissingSystemPackage, PgstacServer

    try:  # a failed start has already stopped what it started
        server = PgstacServer(stac_items.collections(sentinel_scene),
                              stac_items.all_items(sentinel_scene, storage_server.url)).start()
    except MissingSystemPackage as exc:
        pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stac_api_url(pgstac_server) -> str:
    return pgstac_server.url


@pytest.fixture(scope="session")
def release_checkpoint(tmp_path_factory) -> Path:
    """``TerraFM-B.pth``: random weights in the release layout (``reference_terrafm``, seed 1; 113 M
    values, 450 MB), made and saved once for every test that needs a base-size release file.
    Read only; ``torch.load(path, mmap=True, weights_only=True)`` gives its tensors without a copy."""
    import torch
    from reference_terrafm import random_release_checkpoint

    path = tmp_path_factory.mktemp("release") / "TerraFM-B.pth"
    torch.save(random_release_checkpoint(seed=1), path)
    return path


@pytest.fixture(scope="session")
def local_cluster():
    """dask LocalCluster of two single-threaded worker processes, started once for the tests that
    need one: each start costs two interpreters importing torch and terrafm (~10-15 s), each stop
    up to 4 s. Open a ``distributed.Client(local_cluster)`` in the test (dask's default scheduler
    only while it is open) and ``client.wait_for_workers(2)``: a test may kill a worker, whose
    nanny then starts a new process."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster:
        yield cluster
