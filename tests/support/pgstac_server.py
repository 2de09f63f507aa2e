"""A real STAC API on 127.0.0.1: stac-fastapi-pgstac over pgstac on Debian's PostgreSQL + PostGIS.

This is the software stack Planetary Computer runs. Needs the Debian package
``postgresql-15-postgis-3`` (installed by ``.ci/run``) and the Python packages ``pypgstac[psycopg]``,
``stac-fastapi-pgstac`` and ``uvicorn``.

PostgreSQL refuses to run as root, so when the tests run as root the data and socket directories
are handed to the ``postgres`` user and its binaries run through ``runuser``. Cold start to a serving
API takes about 5 s.
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


class PgstacServer:
    """Start PostgreSQL, migrate pgstac, load collections/items and serve stac-fastapi-pgstac."""

    def __init__(self, collections: list[dict], items: list[dict]):
        self.collections = collections
        self.items = items
        self.pg_port = free_port()
        self.api_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="terrafm-pgstac-"))
        self.data = self.workdir / "data"
        self._api: subprocess.Popen | None = None
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/stac"

    def _pg(self, *args: str) -> None:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")

    def start(self) -> "PgstacServer":
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(
                f"PostgreSQL binaries not found in {PG_BIN}: install them with "
                "`apt-get install -y postgresql-15-postgis-3` (or set TERRAFM_PG_BIN)"
            )
        if self._as_postgres:
            shutil.chown(self.workdir, "postgres", "postgres")
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.workdir / "pg.log"), "-o",
                 f"-p {self.pg_port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                 "-c synchronous_commit=off -c full_page_writes=off", "-w", "start")
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres", autocommit=True) as conn:
            conn.execute("create database stac")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("create extension if not exists postgis")
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
                    return self
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
        if self._api is not None:
            self._api.terminate()
            try:
                self._api.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._api.kill()
        try:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        except RuntimeError:
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)
