from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from sidecar.quota.signins import FailedSignIns
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.keys import Keys

COOKIE = "sidecar_session"
SESSION_TTL_S = 12 * 3600


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Sessions:
    """Dashboard sign-ins. The cookie holds a random session id and its HMAC under a key
    derived from the admin token, never the token: a new token signs every session out. The
    id is also kept in Redis (by its digest) for SESSION_TTL_S, so that signing out ends the
    session on every sidecar sharing the store, and a stolen cookie with it."""

    def __init__(
        self, client: RedisClient, keys: Keys, admin_token: str, signins: FailedSignIns
    ) -> None:
        self.client = client
        self.keys = keys
        self.admin_token = admin_token
        self.signins = signins
        self._key = hmac.new(
            admin_token.encode("utf-8"), b"sidecar dashboard session v1", hashlib.sha256
        ).digest()

    async def token_valid(
        self, given: str | None, peer: str | None, headers: Mapping[str, str]
    ) -> bool:
        """`given` is the admin token; failed attempts are limited per client address (raises
        TooManyFailedSignIns)."""
        return await self.signins.verify(
            given,
            self.admin_token,
            peer=peer,
            forwarded_for=headers.get("x-forwarded-for"),
            where="dashboard",
        )

    def _mac(self, purpose: str, session_id: str) -> str:
        message = f"{purpose}\0{session_id}".encode()
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def _stored(self, session_id: str) -> str:
        return self.keys.ui_session(hashlib.sha256(session_id.encode()).hexdigest()[:32])

    async def open(self) -> str:
        """A new session; returns the cookie's value."""
        session_id = secrets.token_urlsafe(32)
        await call(self.client.set(self._stored(session_id), b"1", ex=SESSION_TTL_S))
        return f"{session_id}.{self._mac('session', session_id)}"

    async def check(self, cookie: str | None) -> str | None:
        """The session id of a valid cookie, else None."""
        if not cookie or len(cookie) > 200:
            return None
        session_id, _, mac = cookie.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", session_id).encode()):
            return None
        if not await call(self.client.exists(self._stored(session_id))):
            return None  # signed out, or expired
        return session_id

    async def close(self, session_id: str) -> None:
        await call(self.client.delete(self._stored(session_id)))

    def csrf(self, session_id: str) -> str:
        """The token every form of this session carries (a hidden field)."""
        return self._mac("csrf", session_id)

    def csrf_matches(self, session_id: str, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), self.csrf(session_id).encode()
        )


def same_origin(headers: Mapping[str, str]) -> bool:
    """A form post's Origin (else its Referer) names this host, when the browser sent one.
    A cross-site form carries the other site's; a non-browser client may send neither, and
    then the CSRF token alone decides."""
    host = (headers.get("host") or "").lower()
    for name in ("origin", "referer"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            parts = urlsplit(value)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host
    return True


def is_https(scheme: str, headers: Mapping[str, str]) -> bool:
    """The browser reached us over https (directly, or through a proxy that says so)."""
    forwarded = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return scheme == "https" or forwarded == "https"
