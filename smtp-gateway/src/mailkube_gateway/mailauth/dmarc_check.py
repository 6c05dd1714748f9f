"""DMARC (RFC 7489): policy discovery with the gateway's resolver, organizational domains from
the Public Suffix List (the `publicsuffixlist` package, which ships a current list), and the
evaluation — identifier alignment, p/sp, pct — by the `dmarc` library.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import dmarc  # type: ignore[import-untyped]
from publicsuffixlist import PublicSuffixList

from .dkim_verify import DkimResult
from .resolver import DnsResolver, DnsTempError
from .spf_check import SpfResult


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (the domain itself if it is a public
    suffix or unknown to the list)."""
    domain = domain.lower().rstrip(".")
    return str(_psl().privatesuffix(domain) or domain)


class _OrgDomains:
    """The `dmarc` library's PSL interface: `get_public_suffix` returns what that library
    compares in relaxed mode, the organizational domain."""

    @staticmethod
    def get_public_suffix(domain: str) -> str:
        return organizational_domain(domain)


_evaluator = dmarc.DMARC(publicsuffix=_OrgDomains())


@dataclass(frozen=True)
class DmarcResult:
    #: "pass", "fail", "none" (no policy), "temperror", "permerror" (RFC 8601 §2.7.7-ish)
    result: str
    #: the RFC 5322.From domain
    from_domain: str
    #: the published policy that applies (p, or sp for a subdomain): none, quarantine, reject
    policy: str = ""
    #: what the policy asks for this message after pct: none, quarantine, reject
    disposition: str = "none"
    reason: str = ""


async def _discover(resolver: DnsResolver, domain: str) -> list[str]:
    """The v=DMARC1 records at _dmarc.<domain> (RFC 7489 §6.6.3 step 2)."""
    return [
        text.decode("utf-8", "replace")
        for text in await resolver.txt(f"_dmarc.{domain}.")
        if text.split(b";", 1)[0].strip() == b"v=DMARC1"
    ]


async def check_dmarc(
    resolver: DnsResolver,
    from_domain: str | None,
    spf: SpfResult,
    dkim: Sequence[DkimResult],
    *,
    chance: float | None = None,
) -> DmarcResult:
    """`from_domain` None: the From header has no single usable domain (a permerror).
    `chance` in [0, 1) replaces the random draw for pct (tests)."""
    if not from_domain:
        return DmarcResult("permerror", "", reason="no single RFC5322.From domain")
    from_domain = from_domain.lower().rstrip(".")
    org_domain = organizational_domain(from_domain)
    try:
        records = await _discover(resolver, from_domain)
        found_at_org = False
        if not records and org_domain != from_domain:  # §6.6.3 step 3
            records = await _discover(resolver, org_domain)
            found_at_org = bool(records)
    except DnsTempError as error:
        return DmarcResult("temperror", from_domain, reason=str(error))
    if len(records) != 1:  # §6.6.3 step 5: none, or several, means no DMARC processing
        reason = "no DMARC record" if not records else "several DMARC records"
        return DmarcResult("none", from_domain, reason=reason)
    record = records[0]
    try:
        policy = _evaluator.parse_record(
            record, domain=from_domain, org_domain=org_domain if found_at_org else None
        )
    except dmarc.RecordSyntaxError as error:
        # §6.6.3: a record that does not parse is as if there were none
        return DmarcResult("none", from_domain, reason=f"invalid DMARC record: {error}"[:120])
    # §4.1: the SPF result counts for the MAIL FROM domain (the HELO domain for <>)
    spf_auth = dmarc.SPF(domain=spf.domain or from_domain, result=_spf_result(spf.result))
    dkim_auths = [
        dmarc.DKIM(domain=sig.domain, result=dmarc.DKIMResult.PASS)
        for sig in dkim
        if sig.result == "pass" and sig.domain
    ]
    outcome = _evaluator.get_result(
        policy, auth_results=dmarc.AuthResults(spf=spf_auth, dkim=dkim_auths)
    )
    published = (policy.sp if found_at_org and policy.sp is not dmarc.DMARCDisposition.UNSPECIFIED
                 else policy.p).value  # fmt: skip
    if outcome.result is dmarc.DMARCResult.PASS:
        return DmarcResult("pass", from_domain, published, "none")
    disposition = outcome.disposition.value
    # §6.6.4: pct < 100 applies the policy to that share of failing mail; the rest gets the
    # next weaker treatment
    draw = random.random() if chance is None else chance  # noqa: S311 (not security)
    if policy.pct < 100 and draw * 100 >= policy.pct:
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(disposition, disposition)
    return DmarcResult("fail", from_domain, published, disposition, "not aligned")


def _spf_result(result: str) -> dmarc.SPFResult:
    try:
        return dmarc.SPFResult(result)
    except ValueError:
        return dmarc.SPFResult.NONE
