"""Microsoft Graph client: paging, delta rounds, throttling and token refresh, one page in memory at a time.

Retries on 429/503/504 (with ``Retry-After`` in seconds or as an HTTP date) come from urllib3's ``Retry`` on a
pooled session; this module adds only what Graph needs beyond HTTP: a fresh token on 401 (once), the signals
that a delta token is dead, and errors that carry the ids a support case needs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import quote, urlsplit

import requests
from urllib3.connectionpool import ConnectionPool
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from graphsync.identity import retrying_session
from graphsync.jsoncodec import loads
from graphsync.metrics import GRAPH_REQUESTS, GRAPH_THROTTLED
from graphsync.text import first_line
from graphsync.tokencache import AccessToken

log = logging.getLogger(__name__)

THROTTLE_STATUSES = (429, 503, 504)
RESYNC_CODES = {"syncstatenotfound", "resyncrequired", "syncstateinvalid"}
# What Graph answers a tenant without the licence a collection needs (sign-ins, registration details: P1/P2; PIM:
# P2/Governance): "Neither tenant is B2C or tenant doesn't have premium license", or AadPremiumLicenseRequired.
LICENCE_CODES = {"authentication_requestfromnonpremiumtenantorb2ctenant", "aadpremiumlicenserequired"}


class _ThrottleAwareRetry(Retry):
    """urllib3's Retry, counting and logging each throttled response it is about to wait out."""

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        if response is not None and response.status in THROTTLE_STATUSES:
            GRAPH_THROTTLED.labels(str(response.status)).inc()
            log.warning(
                "Graph answered %s (Retry-After: %s) for %s; retrying",
                response.status,
                response.headers.get("Retry-After", "-"),
                _path(url or ""),
            )
        return super().increment(method, url, response, error, _pool, _stacktrace)


class TokenSource(Protocol):
    def acquire(self, tenant: str, *, rejected: str | None = None) -> AccessToken: ...


class GraphError(Exception):
    """A Graph call failed; the message names the URL path, status, Graph error code and request ids."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ResyncRequired(GraphError):
    """The delta token is expired or invalid: the only way forward is a full resync."""


class LicenceRequired(GraphError):
    """The tenant lacks the licence the collection needs: no retry or resync helps, only a licence."""


class MalformedResponse(GraphError):
    """The response is not the JSON collection page Graph promises."""


@dataclass(frozen=True)
class Page:
    objects: list[dict[str, Any]]
    next_link: str | None
    delta_link: str | None


class GraphClient:
    def __init__(
        self,
        endpoint: str,
        api_version: str,
        tokens: TokenSource,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = f"{endpoint.rstrip('/')}/{api_version}"
        self._tokens = tokens
        self._timeout = timeout
        self._session = session or retrying_session(
            total=max_retries, statuses=THROTTLE_STATUSES, backoff=1.0, retry_class=_ThrottleAwareRetry
        )

    def collection_url(
        self,
        resource: str,
        *,
        select: list[str] | None = None,
        expand: list[str] | None = None,
        delta: bool = False,
        top: int | None = None,
        filter_expression: str | None = None,
        orderby: str | None = None,
    ) -> str:
        url = f"{self.base_url}/{resource}{'/delta' if delta else ''}"
        query = []
        if select:
            query.append("$select=" + ",".join(select))
        if expand:
            query.append("$expand=" + ",".join(expand))
        if filter_expression:
            query.append("$filter=" + quote(filter_expression, safe=":"))
        if orderby:
            query.append("$orderby=" + quote(orderby))
        if top is not None:
            query.append(f"$top={top}")
        return url + ("?" + "&".join(query) if query else "")

    def pages(self, tenant: str, url: str, *, minimal: bool = False) -> Iterator[Page]:
        """Follow ``@odata.nextLink`` from ``url`` verbatim until a page without one (delta: with a deltaLink).

        ``minimal`` sends ``Prefer: return=minimal`` (delta-link rounds: updated objects carry only changed
        properties). A generator, so the caller can stop between pages and only one page is ever in memory.
        """
        next_url: str | None = url
        while next_url is not None:
            body = self.get_json(tenant, next_url, minimal=minimal)
            objects = body.get("value")
            if not isinstance(objects, list):
                raise MalformedResponse(f"GET {_path(next_url)}: the response has no 'value' array")
            page = Page(objects, body.get("@odata.nextLink"), body.get("@odata.deltaLink"))
            if page.next_link == next_url:  # following it would loop forever while holding the job lock
                raise MalformedResponse(f"GET {_path(next_url)}: the @odata.nextLink points at the same page")
            yield page
            next_url = page.next_link

    def singleton(self, tenant: str, url: str, key: str) -> Iterator[Page]:
        """A single object (``policies/adminConsentRequestPolicy``) as a page of one, under the id ``key``: such an
        object answers itself, with no ``value`` and no paging, and may carry no ``id`` of its own."""
        body = self.get_json(tenant, url)
        yield Page([{**{k: v for k, v in body.items() if not k.startswith("@odata.")}, "id": key}], None, None)

    def get_json(self, tenant: str, url: str, *, minimal: bool = False) -> dict[str, Any]:
        """GET ``url`` with a token for ``tenant``; on 401 get a fresh token once and try again."""
        response = self._authorized(tenant, "GET", url, minimal=minimal)
        if response.status_code != 200:
            raise self._error("GET", url, response)
        body = self._json(url, response)
        if body is None:
            raise MalformedResponse(f"GET {_path(url)}: response is not a JSON object; {_ids(response)}")
        return body

    def send(self, tenant: str, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """A write (``POST``, ``PATCH``, ``DELETE``: subscriptions) with the token handling of :meth:`get_json`.

        Returns the JSON object answered, or ``None`` for an empty answer (204); any other status than 2xx raises
        :class:`GraphError` with the status, so that a caller can tell a 404 (gone) from a failure.
        """
        response = self._authorized(tenant, method, url, body=body)
        if not 200 <= response.status_code < 300:
            raise self._error(method, url, response)
        return self._json(url, response, method=method) if response.content else None

    def _authorized(
        self, tenant: str, method: str, url: str, *, minimal: bool = False, body: dict[str, Any] | None = None
    ) -> requests.Response:
        token = self._tokens.acquire(tenant)
        response = self._send(method, url, token.token, minimal=minimal, body=body)
        if response.status_code == 401:
            log.info(
                "Graph rejected the access token for tenant %s (401); getting a fresh one",
                tenant,
                extra={"tenant": tenant},
            )
            token = self._tokens.acquire(tenant, rejected=token.token)
            response = self._send(method, url, token.token, minimal=minimal, body=body)
        return response

    @staticmethod
    def _json(url: str, response: requests.Response, *, method: str = "GET") -> dict[str, Any] | None:
        """The response's JSON object; ``None`` if it is JSON but not an object; MalformedResponse if not JSON."""
        try:
            body = loads(response.content)
        except ValueError as exc:  # json.JSONDecodeError and orjson.JSONDecodeError are ValueErrors
            raise MalformedResponse(
                f"{method} {_path(url)}: response is not valid JSON ({exc.__class__.__name__}); {_ids(response)}"
            ) from None
        return body if isinstance(body, dict) else None

    def _send(
        self, method: str, url: str, token: str, *, minimal: bool, body: dict[str, Any] | None
    ) -> requests.Response:
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "client-request-id": str(uuid.uuid4()),
            "return-client-request-id": "true",
            "x-ms-throttle-priority": "low",  # background work: let interactive traffic go first
        }
        if minimal:
            headers["Prefer"] = "return=minimal"
        try:
            response = self._session.request(method, url, headers=headers, json=body, timeout=self._timeout)
        except requests.RequestException as exc:
            GRAPH_REQUESTS.labels("error").inc()
            raise GraphError(
                f"{method} {_path(url)}: {type(exc).__name__} (client-request-id {headers['client-request-id']})"
            ) from None
        GRAPH_REQUESTS.labels(str(response.status_code)).inc()
        return response

    def _error(self, method: str, url: str, response: requests.Response) -> GraphError:
        code, message = _graph_error(response)
        text = f"{method} {_path(url)}: HTTP {response.status_code} {code or ''}: {message}; {_ids(response)}"
        log.warning(
            "Graph call failed: %s",
            text,
            extra={
                "request_id": response.headers.get("request-id"),
                "client_request_id": response.request.headers.get("client-request-id"),
            },
        )
        resync = response.status_code == 410 or (response.status_code == 400 and (code or "").lower() in RESYNC_CODES)
        licence = response.status_code in (400, 403) and (
            (code or "").lower() in LICENCE_CODES or "premium license" in message.lower()
        )
        kind = ResyncRequired if resync else LicenceRequired if licence else GraphError
        return kind(text, status=response.status_code, code=code)


def _graph_error(response: requests.Response) -> tuple[str | None, str]:
    try:
        error = response.json().get("error") or {}
        return error.get("code"), first_line(error.get("message") or "")
    except (ValueError, AttributeError):
        return None, (response.reason or "")


def _ids(response: requests.Response) -> str:
    """The identifiers Microsoft support asks for: request-id, client-request-id and x-ms-ags-diagnostic."""
    headers = response.headers
    client_request_id = headers.get("client-request-id") or response.request.headers.get("client-request-id")
    parts = [f"request-id {headers.get('request-id', '-')}", f"client-request-id {client_request_id or '-'}"]
    if diagnostic := headers.get("x-ms-ags-diagnostic"):
        parts.append(f"x-ms-ags-diagnostic {diagnostic}")
    return ", ".join(parts)


def _path(url: str) -> str:
    """The URL path only: skip tokens and delta tokens in the query string are opaque and can be long."""
    return urlsplit(url).path
