"""Prometheus metrics shared by every layer.

Defined in one leaf module so that storage, the token cache and the Graph client can count what they do without
importing each other. The exposition (``/metrics``) lives with the daemon; here are only the instruments.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
GRAPH_REQUESTS = Counter(
    "graphsync_graph_requests_total",
    "Microsoft Graph responses by HTTP status (or 'error' when no response came).",
    ["status"],
)
JOB_RUNS = Counter(
    "graphsync_job_runs_total",
    "Job runs by result (ok, failed, skipped, busy, stopped).",
    ["tenant", "job", "result"],
)
JOB_DURATION = Histogram(
    "graphsync_job_run_duration_seconds",
    "Duration of job runs that did work.",
    ["tenant", "job"],
    buckets=(1, 5, 15, 60, 300, 900, 3600),
)
OBJECTS_SYNCED = Counter(
    "graphsync_objects_synced_total",
    "Records received from Graph and applied to snapshots.",
    ["tenant", "job"],
)
JOB_LAST_SUCCESS = Gauge(
    "graphsync_job_last_success_timestamp_seconds",
    "Unix time of the job's last successful run: set by a success on this replica, and from state.json (the "
    "fleet's last success) whenever this replica takes the job's lock, so that it survives restarts.",
    ["tenant", "job"],
)
GRAPH_THROTTLED = Counter(
    "graphsync_graph_throttled_retries_total",
    "Graph responses (429, 503, 504) waited out and retried, honouring Retry-After.",
    ["status"],
)
RECONCILE_DRIFT = Gauge(
    "graphsync_reconcile_drift_objects",
    "Drift the last reconciliation found between a delta job's snapshot and a full round, by kind (missing, extra, "
    "different objects; member_missing, member_extra links); corrected by that round. Set by a reconciliation on "
    "this replica, and from state.json whenever this replica takes the job's lock.",
    ["tenant", "job", "kind"],
)
RECONCILE_LAST = Gauge(
    "graphsync_reconcile_last_timestamp_seconds",
    "Unix time of the reconciliation graphsync_reconcile_drift_objects describes: alert on the replica with the "
    "latest one, since another replica's gauge may hold an older reconciliation.",
    ["tenant", "job"],
)
TABLE_COMMITS = Counter(
    "graphsync_table_commits_total",
    "Commits to the Delta Lake tables ([output] tables = true), by table.",
    ["table"],
)
TABLE_CONFLICTS_RETRIED = Counter(
    "graphsync_table_conflicts_retried_total",
    "Table commits that met a concurrent commit (another replica or tenant) and were tried again, by table.",
    ["table"],
)
TABLE_BYTES_WRITTEN = Counter(
    "graphsync_table_bytes_written_total",
    "Bytes of data files the table commits added (data and change data files), by table.",
    ["table"],
)
NOTIFICATIONS_RECEIVED = Counter(
    "graphsync_notifications_received_total",
    "Graph notifications accepted (clientState verified), by kind: change, or the lifecycle event "
    "(reauthorizationRequired, subscriptionRemoved, missed).",
    ["tenant", "job", "kind"],
)
NOTIFICATIONS_REJECTED = Counter(
    "graphsync_notifications_rejected_total",
    "Requests to the notification endpoint refused without effect, by reason (client_state, unknown_subscription, "
    "malformed, too_large, validation, method, path).",
    ["reason"],
)
NOTIFICATION_LAST = Gauge(
    "graphsync_notification_last_timestamp_seconds",
    "Unix time of the last notification this replica accepted for the job's subscription.",
    ["tenant", "job"],
)
NOTIFICATION_DELAY = Histogram(
    "graphsync_notification_round_delay_seconds",
    "From a change notification's arrival at this replica to the end of the round that served it (a round here, "
    "or one another replica started after the notification came).",
    ["tenant", "job"],
    buckets=(1, 2, 5, 10, 30, 60, 300, 900),
)
SUBSCRIPTION_OPERATIONS = Counter(
    "graphsync_subscription_operations_total",
    "Graph subscription calls by operation (create, renew, delete) and result (ok, failed).",
    ["tenant", "job", "operation", "result"],
)
SUBSCRIPTION_EXPIRY = Gauge(
    "graphsync_subscription_expiration_timestamp_seconds",
    "Unix time at which the job's Graph subscription expires, as this replica last read or renewed it (every "
    "replica reads the tenant's subscription record each check_every).",
    ["tenant", "job"],
)
SUBSCRIPTION_FAILING = Gauge(
    "graphsync_subscription_failing",
    "1 while the tenant's subscription record holds an error for the job (its last create or renew failed), else "
    "0; as this replica last read or wrote the record.",
    ["tenant", "job"],
)
SUBSCRIPTION_RENEW_BEFORE = Gauge(
    "graphsync_subscription_renew_before_seconds",
    "[notifications] renew_before: how long before expiry a subscription is renewed. A subscription with less than "
    "half of it left is overdue.",
)
ROUNDS_WITH_CHANGES = Counter(
    "graphsync_job_rounds_with_changes_total",
    "Successful rounds that found at least one change, full rounds (first, resync, reconciliation) not counted: "
    "how busy a tenant's directory is, whether notifications or the schedule started the rounds.",
    ["tenant", "job"],
)
