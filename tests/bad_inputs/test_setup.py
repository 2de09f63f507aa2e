"""Class 10 of issue 15: the README's test command on a machine without the system packages.

A missing PostgreSQL, PostGIS or Chromium stops pytest before any test runs with one line that
names the ``apt-get`` command (``--install-system-packages`` runs it), and a STAC API whose
set-up fails part-way stops the PostgreSQL server it launched. PostGIS is made missing for real:
PostgreSQL's own binaries are copied into a relocated tree whose extension directory lacks
PostGIS (PostgreSQL finds its share directory relative to its binary).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support import pgstac_server
from support.pgstac_server import PG_PACKAGE, MissingSystemPackage, PgstacServer, missing_postgis

pytestmark = pytest.mark.postgis  # copies Debian's PostgreSQL binaries, starts PostgreSQL

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PG = Path("/usr/lib/postgresql/15")
DEBIAN_SHARE = Path("/usr/share/postgresql/15")
PG_TEST = "tests/stac/test_fixtures.py::test_pgstac_api_serves_the_scene_items"
BROWSER_TEST = "tests/viz/test_browser.py"
PLAIN_TEST = "tests/bad_inputs/test_composite.py::test_month_without_valid_observation_is_nan_and_uncounted"


def _world_readable_tmpdir(prefix: str) -> Path:
    """Under /tmp and 0755: PostgreSQL runs as the postgres user and must reach it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def pg_without_postgis():
    """Debian's PostgreSQL 15 relocated to a tree whose extension directory has no PostGIS."""
    if missing_postgis(DEBIAN_PG / "bin"):
        pytest.fail(missing_postgis(DEBIAN_PG / "bin"))
    root = _world_readable_tmpdir("terrafm-no-postgis-")
    bin_dir = root / "lib/postgresql/15/bin"
    bin_dir.mkdir(parents=True)
    for name in ("initdb", "postgres", "pg_ctl", "pg_config"):
        shutil.copy2(DEBIAN_PG / "bin" / name, bin_dir / name)
    (root / "lib/postgresql/15/lib").symlink_to(DEBIAN_PG / "lib")
    share = root / "share/postgresql/15"
    (share / "extension").mkdir(parents=True)
    for entry in DEBIAN_SHARE.iterdir():
        if entry.name != "extension":
            (share / entry.name).symlink_to(entry)
    for entry in (DEBIAN_SHARE / "extension").iterdir():
        if not entry.name.startswith("postgis"):
            (share / "extension" / entry.name).symlink_to(entry)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)
    yield bin_dir
    shutil.rmtree(root)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------------------------------------ the check
def no_binaries(fake_bin: Path, tmp_path: Path) -> Path:
    empty = tmp_path / "no-postgres"
    empty.mkdir()
    return empty


def no_postgis(fake_bin: Path, tmp_path: Path) -> Path:
    return fake_bin


def the_real_installation(fake_bin: Path, tmp_path: Path) -> Path:
    return DEBIAN_PG / "bin"


CHECK_CASES = [
    pytest.param(no_binaries, rf"^PostgreSQL binaries not found in .*no-postgres \(no initdb, pg_ctl, postgres, "
                              rf"pg_config\): apt-get install -y {PG_PACKAGE}", id="s10-postgresql-missing"),
    pytest.param(no_postgis, rf"^PostGIS is missing \(no postgis\.control in .*/share/postgresql/15/extension\): "
                             rf"apt-get install -y {PG_PACKAGE}$", id="s10-postgis-missing"),
    pytest.param(the_real_installation, None, id="s10-debian-postgis-present"),
]


@pytest.mark.parametrize("make_bin, message", CHECK_CASES)
def test_missing_postgis_names_the_package(pg_without_postgis, tmp_path, make_bin, message):
    problem = missing_postgis(make_bin(pg_without_postgis, tmp_path))
    if message is None:
        assert problem is None
    else:
        assert problem is not None and len(problem.splitlines()) == 1
        assert re.search(message, problem), problem


@pytest.mark.parametrize("make_bin, message", CHECK_CASES[:2])
def test_start_without_postgis_starts_nothing(pg_without_postgis, tmp_path, monkeypatch, make_bin, message):
    monkeypatch.setattr(pgstac_server, "PG_BIN", make_bin(pg_without_postgis, tmp_path))
    server = PgstacServer([], [])
    with pytest.raises(MissingSystemPackage, match=message):
        server.start()
    assert not server.workdir.exists() and not _processes_mentioning(str(server.workdir))


# ------------------------------------------------------------------------------------------------ part-way
def test_postgis_unavailable_in_the_running_server_stops_it(pg_without_postgis, monkeypatch):
    """The check is bypassed, so PostgreSQL starts and only `create extension postgis` fails: the
    server it launched is stopped, its directory removed, and the error names the package."""
    monkeypatch.setattr(pgstac_server, "PG_BIN", pg_without_postgis)
    monkeypatch.setattr(pgstac_server, "missing_postgis", lambda bin_dir=None: None)
    server = PgstacServer([], [])
    ran = []
    original = server._pg
    monkeypatch.setattr(server, "_pg", lambda *args: (ran.append(args[0]), original(*args))[1])
    with pytest.raises(MissingSystemPackage, match=rf'^PostGIS is missing \(PostgreSQL says: extension "postgis" is not '
                                                   rf'available\): apt-get install -y {PG_PACKAGE}$'):
        server.start()
    assert ran[:2] == ["initdb", "pg_ctl"]  # PostgreSQL had been started
    assert not _processes_mentioning(str(server.workdir)), "the PostgreSQL server of the failed start still runs"
    assert not _port_open(server.pg_port) and not server.workdir.exists()


def test_a_failure_while_loading_items_stops_postgresql():
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "orphan", "collection": "no-such-collection",
            "geometry": {"type": "Point", "coordinates": [0, 0]}, "bbox": [0, 0, 0, 0],
            "properties": {"datetime": "2021-06-01T00:00:00Z"}, "links": [], "assets": {}}
    server = PgstacServer([], [item])
    with pytest.raises(Exception) as failure:
        server.start()
    assert not isinstance(failure.value, MissingSystemPackage)
    assert not _processes_mentioning(str(server.workdir)), "the PostgreSQL server of the failed start still runs"
    assert not _port_open(server.pg_port) and not server.workdir.exists()


# ------------------------------------------------------------------------------------------------ pytest itself
def _pytest(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **env}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _fake_apt_get(tmp_path: Path, exit_code: int, stderr: str = "") -> tuple[Path, Path]:
    """An apt-get that records its arguments and installs nothing."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    log = tmp_path / "apt-get.log"
    script = bin_dir / "apt-get"
    script.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\necho '{stderr}' >&2\nexit {exit_code}\n")
    script.chmod(0o755)
    return bin_dir, log


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "ERROR at setup" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: "), proc.stderr
    assert " passed" not in proc.stdout and " failed" not in proc.stdout
    return errors[0]


def test_pytest_without_postgis_stops_with_one_line_before_any_test(pg_without_postgis):
    tmp = _world_readable_tmpdir("terrafm-pytest-tmp-")
    try:
        proc = _pytest([PG_TEST], {"TERRAFM_PG_BIN": str(pg_without_postgis), "TMPDIR": str(tmp)})
        line = _one_line_error(proc)
        assert "PostGIS is missing (no postgis.control in" in line
        assert line.endswith(f"apt-get install -y {PG_PACKAGE} (or run pytest with --install-system-packages)")
        assert not _processes_mentioning(str(tmp)) and list(tmp.iterdir()) == []
    finally:
        shutil.rmtree(tmp)


def test_pytest_without_chromium_stops_with_one_line(tmp_path):
    proc = _pytest([BROWSER_TEST], {"TERRAFM_CHROMIUM": str(tmp_path / "no-chromium")})
    line = _one_line_error(proc)
    assert line == (f"ERROR: Chromium is missing ({tmp_path / 'no-chromium'} not found): apt-get install -y chromium "
                    "(or run pytest with --install-system-packages)")


def test_tests_that_need_no_system_package_run_without_them(tmp_path):
    proc = _pytest([PLAIN_TEST], {"TERRAFM_PG_BIN": str(tmp_path / "none"), "TERRAFM_CHROMIUM": str(tmp_path / "none")})
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_install_option_runs_apt_get_for_what_is_missing(pg_without_postgis, tmp_path):
    """apt-get here records its arguments and installs nothing, so PostGIS stays missing."""
    fake_bin, log = _fake_apt_get(tmp_path, 0)
    proc = _pytest([PG_TEST, "--install-system-packages"],
                   {"TERRAFM_PG_BIN": str(pg_without_postgis), "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    line = _one_line_error(proc)
    assert log.read_text().splitlines() == ["update -qq", f"install -y -qq {PG_PACKAGE}"]
    assert "PostGIS is missing" in line and line.endswith("(still missing after apt-get install)")
    assert "installing system packages: apt-get install -y -qq postgresql-15-postgis-3" in proc.stdout


def test_install_option_reports_a_failing_apt_get_in_one_line(pg_without_postgis, tmp_path):
    fake_bin, log = _fake_apt_get(tmp_path, 100, "E: Could not get lock /var/lib/apt/lists/lock")
    proc = _pytest([PG_TEST, "--install-system-packages"],
                   {"TERRAFM_PG_BIN": str(pg_without_postgis), "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    line = _one_line_error(proc)
    assert log.read_text().splitlines() == ["update -qq"]
    assert line.endswith("(--install-system-packages: `apt-get update -qq` failed "
                         "(E: Could not get lock /var/lib/apt/lists/lock))")
