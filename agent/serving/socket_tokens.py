"""Per-user tokens: what proves to ``/v1/ws`` (and ``/v1/items``) which user a client is.

Format, so that an app's backend can mint tokens in any language::

    v1.<user>.<expires>.<signature>

- ``user``: the user id's UTF-8 bytes in URL-safe base64 without padding;
- ``expires``: when the token stops being accepted, in whole seconds since the Unix epoch
  (decimal digits);
- ``signature``: HMAC-SHA256, keyed by the UTF-8 bytes of ``token_secret``, over the text
  ``v1.<user>.<expires>`` (the token up to its last dot), in URL-safe base64 without padding.

Every part is made of ``A-Z a-z 0-9 - _`` and the dots between them, so a token goes in a URL's
query (``?token=``) and in an ``Authorization: Bearer`` header as it is. The secret comes from
``RECSYS_TOKEN_SECRET``; when none is set the agent generates one and keeps it in its data dir
(:data:`SECRET_FILE`, readable by its owner only), which ``recsys-agent token`` reads too.
Several agents that serve the same users share one secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from agent.config import Settings

log = logging.getLogger(__name__)

VERSION = "v1"
SECRET_FILE = "token-secret"
# A token lives a month at most: a leaked one stops working by itself.
MAX_TTL_S = 30 * 86_400
MIN_SECRET_LENGTH = 32


class TokenRefused(Exception):
    """A token that is not accepted; the text says why, without quoting the token."""


@dataclass(frozen=True, slots=True)
class UserToken:
    user_id: str
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    # b64decode ignores characters outside the alphabet unless told to validate: a token with
    # junk in it must be refused, not read as some other token
    if not text or any(c not in _ALPHABET for c in text):
        raise ValueError("not URL-safe base64")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class TokenSigner:
    """Mints and checks tokens with one secret."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode("utf-8")

    def __repr__(self) -> str:
        return "TokenSigner(***)"

    def _signature(self, signed: str) -> str:
        return _b64(hmac.new(self._key, signed.encode("ascii"), hashlib.sha256).digest())

    def mint(self, user_id: str, ttl_s: int, now: float | None = None) -> tuple[str, int]:
        """A token for ``user_id`` that expires ``ttl_s`` seconds from ``now``; and that expiry."""
        check_ttl(ttl_s)
        if not user_id:
            raise ValueError("the user id must not be empty")
        expires = int(now if now is not None else time.time()) + ttl_s
        signed = f"{VERSION}.{_b64(user_id.encode('utf-8'))}.{expires}"
        return f"{signed}.{self._signature(signed)}", expires

    def verify(self, token: str, now: float | None = None) -> UserToken:
        """The user and expiry of a valid token; TokenRefused saying why otherwise."""
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != VERSION:
            raise TokenRefused(f"the token is not a user token (expected {VERSION}.<user>.<expires>.<signature>)")
        _, user_part, expires_part, signature = parts
        signed = token[: -len(signature) - 1]
        # the signature is checked first, in constant time: nothing else of a forged token is read
        if not signature or not hmac.compare_digest(signature.encode("ascii", "replace"), self._signature_of(signed)):
            raise TokenRefused("the token's signature is not valid")
        try:
            user_id = _unb64(user_part).decode("utf-8")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise TokenRefused("the token's user part is not valid") from None
        if not expires_part.isascii() or not expires_part.isdigit():
            raise TokenRefused("the token's expiry is not valid")
        expires = int(expires_part)
        if expires <= (now if now is not None else time.time()):
            raise TokenRefused("the token has expired")
        return UserToken(user_id=user_id, expires_at=expires)

    def _signature_of(self, signed: str) -> bytes:
        try:
            return self._signature(signed).encode("ascii")
        except UnicodeEncodeError:
            # a non-ASCII token was not made here; compared against a value it cannot match
            return b"-"


SIGNER = web.AppKey("token_signer", TokenSigner)


def check_ttl(ttl_s: int) -> None:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be a whole number of seconds between 1 and {MAX_TTL_S}")


def token_secret(settings: Settings) -> str:
    """The secret tokens are signed with: ``token_secret``, else the data dir's, made on first use."""
    if settings.token_secret:
        return settings.token_secret
    path = settings.data_dir / SECRET_FILE
    with suppress(FileNotFoundError):  # none yet: this start makes it
        return _read_secret(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    try:
        # a link, not a rename: of two processes making the secret at once, the first wins
        # and both then sign with it
        os.link(candidate, path)
    except FileExistsError:
        log.debug("another process made the token secret first: using theirs")
    finally:
        candidate.unlink()
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    secret = path.read_text(encoding="ascii").strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"the token secret in {path} is shorter than {MIN_SECRET_LENGTH} characters")
    return secret


def bearer_or_query_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token a request presents: ``?token=`` (browsers cannot set a socket's headers) or
    ``Authorization: Bearer``."""
    if query_token:
        return query_token
    scheme, _, value = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None
