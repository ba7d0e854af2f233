"""Adapter combinations and their fingerprints, which key vLLM's prefix cache (``cache_salt``).

KV blocks computed under an adapter must never be reused by a request with another adapter (or none),
so every steered request carries ``cache_salt = "lofit:<fingerprint>"``, where the fingerprint covers the
content hash and weight of every adapter in the request's combination. Requests with the same
combination share prefixes; a name reloaded with new content gets a new fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

SALT_PREFIX = "lofit:"
MAX_SALT_LENGTH = 128  # vLLM's limit on cache_salt
FORBIDDEN_SALT_CHARS = frozenset("@/\\\x00")


class CombinationError(ValueError):
    """A malformed request for adapters (empty, a non-finite weight, a bad name)."""


@dataclass(frozen=True)
class Combination:
    """What one request applies: adapters (by name and content hash) with weights, sorted by name."""

    parts: tuple[tuple[str, str, float], ...]  # (name, content_sha256, weight)

    @classmethod
    def of(cls, parts: dict[str, tuple[str, float]]) -> Combination:
        """From ``{name: (content_sha256, weight)}``; zero-weight entries are dropped."""
        out = []
        for name, (sha, weight) in sorted(parts.items()):
            if not name or any(c in FORBIDDEN_SALT_CHARS for c in name):
                raise CombinationError(f"invalid adapter name {name!r}")
            weight = float(weight)
            if not math.isfinite(weight):
                raise CombinationError(f"adapter {name!r}: weight must be a finite number, got {weight}")
            if weight != 0.0:
                out.append((name, sha, weight))
        if not out:
            raise CombinationError("a steered request needs at least one adapter with a non-zero weight")
        return cls(tuple(out))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.parts)

    @property
    def shas(self) -> tuple[str, ...]:
        return tuple(sha for _, sha, _ in self.parts)

    def as_list(self) -> list[list]:
        """``[[name, content_sha256, weight], ...]``: the form stamped into a request's ``extra_args``."""
        return [[name, sha, weight] for name, sha, weight in self.parts]

    @classmethod
    def from_list(cls, parts: list) -> Combination:
        """Inverse of :meth:`as_list`."""
        try:
            return cls.of({str(name): (str(sha), weight) for name, sha, weight in parts})
        except (TypeError, ValueError) as exc:
            raise CombinationError(f"malformed resolved adapter combination {parts!r}") from exc

    @property
    def fingerprint(self) -> str:
        """sha256 (hex, 32 chars) over the content hashes and weights; names do not matter."""
        content = [[sha, repr(weight)] for _, sha, weight in self.parts]
        return hashlib.sha256(json.dumps(sorted(content)).encode()).hexdigest()[:32]

    @property
    def cache_salt(self) -> str:
        return SALT_PREFIX + self.fingerprint


def combine_salt(lofit_salt: str, client_salt: str | None) -> str:
    """Join our salt with a client's own (e.g. a tenant salt), within vLLM's 128-character limit."""
    if not client_salt:
        return lofit_salt
    joined = f"{lofit_salt}:{client_salt}"
    if len(joined) <= MAX_SALT_LENGTH:
        return joined
    return f"{lofit_salt}:{hashlib.sha256(client_salt.encode()).hexdigest()[:32]}"
