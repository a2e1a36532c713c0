"""Credentials out of text: what lrsearch shows, logs or writes never holds a tracking login."""

from __future__ import annotations

import re

__all__ = ["redact_uri"]

_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^/\s@:]*)(?::[^/\s]*)?@", re.I)


def redact_uri(text: str) -> str:
    """``text`` (a URI, or a message holding URIs) without the credentials of ``scheme://user:pw@host``.

    The password always goes; so does an HTTP URI's whole user part (it may be a token). A database
    URI keeps its user (``postgresql://mlflow@db/mlflow``: the password then comes from ``PGPASSWORD``).
    What is left still connects when the credentials are in the environment.

    Example:
        >>> redact_uri("http://alice:s3cret@mlflow:5000")
        'http://mlflow:5000'
    """

    def strip(match: re.Match) -> str:
        if match["scheme"].lower().startswith("http") or not match["user"]:
            return match["scheme"]
        return f"{match['scheme']}{match['user']}@"

    return _USERINFO.sub(strip, text)
