"""Local delivery: a recipient of one of our domains, resolved through the routing table
(address, alias, catch-all), lands in its user's maildir; `forward_to` sends it on. A forward
to a remote address becomes a new message in the remote lane, with the original envelope
sender, so bounces still reach the author (the far end's SPF check then sees our address, not
the author's domain: see docs/delivery.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from functools import partial
from pathlib import Path

from mailkube_core.queue import Claimed, Envelope, Queue, RecipientResult, RecipientStatus
from mailkube_core.routing import RoutingSnapshot, User

from . import maildir
from .counters import Counters
from .dsn import Action
from .results import deferred, delivered, failed

log = logging.getLogger(__name__)

#: stores recipients' results in the queue (`Queue.record`)
Recorder = Callable[[Mapping[int, RecipientResult]], Awaitable[None]]
#: forward_to chains longer than this are a configuration loop (RFC 5321 §6.3 asks for a limit)
MAX_FORWARD_DEPTH = 8
JUNK = "Junk"


@dataclass
class Expansion:
    """Where one address ends up: local mailboxes and remote addresses."""

    mailboxes: list[User] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def expand(snapshot: RoutingSnapshot, address: str) -> Expansion:
    """Follow aliases, catch-alls and forward_to (keep_copy keeps the mailbox too)."""
    out = Expansion()
    seen: set[str] = set()

    def visit(target: str, depth: int) -> None:
        if not snapshot.is_local(target):
            if target not in out.remote:
                out.remote.append(target)
            return
        mailbox = snapshot.resolve(target)
        if mailbox is None:
            out.unknown.append(target)
            return
        user = mailbox.user
        if user.address in seen:
            return
        seen.add(user.address)
        if not user.forward_to or user.keep_copy or depth >= MAX_FORWARD_DEPTH:
            out.mailboxes.append(user)
        if depth < MAX_FORWARD_DEPTH:
            for forward in user.forward_to:
                visit(forward, depth + 1)

    visit(address, 0)
    return out


def delivered_to(body: bytes) -> set[str]:
    """The Delivered-To values already in the message (lower-cased), for loop detection."""
    headers = BytesHeaderParser().parsebytes(body)
    return {value.strip().lower() for value in headers.get_all("Delivered-To", [])}


class LocalDelivery:
    def __init__(
        self,
        maildir_root: Path,
        hostname: str,
        routing: Callable[[], RoutingSnapshot],
        counters: Counters,
        queue: Queue,
        executor: Executor | None = None,
    ) -> None:
        self.root = maildir_root
        #: threads for the blocking writes and fsyncs (None: asyncio's default pool)
        self.executor = executor
        self.hostname = hostname
        self.routing = routing
        self.counters = counters
        self.queue = queue

    async def deliver(self, claimed: Claimed, index: int, done: set[str]) -> RecipientResult:
        """Deliver recipient `index`. `done` holds the mailboxes this attempt already wrote
        to, so an alias and its user listed together get one copy (like Postfix)."""
        envelope = claimed.envelope
        address = envelope.recipients[index].address
        snapshot = self.routing()
        if not snapshot.is_local(address):
            # the domain left the routing table after the message was queued: it may be
            # a table being rewritten; retry, and bounce when the retries run out
            return deferred("4.3.5", f"{address}: domain not in the routing table")
        expansion = expand(snapshot, address)
        if not expansion.mailboxes and not expansion.remote:
            return failed("5.1.1", f"{address}: no such mailbox", smtp_code=550)
        if expansion.remote and address.lower() in delivered_to(claimed.body):
            # we forwarded this message before and it came back (RFC 5321 §6.3)
            return failed("5.4.6", f"{address}: mail forwarding loop (Delivered-To)")
        notes = []
        for user in expansion.mailboxes:
            if user.address in done:
                continue
            result = await self._to_mailbox(claimed, user)
            if result is not None:
                return result
            done.add(user.address)
            notes.append(f"maildir of {user.address}")
        if expansion.remote:
            await self._forward(claimed, index, expansion.remote)
            notes.append("forwarded to " + ", ".join(expansion.remote))
        return delivered("delivered to " + "; ".join(notes or ["maildir"]))

    async def _to_mailbox(self, claimed: Claimed, user: User) -> RecipientResult | None:
        envelope = claimed.envelope
        content = maildir.render(claimed.body, envelope.mail_from, user.address)
        if user.quota is not None:
            usage = await self.counters.usage(user.address)
            if usage.bytes + len(content) > user.quota:
                # RFC 3463 4.2.2 mailbox full: temporary, so it bounces only if the user
                # stays over quota for the whole retry window
                return deferred("4.2.2", f"{user.address}: mailbox full", smtp_code=452)
        folder = JUNK if envelope.annotations.get("quarantine") else None
        box = maildir.mailbox_path(self.root, user.address, folder)
        name = maildir.unique_name(
            claimed.id, user.address, envelope.received_at, self.hostname, len(content)
        )
        # only a message handled before can already be there: skip the scan otherwise
        handled_before = claimed.deliveries > 1 or claimed.attempts > 0
        try:
            store = partial(maildir.store, box, name, content, check_existing=handled_before)
            stored = await asyncio.get_running_loop().run_in_executor(self.executor, store)
        except OSError as exc:
            log.error("maildir write failed", extra={"mailbox": user.address, "error": str(exc)})
            return deferred("4.3.0", f"{user.address}: mailbox unavailable ({exc.strerror})")
        if not stored.duplicate:
            self.counters.received(
                user.address, claimed.id, stored.size, folder, envelope.received_at
            )
        return None

    async def _forward(self, claimed: Claimed, index: int, targets: list[str]) -> None:
        """Queue a copy for remote targets (at-least-once: a crash between this enqueue and
        the record of the recipient can forward twice)."""
        original = claimed.envelope
        recipient = original.recipients[index]
        envelope = Envelope(
            mail_from=original.mail_from,
            recipients=[
                recipient.model_copy(update={"address": target, "orcpt": None})
                for target in targets
            ],
            ret=original.ret,
            envid=original.envid,
            body_type=original.body_type,
            smtputf8=original.smtputf8,
            received_at=original.received_at,
            trace_context=original.trace_context,
        )
        body = f"Delivered-To: {recipient.address}\r\n".encode() + claimed.body
        await self.queue.enqueue(envelope, body, is_local=self.routing().is_local)

    async def deliver_all(
        self, claimed: Claimed, pending: list[int], record: Recorder
    ) -> list[tuple[int, Action]]:
        """Every pending recipient, each result recorded as soon as it is known. Returns the
        recipients delivered, for success notices (NOTIFY=SUCCESS)."""
        done: set[str] = set()
        delivered_now: list[tuple[int, Action]] = []
        for index in pending:
            result = await self.deliver(claimed, index, done)
            await record({index: result})
            if result.status is RecipientStatus.DELIVERED:
                delivered_now.append((index, "delivered"))
        return delivered_now
