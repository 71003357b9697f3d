"""The API key of the catalog writes: which requests are writes, and what a request's
`Authorization` header answers to the key. Both the ASGI gate (`limits.RequestGate`,
which checks before a write's body is read) and the routes' `require_key` use it."""

import hmac

from ..errors import LookalikeError
from .errors import AuthError, WritesDisabledError

API_KEY_ENV = "LOOKALIKE_API_KEY"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_write(method: str, path: str) -> bool:
    """Whether `method path` (path without the root path) changes the catalog."""
    path = path.rstrip("/")
    return method in WRITE_METHODS and (path == "/products" or path.startswith("/products/"))


def key_problem(key: bytes | None, authorization: str | None) -> LookalikeError | None:
    """The error for a write with this `Authorization` header value, or None when the
    key is right. With no key configured, writes are disabled (403)."""
    if key is None:
        return WritesDisabledError(
            "catalog writes are disabled because no API key is configured: start the"
            f" server with {API_KEY_ENV}=<secret> in its environment and send"
            " 'Authorization: Bearer <secret>'"
        )
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return AuthError("missing API key: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(given.strip().encode("utf-8"), key):
        return AuthError("wrong API key")
    return None
