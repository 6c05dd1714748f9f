"""The routing table (docs/architecture.md "Routing table"): domains, users, DKIM keys, policies.

The operator and `mailkube routing apply` write it; the gateway and workers read it. Addresses
and domain names are stored normalised (see `addresses`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    model_validator,
)

from ..addresses import normalize_address, normalize_domain, split_address

DomainName = Annotated[str, AfterValidator(normalize_domain)]
Address = Annotated[str, AfterValidator(normalize_address)]
#: stored in Redis in clear (Redis holds the keys anyway); shown as ********** by repr/str
Secret = Annotated[
    SecretStr,
    PlainSerializer(lambda value: value.get_secret_value(), return_type=str, when_used="json"),
]
Selector = Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DkimKey(_Model):
    selector: Selector
    algorithm: Literal["rsa-sha256", "ed25519-sha256"]
    #: PEM for RSA; for Ed25519 the base64 of the 32-byte private seed, as dkimpy takes it
    private_key: Secret
    #: False for a retired key still published in DNS during a rotation; it does not sign
    signing: bool = True


class DomainPolicy(_Model):
    """Inbound checks for mail to the domain; None: the gateway's setting of the same name."""

    #: enforce: DMARC p=reject fails with 550 and p=quarantine goes to .Junk; monitor: tag only
    dmarc: Literal["enforce", "monitor"] | None = None
    #: an SPF fail: refuse (550 5.7.23) or accept with the result in Authentication-Results
    spf_fail: Literal["reject", "tag"] | None = None
    #: a DNS temporary error during SPF/DKIM/DMARC: answer 451 (defer) or accept and tag
    dns_temp_error: Literal["defer", "accept"] | None = None
    #: outbound: deliver only over TLS for this sender domain
    require_tls_outbound: bool = False


class SpamPolicy(_Model):
    """Spam defence for mail to the domain (docs/spam.md); None: the gateway's setting of the
    same name (spam_policy, spam_reject_score, ...). Recipients of several domains in one
    message: the strictest value wins."""

    #: off: not scanned; tag: headers only; quarantine: spam into Junk; reject: rspamd's
    #: reject refused (554 5.7.1), the rest of the spam into Junk
    policy: Literal["off", "tag", "quarantine", "reject"] | None = None
    #: a score at or above this is a reject, whatever rspamd's action
    reject_score: float | None = None
    #: a score at or above this is spam (tagged; into Junk under quarantine and reject)
    junk_score: float | None = None
    #: prefix the Subject of spam
    rewrite_subject: bool | None = None
    #: rspamd down, slow or answering garbage: accept (X-Spam-Status: unchecked) or defer (451)
    when_unavailable: Literal["accept", "defer"] | None = None
    #: greylist unknown (client network, sender, recipient) triplets
    greylisting: bool | None = None


class DomainLimits(_Model):
    max_message_size: Annotated[int, Field(gt=0)] | None = None
    max_messages_per_minute: Annotated[int, Field(gt=0)] | None = None


class RelayHost(_Model):
    """Outbound smart host for mail from this domain."""

    host: str
    port: Annotated[int, Field(gt=0, lt=65536)] = 587
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str | None = None
    password: Secret | None = None


class InboundRelay(_Model):
    """The next hop for mail *to* a domain we relay for (Postfix's relay_domains with a
    transport): the gateway accepts it as for any of our domains, and the worker sends it on
    to this host instead of into mailboxes, as a mail gateway in front of another server or a
    backup MX does."""

    host: str
    port: Annotated[int, Field(gt=0, lt=65536)] = 25
    #: opportunistic: STARTTLS when offered, any certificate; starttls: required and verified
    tls: Literal["opportunistic", "starttls", "implicit", "none"] = "opportunistic"


class MtaStsPolicy(_Model):
    """The MTA-STS policy (RFC 8461) we publish for mail to one of our domains: the gateway
    serves `text()` at https://mta-sts.<domain>/.well-known/mta-sts.txt, and the TXT record's
    id is derived from the same text (the operator's status)."""

    mode: Literal["enforce", "testing", "none"]
    #: seconds senders may cache the policy (RFC 8461 §3.2: at most 31557600)
    max_age: Annotated[int, Field(ge=0, le=31557600)]
    #: the MX host names senders may deliver to
    mx: Annotated[list[DomainName], Field(min_length=1)]

    def text(self) -> str:
        """The policy file (RFC 8461 §3.2), CRLF line ends."""
        lines = ["version: STSv1", f"mode: {self.mode}", *(f"mx: {mx}" for mx in self.mx),
                 f"max_age: {self.max_age}"]  # fmt: skip
        return "".join(f"{line}\r\n" for line in lines)


class Domain(_Model):
    name: DomainName
    dkim: list[DkimKey] = []
    #: where mail to unknown local parts of this domain goes; None rejects them (550 5.1.1)
    catch_all: Address | None = None
    policy: DomainPolicy = DomainPolicy()
    spam: SpamPolicy = SpamPolicy()
    limits: DomainLimits = DomainLimits()
    relay: RelayHost | None = None
    #: mail to this domain goes on to this host, not into mailboxes; its users and aliases
    #: (and catch-all) say which recipients are accepted, as for a mailbox domain
    inbound_relay: InboundRelay | None = None
    #: the MTA-STS policy the gateway serves for mta-sts.<name>; None: 404
    mta_sts: MtaStsPolicy | None = None

    def signing_keys(self) -> list[DkimKey]:
        return [key for key in self.dkim if key.signing]


class User(_Model):
    address: Address
    #: argon2id (PHC string); None: the user cannot log in (e.g. its Secret is missing)
    password_hash: str | None = None
    #: mailbox quota in bytes; None: unlimited
    quota: Annotated[int, Field(ge=0)] | None = None
    aliases: list[Address] = []
    forward_to: list[Address] = []
    #: with forward_to, also deliver to the local mailbox
    keep_copy: bool = False
    #: extra MAIL FROM addresses this user may submit with
    send_as: list[Address] = []
    suspended: bool = False

    @property
    def domain(self) -> str:
        return split_address(self.address)[1]


class TlsPolicy(_Model):
    """Transport security for mail to a destination domain (any domain, not only ours),
    overriding what its DNS publishes (docs/delivery.md "Transport security").

    opportunistic: STARTTLS when offered, nothing verified, MTA-STS and DANE not looked up;
    required: TLS with a certificate valid for the MX host name under the WebPKI;
    dane: only MX hosts with DNSSEC-authenticated TLSA records, matched (else deferred);
    sts: only what the domain's MTA-STS policy allows, enforced even in testing mode."""

    domain: DomainName
    tls: Literal["opportunistic", "required", "dane", "sts"]


class RoutingTable(_Model):
    domains: list[Domain] = []
    users: list[User] = []
    #: per-destination overrides of the outbound TLS policy
    tls_policies: list[TlsPolicy] = []

    @model_validator(mode="after")
    def _consistent(self) -> RoutingTable:
        overridden = [p.domain for p in self.tls_policies]
        if len(overridden) != len(set(overridden)):
            twice = sorted({n for n in overridden if overridden.count(n) > 1})
            raise ValueError(f"tls_policies: domain listed twice: {twice}")
        listed = [d.name for d in self.domains]
        names = set(listed)  # a set: this runs over every user of a table of thousands
        if len(listed) != len(names):
            raise ValueError(
                f"domain listed twice: {sorted({n for n in listed if listed.count(n) > 1})}"
            )
        owners: dict[str, str] = {}
        for user in self.users:
            if user.domain not in names:
                raise ValueError(f"user {user.address}: domain {user.domain} is not in the table")
            for address in (user.address, *user.aliases):
                if split_address(address)[1] not in names:
                    raise ValueError(f"alias {address} of {user.address} is not in a local domain")
                _own(owners, address, user.address)
        return self


def _own(owners: dict[str, str], address: str, user: str) -> None:
    """Record that `user` owns `address`; an address owned twice is an error."""
    if address in owners:
        raise ValueError(f"address {address} belongs to both {owners[address]} and {user}")
    owners[address] = user


class DomainEntry(_Model):
    """One domain of the table with its users: what Redis keeps per domain (store.py). Its
    own checks are the per-domain part of RoutingTable's: every user's address in this
    domain, no address (own or alias) twice among its users. An alias may be in another
    local domain: that it is local and owned once is the writer's check across the table."""

    domain: Domain
    users: list[User] = []

    @model_validator(mode="after")
    def _consistent(self) -> DomainEntry:
        owners: dict[str, str] = {}
        for user in self.users:
            if user.domain != self.domain.name:
                raise ValueError(f"user {user.address} is not in domain {self.domain.name}")
            for address in (user.address, *user.aliases):
                _own(owners, address, user.address)
        return self


class TableGlobals(_Model):
    """The table's parts that are no domain's, kept in one key next to the domains."""

    tls_policies: list[TlsPolicy] = []
    #: the domains' order in the table (RoutingTable.domains), e.g. the first is the
    #: postmaster's fallback; domains not listed follow, by name
    order: list[DomainName] = []


def split_table(table: RoutingTable) -> tuple[dict[str, DomainEntry], TableGlobals]:
    """The table as stored: one entry per domain with its users, and the rest (no checks
    again: the table's were made)."""
    users: dict[str, list[User]] = {domain.name: [] for domain in table.domains}
    for user in table.users:
        users[user.domain].append(user)
    entries = {
        domain.name: DomainEntry.model_construct(domain=domain, users=users[domain.name])
        for domain in table.domains
    }
    globals_ = TableGlobals.model_construct(
        tls_policies=table.tls_policies, order=[domain.name for domain in table.domains]
    )
    return entries, globals_


def join_table(entries: Mapping[str, DomainEntry], globals_: TableGlobals) -> RoutingTable:
    """The table from its stored parts, unchecked: each entry was checked when it was parsed,
    the rest across domains is the writer's (RoutingTable's checks, or the operator's plan)."""
    listed = [name for name in globals_.order if name in entries]
    names = [*listed, *sorted(set(entries) - set(listed))]
    return RoutingTable.model_construct(
        domains=[entries[name].domain for name in names],
        users=[user for name in names for user in entries[name].users],
        tls_policies=globals_.tls_policies,
    )
