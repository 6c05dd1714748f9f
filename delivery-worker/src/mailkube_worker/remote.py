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
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from mailkube_core.addresses import split_address
from mailkube_core.queue import Claimed, Recipient, RecipientResult, RecipientStatus
from mailkube_core.routing import RoutingSnapshot
from mailkube_core.settings import WorkerSettings

from .connections import ConnectionPool
from .dsn import Action
from .mx import Host, MxLookupError, MxResolver
from .results import deferred, failed
from .smarthost import Relay, inbound_next_hop, relay_for
from .smtp_client import Peer, SessionError, SmtpSession, TlsMode
from .tlspolicy.decide import Refusal
from .tlspolicy.enforcer import DomainTls, TlsPolicies

log = logging.getLogger(__name__)

#: RFC 8689 §5 "TLS-Required: No" in the message header
_TLS_REQUIRED_NO = re.compile(rb"^TLS-Required:[ \t]*No[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)

Recorder = Callable[[Mapping[int, RecipientResult]], Awaitable[None]]
#: takes one destination's messages of a batch with their results, once all are known
Settler = Callable[[list[tuple[Claimed, dict[int, RecipientResult]]]], Awaitable[None]]


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
        tls_policies: TlsPolicies | None = None,
    ) -> None:
        self.settings = settings
        self.tls_policies = tls_policies
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
            domain = split_address(claimed.envelope.recipients[index].address)[1].lower()
            # a domain we relay for goes to its next hop, whoever sent it (like Postfix's
            # transport_maps, ahead of a relayhost)
            next_hop = inbound_next_hop(snapshot, domain)
            if next_hop is not None:
                destination = Destination(next_hop.destination, None, next_hop, next_hop.tls)
            elif relay is not None:
                destination = Destination(relay.destination, None, relay, relay.tls)
            else:
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

    def one_destination(self, claimed: Claimed) -> bool:
        """Whether the claim's pending recipients all go to one destination (deliver_batch
        takes only those)."""
        return len(self.destinations(claimed, claimed.pending())) == 1

    async def deliver_batch(self, batch: list[Claimed], settle: Settler) -> None:
        """Claims each of whose pending recipients go to one destination (`one_destination`),
        grouped by it: each destination's messages go over up to `destination_concurrency`
        sessions, one transaction after another on each (sessions kept in the pool for the
        next batch), and are handed to `settle` together once all their results are known,
        so one slow destination holds back only its own messages."""
        groups: dict[Destination, list[tuple[Claimed, list[int]]]] = {}
        for claimed in batch:
            ((destination, indexes),) = self.destinations(claimed, claimed.pending()).items()
            groups.setdefault(destination, []).append((claimed, indexes))

        async def one_destination(destination: Destination,
                                  jobs: list[tuple[Claimed, list[int]]]) -> None:  # fmt: skip
            results: list[dict[int, RecipientResult]] = [{} for _ in jobs]
            todo = iter(range(len(jobs)))

            async def session_lane() -> None:
                for n in todo:  # shared: each job is taken by one lane
                    claimed, indexes = jobs[n]
                    try:
                        results[n], _ = await self._deliver(claimed, destination, indexes)
                    except Exception as exc:  # a bug must not lose the other jobs' results
                        log.exception("remote delivery failed", extra={"message_id": claimed.id})
                        results[n] = {i: deferred("4.3.0", f"internal error: {exc!r}")
                                      for i in indexes}  # fmt: skip

            lanes = min(self.pool.per_destination, len(jobs))
            await asyncio.gather(*(session_lane() for _ in range(lanes)))
            await settle([(claimed, results[n]) for n, (claimed, _) in enumerate(jobs)])

        outcomes = await asyncio.gather(
            *(one_destination(d, jobs) for d, jobs in groups.items()), return_exceptions=True
        )
        for outcome in outcomes:  # raised once every destination is done with its sessions
            if isinstance(outcome, BaseException):
                raise outcome

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
        requiretls = claimed.envelope.requiretls
        async with self.pool.slot(destination.key):
            # a REQUIRETLS message only over a session opened and checked for it
            session = None if requiretls else self.pool.take(destination.pool_key)
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
            policies = await self._tls_policies(destination, claimed)
            last: SessionError | None = None
            temporary: SessionError | None = None
            for peer in self._skip_failed(peers):
                # MTA-STS / DANE (tlspolicy/): the host's policy, then the session judged by it
                host = await policies.host(peer.name) if policies is not None else None
                if isinstance(host, Refusal):
                    assert policies is not None
                    await policies.report(host, peer.name, peer.address, host.result_type)
                    last = _policy_error(f"{peer.name}: {host.text}", requiretls)
                    continue
                tls = destination.tls if host is None else \
                    "required" if host.tls_required else "opportunistic"  # fmt: skip
                try:
                    session = await SmtpSession.open(
                        peer,
                        helo=self.settings.hostname,
                        tls=tls,
                        tls_context=self.loose_tls
                        if tls == "opportunistic" or host is not None
                        else self.strict_tls,
                        connect_timeout=self.settings.smtp_connect_timeout.total_seconds(),
                        auth=destination.relay.auth if destination.relay else None,
                    )
                except SessionError as exc:
                    log.info("host failed", extra={"host": peer.name, "address": peer.address,
                                                   "error": str(exc)})  # fmt: skip
                    self.pool.failed(peer.address)
                    if requiretls and exc.code in ("4.7.4", "4.7.5"):  # no TLS, or it failed
                        last = _policy_error(str(exc), requiretls)
                    else:
                        last = temporary = exc
                    if policies is not None and host is not None:
                        result = policies.setup_failure(host, exc.code)
                        if result is not None:
                            await policies.report(host, peer.name, peer.address, result)
                    continue
                self.pool.recovered(peer.address)
                if policies is not None and host is not None:
                    verdict = policies.judge(host, peer.name, session.tls, session.peer_chain())
                    await policies.report(host, peer.name, peer.address, verdict.result_type)
                    refused = verdict.text if verdict.refuse else None
                    if requiretls and not refused and \
                            not session.smtp.supports_extension("requiretls"):  # fmt: skip
                        refused = f"{peer.name} does not offer REQUIRETLS"  # RFC 8689 §4.2.1
                    if refused:
                        log.info("host fails the TLS policy", extra={"host": peer.name,
                                 "policy": host.kind, "error": refused})  # fmt: skip
                        await session.close()
                        last = _policy_error(refused, requiretls)
                        continue
                try:
                    return await self._transaction(destination, session, claimed, recipients)
                except SessionError as exc:
                    failure = {
                        i: deferred(exc.code, str(exc), remote_mta=peer.name) for i in indexes
                    }
                    return failure, False
            assert last is not None
            if last.permanent and temporary is not None:
                last = temporary  # a host that may take the mail later: not a bounce yet
            make = failed if last.permanent else deferred
            return {i: make(last.code, str(last), smtp_code=last.smtp_code) for i in indexes}, False

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
        if claimed.envelope.body_type == "BINARYMIME" and not (
            session.chunking and session.smtp.supports_extension("binarymime")
        ):
            # RFC 3030 §3: binary content goes only to a peer taking BINARYMIME
            self.pool.give(destination.pool_key, session)
            text = f"{session.remote_mta} does not support BINARYMIME"
            return {
                i: failed("5.6.3", text, remote_mta=session.remote_mta) for i, _ in recipients
            }, False
        results: dict[int, RecipientResult] = {}
        chunks = split_recipients(recipients, session.rcpt_max())
        for n, chunk in enumerate(chunks):
            try:
                results.update(await session.send(claimed.envelope, chunk, claimed.body))
            except SessionError as exc:
                if not results:
                    raise
                # the earlier transactions' results stand: their recipients have the mail
                for i, _ in (r for rest in chunks[n:] for r in rest):
                    results[i] = deferred(exc.code, str(exc), remote_mta=session.remote_mta)
                return results, session.smtp.supports_extension("dsn")
        self.pool.give(destination.pool_key, session)
        return results, session.smtp.supports_extension("dsn")

    async def _tls_policies(self, destination: Destination, claimed: Claimed) -> DomainTls | None:
        """MX delivery's MTA-STS / DANE policies (not a relay's: we chose that host)."""
        if self.tls_policies is None or destination.domain is None or destination.relay:
            return None
        if claimed.envelope.requiretls:
            return await self.tls_policies.for_domain(destination.domain, None, "required", True)
        minimum: Literal["opportunistic", "required"] = (
            "required" if destination.tls == "required" else "opportunistic"
        )
        override = self.routing().tls_policy(destination.domain)
        if tls_not_required(claimed.body):
            override = "opportunistic"  # RFC 8689 §5: the sender waives the policies
        return await self.tls_policies.for_domain(destination.domain, override, minimum)

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


def split_recipients(
    recipients: list[tuple[int, Recipient]], most: int | None
) -> list[list[tuple[int, Recipient]]]:
    """One transaction's worth of recipients after another: at most the peer's RCPTMAX
    each (RFC 9422 §4.2), all in one without it."""
    if not most or len(recipients) <= most:
        return [recipients]
    return [recipients[n : n + most] for n in range(0, len(recipients), most)]


def _policy_error(text: str, requiretls: bool) -> SessionError:
    """A host refused under a TLS policy: tried again later, except for a REQUIRETLS
    message, which bounces with 5.7.30 (RFC 8689 §4.2.1)."""
    if requiretls:
        return SessionError("5.7.30", f"REQUIRETLS: {text}", permanent=True)
    return SessionError("4.7.5", text)


def tls_not_required(body: bytes) -> bool:
    """The message's header says `TLS-Required: No` (RFC 8689 §5)."""
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[: end + 2]
    return _TLS_REQUIRED_NO.search(head) is not None
