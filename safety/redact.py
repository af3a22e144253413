"""Redaction of credentials before anything is printed or persisted.

Secrets reach our outputs through URLs a user configures (`api_url: http://user:pass@host`, a
`?api_key=` or `token=` query parameter) and through error messages that name such a URL. One function,
`redact`, removes them from a string; `redact_value` walks a JSON-like structure (a manifest, a stage
record, a config) and redacts every string in it and every value under a secret-named key.

What is kept is enough to recognise the server (scheme, host, port, path); what is removed never comes
back, so a redacted config is for showing, never for running: fingerprints hash the real value.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# Query parameters and mapping keys whose value is a credential.
_SECRET_NAMES = r"(?:api[_-]?key|apikey|access[_-]?token|auth[_-]?token|token|secret|client[_-]?secret|password|passwd|pwd|signature|sig|credentials?)"
_SECRET_KEY = re.compile(rf"^(?:[\w-]*[_-])?{_SECRET_NAMES}$", re.IGNORECASE)

# `scheme://userinfo@host`: the userinfo (user, password or a token) goes entirely.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^\s/?#@]+)@")
# `user:password@host` without a scheme (a Redis or database host written by hand).
_BARE_USERINFO = re.compile(r"(?P<lead>^|[\s'\"(=,])(?P<userinfo>[^\s/?#@:'\"]+:[^\s/?#@'\"]+)@(?=[\w.\[-])")
# `?api_key=...` / `&token=...` in a URL or a message quoting one.
_QUERY_SECRET = re.compile(rf"(?P<key>[?&;]{_SECRET_NAMES}=)(?P<value>[^&#\s'\"]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials in any URL it contains replaced by ***."""
    if not isinstance(text, str) or not text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _BARE_USERINFO.sub(lambda m: f"{m['lead']}{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)


def is_secret_key(key: str) -> bool:
    """A mapping key whose value is a credential (`api_key`, `password`, `hf_token`, ...)."""
    return isinstance(key, str) and bool(_SECRET_KEY.match(key))


def redact_value(value: Any) -> Any:
    """A copy of a JSON-like value with every string redacted and secret-named keys' values masked.

    Key names that merely point at a secret (`api_key_env: ARGILLA_API_KEY`) are not secrets and stay."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            key: (MASK if is_secret_key(key) and isinstance(item, str) and item else redact_value(item))
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_value(item) for item in value]
    return value
