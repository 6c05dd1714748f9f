"""Remote delivery: recipients grouped by destination (their domain's MX hosts, or a relay),
one SMTP transaction per group, groups in parallel.

For each group the hosts are tried in order (mx.py) until one takes the transaction. A
connection failure, or a refusal at the greeting or EHLO, moves on to the next host (RFC 5321
§5.1); once a transaction runs, its replies are final for this attempt: 2xx delivered, 4xx
deferred, 5xx failed, recipient by recipient.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from mailkube_core.addresses import split_address
from mailkube_core.queue import Claimed, Recipient, RecipientResult, RecipientStatus
from mailkube_core.routing import RoutingSnapshot
from mailkube_core.settings import WorkerSettings

from .connections import ConnectionPool
from .dsn import Action
from .mx import Host, MxLookupError, MxResolver
from .results import deferred, failed
from .smarthost import Relay, relay_for
from .smtp_client import Peer, SessionError, SmtpSession, TlsMode

log = logging.getLogger(__name__)

Recorder = Callable[[Mapping[int, RecipientResult]], Awaitable[None]]


@dataclass(frozen=True)
class Destination:
    key: str  # what the concurrency cap is keyed by: a domain, or [relay]:port
    domain: str | None  # MX delivery: the recipients' domain
    relay: Relay | None
    tls: TlsMode

    @property
    def pool_key(self) -> str:
        """Idle sessions are shared only by messages with the same TLS needs and login."""
        user = self.relay.auth[0] if self.relay and self.relay.auth else ""
        return f"{self.key}/{self.tls}/{user}"


def tls_contexts(ca_file: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(opportunistic, verified). Opportunistic TLS takes any certificate (RFC 7435: better
    than plain text, and what most MX hosts offer); where TLS is required, the certificate
    must chain to a trusted CA and name the host."""
    loose = ssl.create_default_context()
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    strict = ssl.create_default_context(cafile=ca_file)
    return loose, strict


class RemoteDelivery:
    def __init__(
        self,
        settings: WorkerSettings,
        routing: Callable[[], RoutingSnapshot],
        resolver: MxResolver,
        pool: ConnectionPool,
    ) -> None:
        self.settings = settings
        self.routing = routing
        self.resolver = resolver
        self.pool = pool
        ca = str(settings.smtp_tls_ca_file) if settings.smtp_tls_ca_file else None
        self.loose_tls, self.strict_tls = tls_contexts(ca)
        self.require_tls = {d.lower().rstrip(".") for d in settings.require_tls_domains}

    def destinations(self, claimed: Claimed, pending: list[int]) -> dict[Destination, list[int]]:
        snapshot = self.routing()
        relay = relay_for(claimed.envelope.mail_from, snapshot, self.settings)
        groups: dict[Destination, list[int]] = {}
        for index in pending:
            if relay is not None:
                destination = Destination(relay.destination, None, relay, relay.tls)
            else:
                domain = split_address(claimed.envelope.recipients[index].address)[1].lower()
                destination = Destination(domain, domain, None, self._tls_mode(claimed, domain))
            groups.setdefault(destination, []).append(index)
        return groups

    async def deliver_all(
        self, claimed: Claimed, pending: list[int], record: Recorder
    ) -> list[tuple[int, Action]]:
        """Deliver every pending recipient; returns those delivered to a host without the
        DSN extension, whose success notices (NOTIFY=SUCCESS) are ours to send as `relayed`
        (RFC 3461 §5.2.2.2; a host with it takes the duty over)."""
        groups = self.destinations(claimed, pending)
        relayed: list[tuple[int, Action]] = []

        async def one(destination: Destination, indexes: list[int]) -> None:
            try:
                results, next_hop_dsn = await self._deliver(claimed, destination, indexes)
            except Exception as exc:  # a bug must not lose the other groups' results
                log.exception("remote delivery failed", extra={"message_id": claimed.id})
                results = {i: deferred("4.3.0", f"internal error: {exc!r}") for i in indexes}
                next_hop_dsn = False
            await record(results)
            if not next_hop_dsn:
                relayed.extend((i, "relayed") for i, r in results.items()
                               if r.status is RecipientStatus.DELIVERED)  # fmt: skip

        await asyncio.gather(*(one(d, indexes) for d, indexes in groups.items()))
        return sorted(relayed)

    def _tls_mode(self, claimed: Claimed, domain: str) -> TlsMode:
        if domain in self.require_tls:
            return "required"
        sender_domain = self.routing().domain(claimed.envelope.mail_from.rpartition("@")[2])
        if sender_domain is not None and sender_domain.policy.require_tls_outbound:
            return "required"
        return "opportunistic"

    async def _deliver(
        self, claimed: Claimed, destination: Destination, indexes: list[int]
    ) -> tuple[dict[int, RecipientResult], bool]:
        """The recipients' results, and whether the host that took them offered DSN."""
        recipients = [(i, claimed.envelope.recipients[i]) for i in indexes]
        async with self.pool.slot(destination.key):
            session = self.pool.take(destination.pool_key)
            if session is not None:
                try:
                    return await self._transaction(destination, session, claimed, recipients)
                except SessionError:
                    pass  # a cached connection the peer closed meanwhile: open a new one
            try:
                peers = await self._peers(destination)
            except MxLookupError as exc:
                make = failed if exc.permanent else deferred
                return {i: make(exc.code, str(exc)) for i in indexes}, False
            last: SessionError | None = None
            for peer in self._skip_failed(peers):
                try:
                    session = await SmtpSession.open(
                        peer,
                        helo=self.settings.hostname,
                        tls=destination.tls,
                        tls_context=self.loose_tls
                        if destination.tls == "opportunistic"
                        else self.strict_tls,
                        connect_timeout=self.settings.smtp_connect_timeout.total_seconds(),
                        auth=destination.relay.auth if destination.relay else None,
                    )
                except SessionError as exc:
                    log.info("host failed", extra={"host": peer.name, "address": peer.address,
                                                   "error": str(exc)})  # fmt: skip
                    self.pool.failed(peer.address)
                    last = exc
                    continue
                self.pool.recovered(peer.address)
                try:
                    return await self._transaction(destination, session, claimed, recipients)
                except SessionError as exc:
                    failure = {
                        i: deferred(exc.code, str(exc), remote_mta=peer.name) for i in indexes
                    }
                    return failure, False
            assert last is not None
            return {
                i: deferred(last.code, str(last), smtp_code=last.smtp_code) for i in indexes
            }, False

    async def _transaction(
        self,
        destination: Destination,
        session: SmtpSession,
        claimed: Claimed,
        recipients: list[tuple[int, Recipient]],
    ) -> tuple[dict[int, RecipientResult], bool]:
        limit = session.max_size()
        if limit is not None and len(claimed.body) > limit:
            # RFC 1870 §6: do not send what the server said it will not take; 5.3.4
            self.pool.give(destination.pool_key, session)
            text = f"message of {len(claimed.body)} bytes exceeds {session.remote_mta}'s " \
                   f"limit of {limit} bytes"  # fmt: skip
            return {
                i: failed("5.3.4", text, remote_mta=session.remote_mta) for i, _ in recipients
            }, False
        if claimed.envelope.smtputf8 and not session.smtp.supports_extension("smtputf8"):
            # RFC 6531 §3.4: an SMTPUTF8 message is not downgraded; it bounces with 5.6.7
            self.pool.give(destination.pool_key, session)
            text = f"{session.remote_mta} does not support SMTPUTF8"
            return {
                i: failed("5.6.7", text, remote_mta=session.remote_mta) for i, _ in recipients
            }, False
        results = await session.send(claimed.envelope, recipients, claimed.body)
        self.pool.give(destination.pool_key, session)
        return results, session.smtp.supports_extension("dsn")

    async def _peers(self, destination: Destination) -> list[Peer]:
        if destination.relay is not None:
            relay = destination.relay
            return [Peer(relay.host, relay.host, relay.port)]
        assert destination.domain is not None
        hosts: list[Host] = await self.resolver.hosts(destination.domain)
        return [Peer(h.name, h.address, self.settings.smtp_port) for h in hosts]

    def _skip_failed(self, peers: list[Peer]) -> list[Peer]:
        """Hosts that just failed go last (not away: they may be the only ones)."""
        fresh = [p for p in peers if not self.pool.recently_failed(p.address)]
        return fresh + [p for p in peers if p not in fresh]

    async def close(self) -> None:
        await self.pool.close()
