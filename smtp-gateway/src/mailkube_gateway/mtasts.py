"""The MTA-STS policy listener (`mta_sts_listen`): serves our domains' policies (RFC 8461 §3.3)
at ``/.well-known/mta-sts.txt`` by the Host header ``mta-sts.<domain>``, from the routing table.

Plain HTTP: the chart's Ingress terminates TLS with a cert-manager certificate for every
``mta-sts.<domain>`` (senders validate it under the WebPKI, §3.3) and forwards here.
"""

from __future__ import annotations

from http import HTTPStatus

from mailkube_core.addresses import normalize_domain
from mailkube_core.routing import RoutingReader, RoutingSnapshot
from mailkube_core.tinyhttp import Request, Response, TinyHTTPServer, error

POLICY_PATH = "/.well-known/mta-sts.txt"
_PREFIX = "mta-sts."
#: RFC 8461 §3.3 "text/plain"; caches may keep the policy a little, senders cache it anyway
_CACHE = (("Cache-Control", "max-age=300"),)


def policy_response(snapshot: RoutingSnapshot, request: Request) -> Response:
    """The answer to one request, a pure function of the routing table."""
    hosts = request.header("host")
    if len(hosts) != 1:  # RFC 9112 §3.2: none (in HTTP/1.1) or several is a 400
        return error(HTTPStatus.BAD_REQUEST, "exactly one Host header is required")
    if request.path != POLICY_PATH:
        return error(HTTPStatus.NOT_FOUND)
    domain = policy_domain(hosts[0])
    found = snapshot.domain(domain) if domain else None
    if found is None or found.mta_sts is None:
        return error(HTTPStatus.NOT_FOUND, "no MTA-STS policy for this host")
    return Response(HTTPStatus.OK, found.mta_sts.text().encode("ascii"), headers=_CACHE)


def policy_domain(host: str) -> str | None:
    """The domain whose policy host `host` (a Host header value, maybe with a port) is."""
    name = host.strip()
    if name.startswith("["):
        return None  # an IP literal
    name = name.rpartition(":")[0] if ":" in name else name
    if not name.lower().startswith(_PREFIX):
        return None
    try:
        return normalize_domain(name[len(_PREFIX) :])
    except ValueError:
        return None


class MtaStsServer(TinyHTTPServer):
    """Answers from `routing.snapshot` as it is at each request."""

    name = "mta-sts server"

    def __init__(self, routing: RoutingReader, *, request_timeout: float) -> None:
        super().__init__(request_timeout=request_timeout)
        self._routing = routing

    async def route(self, request: Request) -> Response:
        return policy_response(self._routing.snapshot, request)
