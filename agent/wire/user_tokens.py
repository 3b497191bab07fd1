"""User tokens: the subject-safe form of a user id (wire contract v1 and v2).

An id made only of ``[A-Za-z0-9_-]`` is its own token. Any other id becomes ``~`` followed by
the unpadded URL-safe base64 of its UTF-8 bytes; ``~`` never occurs in a plain token, so the
mapping is reversible and two ids never share a token.
"""

from __future__ import annotations

import base64
import re

import orjson

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
MARK = "~"


def user_token(user_id: str) -> str:
    if _PLAIN.fullmatch(user_id):
        return user_id
    encoded = base64.urlsafe_b64encode(user_id.encode("utf-8")).decode("ascii").rstrip("=")
    return MARK + encoded


def tokens_named(prefix: str, subject: str, payload: bytes) -> list[str]:
    """The tokens of the users a refused event message is about, as far as it says: the token of
    a v2 subject (``<prefix>.events.<type>.<token>``) and that of the body's ``user_id`` when the
    body is a JSON object with one. Nothing is guessed from subjects of other shapes: a dead
    letter is shown to, and erased for, only the users it names."""
    found: list[str] = []
    head = f"{prefix}.events."
    if subject.startswith(head):
        parts = subject[len(head) :].split(".")
        if len(parts) == 2 and parts[1]:
            found.append(parts[1])
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return found
    user_id = body.get("user_id") if isinstance(body, dict) else None
    if isinstance(user_id, str) and user_id and user_token(user_id) not in found:
        found.append(user_token(user_id))
    return found


def user_id_from_token(token: str) -> str:
    if not token.startswith(MARK):
        if not _PLAIN.fullmatch(token):
            raise ValueError(f"not a user token: {token!r}")
        return token
    body = token[1:]
    padded = body + "=" * (-len(body) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
