"""Who is asking and what exactly: the caller's tenant, and a request body's fingerprint.

A tenant is the identity of an API key (a hash, never the key itself), or one anonymous tenant when the
deployment has no keys. Idempotency keys and a request's events are scoped to it.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel

ANONYMOUS = "anonymous"


def tenant_of(api_key: str | None) -> str:
    if api_key is None:
        return ANONYMOUS
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:32]


def fingerprint(route: str, body: BaseModel) -> str:
    """The same request, however its JSON was spelled (key order, spacing, defaults written out or not)."""
    canonical = json.dumps({"route": route, "body": body.model_dump(mode="json")}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
