"""User tokens: the subject-safe form of a user id (wire contract v1 and v2).

An id made only of ``[A-Za-z0-9_-]`` is its own token. Any other id becomes ``~`` followed by
the unpadded URL-safe base64 of its UTF-8 bytes; ``~`` never occurs in a plain token, so the
mapping is reversible and two ids never share a token.
"""

from __future__ import annotations

import base64
import re

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
MARK = "~"


def user_token(user_id: str) -> str:
    if _PLAIN.fullmatch(user_id):
        return user_id
    encoded = base64.urlsafe_b64encode(user_id.encode("utf-8")).decode("ascii").rstrip("=")
    return MARK + encoded


def user_id_from_token(token: str) -> str:
    if not token.startswith(MARK):
        if not _PLAIN.fullmatch(token):
            raise ValueError(f"not a user token: {token!r}")
        return token
    body = token[1:]
    padded = body + "=" * (-len(body) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
