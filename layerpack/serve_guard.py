"""Browser safety for `layerpack serve`: a web page must not be able to use a local server.

- Host check (DNS rebinding): a page on evil.example that re-points its name to 127.0.0.1 sends
  `Host: evil.example`; only loopback names, the bound address and `--allowed-hosts` are served
  (403 otherwise). A wildcard bind (0.0.0.0 / ::) also accepts this machine's own names and addresses.
- Origin check (cross-site requests): a browser marks every cross-site POST with `Origin`, and a
  `text/plain` POST needs no preflight, so a page could make a loopback server generate. A request
  whose Origin is neither the server's own (same host and port) nor a `--cors-origin` gets 403.
- CORS is off unless `--cors-origin` names origins (or `*`): then preflights are answered and
  responses carry Access-Control-Allow-Origin for those origins only.
A pure ASGI middleware around the app.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from urllib.parse import urlsplit

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
CORS_METHODS = "GET, POST, OPTIONS"
CORS_MAX_AGE = "600"


def _hostname(value: str) -> str | None:
    """'Host' header or origin netloc -> the lower-case host without port or brackets."""
    try:
        parts = urlsplit("//" + value)
        return (parts.hostname or "").lower() or None
    except ValueError:
        return None


def machine_names() -> set[str]:
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            names.add(str(info[4][0]).lower())
    except OSError:
        pass
    return names


def allowed_hosts(bound: str, extra: list[str] | None = None) -> set[str] | None:
    """The Host names served; None: any (`--allowed-hosts '*'`)."""
    extra = [h.strip().lower() for h in extra or [] if h.strip()]
    if "*" in extra:
        return None
    hosts = set(LOOPBACK_NAMES) | {bound.strip("[]").lower()} | set(extra)
    try:
        if ipaddress.ip_address(bound.strip("[]")).is_unspecified:
            hosts |= machine_names()
    except ValueError:
        pass
    return hosts


class BrowserGuard:
    def __init__(self, app, hosts: set[str] | None, cors_origins: list[str] | None = None):
        self.app, self.hosts = app, hosts
        self.cors = {o.rstrip("/").lower() for o in cors_origins or []}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if host is not None and self.hosts is not None and _hostname(host) not in self.hosts:
            return await self._deny(send, f"Host {host[:100]!r} is not served here (DNS rebinding guard); "
                                          f"start the server with --allowed-hosts to add it")
        origin = headers.get("origin")
        allow = None
        if origin is not None:
            o = origin.rstrip("/").lower()
            same = host is not None and urlsplit(o).netloc == host.lower()
            if "*" in self.cors or o in self.cors:
                allow = "*" if "*" in self.cors else origin
            elif not same:
                return await self._deny(send, f"cross-origin requests from {origin[:100]!r} are refused; start the "
                                              f"server with --cors-origin to allow a web page to use it")
        if allow is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            extra = [(b"access-control-allow-methods", CORS_METHODS.encode()),
                     (b"access-control-allow-headers",
                      headers.get("access-control-request-headers", "authorization, content-type").encode("latin-1")),
                     (b"access-control-max-age", CORS_MAX_AGE.encode())]
            await send({"type": "http.response.start", "status": 204, "headers": self._cors_headers(allow) + extra})
            return await send({"type": "http.response.body", "body": b""})
        if allow is None:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + self._cors_headers(allow)}
            await send(message)
        return await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _cors_headers(allow: str) -> list[tuple[bytes, bytes]]:
        return [(b"access-control-allow-origin", allow.encode("latin-1")), (b"vary", b"Origin")]

    @staticmethod
    async def _deny(send, message: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "permission_error", "param": None,
                                     "code": "forbidden"}}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
