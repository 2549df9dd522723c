"""HTTP basic authentication: the standalone app's --auth / --auth-file, and the check that the app
(every route, the page's websocket too) and the API routes share.

Credentials are compared as UTF-8 bytes in constant time (``hmac.compare_digest``), against every
user, so neither a password's content nor which user exists shows in the answer's timing.
Browsers and curl send UTF-8, so non-ASCII passwords work.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from pathlib import Path

Credentials = dict[str, str]  # user -> password
CHALLENGE = b'Basic realm="Merge Lab", charset="UTF-8"'


def parse_pair(text: str, where: str) -> tuple[str, str]:
    """``USER:PASSWORD`` (the password may contain ':'); ValueError naming ``where`` otherwise."""
    user, colon, password = text.strip().partition(":")
    if not colon or not user or not password:
        raise ValueError(f"{where}: expected USER:PASSWORD")
    return user, password


def read_auth_file(path: Path) -> Credentials:
    """One ``USER:PASSWORD`` per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--auth-file {path}: cannot be read ({err})") from None
    credentials = {}
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            user, password = parse_pair(line, f"--auth-file {path}, line {number}")
            credentials[user] = password
    if not credentials:
        raise ValueError(f"--auth-file {path}: no USER:PASSWORD line")
    return credentials


def check_basic_auth(header: str | None, credentials: Credentials) -> bool:
    """True when an ``Authorization: Basic ...`` header names one of the users with its password."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, colon, password = base64.b64decode(token.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    matched = False
    for known_user, known_password in credentials.items():
        same_user = hmac.compare_digest(user, known_user.encode())
        same_password = hmac.compare_digest(password, known_password.encode())
        matched |= same_user and same_password and bool(colon)
    return matched


class BasicAuthMiddleware:
    """ASGI middleware: every HTTP request and websocket of the wrapped app needs the credentials.

    Wrapping the whole app (gradio's page, its queue websocket, its file route and the API) leaves
    no route behind; a browser asks for the login once and sends it with each request after.
    """

    def __init__(self, app, credentials: Credentials, internal_token: str = ""):
        self.app = app
        self.credentials = credentials
        # gradio 3's queue runs each job by calling the app's own predict route with a secret
        # "Bearer" token of its own: that call is the server's, not a client's.
        self.internal = f"Bearer {internal_token}".encode() if internal_token else b""

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        internal = bool(self.internal) and hmac.compare_digest(header, self.internal)
        if internal or check_basic_auth(header.decode("latin-1"), self.credentials):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: the handshake gets a 403
            return None
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"www-authenticate", CHALLENGE), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"detail":"Incorrect username or password"}'})
        return None
