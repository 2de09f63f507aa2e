"""A local blob store on 127.0.0.1: Range-capable COG serving, SAS tokens, fault injection.

One uvicorn server (in a subprocess, so GDAL's blocking reads in the test process never starve it)
runs a Starlette app:

* ``/api/sas/v1/token/{account}/{container}``: a SAS token endpoint with the Planetary Computer
  response shape (``{"msft:expiry": ..., "token": "st=..&se=..&sp=rl&sv=..&sr=c&sig=.."}``); point
  ``PC_SDK_SAS_URL`` at ``{url}/api/sas/v1/token`` and ``planetary_computer.sign`` runs for real.
* everything else: files under ``root`` by ``StaticFiles`` (``Range: bytes=a-b`` answers 206 with
  exactly those bytes).
* Requests whose Host ends with ``.blob.core.windows.net`` (they arrive through ``http_proxy`` as
  absolute-form targets) must carry a SAS token this server issued and that is neither expired nor
  revoked, else 403 ``AuthenticationFailed`` like Azure. Direct ``127.0.0.1`` requests need none.

Fault injection (thread-safe, all on :class:`StorageServer`):

* :meth:`StorageServer.fail_next` -- answer the next requests matching a path fragment with given
  statuses (e.g. ``(503, 429)``), then serve normally.
* :meth:`StorageServer.remove_after` -- delete a file after N served requests to it (a COG that
  disappears mid-read).
* :meth:`StorageServer.expire_tokens` -- revoke every token issued so far (they "expire"), or do it
  automatically after N authenticated reads with ``expire_tokens(after_reads=N)``.
* ``requests`` -- a log of (host, path, range, status) for assertions.

API proxy: with :meth:`StorageServer.set_api_target` (e.g. the pgstac API's URL), requests under
``{url}/stac-api/`` are forwarded there (links in the answers rewritten to point back through the
proxy), so ``fail_next("/stac-api/search", (503, 429))`` makes the STAC API itself answer errors
before succeeding.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Fault:
    fragment: str
    statuses: list[int]


@dataclass
class _StorageApp:
    root: Path
    token_ttl: float = 3600.0
    requests: list = field(default_factory=list)
    tokens_issued: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._removals: dict[str, int] = {}
        self._tokens: dict[str, float] = {}  # sig -> expiry (epoch seconds)
        self._expire_after: int | None = None
        self._api_target: str | None = None
        self._public_base: str | None = None

    # ----- controls (called through /_control/{op}) ------------------------------------------
    def fail_next(self, fragment: str, statuses=(503, 429)) -> None:
        """Answer the next ``len(statuses)`` requests whose path contains ``fragment`` with them."""
        with self._lock:
            self._faults.append(_Fault(fragment, list(statuses)))

    def remove_after(self, relpath: str, n_requests: int) -> None:
        """Delete ``root/relpath`` once ``n_requests`` more requests for it were served."""
        with self._lock:
            self._removals[relpath.lstrip("/")] = n_requests

    def expire_tokens(self, after_reads: int | None = None) -> None:
        """Revoke all tokens issued so far, now or after ``after_reads`` authenticated reads."""
        with self._lock:
            if after_reads is None:
                for sig in self._tokens:
                    self._tokens[sig] = 0.0
            else:
                self._expire_after = after_reads

    def set_token_ttl(self, seconds: float) -> None:
        self.token_ttl = float(seconds)

    def set_api_target(self, target: str, public_base: str) -> None:
        """Forward ``/stac-api/...`` to ``target``; links in answers are rewritten to ``public_base``."""
        self._api_target, self._public_base = target.rstrip("/"), public_base.rstrip("/")

    def _forward(self, method: str, path: str, query: bytes, body: bytes, headers: dict) -> tuple[int, bytes, str]:
        import urllib.error
        import urllib.request

        url = self._api_target + path[len("/stac-api"):] + (("?" + query.decode()) if query else "")
        request = urllib.request.Request(url, data=body or None, method=method, headers={
            k.decode(): v.decode() for k, v in headers.items() if k.lower() in (b"content-type", b"accept")})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=30) as answer:
                status, data, ctype = answer.status, answer.read(), answer.headers.get("content-type", "")
        except urllib.error.HTTPError as err:
            status, data, ctype = err.code, err.read(), err.headers.get("content-type", "")
        data = data.replace(self._api_target.encode(), (self._public_base + "/stac-api").encode())
        return status, data, ctype

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._removals.clear()
            self._expire_after = None

    # ----- the ASGI app ----------------------------------------------------------------------
    def _issue_token(self, account: str, container: str) -> dict:
        now = dt.datetime.now(dt.timezone.utc)
        expiry = now + dt.timedelta(seconds=self.token_ttl)
        sig = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[sig] = expiry.timestamp()
            self.tokens_issued += 1
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        token = (f"st={now.strftime(fmt)}&se={expiry.strftime(fmt)}&sp=rl&sv=2024-05-04&sr=c"
                 f"&skoid={account}&sktid={container}&sig={sig}")
        return {"msft:expiry": expiry.strftime(fmt), "token": token}

    def _check_token(self, query: bytes) -> bool:
        qs = parse_qs(query.decode())
        sig = (qs.get("sig") or [None])[0]
        with self._lock:
            expiry = self._tokens.get(sig)
            if expiry is None or expiry < time.time():
                return False
            if self._expire_after is not None:
                self._expire_after -= 1
                if self._expire_after <= 0:
                    for s in self._tokens:
                        self._tokens[s] = 0.0
                    self._expire_after = None
            return True

    def build_app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        async def token(request):
            return JSONResponse(self._issue_token(request.path_params["account"], request.path_params["container"]))

        async def control(request):
            op = request.path_params["op"]
            args = await request.json() if request.method == "POST" else {}
            if op == "state":
                with self._lock:
                    return JSONResponse({"requests": self.requests, "tokens_issued": self.tokens_issued})
            getattr(self, op)(**args)
            return JSONResponse({"ok": True})

        inner = Starlette(routes=[
            Route("/_control/{op}", control, methods=["GET", "POST"]),
            Route("/api/sas/v1/token/{account}/{container}", token),
            Mount("/", StaticFiles(directory=str(self.root))),
        ])

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            path = scope["path"]
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode()
            if path.startswith("/_control/"):
                return await inner(scope, receive, send)
            if path.startswith("http://") or path.startswith("https://"):  # proxied absolute-form
                parts = urlsplit(path)
                host, path = parts.netloc, parts.path
                scope = dict(scope, path=path, raw_path=path.encode())
            rel = path.lstrip("/")
            is_api = path == "/stac-api" or path.startswith("/stac-api/")
            if not is_api and not path.startswith("/api/") and (path.endswith("/") or (self.root / rel).is_dir()):
                # no directory listings (GDAL probes them unless GDAL_DISABLE_READDIR_ON_OPEN)
                return await Response("not found", status_code=404)(scope, receive, send)
            rng = headers.get(b"range", b"").decode()
            status = None
            with self._lock:
                for fault in self._faults:
                    if fault.fragment in path and fault.statuses:
                        status = fault.statuses.pop(0)
                        break
                self._faults = [f for f in self._faults if f.statuses]
            if status is not None:
                self.requests.append((host, path, rng, status))
                extra = {"Retry-After": "0"} if status in (429, 503) else {}
                return await Response(f"injected {status}", status_code=status, headers=extra)(scope, receive, send)
            if is_api and self._api_target:
                from starlette.concurrency import run_in_threadpool
                from starlette.requests import Request

                request = Request(scope, receive)
                body = await request.body()
                code, data, ctype = await run_in_threadpool(
                    self._forward, scope["method"], path, scope.get("query_string", b""), body, headers)
                self.requests.append((host, path, rng, code))
                return await Response(data, status_code=code, media_type=ctype or None)(scope, receive, send)
            if host.endswith(".blob.core.windows.net") and not path.startswith("/api/sas"):
                if not self._check_token(scope.get("query_string", b"")):
                    self.requests.append((host, path, rng, 403))
                    body = ("<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthenticationFailed</Code>"
                            "<Message>Signature not valid in the specified time frame</Message></Error>")
                    return await Response(body, status_code=403, media_type="application/xml")(scope, receive, send)
            with self._lock:
                remaining = self._removals.get(rel)
                if remaining is not None:
                    if remaining <= 0:
                        try:
                            os.remove(self.root / rel)
                        except FileNotFoundError:
                            pass
                        del self._removals[rel]
                    else:
                        self._removals[rel] = remaining - 1
            self.requests.append((host, path, rng, 200))
            return await inner(scope, receive, send)

        return app



class StorageServer:
    """Handle on the storage server subprocess; its methods drive the fault injection."""

    def __init__(self, root: Path, token_ttl: float = 3600.0):
        self.root = Path(root)
        self.token_ttl = token_ttl
        self.port = free_port()
        self._proc = None
        import requests

        self._http = requests.Session()
        self._http.trust_env = False  # never through the test http_proxy

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sas_url(self) -> str:
        return f"{self.url}/api/sas/v1/token"

    def _post(self, op: str, **args) -> None:
        self._http.post(f"{self.url}/_control/{op}", json=args, timeout=10).raise_for_status()

    def fail_next(self, fragment: str, statuses=(503, 429)) -> None:
        """Answer the next ``len(statuses)`` requests whose path contains ``fragment`` with them."""
        self._post("fail_next", fragment=fragment, statuses=list(statuses))

    def remove_after(self, relpath: str, n_requests: int) -> None:
        """Delete ``root/relpath`` once ``n_requests`` more requests for it were served."""
        self._post("remove_after", relpath=relpath, n_requests=n_requests)

    def expire_tokens(self, after_reads: int | None = None) -> None:
        """Revoke all tokens issued so far, now or after ``after_reads`` authenticated reads."""
        self._post("expire_tokens", after_reads=after_reads)

    def clear_faults(self) -> None:
        self._post("clear_faults")

    def set_token_ttl(self, seconds: float) -> None:
        self._post("set_token_ttl", seconds=seconds)

    def set_api_target(self, target: str) -> str:
        """Proxy ``/stac-api/`` to the STAC API at ``target``; returns the proxied API's URL."""
        self._post("set_api_target", target=target, public_base=self.url)
        return f"{self.url}/stac-api"

    @property
    def requests(self) -> list:
        """Log of served requests: [host, path, range, status]."""
        return self._http.get(f"{self.url}/_control/state", timeout=10).json()["requests"]

    @property
    def tokens_issued(self) -> int:
        return self._http.get(f"{self.url}/_control/state", timeout=10).json()["tokens_issued"]

    def copy_tree(self, relpath: str, new_relpath: str) -> None:
        """Copy a file or folder under root (to give a fault test its own files)."""
        src, dst = self.root / relpath, self.root / new_relpath
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)

    def start(self) -> "StorageServer":
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
        env["PYTHONPATH"] = str(Path(__file__).parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "support.storage_server", str(self.root), str(self.port), str(self.token_ttl)],
            env=env)
        deadline = time.time() + 15
        while time.time() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError("local storage server exited at start")
            try:
                self._http.get(f"{self.url}/_control/state", timeout=1)
                return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("local storage server did not start within 15 s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except Exception:
                self._proc.kill()


def main(argv=None) -> None:
    import sys

    import uvicorn

    root, port, ttl = (argv or sys.argv[1:])[:3]
    state = _StorageApp(root=Path(root), token_ttl=float(ttl))
    uvicorn.run(state.build_app(), host="127.0.0.1", port=int(port), log_level="warning",
                access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
