"""The policies of one delivery, found and applied: the remote path (remote.py) asks
`TlsPolicies.for_domain` once per destination domain, then for each MX host whether it may
be used (`host`), how to connect (`HostPolicy.tls_required`), and whether the session it got
is good enough (`judge`); every outcome goes to the TLS-RPT store."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.resolver
from cryptography.x509.verification import Store

from .certs import Chain, load_roots
from .dane import TlsaAnswer, lookup_tlsa, mx_secure
from .decide import (
    HostPolicy,
    Override,
    Refusal,
    Verdict,
    for_requiretls,
    host_policy,
    judge,
    needs_dane,
)
from .mta_sts import PolicyError, StsRecord, parse_record
from .sts_cache import StsPolicies, StsState
from .tlsrpt_store import Outcome, TlsRptStore

log = logging.getLogger(__name__)

#: what a failed session setup means for the report (SessionError codes of smtp_client)
_SETUP_RESULT = {"4.7.4": "starttls-not-supported", "4.7.5": "validation-failure"}


@dataclass(frozen=True)
class DaneResolver:
    """A validating resolver whose AD bit is trusted (settings: dns_dnssec_trusted)."""

    nameservers: list[str]
    port: int
    timeout: float

    async def tlsa(self, host: str) -> TlsaAnswer:
        return await lookup_tlsa(host, self.nameservers, self.port, self.timeout)

    async def mx_secure(self, domain: str) -> bool:
        return await mx_secure(domain, self.nameservers, self.port, self.timeout)


class TlsPolicies:
    def __init__(
        self,
        *,
        sts: StsPolicies | None,
        dane: DaneResolver | None,
        reports: TlsRptStore | None,
        ca_file: str | None,
    ) -> None:
        self.sts = sts
        self.dane = dane
        self.reports = reports
        self.ca_file = ca_file

    def roots(self) -> Store:
        return load_roots(self.ca_file)

    async def for_domain(self, domain: str, override: Override | None,
                         minimum: Literal["opportunistic", "required"],
                         requiretls: bool = False) -> DomainTls:  # fmt: skip
        """`requiretls`: the message asks for RFC 8689 REQUIRETLS (overrides do not apply)."""
        if requiretls:
            override = None
        state = StsState(None)
        if self.sts is not None and override not in ("opportunistic", "required"):
            state = await self.sts.state(domain)
        return DomainTls(self, domain, override, minimum, state, requiretls)


@dataclass
class DomainTls:
    policies: TlsPolicies
    domain: str
    override: Override | None
    minimum: Literal["opportunistic", "required"]
    sts: StsState
    requiretls: bool = False
    _tlsa: dict[str, TlsaAnswer] = field(default_factory=dict)
    _mx_secure: bool | None = None

    async def host(self, name: str) -> HostPolicy | Refusal:
        tlsa = None
        dane = self.policies.dane
        if dane is not None and needs_dane(self.override) and not name.startswith("["):
            if self._mx_secure is None:
                self._mx_secure = await dane.mx_secure(self.domain)
            if not self._mx_secure:
                tlsa = TlsaAnswer("none", error="MX records not authenticated")
            elif name not in self._tlsa:
                self._tlsa[name] = await dane.tlsa(name)
            tlsa = self._tlsa.get(name, tlsa)
        policy = host_policy(name, self.override, self.minimum, self.sts.active, tlsa)
        return for_requiretls(policy, name) if self.requiretls else policy

    def judge(self, policy: HostPolicy, host: str, tls: bool, chain: Chain) -> Verdict:
        return judge(policy, host, tls, chain, self.policies.roots)

    def setup_failure(self, policy: HostPolicy, code: str) -> str | None:
        """The report's result type for a session that could not be set up under a policy
        that requires TLS (None: not a TLS matter)."""
        return _SETUP_RESULT.get(code) if policy.tls_required else None

    async def report(self, policy: HostPolicy | Refusal, host: str, ip: str,
                     result: str | None) -> None:  # fmt: skip
        """Count one session's outcome (result None: success)."""
        store = self.policies.reports
        if store is None:
            return
        if isinstance(policy, Refusal):
            kind = "tlsa" if policy.result_type in ("dnssec-invalid", "dane-required") \
                else "sts" if self.sts.active else "no-policy-found"  # fmt: skip
            outcome = self._outcome(kind, policy.result_type, host, ip)
        else:
            outcome = self._outcome(policy.policy_type, result or "success", host, ip, policy)
        await store.record(self.domain, outcome)
        if self.sts.failure is not None and self.sts.policy is None:
            await store.record(self.domain, Outcome("sts", (), (), self.sts.failure.result_type,
                                                    host, ip))  # fmt: skip

    def _outcome(self, kind: str, result: str, host: str, ip: str,
                 policy: HostPolicy | None = None) -> Outcome:  # fmt: skip
        strings: tuple[str, ...] = ()
        patterns: tuple[str, ...] = ()
        if kind == "sts" and self.sts.policy is not None:
            strings = tuple(self.sts.policy.to_text().splitlines())
            patterns = self.sts.policy.mx
        elif kind == "tlsa" and policy is not None and policy.tlsa is not None:
            strings = tuple(r.to_text() for r in policy.tlsa.records)
        return Outcome(kind, strings, patterns, "success" if result is None else result, host, ip)


async def sts_record(resolver: dns.asyncresolver.Resolver, domain: str) -> StsRecord | None:
    """The `_mta-sts` TXT record (RFC 8461 §3.1); None when there is no valid one;
    LookupError on DNS trouble."""
    try:
        answer = await resolver.resolve(f"_mta-sts.{domain}.", "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.DNSException as exc:
        raise LookupError(f"_mta-sts.{domain} TXT: {exc}") from exc
    strings = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    try:
        return parse_record(strings)
    except PolicyError as exc:
        log.info("mta-sts record ignored", extra={"domain": domain, "error": str(exc)})
        return None


async def addresses(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """IPv6 and IPv4 addresses of `name` ([] when it has none or DNS fails)."""

    async def one(rdtype: str) -> list[str]:
        try:
            answer = await resolver.resolve(name, rdtype, search=False)
        except dns.exception.DNSException:
            return []
        return [r.to_text() for r in answer]

    v6, v4 = await asyncio.gather(one("AAAA"), one("A"))
    return v6 + v4
