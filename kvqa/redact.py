"""Credentials out of everything that is shown, logged, cached by name or published.

A config can carry secrets in three places, none of which pydantic marks as secret: a URL's userinfo
(`base_url: http://user:pass@host/v1`), a secret query parameter (`?api_key=...`, `?token=...`, Azure's
`sig=...`), and a value under a secret-looking key of a free-form dict (`extra_body: {api_key: ...}`,
`vllm_engine: {hf_token: ...}`). These functions find them by name, so one rule serves the release card,
error messages and the LLM cache's endpoint key.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit


REDACTED = "<redacted>"

# A name is secret when one of its words is one of these ...
_SECRET_WORDS = {"apikey", "secret", "password", "passwd", "authorization", "bearer", "credential",
                 "credentials", "cookie"}
# ... or when it ends with one of these (`api_key`, `hf_token`, `x-api-key`; not `max_tokens`, `top_k`,
# `stop_token_ids`, `tokenizer`).
_SECRET_LAST_WORDS = {"key", "token", "auth", "pwd", "sig", "signature"}


def is_secret_name(name: str) -> bool:
    """Whether a field, header or query parameter of this name holds a credential."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    words = [w for w in words if w]
    return bool(words) and (bool(_SECRET_WORDS.intersection(words)) or words[-1] in _SECRET_LAST_WORDS)


def _redact_params(text: str, replacement: str | None) -> str:
    """`a=1&api_key=x` -> `a=1&api_key=<redacted>` (or the pair dropped); other pairs kept byte for byte."""
    kept = []
    for pair in text.split("&"):
        name = unquote(pair.split("=", 1)[0])
        if pair and is_secret_name(name):
            if replacement is not None:
                kept.append(f"{pair.split('=', 1)[0]}={replacement}")
        else:
            kept.append(pair)
    return "&".join(kept)


def redact_url(url: str, replacement: str | None = REDACTED) -> str:
    """The URL with its userinfo and secret query/fragment parameters replaced, or dropped when
    `replacement` is None. Strings that are not URLs with a host come back unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = host if "@" not in parts.netloc or replacement is None else f"{replacement}@{host}"
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, _redact_params(parts.query, replacement),
                                  _redact_params(parts.fragment, replacement)))


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with every secret replaced by `<redacted>`: values under secret-looking
    keys (whatever their type) and the credentials inside URL strings."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and is_secret_name(k) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value
