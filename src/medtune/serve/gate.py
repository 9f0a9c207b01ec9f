"""What `medtune serve` checks on the raw request, before FastAPI parses a byte of the body (an ASGI middleware).

- **Host** (only when no API key is set): a browser page on `evil.example` can rebind its name to 127.0.0.1 and
  reach a key-less loopback server (DNS rebinding); its requests still carry `Host: evil.example`. So, as local
  model servers do, only the names the server is bound to are served: localhost, 127.0.0.1, [::1] and the
  `--host` value (any IP literal too when bound to every interface, 0.0.0.0 or ::, since an IP literal cannot be
  rebound). Anything else is 421.
- **API key** (when set): every /v1 route wants `Authorization: Bearer <key>`; a missing or wrong one is 401
  before the body is read.
- **Body size**: a body over `max_body_bytes` (by its Content-Length, or counted as it arrives) is 413; the body
  is read into memory only up to that limit.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 32,000 prompt characters as JSON \u escapes is ~200 KB
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD = frozenset({"0.0.0.0", "::", ""})

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def host_name(header: str) -> str:
    """`Host` header -> name without port: "[::1]:8000" -> "::1", "LocalHost:80" -> "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(header: str, bound: str) -> bool:
    """Whether a request with this `Host` header may be served by a key-less server bound to `bound`."""
    name, bound = host_name(header), host_name(bound) if bound not in _WILDCARD else bound
    if name in LOOPBACK_NAMES or (name and name == bound):
        return True
    return bound in _WILDCARD and _is_ip(name)


class Gate:
    """ASGI middleware: Host check (no key), API-key check (key), body-size limit; see the module docstring."""

    def __init__(self, app, *, api_key: str | None, host: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app, self.api_key, self.host, self.max_body_bytes = app, api_key, host, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = self._refusal(scope, headers)
        if refused:
            await _error(send, *refused)
            return
        body = await self._read_body(receive, headers)
        if body is None:
            await _error(send, 413, f"the request body is over {self.max_body_bytes} bytes", "request_too_large")
            return
        await self.app(scope, _replay(body, receive), send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, str] | None:
        if self.api_key is None:
            if not host_allowed(headers.get("host", ""), self.host):
                return (421, f"this server answers only Host {_names(self.host)} when it has no API key "
                             "(set --api-key to serve other names)", "invalid_host")
            return None
        if scope.get("path", "").startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                        self.api_key.encode()):
                return 401, "missing or incorrect API key (send 'Authorization: Bearer <key>')", "invalid_api_key"
        return None

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> bytes | None:
        """The whole body, or None once it is over the limit (declared or counted)."""
        declared = headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _names(host: str) -> str:
    names = sorted(LOOPBACK_NAMES | ({host_name(host)} if host not in _WILDCARD else set()))
    return ", ".join(names) + (" or an IP address" if host in _WILDCARD else "")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the buffered body over once, then the real one (which reports the disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _error(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
