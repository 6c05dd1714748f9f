"""Sending the daily TLS-RPT reports (RFC 8460 §5): once a UTC day is over, one report per
policy domain with outcomes that day and a `_smtp._tls` TXT record, to each `rua`: mailto:
as a message through our own queue, https: by POST (§5.4, WebPKI-verified, one deadline).

Any remote worker may do it: a domain's report is claimed in Redis for an hour (another
worker takes over if this one dies), and marked sent for the day once every rua had it
(a failed https POST is not retried: §5.4 leaves retrying to the sender, and one missed
aggregate is not worth a second copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailkube_core.queue import Envelope, Notify, Recipient
from mailkube_core.redis_client import RedisClient

from .sts_fetch import AddressLookup
from .tlsrpt import (
    MEDIA_TYPE,
    RecordError,
    ReportTargets,
    build_report,
    parse_record,
    report_body,
    report_message,
)
from .tlsrpt_store import KEEP_DAYS, TlsRptStore, day_key, day_of

log = logging.getLogger(__name__)

CLAIM_SECONDS = 3600
#: (envelope, message) -> queued
Enqueue = Callable[[Envelope, bytes], Awaitable[object]]


async def report_targets(resolver: dns.asyncresolver.Resolver, domain: str) -> ReportTargets | None:
    try:
        answer = await resolver.resolve(f"_smtp._tls.{domain}.", "TXT", search=False)
    except dns.exception.DNSException:
        return None
    strings = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    try:
        return parse_record(strings)
    except RecordError:
        return None


async def post(url: str, body: bytes, context: ssl.SSLContext, limit: float,
               addresses: AddressLookup) -> int:  # fmt: skip
    """POST the report (§5.4) to the first address of the URL's host (looked up by
    `addresses`, the worker's resolver); the HTTP status. OSError / TimeoutError when it
    could not."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with asyncio.timeout(limit):
        found = await addresses(host)
        if not found:
            raise OSError(f"{host} has no address")
        reader, writer = await asyncio.open_connection(found[0], parts.port or 443, ssl=context,
                                                       server_hostname=host)  # fmt: skip
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {MEDIA_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            status = (await reader.readline()).split()
        finally:
            writer.close()
    if len(status) < 2 or not status[1].isdigit():
        raise OSError(f"{host}: not an HTTP answer")
    return int(status[1])


class TlsReporter:
    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        *,
        targets: Callable[[str], Awaitable[ReportTargets | None]],
        enqueue: Enqueue,
        https: Callable[[str, bytes], Awaitable[int]],
        submitter: str,
        organization: str,
        contact: str,
        sender: str,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.store = TlsRptStore(redis, prefix)
        self.targets = targets
        self.enqueue = enqueue
        self.https = https
        self.submitter = submitter
        self.organization = organization
        self.contact = contact
        self.sender = sender

    async def run(self, stopping: asyncio.Event, every: timedelta = timedelta(hours=1)) -> None:
        """Until `stopping`: the reports of the days before today not yet sent."""
        while not stopping.is_set():
            today = datetime.now(UTC)
            for back in (1, 2):  # yesterday, and the day before if it was missed
                try:
                    await self.send_day(day_of(today - timedelta(days=back)))
                except Exception:  # Redis down, a bug: try again later
                    log.exception("tls-rpt reports failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), every.total_seconds())

    async def send_day(self, day: str) -> int:
        """Send the reports of `day` not sent yet; the number sent."""
        sent = 0
        done_key = f"{day_key(self.prefix, day)}:sent"
        for domain in await self.store.domains(day):
            if await self.redis.sismember(done_key, domain):
                continue
            claim = f"{day_key(self.prefix, day)}:claim:{domain}"
            if not await self.redis.set(claim, "1", nx=True, ex=CLAIM_SECONDS):
                continue
            if await self._send(domain, day):
                sent += 1
            await self.redis.sadd(done_key, domain)
            await self.redis.expire(done_key, KEEP_DAYS * 86400)
        return sent

    async def _send(self, domain: str, day: str) -> bool:
        targets = await self.targets(domain)
        if targets is None:
            return False  # the domain asks for no reports
        outcomes = await self.store.outcomes(day, domain)
        if not outcomes:
            return False
        unique = uuid.uuid4().hex[:12]
        report = build_report(domain, day, outcomes, organization=self.organization,
                              contact=self.contact,
                              report_id=f"{day}.{unique}@{self.submitter}")  # fmt: skip
        if targets.mailto:
            message = report_message(report, domain=domain, submitter=self.submitter,
                                     sender=self.sender, recipients=list(targets.mailto),
                                     unique=unique, now=datetime.now(UTC))  # fmt: skip
            envelope = Envelope(
                mail_from=self.sender,
                recipients=[
                    Recipient(address=a, notify=frozenset({Notify.NEVER})) for a in targets.mailto
                ],
            )
            await self.enqueue(envelope, message)
        body = report_body(report)
        for url in targets.https:
            try:
                status = await self.https(url, body)
            except (OSError, TimeoutError) as exc:
                log.info("tls-rpt post failed", extra={"url": url, "error": str(exc)})
                continue
            if not 200 <= status < 300:
                log.info("tls-rpt post refused", extra={"url": url, "status": status})
        log.info("tls-rpt report sent", extra={"domain": domain, "day": day})
        return True
