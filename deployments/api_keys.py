"""Client API keys of the HTTP and gRPC ingress.

Keys come from the config (`ingress.api_keys`) and from PDSERVE_API_KEYS (comma-separated),
which is how the Helm chart hands over its Secret. Only SHA-256 digests are kept, and a key
presented is compared with every digest in constant time: neither the time an answer takes
nor a dump of this object tells anything about a key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

ENV_VAR = "PDSERVE_API_KEYS"


class ApiKeys:
    """The keys a client may present; none configured admits every client."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(k) for k in {k.strip() for k in keys} if k]

    @classmethod
    def from_sources(cls, configured: Iterable[str], env_value: str) -> ApiKeys:
        """The configured keys plus those listed (comma-separated) in the environment variable's value."""
        return cls([*configured, *env_value.split(",")])

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def admits(self, presented: str | None) -> bool:
        if not self._digests:
            return True
        if not presented:
            return False
        digest = _digest(presented)
        found = False
        for known in self._digests:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(digest, known)
        return found

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer <key>` value; None for a missing or other scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
