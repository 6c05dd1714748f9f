"""The MailDomain and MailUser custom resources as pydantic models.

They are the single source of the CRDs (`crdgen` turns their JSON schema into structural
OpenAPI v3) and parse the spec dicts the handlers receive, so that what the API server admits
and what the operator understands cannot drift apart. Field names are the Kubernetes
camelCase ones (aliases); Python code uses snake_case.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, model_validator
from pydantic.alias_generators import to_camel

from mailkube_core.settings import parse_duration

GROUP = "mailkube.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
DOMAINS = "maildomains"
USERS = "mailusers"

#: one DNS label (RFC 1123), letters, digits and hyphens
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: a domain name in ASCII (IDNs in their xn-- A-label form), at least two labels
DOMAIN_PATTERN = rf"^{_LABEL}(\.{_LABEL})+$"
#: a mail address: a local part without spaces, quotes or angle brackets, then a domain
ADDRESS_PATTERN = rf"^[^@\s<>\"]{{1,64}}@{_LABEL}(\.{_LABEL})+$"
#: a Kubernetes resource.Quantity ("1Gi", "500M", "1073741824")
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
#: a DKIM selector; with algorithm "both" the Ed25519 key uses "<selector>-ed25519"
SELECTOR_PATTERN = rf"^{_LABEL}$"
#: a Secret name (RFC 1123 subdomain) and a key in its data
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # noqa: S105
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105

_SUFFIXES: dict[str, Decimal | int] = {
    "": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def parse_quantity(value: int | str) -> int:
    """A Kubernetes quantity as a whole number of bytes (rounded up, as Kubernetes does)."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative: {value}")
        return value
    text = value.strip()
    number, suffix = text, ""
    for candidate in sorted(_SUFFIXES, key=len, reverse=True):
        if candidate and text.endswith(candidate):
            number, suffix = text[: -len(candidate)], candidate
            break
    try:
        amount = Decimal(number) * _SUFFIXES[suffix]
    except ArithmeticError:
        raise ValueError(f"not a quantity: {value!r} (use e.g. 1Gi, 500M, 1073741824)") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"not a quantity: {value!r} (must be finite and not negative)")
    return int(amount.to_integral_value(rounding="ROUND_CEILING"))


def _check_quantity(value: int | str) -> int | str:
    parse_quantity(value)
    return value


DomainName = Annotated[str, Field(pattern=DOMAIN_PATTERN, max_length=253)]
Address = Annotated[str, Field(pattern=ADDRESS_PATTERN, max_length=254)]
Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]
Selector = Annotated[str, Field(pattern=SELECTOR_PATTERN, max_length=55)]
SecretName = Annotated[str, Field(pattern=SECRET_NAME_PATTERN, max_length=253)]
SecretKey = Annotated[str, Field(pattern=SECRET_KEY_PATTERN, max_length=253)]
#: a duration: numbers with units, e.g. 180d, 7d, 1h30m, 90s (w, d, h, m, s, ms)
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d|w))+$"


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


Duration = Annotated[
    str, Field(pattern=DURATION_PATTERN, max_length=32), AfterValidator(_check_duration)
]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    def dump(self) -> dict[str, Any]:
        """The Kubernetes form: camelCase, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# -- MailDomain ----------------------------------------------------------------------------


class DkimRotationSpec(_Model):
    """When and how the operator rotates the domain's DKIM key (also on the annotation
    mailkube.io/rotate-dkim, and on a change of selector or algorithm)."""

    every: Duration | None = None
    """Rotate when the signing key has signed this long (e.g. 180d); unset: only on demand."""
    overlap: Duration = "7d"
    """How long the old key stays published after the new one signs (mail in transit and
    re-verification), before the operator removes it."""
    propagation_delay: Duration = "1h"
    """With the DNS check off (dns_check_interval): how long after the new key is listed in
    status it is taken as published. With the check on, the new key signs once the check
    finds its record."""

    @model_validator(mode="after")
    def _every_is_positive(self) -> DkimRotationSpec:
        if self.every is not None and not parse_duration(self.every):
            raise ValueError("rotation.every must be longer than 0s")
        return self


class DkimSpec(_Model):
    """DKIM signing of outgoing mail."""

    selector: Selector = "mailkube"
    """Selector of the signing key: the DKIM record is <selector>._domainkey.<domain>. Changing
    it rotates: without rotation, a new key signs at once and the old one stays published until
    removed from the Secret; with rotation, in stages."""
    algorithm: Literal["rsa-2048", "ed25519", "both"] = "rsa-2048"
    """Key type; both: RSA under <selector> and Ed25519 under <selector>-ed25519 (RFC 8463)."""
    rotation: DkimRotationSpec | None = None
    """Staged key rotation (docs/dns.md): a new key is listed, signs only once its record is
    published, and the old one stays listed for the overlap, then is removed. Unset: a
    selector change switches at once and old keys stay until removed from the Secret."""


class PolicySpec(_Model):
    """How inbound mail for the domain is checked; an unset field takes the gateway's setting
    of the same name (dmarc_policy, spf_fail, dns_temp_error)."""

    dmarc: Literal["enforce", "monitor"] | None = None
    """enforce: DMARC p=reject is refused (550) and p=quarantine goes to Junk; monitor: tag."""
    spf_fail: Literal["reject", "tag"] | None = None
    """What an SPF fail does: refuse the message, or accept it with a header."""
    dns_temp_error: Literal["defer", "accept"] | None = None
    """A DNS temporary error during SPF/DKIM/DMARC: answer 451 (defer) or accept and tag."""
    require_tls_outbound: bool = False
    """Deliver mail from this domain to other servers only over TLS."""


#: a spam score threshold; rspamd's scores of real mail stay far inside this range
SpamScore = Annotated[float, Field(ge=0, le=1000)]
#: junkScore below rejectScore when both are set (CRD validation rule; the API server checks it
#: from Kubernetes 1.25 on, the operator in any case)
SPAM_SCORE_RULE: dict[str, JsonValue] = {
    "rule": "!has(self.junkScore) || !has(self.rejectScore) || self.junkScore < self.rejectScore",
    "message": "junkScore must be below rejectScore",
}


class SpamSpec(_Model):
    """Spam defence for mail to the domain (docs/spam.md); an unset field takes the gateway's
    setting (spam_policy, spam_reject_score, spam_junk_score, spam_rewrite_subject,
    spam_unavailable, greylisting)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [SPAM_SCORE_RULE]})

    policy: Literal["off", "tag", "quarantine", "reject"] | None = None
    """off: not scanned; tag: headers only; quarantine: spam into Junk; reject: rspamd's reject
    refused (554 5.7.1), the rest of the spam into Junk."""
    reject_score: SpamScore | None = None
    """A score at or above this is a reject, whatever rspamd's action said."""
    junk_score: SpamScore | None = None
    """A score at or above this is spam (tagged; into Junk under quarantine and reject)."""
    rewrite_subject: bool | None = None
    """Prefix the Subject of spam."""
    when_unavailable: Literal["accept", "defer"] | None = None
    """rspamd down, slow or answering garbage: accept (X-Spam-Status: unchecked) or defer
    (451 4.3.0)."""
    greylisting: bool | None = None
    """Greylist mail from unknown (client network, sender, recipient) triplets."""

    @model_validator(mode="after")
    def _scores_in_order(self) -> SpamSpec:
        if (
            self.junk_score is not None
            and self.reject_score is not None
            and self.junk_score >= self.reject_score
        ):
            raise ValueError(str(SPAM_SCORE_RULE["message"]))
        return self


class DmarcRecordSpec(_Model):
    """The DMARC record the domain's owner publishes (listed in status.dnsRecords)."""

    policy: Literal["none", "quarantine", "reject"] = "quarantine"
    """p= of the record: what receivers do with mail that fails DMARC."""
    report_to: Address | None = None
    """Address for aggregate reports (rua=); default postmaster@<domain>."""


class MtaStsSpec(_Model):
    """The MTA-STS policy (RFC 8461) others apply to mail they send to the domain; its
    records are listed in status.dnsRecords."""

    mode: Literal["enforce", "testing", "none"] = "testing"
    """enforce: senders defer rather than deliver without valid TLS to our MX host; testing:
    they only report failures (TLS-RPT); none: withdraws a policy published before."""
    max_age: Annotated[int, Field(ge=0, le=31557600)] = 604800
    """Seconds senders may cache the policy (at most a year; a week by default)."""


class TlsRptSpec(_Model):
    """Where other senders send their daily TLS reports about mail to the domain (RFC 8460)."""

    rua: Annotated[
        list[Annotated[str, Field(pattern=r"^(mailto:[^@\s,;]+@[^@\s,;]+|https://[^\s,;]+)$")]],
        Field(min_length=1),
    ]
    """mailto: addresses or https: URLs, e.g. mailto:tls-reports@example.org."""


class LimitsSpec(_Model):
    """Per-domain limits, tighter than the gateway's."""

    max_message_size: Quantity | None = None
    """Largest message accepted for or from the domain (a quantity, e.g. 10Mi)."""
    max_messages_per_minute: Annotated[int, Field(gt=0)] | None = None
    """Messages per minute one sender of the domain may submit."""


class SecretKeyRef(_Model):
    """A key of a Secret in the resource's namespace."""

    name: SecretName
    """Name of the Secret."""
    key: SecretKey = "password"
    """Key in the Secret's data."""


class RelayCredentials(_Model):
    """AUTH credentials for the relay, from a Secret in the MailDomain's namespace."""

    name: SecretName
    """Name of the Secret."""
    username_key: SecretKey = "username"
    """Key holding the user name."""
    password_key: SecretKey = "password"  # noqa: S105
    """Key holding the password."""


class RelaySpec(_Model):
    """Outbound smart host for mail from this domain."""

    host: DomainName
    """Relay host name."""
    port: Annotated[int, Field(gt=0, lt=65536)] = 587
    """Relay port."""
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    """How to reach it: STARTTLS, implicit TLS, or plain (trusted networks only)."""
    credentials_secret_ref: RelayCredentials | None = None
    """Secret with the AUTH user name and password, if the relay wants them."""


class InboundRelaySpec(_Model):
    """Where mail to this domain goes on to, instead of into mailboxes (a gateway in front of
    another mail server, or a backup MX)."""

    host: DomainName
    """Next hop host name."""
    port: Annotated[int, Field(gt=0, lt=65536)] = 25
    """Next hop port."""
    tls: Literal["opportunistic", "starttls", "implicit", "none"] = "opportunistic"
    """STARTTLS when offered (any certificate), STARTTLS required and verified, implicit TLS,
    or plain (trusted networks only)."""


class MailDomainSpec(_Model):
    """A mail domain served by Mailkube."""

    domain: Annotated[
        DomainName,
        Field(
            json_schema_extra={
                "x-kubernetes-validations": [
                    {"rule": "self == oldSelf", "message": "domain is immutable"}
                ]
            }
        ),
    ]
    """The domain name (immutable; IDNs in their xn-- form)."""
    dkim: DkimSpec = DkimSpec()
    """DKIM signing keys (generated by the operator into <name>-dkim)."""
    catch_all: Address | None = None
    """Where mail to unknown addresses of the domain goes; unset: refused (550 5.1.1)."""
    policy: PolicySpec = PolicySpec()
    """Inbound checks."""
    dmarc_record: DmarcRecordSpec = DmarcRecordSpec()
    """The DMARC record to publish."""
    limits: LimitsSpec = LimitsSpec()
    """Per-domain limits."""
    spam: SpamSpec = SpamSpec()
    """Spam defence for mail to the domain; unset fields: the gateway's defaults."""
    relay: RelaySpec | None = None
    """Outbound smart host for mail from this domain; unset: direct delivery."""
    inbound_relay: InboundRelaySpec | None = None
    """Relay mail to this domain to this host instead of into mailboxes; its MailUsers (and
    catch-all) say which recipients are accepted. Unset: mailboxes."""
    mta_sts: MtaStsSpec | None = None
    """An MTA-STS policy for mail to the domain; unset: none published."""
    tls_rpt: TlsRptSpec | None = None
    """A TLS-RPT record asking senders for TLS reports; unset: none published."""


class Condition(_Model):
    """A metav1.Condition."""

    type: Annotated[str, Field(max_length=316)]
    """Ready, DKIMKeyReady, Published, DNSVerified."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation the condition was computed from."""
    last_transition_time: str
    """When status last changed (RFC 3339)."""
    reason: Annotated[str, Field(max_length=1024)]
    """A CamelCase word for programs."""
    message: Annotated[str, Field(max_length=32768)]
    """A sentence for people."""


class DnsRecord(_Model):
    """A DNS record the domain's owner must publish."""

    type: Literal["MX", "TXT", "CNAME", "TLSA"]
    """Record type."""
    name: str
    """Fully qualified owner name, with the trailing dot."""
    value: str
    """Exact value (TXT: the text, unquoted and unsplit)."""
    purpose: Literal[
        "mx", "spf", "dkim", "dmarc", "mta-sts", "mta-sts-host", "tls-rpt", "tlsa", "tlsa-next"
    ]
    """What the record is for."""
    note: str | None = None
    """E.g. that a DKIM key is retired and the record may go once no mail signed with it is in
    transit."""


class SpamStatus(_Model):
    """The spam policy in effect for mail to the domain: spec.spam over the gateway's defaults.
    A score threshold that is absent is left to rspamd's actions."""

    policy: Literal["off", "tag", "quarantine", "reject"]
    """off, tag, quarantine or reject."""
    reject_score: float | None = None
    """Score from which mail is rejected."""
    junk_score: float | None = None
    """Score from which mail is spam."""
    rewrite_subject: bool
    """Whether the Subject of spam is prefixed."""
    when_unavailable: Literal["accept", "defer"]
    """What happens while rspamd cannot answer."""
    greylisting: bool
    """Whether unknown triplets are greylisted."""


class MailDomainStatus(_Model):
    """What the operator observed and did."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation this status describes."""
    domain: DomainName | None = None
    """The domain served (normalised). spec.domain is immutable: the operator keeps serving
    this one if spec.domain changes where the API server does not enforce the CEL rule."""
    conditions: list[Condition] = []
    """Ready, DKIMKeyReady, Published, DNSVerified, DKIMRotation."""
    dns_records: list[DnsRecord] = []
    """The records to publish in DNS, with exact names and values."""
    users: Annotated[int, Field(ge=0)] | None = None
    """MailUsers of the domain in the routing table."""
    dkim_secret: str | None = None
    """Name of the Secret holding the DKIM private keys."""
    spam: SpamStatus | None = None
    """The spam policy in effect (spec.spam over the gateway's defaults)."""


# -- MailUser ------------------------------------------------------------------------------


class MailUserSpec(_Model):
    """A mailbox."""

    address: Address
    """The user's address; its domain must be a MailDomain in the same namespace."""
    password_secret_ref: SecretKeyRef | None = None
    """The Secret key holding the password (hashed with argon2id; the plaintext stays in the
    Secret). Unset or missing: the user cannot log in."""
    quota: Quantity | None = None
    """Mailbox quota (a quantity, e.g. 1Gi); unset: unlimited."""
    aliases: list[Address] = []
    """More addresses delivering to this mailbox."""
    forward_to: list[Address] = []
    """Forward mail to these addresses."""
    keep_copy: bool = False
    """With forwardTo, also deliver to the mailbox."""
    send_as: list[Address] = []
    """Extra addresses the user may send as (besides its address and aliases)."""
    suspended: bool = False
    """Refuse logins and deliveries without deleting anything."""


class MailUserStatus(_Model):
    """What the operator observed and did."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation this status describes."""
    conditions: list[Condition] = []
    """Ready (reasons: Published, DomainNotFound, PasswordSecretMissing, AddressConflict,
    Invalid); SubmissionSuspended (True: SpamRejections; False: NotSuspended, Lifted)."""
    mailbox: str | None = None
    """The maildir, relative to the workers' mail_root: <domain>/<localpart>/."""
