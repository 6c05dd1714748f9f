"""What a session may do: admission, MAIL, RCPT, and the acceptance of a message into the
durable queue. The session (session.py) parses and hands this values; the rules themselves
are pure functions (rules.py), and this does the I/O around them (the connection lease, the
recipient counters, the filters, the queue). Every answer is a complete SMTP reply
(replies.py)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import metrics, trace
from redis.exceptions import RedisError

from mailkube_core.addresses import normalize_address
from mailkube_core.line_endings import has_bare_line_ending
from mailkube_core.queue import Envelope, Recipient
from mailkube_core.telemetry import Tally, inject_trace_context, span_ids_only, spans_exported

from . import replies, rules
from .connection_slots import Slot
from .data import DataResult, DataStatus
from .gateway import Gateway
from .headers import (
    HeaderError,
    add_after_headers,
    parse_header_section,
    submission_additions,
)
from .params import MailParams, RcptParams
from .pipeline import Action, ClientFacts, Message
from .ratelimit import SenderRate
from .received import protocol_type, received_header
from .relay import Path
from .rules import Client
from .screening.dnsbl import TRACE_FIELD, remove_trace_fields

if TYPE_CHECKING:
    from .screening.screen import ClientScreen

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("mailkube.gateway")
_meter = metrics.get_meter("mailkube.gateway")
_messages = Tally(
    _meter, "mailkube.gateway.messages", unit="{message}",
    description="Messages by listener and outcome",
)  # fmt: skip
_connections = Tally(
    _meter, "mailkube.gateway.connections", unit="{connection}",
    description="Connections by outcome",
)  # fmt: skip
#: Redis trouble of any kind: the answer is 4xx, never a lost message
REDIS_ERRORS = (RedisError, TimeoutError, OSError)
_NO_FACTS = ClientFacts()
_TRACE_NAME = TRACE_FIELD.lower()


@dataclass
class Transaction:
    #: who started it (a transaction ends with any change of HELO, TLS or AUTH)
    client: Client
    mail_from: str
    params: MailParams
    #: counted against its rate with the first accepted recipient, then None
    sender: SenderRate | None
    recipients: list[Recipient] = field(default_factory=list)
    #: normalised recipient addresses, to drop duplicates
    seen: set[str] = field(default_factory=set)
    #: for logs and the Received field: unique enough, not secret (see queue.keys)
    id: str = field(default_factory=lambda: f"{random.getrandbits(48):012X}")


class Policy:
    """One connection's admission and transactions: the rules (rules.py) with the Redis
    counters and the queue around them. It is handed values by the session, never the
    session itself; `close` ends the connection with a reply (a client over its limit)."""

    def __init__(self, gateway: Gateway, close: Callable[[str], None]) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self._close = close
        #: the connection lease on its way, until the session waits for it (`admitted`)
        self.admitting: asyncio.Task[bool] | None = None
        #: the connection-level checks of this client (screening/), started with the lease
        self.screen: ClientScreen | None = None
        self._client_ip = ""
        #: the client address's connection slot, once held (connection_slots.py)
        self._slot: Slot | None = None
        self._gone = False

    # --- connection ---------------------------------------------------------------------

    def admit(self, listener: str, client_ip: str) -> str | None:
        """None to greet the client at once, else the 421 to close with.

        The client address's connection lease is asked for meanwhile: its Redis round trip
        runs while the greeting travels and the client answers it, instead of before the
        greeting. No command runs until the answer is in (`admitted`); a client over its
        limit gets `421 4.7.0` (RFC 5321 §3.8: the server may close with 421 at any time).

        The connection-level checks start here too (DNS lists, reverse name, early-talker
        memory: screening/), their Redis command in this turn, beside the lease's."""
        gateway = self.gateway
        if gateway.stopping:
            return replies.SHUTTING_DOWN
        if len(gateway.sessions) > self.settings.max_connections:
            _connections.add(1, {"outcome": "busy"})
            return replies.SERVER_BUSY
        self._client_ip = client_ip
        lease = asyncio.get_running_loop().create_task(self._lease())
        self.admitting = lease
        gateway.background.add(lease)  # it may outlive the session
        lease.add_done_callback(gateway.background.discard)
        if gateway.screening is not None:
            self.screen = gateway.screening.start(listener, client_ip)
        return None

    async def admitted(self) -> bool:
        """Whether the connection may go on (the lease is held, or Redis could not say)."""
        lease, self.admitting = self.admitting, None
        return True if lease is None else await lease

    async def _lease(self) -> bool:
        try:
            # a lease outlives any idle session (the read timeout closes those first)
            lease = self.settings.read_timeout * 2 + self.settings.shutdown_grace
            slot = await self.gateway.limits.connection_slots.take(
                self._client_ip, self.settings.max_connections_per_ip, lease.total_seconds()
            )
        except REDIS_ERRORS as error:
            # fail open: without Redis nothing can be queued anyway (451 at RCPT)
            log.warning("connection limit unavailable", extra={"error": repr(error)})
            return True
        if slot is None:
            _connections.add(1, {"outcome": "per_ip_limit"})
            self._close(replies.TOO_MANY_CONNECTIONS)
            return False
        _connections.add(1, {"outcome": "accepted"})
        self._slot = slot
        if self._gone:  # the client left while the lease was on its way
            self.release()
        return True

    def release(self) -> None:
        self._gone = True
        if self.screen is not None:
            self.screen.close()
        slot, self._slot = self._slot, None
        if slot is not None:
            self.gateway.limits.connection_slots.give_back(self._client_ip, slot)

    # --- MAIL ---------------------------------------------------------------------------

    async def mail(
        self, client: Client, path: Path | None, params: MailParams
    ) -> tuple[str, Transaction | None]:
        """The reply to MAIL FROM, and the transaction it started (None: refused)."""
        snapshot = self.gateway.routing.snapshot
        refusal = rules.sender_refusal(client, path, snapshot, self.gateway.suspended)
        if refusal is not None:
            return refusal, None
        # The sender's rate is asked for with the first recipient's checks, in the same
        # round trip, and refused there (450 4.7.1 at RCPT), as Postfix's smtpd_delay_reject
        # refuses at RCPT what it decides about the client and sender: MAIL waits for no
        # Redis, and a transaction no recipient was accepted for counts as no message.
        limit = rules.sender_limit(client, snapshot, self.settings.max_messages_per_minute)
        sender = SenderRate(client.auth_user or client.ip, limit)
        mail_from = "" if path is None else path.address
        return replies.SENDER_OK, Transaction(client, mail_from, params, sender)

    # --- RCPT ---------------------------------------------------------------------------

    async def rcpt(self, txn: Transaction, path: Path | None, params: RcptParams) -> str:
        """The reply to RCPT TO; `path` None: the bare <postmaster> (RFC 5321 §4.5.1)."""
        snapshot = self.gateway.routing.snapshot
        decision = rules.recipient_decision(
            txn.client, path, snapshot,
            taken=len(txn.recipients), max_recipients=self.settings.max_recipients,
            postmaster=rules.postmaster_address(self.settings.postmaster, snapshot),
            declared_size=txn.params.size,
        )  # fmt: skip
        if isinstance(decision, str):
            if decision == replies.RELAY_DENIED and path is not None:
                log.info("relay denied", extra={"client_ip": txn.client.ip,
                                                "recipient": path.address})  # fmt: skip
            return decision
        try:
            key = normalize_address(decision.address)
        except ValueError:
            key = decision.address
        if key in txn.seen:  # the same mailbox twice: one copy is enough
            return replies.RECIPIENT_OK
        quota = decision.user.quota if decision.user is not None else None
        try:
            verdict = await self.gateway.limits.admit_recipient(
                key, self.settings.max_recipient_messages_per_minute, quota, txn.sender
            )
        except REDIS_ERRORS:
            return replies.TEMP_FAILURE
        refusal = rules.admission_refusal(verdict)
        if refusal is not None:
            return refusal
        txn.sender = None
        txn.seen.add(key)
        txn.recipients.append(
            Recipient(address=decision.address, notify=params.notify, orcpt=params.orcpt)
        )
        return replies.RECIPIENT_OK

    # --- DATA ---------------------------------------------------------------------------

    async def data(
        self, txn: Transaction, result: DataResult, span: trace.Span | None = None
    ) -> str:
        """The reply to the end of DATA: refused, or queued durably (`span`: the session's,
        the message's span's parent)."""
        client = txn.client
        listener = client.listener
        if result.status is DataStatus.TOO_BIG:
            _messages.add(1, {"listener": listener, "outcome": "too_big"})
            return replies.SIZE_EXCEEDED
        if result.status is DataStatus.BARE_LINE_ENDING:
            _messages.add(1, {"listener": listener, "outcome": "bare_line_ending"})
            return replies.BARE_LINE_ENDING
        if result.status is DataStatus.NO_MEMORY:
            _messages.add(1, {"listener": listener, "outcome": "no_memory"})
            log.warning(
                "message refused: data_memory_limit reached",
                extra={"client_ip": client.ip, "transaction": txn.id},
            )
            return replies.DATA_NO_MEMORY
        content = result.content
        limit = rules.domain_size_limit(
            self.gateway.routing.snapshot, [r.address for r in txn.recipients]
        )
        if len(content) > limit:
            _messages.add(1, {"listener": listener, "outcome": "too_big"})
            return replies.SIZE_EXCEEDED_FOR_DOMAIN
        try:
            section = parse_header_section(content, max_size=self.settings.max_header_size)
        except HeaderError:
            _messages.add(1, {"listener": listener, "outcome": "header_too_big"})
            return replies.HEADER_TOO_BIG
        if txn.params.body == "BINARYMIME" and has_bare_line_ending(content[: section.size]):
            # binary is for the body (RFC 3030 §3); the header section stays CRLF lines,
            # so no reader splits its fields differently
            _messages.add(1, {"listener": listener, "outcome": "bare_line_ending"})
            return replies.BARE_LINE_ENDING
        refusal = rules.header_refusal(section, self.settings.max_received_headers)
        if refusal is not None:
            outcome, reply = refusal
            _messages.add(1, {"listener": listener, "outcome": outcome})
            return reply
        if section.count(_TRACE_NAME) and client.auth_user is None:  # only we may say that
            content = remove_trace_fields(content, section.size)
        if client.auth_user is not None:
            content = add_after_headers(
                content, section, submission_additions(section, self.settings.hostname)
            )
        if not spans_exported():  # nobody would see the span: only its ids (providers.py)
            with trace.use_span(span_ids_only(span), end_on_exit=True) as ids:
                return await self._accept(txn, content, result.dot_lines, ids)
        context = trace.set_span_in_context(span) if span else None
        with _tracer.start_as_current_span(
            "smtp.message", context=context, attributes={"smtp.transaction": txn.id}
        ) as message_span:
            return await self._accept(txn, content, result.dot_lines, message_span)

    async def _accept(
        self, txn: Transaction, content: bytes, dot_lines: bool, span: trace.Span
    ) -> str:
        conn = txn.client
        listener = conn.listener
        screen = self.screen
        # the checks started at connect: done by now, or within dns_timeout of the connection
        client = await screen.facts() if screen is not None else _NO_FACTS
        outcome = await self.gateway.pipeline.run(
            Message(
                mail_from=txn.mail_from,
                recipients=[r.address for r in txn.recipients],
                client_ip=conn.ip,
                helo=conn.helo,
                auth_user=conn.auth_user,
                listener=listener,
                content=content,
                queue_id=txn.id,
                client=client,
            )
        )
        if outcome.action is Action.REJECT:
            _messages.add(1, {"listener": listener, "outcome": f"rejected:{outcome.stage}"})
            return outcome.reply or "550 5.7.1 Message rejected by policy"
        if outcome.action is Action.DEFER:
            _messages.add(1, {"listener": listener, "outcome": f"deferred:{outcome.stage}"})
            return outcome.reply or "451 4.7.1 Message deferred by policy, try again later"
        tls = conn.tls
        received = received_header(
            helo=conn.helo,
            client_ip=conn.ip,
            hostname=self.settings.hostname,
            protocol=protocol_type(
                esmtp=conn.esmtp,
                tls=tls is not None,
                auth=conn.auth_user is not None,
                utf8=txn.params.smtputf8,
            ),
            queue_id=txn.id,
            tls=tls,
            auth_user=conn.auth_user,
            recipient=txn.recipients[0].address if len(txn.recipients) == 1 else None,
            client_name=screen.received_name() if screen is not None else None,
        )
        trace_field = screen.trace_field() if screen is not None else None
        if trace_field is not None:  # beside Authentication-Results
            received += f"{trace_field}\r\n".encode()
        tags = b"".join(f"{header}\r\n".encode() for header in outcome.headers)
        body = received + tags + outcome.content
        # What follows the header section is the content as read: checked for bare CR or LF
        # and for dotted lines (data.py). The header section is ours now (fields added,
        # removed, rewritten): look at it again, a few KB, so that the worker need not scan
        # the whole body before DATA.
        text = txn.params.body != "BINARYMIME"
        head_end = body.find(b"\r\n\r\n")
        head = body if head_end < 0 else body[: head_end + 4]
        envelope = Envelope(
            mail_from=txn.mail_from,
            recipients=txn.recipients,
            ret=txn.params.ret,
            envid=txn.params.envid,
            body_type=txn.params.body,
            smtputf8=txn.params.smtputf8,
            requiretls=txn.params.requiretls,
            client_address=conn.ip,
            client_helo=conn.helo,
            auth_user=conn.auth_user,
            listener=listener,
            trace_context=inject_trace_context(),
            annotations=outcome.annotations,
            crlf_checked=text and not has_bare_line_ending(head),
            dot_lines=dot_lines or head.startswith(b".") or b"\r\n." in head,
        )
        snapshot = self.gateway.routing.snapshot
        try:
            async with asyncio.timeout(self.settings.enqueue_timeout.total_seconds()):
                ids = await self.gateway.queue.enqueue(envelope, body, is_local=snapshot.is_local)
        except REDIS_ERRORS as error:
            span.record_exception(error)
            log.warning(
                "enqueue failed",
                extra={"transaction": txn.id, "client_ip": conn.ip,
                       "error": repr(error)},
            )  # fmt: skip
            _messages.add(1, {"listener": listener, "outcome": "temp_failure"})
            return replies.TEMP_FAILURE
        _messages.add(1, {"listener": listener, "outcome": "queued"})
        log.info(
            "message queued",
            extra={"transaction": txn.id, "queue_ids": ids, "client_ip": conn.ip,
                   "client_name": client.reverse_name, "dnsbl_score": client.dnsbl_score,
                   "from": txn.mail_from, "recipients": len(txn.recipients),
                   "size": len(body), "listener": listener},
        )  # fmt: skip
        return replies.QUEUED.format(ids=" ".join(ids))
