"""The filter-pipeline stages of email authentication.

- `InboundAuthentication` (MX listener, unauthenticated sessions): SPF, DKIM, ARC and DMARC,
  one Authentication-Results field, and the recipient domains' policy: reject, quarantine
  (the worker files the message in Junk), defer on DNS trouble, or accept.
- `SubmissionSigning` (authenticated sessions): Authentication-Results `auth=pass`, and DKIM
  signatures with the sender domain's keys.

Both first remove incoming Authentication-Results fields that claim our authserv-id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from mailkube_core.routing import Domain, RoutingReader
from mailkube_core.settings import GatewaySettings

from ..headers import HeaderSection, parse_header_section
from ..pipeline import Action, AuthFacts, ClientFacts, Message, Stage, Verdict
from .arc_verify import ARC_FIELDS, NO_ARC, ArcResult, verify_arc
from .dkim_sign import sign
from .dkim_verify import DkimResult, verify_dkim
from .dmarc_check import DmarcResult, check_dmarc
from .header_fields import field_spans, from_address, from_domain
from .resolver import DnsResolver
from .results_header import Clause, remove_ours, render_header
from .spf_check import SpfResult, check_spf
from .threads import BlockingChecks

T = TypeVar("T")

log = logging.getLogger(__name__)

# RFC 7372 / RFC 3463 enhanced codes
SPF_REJECTED = "550 5.7.23 SPF check failed: {domain} does not authorize {ip} to send its mail"
DMARC_REJECTED = (
    "550 5.7.1 Rejected by the DMARC policy of {domain}: the message is not authenticated "
    "as coming from it"
)
SPF_TEMP = "451 4.7.24 SPF record of {domain} could not be checked now, try again later"
DKIM_TEMP = "451 4.7.5 DKIM key of {domain} could not be fetched now, try again later"
DMARC_TEMP = "451 4.7.1 DMARC policy of {domain} could not be fetched now, try again later"


@dataclass(frozen=True)
class Policy:
    dmarc: str
    spf_fail: str
    dns_temp_error: str


def effective_policy(settings: GatewaySettings, domains: Sequence[Domain | None]) -> Policy:
    """The policy for a message to these recipient domains: each domain's own setting, else
    the gateway's; when recipient domains differ, the stricter setting wins (one DATA reply
    answers for every recipient)."""
    policies = [domain.policy for domain in domains if domain is not None]

    def pick(values: list[str], default: str, strict: str) -> str:
        return strict if strict in values else (values[0] if values else default)

    return Policy(
        dmarc=pick([p.dmarc or settings.dmarc_policy for p in policies],
                   settings.dmarc_policy, "enforce"),
        spf_fail=pick([p.spf_fail or settings.spf_fail for p in policies],
                      settings.spf_fail, "reject"),
        dns_temp_error=pick([p.dns_temp_error or settings.dns_temp_error for p in policies],
                            settings.dns_temp_error, "defer"),
    )  # fmt: skip


class _AuthStage:
    """What both stages share: settings, the routing table, the blocking-check pool, and the
    removal of forged Authentication-Results."""

    def __init__(
        self, settings: GatewaySettings, routing: RoutingReader, checks: BlockingChecks
    ) -> None:
        self.settings = settings
        self.routing = routing
        self.checks = checks
        self.authserv_id = settings.authserv_id or settings.hostname

    def strip_forged(self, message: Message) -> HeaderSection:
        """Remove incoming fields claiming our authserv-id; the header section after it (its
        field names as they were: only Authentication-Results fields may be gone)."""
        before = message.content
        section = parse_header_section(before, max_size=len(before))
        message.content, removed = remove_ours(before, section.size, self.authserv_id)
        if removed:
            log.info("removed Authentication-Results claiming our authserv-id",
                     extra={"count": removed, "client_ip": message.client_ip})  # fmt: skip
        # only fields of the header section were removed
        return replace(section, size=section.size - (len(before) - len(message.content)))


class InboundAuthentication(_AuthStage):
    name = "email-auth"

    async def check(self, message: Message) -> Verdict:
        if message.listener != "mx" or message.auth_user is not None:
            return Verdict()
        section = self.strip_forged(message)
        header_size = section.size
        content = message.content
        bridge = self.checks.bridge()
        timeout = self.checks.resolver.timeout
        # dkimpy splits the whole message into lines before it looks at the header: where
        # no field is there for it to verify, the answer (none) is known without it
        signed = section.count("dkim-signature") > 0
        sealed = any(section.count(name.decode()) for name in ARC_FIELDS)
        spf, dkim, arc = await asyncio.gather(
            self.checks.run(check_spf, bridge, message.client_ip, message.mail_from, message.helo),
            self.checks.run(verify_dkim, content, bridge.dkim_txt, timeout=timeout)
            if signed
            else _ready(list[DkimResult]()),
            self.checks.run(verify_arc, content, bridge.dkim_txt, timeout=timeout)
            if sealed
            else _ready(NO_ARC),
        )
        dmarc = await check_dmarc(
            self.checks.resolver, from_domain(content, header_size), spf, dkim
        )
        header = render_header(
            self.authserv_id,
            [*iprev_clause(message.client, message.client_ip), *clauses(spf, dkim, arc, dmarc)],
        )
        message.auth = AuthFacts(
            spf=spf.result,
            spf_domain=spf.domain,
            dkim=tuple((sig.domain, sig.result) for sig in dkim),
            dmarc=dmarc.result,
            from_domain=dmarc.from_domain,
            dmarc_disposition=dmarc.disposition,
        )
        snapshot = self.routing.snapshot
        policy = effective_policy(
            self.settings,
            snapshot.recipient_domains(message.recipients),
        )
        return decide(policy, spf, dkim, dmarc, message.client_ip, (header,))


async def _ready(value: T) -> T:
    return value


def decide(
    policy: Policy,
    spf: SpfResult,
    dkim: Sequence[DkimResult],
    dmarc: DmarcResult,
    client_ip: str,
    headers: tuple[str, ...],
) -> Verdict:
    if dmarc.result != "pass" and policy.dns_temp_error == "defer":
        # a DNS failure could have hidden a pass: let the sender retry rather than guess
        if spf.result == "temperror":
            reply = SPF_TEMP.format(domain=spf.domain)
            return Verdict(Action.DEFER, headers, reply, "spf temperror")
        failed = next((sig for sig in dkim if sig.result == "temperror"), None)
        if failed is not None:
            reply = DKIM_TEMP.format(domain=failed.domain)
            return Verdict(Action.DEFER, headers, reply, "dkim temperror")
        if dmarc.result == "temperror":
            reply = DMARC_TEMP.format(domain=dmarc.from_domain)
            return Verdict(Action.DEFER, headers, reply, "dmarc temperror")
    # RFC 7489 §10.1: an SPF fail is not refused before DMARC had its say (DKIM may align)
    if spf.result == "fail" and policy.spf_fail == "reject" and dmarc.result != "pass":
        reply = SPF_REJECTED.format(domain=spf.domain, ip=client_ip)
        return Verdict(Action.REJECT, headers, reply, "spf fail")
    if dmarc.result == "fail" and policy.dmarc == "enforce":
        if dmarc.disposition == "reject":
            reply = DMARC_REJECTED.format(domain=dmarc.from_domain)
            return Verdict(Action.REJECT, headers, reply, "dmarc p=reject")
        if dmarc.disposition == "quarantine":
            return Verdict(Action.QUARANTINE, headers, None, "dmarc p=quarantine")
    return Verdict(Action.ACCEPT, headers)


def iprev_clause(client: ClientFacts, client_ip: str) -> list[Clause]:
    """The reverse-name check the session made (screening/rdns.py), as RFC 8601 §2.7.3
    reports it: `iprev=pass (name) policy.iprev=ip` (the property IANA registers for iprev);
    nothing when client_rdns is off."""
    if client.iprev is None:
        return []
    return [
        Clause("iprev", client.iprev, client.reverse_name or "",
               properties=(("policy.iprev", client_ip),))
    ]  # fmt: skip


def clauses(
    spf: SpfResult, dkim: Sequence[DkimResult], arc: ArcResult, dmarc: DmarcResult
) -> list[Clause]:
    """The resinfo list of RFC 8601 §2.2, in the order the checks depend on each other."""
    identity = "smtp.mailfrom" if spf.scope == "mailfrom" else "smtp.helo"
    result = [Clause("spf", spf.result, spf.explanation, properties=((identity, spf.domain),))]
    if not dkim:
        result.append(Clause("dkim", "none"))
    for sig in dkim:
        result.append(
            Clause(
                "dkim",
                sig.result,
                reason="" if sig.result == "pass" else sig.reason,
                properties=(
                    ("header.d", sig.domain),
                    ("header.s", sig.selector),
                    ("header.a", sig.algorithm),
                    ("header.b", sig.header_b),
                ),
            )
        )
    result.append(Clause("arc", arc.result, reason="" if arc.result != "fail" else arc.reason))
    dmarc_comment = f"p={dmarc.policy} dis={dmarc.disposition}" if dmarc.policy else ""
    result.append(
        Clause(
            "dmarc",
            dmarc.result,
            dmarc_comment,
            reason=dmarc.reason if dmarc.result in ("permerror", "temperror") else "",
            properties=(("header.from", dmarc.from_domain),),
        )
    )
    return result


class SubmissionSigning(_AuthStage):
    name = "dkim-sign"

    def __init__(
        self, settings: GatewaySettings, routing: RoutingReader, checks: BlockingChecks
    ) -> None:
        super().__init__(settings, routing, checks)
        #: domains already logged as having no key (log once per domain)
        self._unsigned: set[str] = set()

    def signing_domain(self, message: Message, header_size: int) -> Domain | None:
        """The From header's domain when the user may send as that address (so DKIM aligns
        for DMARC), else the MAIL FROM domain; None when neither is ours. Never a domain the
        user may not use: a signature vouches for the mail."""
        assert message.auth_user is not None
        snapshot = self.routing.snapshot
        user = snapshot.user(message.auth_user)
        if user is None:
            return None
        author = from_address(message.content, header_size)
        for address in (author, message.mail_from):
            if address and snapshot.may_send_as(user, address):
                domain = snapshot.domain(address.rpartition("@")[2])
                if domain is not None:
                    return domain
        return None

    async def check(self, message: Message) -> Verdict:
        if message.auth_user is None:
            return Verdict()
        header_size = self.strip_forged(message).size
        header = render_header(
            self.authserv_id,
            [Clause("auth", "pass", properties=(("smtp.auth", message.auth_user),))],
        )
        domain = self.signing_domain(message, header_size)
        keys = domain.signing_keys() if domain is not None else []
        if domain is None or not keys:
            name = domain.name if domain is not None else message.mail_from.rpartition("@")[2]
            if name not in self._unsigned:
                self._unsigned.add(name)
                log.warning("sending unsigned: no DKIM key", extra={"domain": name})
            return Verdict(headers=(header,))
        try:
            signatures = await self.checks.run(sign, message.content, domain.name, keys)
        except ValueError as error:  # a broken key in the routing table: send, but say so
            log.error("DKIM signing failed", extra={"domain": domain.name, "error": str(error)})
            return Verdict(headers=(header,))
        fields = tuple(
            signatures[start:end].decode("ascii").removesuffix("\r\n")
            for start, end in field_spans(signatures, len(signatures))
        )
        return Verdict(headers=(header, *fields))


def build_resolver(settings: GatewaySettings) -> DnsResolver:
    """The process's one resolver (and cache), shared with the connection-level checks."""
    return DnsResolver(
        settings.dns_nameservers, settings.dns_port, settings.dns_timeout.total_seconds()
    )


def build_stages(
    settings: GatewaySettings, routing: RoutingReader, resolver: DnsResolver
) -> tuple[list[Stage], BlockingChecks]:
    """The email-authentication stages for the gateway's pipeline, and the thread pool they
    share (close it on stop)."""
    checks = BlockingChecks(resolver, settings.auth_check_threads)
    stages: list[Stage] = [SubmissionSigning(settings, routing, checks)]
    if settings.inbound_auth_checks:
        stages.insert(0, InboundAuthentication(settings, routing, checks))
    return stages, checks
