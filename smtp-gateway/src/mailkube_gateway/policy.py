"""What a session may do: admission, MAIL, RCPT, and the acceptance of a message into the
durable queue. The session (session.py) parses; this decides, and answers every question with
a complete SMTP reply (replies.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import metrics, trace
from redis.exceptions import RedisError

from mailkube_core.addresses import normalize_address
from mailkube_core.queue import Envelope, Recipient
from mailkube_core.routing import User
from mailkube_core.telemetry import Tally, inject_trace_context

from . import replies
from .data import DataResult, DataStatus
from .gateway import Gateway
from .headers import (
    HeaderError,
    add_after_headers,
    check_fields,
    parse_header_section,
    submission_additions,
)
from .params import MailParams, RcptParams
from .pipeline import Action, Message
from .ratelimit import SenderRate
from .received import protocol_type, received_header
from .relay import Path, RelayVerdict, relay_verdict

if TYPE_CHECKING:
    from .session import GatewaySMTP

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


@dataclass
class Transaction:
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
    def __init__(self, gateway: Gateway, session: GatewaySMTP) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.session = session
        #: the connection lease on its way, until the session waits for it (`admitted`)
        self.admitting: asyncio.Task[bool] | None = None
        self._leased = False
        self._gone = False

    # --- connection ---------------------------------------------------------------------

    def admit(self) -> str | None:
        """None to greet the client at once, else the 421 to close with.

        The client address's connection lease is asked for meanwhile: its Redis round trip
        runs while the greeting travels and the client answers it, instead of before the
        greeting. No command runs until the answer is in (`admitted`); a client over its
        limit gets `421 4.7.0` (RFC 5321 §3.8: the server may close with 421 at any time)."""
        if self.gateway.stopping:
            return replies.SHUTTING_DOWN
        if len(self.gateway.sessions) > self.settings.max_connections:
            _connections.add(1, {"outcome": "busy"})
            return replies.SERVER_BUSY
        lease = asyncio.get_running_loop().create_task(self._lease())
        self.admitting = lease
        self.gateway.background.add(lease)  # it may outlive the session
        lease.add_done_callback(self.gateway.background.discard)
        return None

    async def admitted(self) -> bool:
        """Whether the connection may go on (the lease is held, or Redis could not say)."""
        lease, self.admitting = self.admitting, None
        return True if lease is None else await lease

    async def _lease(self) -> bool:
        session = self.session
        try:
            # a lease outlives any idle session (the read timeout closes those first)
            lease = self.settings.read_timeout * 2 + self.settings.shutdown_grace
            held = await self.gateway.limits.acquire_connection(
                session.client_ip, session.connection_id, self.settings.max_connections_per_ip,
                lease,
            )  # fmt: skip
        except REDIS_ERRORS as error:
            # fail open: without Redis nothing can be queued anyway (451 at RCPT)
            log.warning("connection limit unavailable", extra={"error": repr(error)})
            return True
        if not held:
            _connections.add(1, {"outcome": "per_ip_limit"})
            session.close_with(replies.TOO_MANY_CONNECTIONS)
            return False
        _connections.add(1, {"outcome": "accepted"})
        self._leased = True
        if self._gone:  # the client left while the lease was on its way
            self.release()
        return True

    def release(self) -> None:
        self._gone = True
        if self._leased:
            self._leased = False
            task = asyncio.get_running_loop().create_task(self._release())
            self.gateway.background.add(task)
            task.add_done_callback(self.gateway.background.discard)

    async def _release(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # the lease expires on its own
            await self.gateway.limits.release_connection(
                self.session.client_ip, self.session.connection_id
            )

    # --- MAIL ---------------------------------------------------------------------------

    def _sender_limit(self, user: User | None) -> int:
        if user is not None:
            domain = self.gateway.routing.snapshot.domain(user.domain)
            if domain is not None and domain.limits.max_messages_per_minute:
                return domain.limits.max_messages_per_minute
        return self.settings.max_messages_per_minute

    async def mail(self, path: Path | None, params: MailParams) -> str:
        session = self.session
        auth_user = session.auth_user
        snapshot = self.gateway.routing.snapshot
        user = snapshot.user(auth_user) if auth_user else None
        if path is None:
            # RFC 5321 §4.5.5: <> is for bounces between MTAs, never a user's submission
            if session.listener.name != "mx" or auth_user is not None:
                return replies.NULL_SENDER_NOT_ALLOWED
        elif auth_user is not None and (
            user is None or user.suspended or not snapshot.may_send_as(user, path.address)
        ):
            return replies.NOT_OWNER
        # The sender's rate is asked for with the first recipient's checks, in the same
        # round trip, and refused there (450 4.7.1 at RCPT), as Postfix's smtpd_delay_reject
        # refuses at RCPT what it decides about the client and sender: MAIL waits for no
        # Redis, and a transaction no recipient was accepted for counts as no message.
        sender = SenderRate(auth_user or session.client_ip, self._sender_limit(user))
        session.txn = Transaction("" if path is None else path.address, params, sender)
        return replies.SENDER_OK

    # --- RCPT ---------------------------------------------------------------------------

    def _postmaster(self) -> str | None:
        if self.settings.postmaster:
            return self.settings.postmaster
        domains = self.gateway.routing.snapshot.table.domains
        return f"postmaster@{domains[0].name}" if domains else None

    async def rcpt(self, path: Path | None, params: RcptParams) -> str:
        """`path` None: the bare <postmaster> (RFC 5321 §4.5.1)."""
        txn = self.session.txn
        assert txn is not None
        snapshot = self.gateway.routing.snapshot
        if len(txn.recipients) >= self.settings.max_recipients:
            return replies.TOO_MANY_RECIPIENTS  # RFC 5321 §4.5.3.1.10
        if path is None:
            address = self._postmaster()
            if address is None:
                return replies.UNKNOWN_USER
            return await self._add(txn, address, params, local=True, user=None)
        verdict = relay_verdict(
            path,
            authenticated=self.session.auth_user is not None,
            is_local_domain=snapshot.is_local_domain,
        )
        if verdict is RelayVerdict.DENIED:
            log.info("relay denied", extra={"client_ip": self.session.client_ip,
                                            "recipient": path.address})  # fmt: skip
            return replies.RELAY_DENIED
        if verdict is RelayVerdict.REMOTE:
            return await self._add(txn, path.address, params, local=False, user=None)
        address = f"{path.local}@{path.ascii_domain}"
        mailbox = snapshot.resolve(address)
        if mailbox is None:
            if path.local.lower() == "postmaster":  # postmaster@ every local domain
                target = self._postmaster()
                if target is not None:
                    return await self._add(txn, target, params, local=True, user=None)
            return replies.UNKNOWN_USER
        if mailbox.user.suspended:
            return replies.SUSPENDED
        return await self._add(txn, address, params, local=True, user=mailbox.user)

    async def _add(
        self, txn: Transaction, address: str, params: RcptParams, *, local: bool, user: User | None
    ) -> str:
        try:
            key = normalize_address(address)
        except ValueError:
            key = address
        if key in txn.seen:  # the same mailbox twice: one copy is enough
            return replies.RECIPIENT_OK
        quota = user.quota if user is not None else None
        try:
            verdict = await self.gateway.limits.admit_recipient(
                key, self.settings.max_recipient_messages_per_minute, quota, txn.sender
            )
        except REDIS_ERRORS:
            return replies.TEMP_FAILURE
        if not verdict.sender_ok:
            return replies.SENDER_RATE
        if not verdict.under_quota:
            return replies.OVER_QUOTA
        if not verdict.rate_ok:
            return replies.RECIPIENT_RATE
        txn.sender = None
        txn.seen.add(key)
        txn.recipients.append(Recipient(address=address, notify=params.notify, orcpt=params.orcpt))
        return replies.RECIPIENT_OK

    # --- DATA ---------------------------------------------------------------------------

    async def data(self, txn: Transaction, result: DataResult) -> str:
        session = self.session
        listener = session.listener.name
        if result.status is DataStatus.TOO_BIG:
            _messages.add(1, {"listener": listener, "outcome": "too_big"})
            return replies.SIZE_EXCEEDED
        if result.status is DataStatus.BARE_LINE_ENDING:
            _messages.add(1, {"listener": listener, "outcome": "bare_line_ending"})
            return replies.BARE_LINE_ENDING
        content = result.content
        try:
            section = parse_header_section(content, max_size=self.settings.max_header_size)
        except HeaderError:
            _messages.add(1, {"listener": listener, "outcome": "header_too_big"})
            return replies.HEADER_TOO_BIG
        if section.count("received") > self.settings.max_received_headers:
            _messages.add(1, {"listener": listener, "outcome": "loop"})
            return replies.LOOP_DETECTED  # RFC 5321 §6.3
        problem = check_fields(section)
        if problem is not None:
            _messages.add(1, {"listener": listener, "outcome": "bad_headers"})
            return replies.BAD_HEADERS.format(reason=problem)
        if session.auth_user is not None:
            content = add_after_headers(
                content, section, submission_additions(section, self.settings.hostname)
            )
        context = trace.set_span_in_context(session.span) if session.span else None
        with _tracer.start_as_current_span(
            "smtp.message", context=context, attributes={"smtp.transaction": txn.id}
        ) as span:
            reply = await self._accept(txn, content, span)
        return reply

    async def _accept(self, txn: Transaction, content: bytes, span: trace.Span) -> str:
        session = self.session
        listener = session.listener.name
        outcome = await self.gateway.pipeline.run(
            Message(
                mail_from=txn.mail_from,
                recipients=[r.address for r in txn.recipients],
                client_ip=session.client_ip,
                helo=session.helo,
                auth_user=session.auth_user,
                listener=listener,
                content=content,
            )
        )
        if outcome.action is Action.REJECT:
            _messages.add(1, {"listener": listener, "outcome": f"rejected:{outcome.stage}"})
            return outcome.reply or "550 5.7.1 Message rejected by policy"
        if outcome.action is Action.DEFER:
            _messages.add(1, {"listener": listener, "outcome": f"deferred:{outcome.stage}"})
            return outcome.reply or "451 4.7.1 Message deferred by policy, try again later"
        tls = session.tls
        received = received_header(
            helo=session.helo,
            client_ip=session.client_ip,
            hostname=self.settings.hostname,
            protocol=protocol_type(
                esmtp=session.esmtp,
                tls=tls is not None,
                auth=session.auth_user is not None,
                utf8=txn.params.smtputf8,
            ),
            queue_id=txn.id,
            tls=tls,
            auth_user=session.auth_user,
            recipient=txn.recipients[0].address if len(txn.recipients) == 1 else None,
        )
        tags = b"".join(f"{header}\r\n".encode() for header in outcome.headers)
        body = received + tags + outcome.content
        envelope = Envelope(
            mail_from=txn.mail_from,
            recipients=txn.recipients,
            ret=txn.params.ret,
            envid=txn.params.envid,
            body_type=txn.params.body,
            smtputf8=txn.params.smtputf8,
            client_address=session.client_ip,
            client_helo=session.helo,
            auth_user=session.auth_user,
            listener=listener,
            trace_context=inject_trace_context(),
            annotations=outcome.annotations,
        )
        snapshot = self.gateway.routing.snapshot
        try:
            async with asyncio.timeout(self.settings.enqueue_timeout.total_seconds()):
                ids = await self.gateway.queue.enqueue(envelope, body, is_local=snapshot.is_local)
        except REDIS_ERRORS as error:
            span.record_exception(error)
            log.warning(
                "enqueue failed",
                extra={"transaction": txn.id, "client_ip": session.client_ip,
                       "error": repr(error)},
            )  # fmt: skip
            _messages.add(1, {"listener": listener, "outcome": "temp_failure"})
            return replies.TEMP_FAILURE
        _messages.add(1, {"listener": listener, "outcome": "queued"})
        log.info(
            "message queued",
            extra={"transaction": txn.id, "queue_ids": ids, "client_ip": session.client_ip,
                   "from": txn.mail_from, "recipients": len(txn.recipients),
                   "size": len(body), "listener": listener},
        )  # fmt: skip
        return replies.QUEUED.format(ids=" ".join(ids))
