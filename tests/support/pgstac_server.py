"""A real STAC API on 127.0.0.1: stac-fastapi-pgstac over pgstac on Debian's PostgreSQL + PostGIS.

This is the software stack Planetary Computer runs. Needs the Debian package
``postgresql-15-postgis-3`` (``python -m pytest --install-system-packages`` installs it) and the
Python packages ``pypgstac[psycopg]``, ``stac-fastapi-pgstac`` and ``uvicorn``.

PostgreSQL refuses to run as root, so when the tests run as root the data and socket directories
are handed to the ``postgres`` user and its binaries run through ``runuser``. Cold start to a serving
API takes about 5 s.

A missing PostgreSQL or PostGIS is found before anything starts (:func:`missing_postgis`) and
raised as :class:`MissingSystemPackage`, one line with the install command; when :meth:`start`
fails part-way, everything it started is stopped and its directory removed before the error
propagates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from .storage_server import free_port

PG_BIN = Path(os.environ.get("TERRAFM_PG_BIN", "/usr/lib/postgresql/15/bin"))
"""PostgreSQL's binaries: ``$TERRAFM_PG_BIN`` or Debian's."""
PG_PACKAGE = "postgresql-15-postgis-3"
"""The Debian package that brings PostgreSQL 15 and PostGIS."""


class MissingSystemPackage(RuntimeError):
    """A system package the test stack needs is not installed; the message is one line that
    ends with the install command."""


def missing_postgis(bin_dir: Path | None = None) -> str | None:
    """One line naming what is missing and the install command, or None when PostgreSQL's
    binaries and PostGIS (its ``postgis.control`` in ``pg_config --sharedir``) are there."""
    bin_dir = Path(bin_dir or PG_BIN)
    absent = [b for b in ("initdb", "pg_ctl", "postgres", "pg_config") if not (bin_dir / b).exists()]
    if absent:
        return (f"PostgreSQL binaries not found in {bin_dir} (no {', '.join(absent)}): apt-get install -y {PG_PACKAGE} "
                "(or set TERRAFM_PG_BIN)")
    share = subprocess.run([str(bin_dir / "pg_config"), "--sharedir"], capture_output=True, text=True).stdout.strip()
    if not (Path(share) / "extension" / "postgis.control").exists():
        return f"PostGIS is missing (no postgis.control in {share}/extension): apt-get install -y {PG_PACKAGE}"
    return None


class PgstacServer:
    """Start PostgreSQL, migrate pgstac, load collections/items and serve stac-fastapi-pgstac."""

    def __init__(self, collections: list[dict], items: list[dict]):
        self.collections = collections
        self.items = items
        self.pg_port = free_port()
        self.api_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="terrafm-pgstac-"))
        self.data = self.workdir / "data"
        self.pg_bin = PG_BIN
        self._api: subprocess.Popen | None = None
        self._pg_started = False
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/stac"

    def _pg(self, *args: str) -> None:
        cmd = [str(self.pg_bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")

    def start(self) -> "PgstacServer":
        """Start everything; on any failure stop what was started, then raise.

        Raises :class:`MissingSystemPackage` (before starting anything) when PostgreSQL or
        PostGIS is not installed.
        """
        problem = missing_postgis(self.pg_bin)
        if problem:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise MissingSystemPackage(problem)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self._as_postgres:
            shutil.chown(self.workdir, "postgres", "postgres")
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._pg_started = True  # from here on stop() runs pg_ctl stop (a no-op if start failed)
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.workdir / "pg.log"), "-o",
                 f"-p {self.pg_port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                 "-c synchronous_commit=off -c full_page_writes=off", "-w", "start")
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres", autocommit=True) as conn:
            conn.execute("create database stac")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            try:
                conn.execute("create extension if not exists postgis")
            except psycopg.Error as exc:
                raise MissingSystemPackage(f"PostGIS is missing (PostgreSQL says: {str(exc).splitlines()[0]}): "
                                           f"apt-get install -y {PG_PACKAGE}") from exc
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods
        from pypgstac.migrate import Migrate

        with PgstacDB(dsn=self.dsn) as db:
            Migrate(db).run_migration()
            loader = Loader(db=db)
            loader.load_collections(iter(self.collections), insert_mode=Methods.upsert)
            loader.load_items(iter(self.items), insert_mode=Methods.upsert)

        env = dict(os.environ, PGUSER="postgres", PGPASSWORD="unused", PGHOST="127.0.0.1",
                   PGPORT=str(self.pg_port), PGDATABASE="stac", POSTGRES_USER="postgres",
                   POSTGRES_PASS="unused", POSTGRES_HOST_READER="127.0.0.1", POSTGRES_HOST_WRITER="127.0.0.1",
                   POSTGRES_PORT=str(self.pg_port), POSTGRES_DBNAME="stac", ENABLE_TRANSACTIONS_EXTENSIONS="false")
        for key in ("http_proxy", "HTTP_PROXY"):
            env.pop(key, None)
        self._api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "stac_fastapi.pgstac.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(self.api_port), "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "api.log", "wb"),
        )
        deadline = time.time() + 30
        session = requests.Session()
        session.trust_env = False
        while time.time() < deadline:
            if self._api.poll() is not None:
                raise RuntimeError(f"stac-fastapi-pgstac exited: {(self.workdir / 'api.log').read_text()[-3000:]}")
            try:
                if session.get(f"{self.url}/_mgmt/ping", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError("stac-fastapi-pgstac did not answer /_mgmt/ping within 30 s")

    def add_items(self, items: list[dict]) -> None:
        """Upsert more items (their collections must exist)."""
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(dsn=self.dsn) as db:
            Loader(db=db).load_items(iter(json.loads(json.dumps(items))), insert_mode=Methods.upsert)

    def stop(self) -> None:
        """Stop the API and PostgreSQL (whatever of them runs) and remove the work directory."""
        if self._api is not None:
            self._api.terminate()
            try:
                self._api.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._api.kill()
                self._api.wait()
            self._api = None
        if self._pg_started:
            try:
                self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError:  # it was not running (pg_ctl start failed)
                pass
            self._pg_started = False
        shutil.rmtree(self.workdir, ignore_errors=True)
