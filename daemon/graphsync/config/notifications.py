"""[notifications]: Graph change notifications that start a delta round early (see graphsync.notify).

Graph calls ``notification_url`` (public HTTPS, TLS ended at an ingress) and the ingress forwards to ``host:port``
on each replica, so the two are configured apart. Graph validates both URLs when a subscription is created, and a
subscription of a directory resource lives at most 41,760 minutes (just under 29 days): the lifetime and the renewal
margin are checked against that here, so a configuration that loads keeps its subscriptions alive.
"""

from typing import Annotated, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveFloat, model_validator

from graphsync.config.errors import Loc, key_errors
from graphsync.config.fields import NonEmptyStr
from graphsync.schedule import check_interval, interval_seconds

# Graph's maximum lifetime of a subscription to users, groups and other directory resources.
MAX_LIFETIME_SECONDS = 41760 * 60
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _notification_url(value: str) -> str:
    """HTTPS, as Graph requires; plain HTTP only on loopback, where a local test double of Graph calls it."""
    parts = urlsplit(value)
    if not parts.hostname or parts.query or parts.fragment:
        raise ValueError(
            "expected an absolute URL without query or fragment, e.g. https://graphsync.example.com/notify"
        )
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS):
        raise ValueError("expected an https:// URL: Graph delivers notifications over HTTPS only")
    return value.rstrip("/")


NotificationUrl = Annotated[str, AfterValidator(_notification_url)]


class NotificationSettings(BaseModel):
    """[notifications]: the endpoint Graph posts change notifications to, and how subscriptions are kept."""

    model_config = ConfigDict(extra="forbid")

    notification_url: NotificationUrl
    # Defaults beside notification_url (<notification_url>/lifecycle); Graph accepts the same URL for both too.
    lifecycle_url: NotificationUrl | None = None
    host: NonEmptyStr = "0.0.0.0"  # behind an ingress: the pod's address must be reachable
    port: Annotated[int, Field(ge=1, le=65535)] = 8090
    # What a subscription is created or renewed for, and how long before its expiry it is renewed.
    lifetime: Annotated[str, AfterValidator(check_interval)] = "29d"
    renew_before: Annotated[str, AfterValidator(check_interval)] = "3d"
    # How often the fleet looks after each tenant's subscriptions (one replica per slot).
    check_every: Annotated[str, AfterValidator(check_interval)] = "5m"
    # A notification's round starts this long after it arrived: a burst in that window makes one round.
    debounce_seconds: PositiveFloat = 1.0
    max_body_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 1024 * 1024

    @model_validator(mode="after")
    def _check_lifetimes(self) -> Self:
        """Renewal must come well inside the lifetime, and maintenance often enough to renew in time."""
        problems: list[tuple[Loc, str]] = []
        lifetime, margin = interval_seconds(self.lifetime), interval_seconds(self.renew_before)
        if lifetime > MAX_LIFETIME_SECONDS:
            problems.append((("lifetime",), "is longer than Graph allows for directory resources (41760m, 29 days)"))
        if margin >= lifetime:
            problems.append((("renew_before",), "must be shorter than notifications.lifetime"))
        elif interval_seconds(self.check_every) * 2 > margin:
            problems.append(
                (("check_every",), "must be at most half of notifications.renew_before, so two checks can renew")
            )
        if self.lifecycle_url is None:
            self.lifecycle_url = f"{self.notification_url}/lifecycle"
        if problems:
            raise key_errors(problems)
        return self

    @property
    def lifetime_seconds(self) -> int:
        return interval_seconds(self.lifetime)

    @property
    def renew_before_seconds(self) -> int:
        return interval_seconds(self.renew_before)

    @property
    def check_seconds(self) -> int:
        return interval_seconds(self.check_every)

    @property
    def lifecycle(self) -> str:
        """lifecycle_url as filled in by validation."""
        assert self.lifecycle_url is not None
        return self.lifecycle_url
