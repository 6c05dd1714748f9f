"""The content-scanning stage of the filter pipeline: rspamd's verdict on each message, by
the recipient domains' spam policy (inbound) or `submission_spam_policy` (authenticated
users), after email authentication and before DKIM signing (docs/spam.md).

Whenever it runs, it first removes incoming X-Spam* fields (spam/headers.py). A submission
refused as spam counts towards the user's suspension (mailkube_core.suspensions).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from opentelemetry import metrics
from redis.exceptions import RedisError

from mailkube_core.redis_client import RedisClient
from mailkube_core.routing import RoutingReader
from mailkube_core.settings import GatewaySettings
from mailkube_core.suspensions import record_spam_rejection
from mailkube_core.telemetry import Tally

from ..headers import parse_header_section
from ..pipeline import Action, Message, Verdict
from .greylist import Greylisting
from .headers import SPAM_FIELDS, rewrite_subject, strip_spam_fields
from .policy import EffectivePolicy, effective_spam_policy
from .rspamd import RspamdClient, RspamdResult, RspamdUnavailable, request_headers
from .suspended import SuspendedUsers
from .verdict import Scan, Unavailable, decide

log = logging.getLogger(__name__)
SPAM_FIELD_NAMES = frozenset(name.decode() for name in SPAM_FIELDS)
_scans = Tally(
    metrics.get_meter("mailkube.gateway"), "mailkube.gateway.spam_scans", unit="{message}",
    description="Messages scanned by rspamd, by result (the action decided on, or "
    "unavailable) and kind (inbound, submission)",
)  # fmt: skip


class RspamdStage:
    name = "rspamd"

    def __init__(
        self,
        settings: GatewaySettings,
        routing: RoutingReader,
        redis: RedisClient,
        client: RspamdClient,
        suspended: SuspendedUsers,
        greylisting: Greylisting,
    ) -> None:
        self.settings = settings
        self.routing = routing
        self.redis = redis
        self.client = client
        self.suspended = suspended
        #: carries out rspamd's advice to greylist (verdict.py)
        self.greylisting = greylisting

    def _policy(self, message: Message) -> EffectivePolicy:
        snapshot = self.routing.snapshot
        domains = snapshot.recipient_domains(message.recipients)
        return effective_spam_policy(self.settings, domains)

    async def check(self, message: Message) -> Verdict:
        before = message.content
        section = parse_header_section(before, max_size=len(before))
        header_size = section.size
        if not SPAM_FIELD_NAMES.isdisjoint(section.names):
            message.content, removed = strip_spam_fields(before, section.size)
            header_size -= len(before) - len(message.content)
            log.info("removed incoming X-Spam fields",
                     extra={"count": removed, "client_ip": message.client_ip})  # fmt: skip
        submission = message.auth_user is not None
        policy: EffectivePolicy | None = None
        if submission:
            if self.settings.submission_spam_policy == "off":
                return Verdict()
        else:
            policy = self._policy(message)
            if policy.policy == "off":
                return Verdict()
        scan: Scan
        try:
            scan = await self.client.check(message.content, request_headers(message, self.settings))
        except RspamdUnavailable as error:
            scan = Unavailable(str(error))
        decision = decide(self.settings, policy, scan, submission=submission)
        kind = "submission" if submission else "inbound"
        _scans.add(1, {"result": decision.result, "kind": kind})
        if decision.rewrite_subject and isinstance(scan, RspamdResult):
            message.content = rewrite_subject(message.content, header_size, scan.subject)
        if decision.counts_against_user and message.auth_user is not None:
            await self._count_refusal(message.auth_user)
        if decision.greylist:
            greylisted = await self.greylisting.greylist(message)
            if greylisted.action is not Action.ACCEPT:
                return replace(greylisted, reason=f"rspamd advised: {greylisted.reason}")
        return decision.verdict

    async def _count_refusal(self, address: str) -> None:
        """One more message of `address` refused as spam; past the threshold the user is
        suspended (the refusal stands whether or not Redis could count it)."""
        settings = self.settings
        threshold = settings.submission_spam_suspend_after
        try:
            count, new = await record_spam_rejection(
                self.redis, settings.key_prefix, address, settings.submission_spam_window,
                threshold,
            )  # fmt: skip
        except (RedisError, TimeoutError, OSError) as error:
            log.warning("spam refusal not counted", extra={"user": address, "error": repr(error)})
            return
        if threshold and count >= threshold:
            self.suspended.suspend(address)
        if new:
            log.warning(
                "user suspended for submission",
                extra={"user": address, "refusals": count,
                       "window_s": settings.submission_spam_window.total_seconds()},
            )  # fmt: skip
        else:
            log.info("submission refused as spam", extra={"user": address, "refusals": count})
