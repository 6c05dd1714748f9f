"""Local delivery: a recipient of one of our domains, resolved through the routing table
(address, alias, catch-all), lands in its user's maildir; `forward_to` sends it on. A forward
to a remote address becomes a new message in the remote lane, with the original envelope
sender, so bounces still reach the author (the far end's SPF check then sees our address, not
the author's domain: see docs/delivery.md). Each copy stored in a mailbox is recorded with its
recipient's result, so the queue counts it (mailkube_core.queue.tally).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from functools import partial
from pathlib import Path

from mailkube_core.queue import (
    Claimed,
    Envelope,
    Forward,
    MailboxCopy,
    RecipientResult,
    RecipientStatus,
)
from mailkube_core.routing import RoutingSnapshot, User

from . import maildir
from .counters import Counters
from .dsn import Action
from .results import deferred, delivered, failed
from .tlspolicy.tlsrpt_receive import ReportCounter

log = logging.getLogger(__name__)

#: stores recipients' results in the queue, counts the copies stored and queues the forwards
#: delivering them made, in one script (`Queue.record`)
Recorder = Callable[
    [Mapping[int, RecipientResult], Sequence[MailboxCopy], Sequence[Forward]], Awaitable[None]
]
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


@dataclass
class LocalOutcome:
    """A recipient's result, and the copies stored in mailboxes for it (also when another
    of its mailboxes failed: those copies are there, and count)."""

    result: RecipientResult
    copies: list[MailboxCopy] = field(default_factory=list)
    #: the new message for the remote lane, recorded with the result (exactly once)
    forwards: list[Forward] = field(default_factory=list)


def delivered_to(body: bytes) -> set[str]:
    """The Delivered-To values already in the message (lower-cased), for loop detection.
    Only the header section is parsed (the parser would read the whole body through)."""
    end = body.find(b"\n\r\n")
    end = body.find(b"\n\n") if end < 0 else end
    head = body if end < 0 else body[: end + 1]
    if b"delivered-to:" not in head.lower():
        return set()
    headers = BytesHeaderParser().parsebytes(head)
    return {value.strip().lower() for value in headers.get_all("Delivered-To", [])}


@dataclass
class BatchDelivered:
    """A claim of a batch whose every pending recipient (`indexes`) is now delivered, with
    the mailbox copies stored for them: ready for Queue.finish_delivered."""

    claimed: Claimed
    indexes: list[int]
    copies: list[MailboxCopy]
    #: new messages for the remote lane (forward_to), queued by the same script
    forwards: list[Forward] = field(default_factory=list)


@dataclass
class _Plan:
    claimed: Claimed
    indexes: list[int]
    files: list[tuple[User, str | None, maildir.Copy]]
    forwards: list[Forward]


class LocalDelivery:
    def __init__(
        self,
        maildir_root: Path,
        hostname: str,
        routing: Callable[[], RoutingSnapshot],
        counters: Counters,
        executor: Executor | None = None,
        fsyncs: Executor | None = None,
        *,
        reports: ReportCounter | None = None,
    ) -> None:
        self.root = maildir_root
        #: counts TLS-RPT reports stored in its mailboxes (tlsrpt_mailboxes)
        self.reports = reports
        #: threads for the blocking writes and fsyncs (None: asyncio's default pool)
        self.executor = executor
        #: threads for a batch's file fsyncs, run in parallel (deliver_batch)
        self.fsyncs = fsyncs or ThreadPoolExecutor(16, thread_name_prefix="fsync")
        self.hostname = hostname
        self.routing = routing
        self.counters = counters

    async def deliver(self, claimed: Claimed, index: int, done: set[str]) -> LocalOutcome:
        """Deliver recipient `index`. `done` holds the mailboxes this attempt already wrote
        to, so an alias and its user listed together get one copy (like Postfix)."""
        envelope = claimed.envelope
        address = envelope.recipients[index].address
        snapshot = self.routing()
        if not snapshot.is_local_domain(address.rpartition("@")[2]):
            # the domain left the routing table after the message was queued: it may be
            # a table being rewritten; retry, and bounce when the retries run out
            # (a domain relayed since is followed by `expand`, to the remote lane)
            return LocalOutcome(deferred("4.3.5", f"{address}: domain not in the routing table"))
        expansion = expand(snapshot, address)
        if not expansion.mailboxes and not expansion.remote:
            return LocalOutcome(failed("5.1.1", f"{address}: no such mailbox", smtp_code=550))
        if expansion.remote and address.lower() in delivered_to(claimed.body):
            # we forwarded this message before and it came back (RFC 5321 §6.3)
            return LocalOutcome(failed("5.4.6", f"{address}: mail forwarding loop (Delivered-To)"))
        notes = []
        copies: list[MailboxCopy] = []
        for user in expansion.mailboxes:
            if user.address in done:
                continue
            stored = await self._to_mailbox(claimed, user)
            if isinstance(stored, RecipientResult):
                return LocalOutcome(stored, copies)
            copies.append(stored)
            done.add(user.address)
            notes.append(f"maildir of {user.address}")
        forwards = []
        if expansion.remote:
            forwards.append(self._forward_copy(claimed, index, expansion.remote))
            notes.append("forwarded to " + ", ".join(expansion.remote))
        await self._count_reports(claimed, copies)
        result = delivered("delivered to " + "; ".join(notes or ["maildir"]))
        return LocalOutcome(result, copies, forwards)

    async def deliver_batch(
        self, batch: list[Claimed]
    ) -> tuple[list[BatchDelivered], list[Claimed]]:
        """The common case of a batch, together: every pending recipient of a message goes to
        plain mailboxes or is forwarded to remote addresses (no quota, no loop, no success
        notice asked for). Their files are written in one thread job, each new/ fsynced once
        for the batch; the forwards are queued by the script that settles the batch
        (Queue.finish_delivered), so exactly once. Returns the claims
        now wholly delivered, and the others, for `deliver_all` one by one (nothing of them
        was recorded; copies they stored are found again by name)."""
        snapshot = self.routing()
        plans: list[_Plan] = []
        slow: list[Claimed] = []
        for claimed in batch:
            plan = self._plan(snapshot, claimed)
            if plan is None:
                slow.append(claimed)
            else:
                plans.append(plan)
        if not plans:
            return [], slow
        if not any(plan.files for plan in plans):  # forwards only: no thread job
            return [BatchDelivered(p.claimed, p.indexes, [], p.forwards) for p in plans], slow
        files = [copy for plan in plans for _, _, copy in plan.files]
        loop = asyncio.get_running_loop()
        store = partial(maildir.store_many, files, self.fsyncs)
        stored = iter(await loop.run_in_executor(self.executor, store))
        done: list[BatchDelivered] = []
        for plan in plans:
            envelope = plan.claimed.envelope
            copies: list[MailboxCopy] = []
            for user, folder, _ in plan.files:
                result = next(stored)
                if isinstance(result, OSError):
                    log.error("maildir write failed",
                              extra={"mailbox": user.address, "error": str(result)})  # fmt: skip
                else:
                    copies.append(MailboxCopy(user.address, plan.claimed.id, result.size, folder,
                                              envelope.received_at))  # fmt: skip
            if len(copies) == len(plan.files):
                done.append(BatchDelivered(plan.claimed, plan.indexes, copies, plan.forwards))
                await self._count_reports(plan.claimed, copies)
            else:  # deliver_all writes (or finds) them again, and records why not
                slow.append(plan.claimed)
        return done, slow

    def _plan(self, snapshot: RoutingSnapshot, claimed: Claimed) -> _Plan | None:
        """The files a claim needs if it is the common case (see deliver_batch), else None."""
        envelope = claimed.envelope
        if any(r.status is not RecipientStatus.DELIVERED for r in claimed.results.values()):
            return None  # failures to report: settle's job
        indexes = claimed.pending()
        users: list[User] = []
        seen: set[str] = set()
        forwards: list[Forward] = []
        looped: set[str] | None = None
        for index in indexes:
            address = envelope.recipients[index].address
            if envelope.wants_dsn(index, "success") or not snapshot.is_local(address):
                return None
            expansion = expand(snapshot, address)
            if expansion.unknown or not (expansion.mailboxes or expansion.remote):
                return None
            if expansion.remote:
                if looped is None:
                    looped = delivered_to(claimed.body)
                if address.lower() in looped:
                    return None  # a forwarding loop: deliver() bounces it
                forwards.append(self._forward_copy(claimed, index, expansion.remote))
            for user in expansion.mailboxes:
                if user.quota is not None:
                    return None
                if user.address not in seen:
                    seen.add(user.address)
                    users.append(user)
        folder = JUNK if envelope.annotations.get("quarantine") else None
        handled_before = claimed.deliveries > 1 or claimed.attempts > 0
        stored = maildir.stored_form(claimed.body if users else b"", envelope.body_type)
        files = []
        for user in users:
            parts = maildir.render_parts(stored, envelope.mail_from, user.address)
            size = len(parts[0]) + len(parts[1])
            name = maildir.unique_name(
                claimed.id, user.address, envelope.received_at, self.hostname, size
            )
            box = maildir.mailbox_path(self.root, user.address, folder)
            files.append((user, folder, maildir.Copy(box, name, parts, handled_before)))
        return _Plan(claimed, indexes, files, forwards)

    async def _count_reports(self, claimed: Claimed, copies: list[MailboxCopy]) -> None:
        """TLS-RPT reports stored in a report mailbox, into the metrics. After the copy is
        stored: the report is kept whatever its parse says, and a parse never fails a
        delivery. A retry that finds the copy stored counts it again (at least once)."""
        if self.reports is None or not self.reports.wants([c.mailbox for c in copies]):
            return
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, self.reports.count, claimed.body)
        except Exception:  # a bug in the parser: the mail is delivered all the same
            log.exception("counting a TLS-RPT report failed", extra={"id": claimed.id})

    async def _to_mailbox(self, claimed: Claimed, user: User) -> MailboxCopy | RecipientResult:
        """The copy stored (or found stored by an earlier attempt), or why not."""
        envelope = claimed.envelope
        content = maildir.render(claimed.body, envelope.mail_from, user.address, envelope.body_type)
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
        # a copy an earlier attempt stored counts too: that attempt died before recording it
        # (the queue counts each mailbox's copy of a message once, however often recorded)
        return MailboxCopy(user.address, claimed.id, stored.size, folder, envelope.received_at)

    @staticmethod
    def _forward_copy(claimed: Claimed, index: int, targets: list[str]) -> Forward:
        """The new message that forwards recipient `index` to remote `targets`: the original
        envelope sender (bounces reach the author), a Delivered-To line for loop detection."""
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
            # the body with a field before it: what was checked of it still holds
            crlf_checked=original.crlf_checked,
            dot_lines=original.dot_lines,
        )
        body = f"Delivered-To: {recipient.address}\r\n".encode() + claimed.body
        return Forward(index, envelope, body)

    async def deliver_all(
        self, claimed: Claimed, pending: list[int], record: Recorder
    ) -> list[tuple[int, Action]]:
        """Every pending recipient, each result recorded as soon as it is known. Returns the
        recipients delivered, for success notices (NOTIFY=SUCCESS)."""
        done: set[str] = set()
        delivered_now: list[tuple[int, Action]] = []
        for index in pending:
            outcome = await self.deliver(claimed, index, done)
            await record({index: outcome.result}, outcome.copies, outcome.forwards)
            if outcome.result.status is RecipientStatus.DELIVERED:
                delivered_now.append((index, "delivered"))
        return delivered_now
