"""Prometheus metrics shared by every layer.

Defined in one leaf module so that storage, the token cache and the Graph client can count what they do without
importing each other. The exposition (``/metrics``) lives with the daemon; here are only the instruments.
"""

from __future__ import annotations

from prometheus_client import Counter

TOKEN_ACQUISITIONS = Counter(
    "graphsync_token_acquisitions_total",
    "Access tokens handed out, by where they came from (memory, blob, identity_provider).",
    ["tenant", "source"],
)
IDENTITY_PROVIDER_REQUESTS = Counter(
    "graphsync_identity_provider_requests_total",
    "Token requests sent to the identity provider, by result (ok, error).",
    ["tenant", "result"],
)
STORAGE_OPERATIONS = Counter(
    "graphsync_storage_operations_total",
    "Blob storage calls by operation (read, write, lease) and result "
    "(ok, not_modified, absent, conflict, lease_held, error).",
    ["operation", "result"],
)
