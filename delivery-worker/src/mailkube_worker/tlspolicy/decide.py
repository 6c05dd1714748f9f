"""Which transport security a delivery to one MX host gets, and whether what the host
presented satisfies it: pure functions of the policies found and the chain seen.

Precedence (RFC 8461 §2, RFC 7672 §2.2): authenticated TLSA records (DANE) first, then an
MTA-STS policy, then the domain's configured minimum (`required`: WebPKI-verified TLS) or
opportunistic TLS. A per-destination override (routing table `tls_policies`) can insist on
one of them or turn the policies off:

- opportunistic: STARTTLS when offered, nothing verified, no policy looked up
- required: TLS with a certificate valid for the MX name under the WebPKI (no DANE, no STS)
- dane: only hosts with authenticated TLSA records, matched (else deferred)
- sts: only what an MTA-STS policy allows, enforced even in testing mode (else deferred)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cryptography.x509.verification import Store

from .certs import Chain, webpki_failure
from .dane import TlsaAnswer, dane_failure
from .mta_sts import StsPolicy

Override = Literal["opportunistic", "required", "dane", "sts"]
#: dane: matched against TLSA; sts / sts-testing: MTA-STS (testing: failures only reported);
#: required: WebPKI; opportunistic: anything goes
Kind = Literal["dane", "sts", "sts-testing", "required", "opportunistic"]


@dataclass(frozen=True)
class HostPolicy:
    kind: Kind
    tlsa: TlsaAnswer | None = None
    sts: StsPolicy | None = None

    @property
    def tls_required(self) -> bool:
        return self.kind in ("dane", "sts", "required")

    @property
    def policy_type(self) -> str:
        """RFC 8460 §4.2 policy-type."""
        if self.kind == "dane":
            return "tlsa"
        if self.kind in ("sts", "sts-testing"):
            return "sts"
        return "no-policy-found"


@dataclass(frozen=True)
class Refusal:
    """The host must not be used now (a temporary failure): the RFC 8460 result type and
    the reason."""

    result_type: str
    text: str


@dataclass(frozen=True)
class Verdict:
    """How a session measured up: `result_type` None is a success; `enforced` False means a
    failure is only reported (testing mode, opportunistic)."""

    result_type: str | None
    text: str = ""
    enforced: bool = False

    @property
    def refuse(self) -> bool:
        return self.result_type is not None and self.enforced


def needs_sts(override: Override | None) -> bool:
    return override in (None, "sts")


def needs_dane(override: Override | None) -> bool:
    return override in (None, "dane")


def sts_allows(policy: StsPolicy | None, override: Override | None, host: str) -> bool:
    """Whether an MX host may be used at all under the domain's MTA-STS policy (§4.1): in
    enforce mode (or under the sts override) only the hosts it names. A host with DANE is
    judged by DANE instead, so it is checked later, against its TLSA answer."""
    if policy is None or policy.mode == "none":
        return override != "sts"
    if policy.mode == "enforce" or override == "sts":
        return policy.allows(host)
    return True


def host_policy(
    host: str,
    override: Override | None,
    minimum: Literal["opportunistic", "required"],
    sts: StsPolicy | None,
    tlsa: TlsaAnswer | None,
) -> HostPolicy | Refusal:
    if override == "opportunistic":
        return HostPolicy("opportunistic")
    if override == "required":
        return HostPolicy("required")
    if tlsa is not None and tlsa.status == "bogus":
        # RFC 7672 §2.2: a validation failure may be an attack hiding the records
        return Refusal("dnssec-invalid", f"TLSA of {host}: {tlsa.error or 'bogus'}")
    if tlsa is not None and tlsa.status == "secure" and override != "sts":
        return HostPolicy("dane", tlsa=tlsa)
    if override == "dane":
        return Refusal("dane-required", f"{host} has no authenticated TLSA records")
    active = sts if sts is not None and sts.mode != "none" else None
    if active is not None:
        if not sts_allows(active, override, host):
            return Refusal("validation-failure", f"{host} is not an MX host of the MTA-STS "
                           f"policy ({', '.join(active.mx)})")  # fmt: skip
        enforced = active.mode == "enforce" or override == "sts"
        return HostPolicy("sts" if enforced else "sts-testing", sts=active)
    if override == "sts":
        return Refusal("sts-policy-fetch-error", "no MTA-STS policy for the destination")
    return HostPolicy(minimum)


def for_requiretls(policy: HostPolicy | Refusal, host: str) -> HostPolicy | Refusal:
    """RFC 8689 §4.2.1: a REQUIRETLS message goes only to a host whose TLS DANE or MTA-STS
    (enforce or testing mode) validates, always enforced."""
    if isinstance(policy, Refusal) or policy.kind == "dane":
        return policy
    if policy.kind in ("sts", "sts-testing"):
        return HostPolicy("sts", sts=policy.sts)
    return Refusal("validation-failure", f"REQUIRETLS: {host} has neither an MTA-STS policy "
                   "nor DANE TLSA records")  # fmt: skip


def judge(policy: HostPolicy, host: str, tls: bool, chain: Chain,
          roots: Callable[[], Store]) -> Verdict:  # fmt: skip
    """The session's TLS (established or not, the chain presented) against the policy;
    `roots` gives the WebPKI trust store, loaded only when needed."""
    enforced = policy.kind in ("dane", "sts", "required")
    if not tls:
        if policy.kind == "opportunistic":
            return Verdict(None)
        return Verdict("starttls-not-supported", f"{host} does not offer STARTTLS", enforced)
    if policy.kind == "opportunistic":
        return Verdict(None)
    if policy.kind == "dane":
        assert policy.tlsa is not None
        why = dane_failure(chain, policy.tlsa.records, host)
        return Verdict(None) if why is None else Verdict("tlsa-invalid", f"{host}: {why}", True)
    failure = webpki_failure(chain, host, roots())
    if failure is None:
        return Verdict(None)
    return Verdict(failure, f"{host}: {failure}", enforced)
