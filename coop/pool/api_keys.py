"""API keys: which institution a request spends for. The key file holds sha256 digests, never keys."""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coop.errors import InvalidInput
from coop.pool.files import read_document, secret_digest

API_KEYS_FORMAT = "coop-api-keys/1"
API_KEY_PREFIX = "coop_"


def api_key_digest(key: str) -> str:
    """What api_keys.json stores of a key, and what a key is recognised by."""
    return secret_digest(key)


@dataclass(frozen=True)
class ApiKeyRecord:
    sha256: str
    institution: str
    created_at: float
    revoked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "institution": self.institution,
            "created_at": self.created_at,
            "revoked": self.revoked,
        }


def api_keys_json(records: Sequence[ApiKeyRecord]) -> bytes:
    doc = {"format": API_KEYS_FORMAT, "keys": [r.to_dict() for r in records]}
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


class ApiKeyStore:
    """Which institution an API key spends for. Holds only sha256 digests, never keys."""

    def __init__(self, records: Sequence[ApiKeyRecord]) -> None:
        self.records: tuple[ApiKeyRecord, ...] = tuple(records)

    @classmethod
    def load(cls, path: Path | str) -> ApiKeyStore:
        path = Path(path)
        doc = read_document(path, "API key file", API_KEYS_FORMAT)
        try:
            records = [
                ApiKeyRecord(
                    sha256=str(item["sha256"]),
                    institution=str(item["institution"]),
                    created_at=float(item["created_at"]),
                    revoked=bool(item["revoked"]),
                )
                for item in doc["keys"]
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"{path} is not a valid API key file: {exc}") from exc
        return cls(records)

    def resolve(self, key: str) -> str | None:
        """The institution of a live key, or None."""
        return self.resolve_digest(api_key_digest(key))

    def resolve_digest(self, digest: str) -> str | None:
        """The institution of the live key with this digest, or None. Compares every digest in constant time."""
        found: str | None = None
        for record in self.records:
            if hmac.compare_digest(record.sha256, digest) and not record.revoked:
                found = record.institution
        return found
