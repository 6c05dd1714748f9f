"""The gateway's security rules, as functions of values: who may use which sender, which
recipients are taken and how, and which messages are refused before the filters.

Nothing here reads a socket, Redis or the session: each rule takes what it decides on and
answers with a complete SMTP reply (replies.py), or with what to do next. policy.py does the
I/O around them (the connection lease, the per-recipient counters, the queue), and
tests/unit/gateway/test_policy_rules.py tests every rule and reply without a socket.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from mailkube_core.routing import User
from mailkube_core.routing.snapshot import RoutingSnapshot

from . import replies
from .headers import HeaderSection, check_fields
from .ratelimit import RecipientVerdict
from .received import TlsInfo
from .relay import Path, RelayVerdict, relay_verdict


@dataclass(frozen=True)
class Client:
    """Who is asking, as the session knows it at the time of the command."""

    #: the listener's name: "mx", "submission" or "submissions"
    listener: str
    ip: str
    #: the address the client authenticated as (None: not authenticated)
    auth_user: str | None = None
    #: the name the client gave in HELO/EHLO
    helo: str = ""
    #: the client said EHLO
    esmtp: bool = False
    #: the session's TLS, if any
    tls: TlsInfo | None = None


@dataclass(frozen=True)
class TakeRecipient:
    """Take `address` into the transaction once its counters admit it."""

    address: str
    #: delivered here (a mailbox, an alias, the postmaster), not relayed
    local: bool
    #: the mailbox's user, whose quota applies (None: no quota to check)
    user: User | None = None


def sender_refusal(
    client: Client, path: Path | None, snapshot: RoutingSnapshot, suspended: Container[str]
) -> str | None:
    """MAIL FROM: None if `path` (None: the null sender <>) is acceptable from `client`, else
    the reply that refuses it."""
    auth_user = client.auth_user
    if auth_user is not None and auth_user in suspended:  # suspended as it authenticated
        return replies.SUBMISSION_SUSPENDED
    if path is None:
        # RFC 5321 §4.5.5: <> is for bounces between MTAs, never a user's submission
        if client.listener != "mx" or auth_user is not None:
            return replies.NULL_SENDER_NOT_ALLOWED
        return None
    if auth_user is None:
        return None  # an MX sender is judged by SPF/DMARC with the message (mailauth/)
    user = snapshot.user(auth_user)
    if user is None or user.suspended or not snapshot.may_send_as(user, path.address):
        return replies.NOT_OWNER
    return None


def sender_limit(client: Client, snapshot: RoutingSnapshot, default: int) -> int:
    """Messages a minute the sender may start: its domain's limit for an authenticated
    user whose domain sets one, else `default`."""
    if client.auth_user is not None:
        user = snapshot.user(client.auth_user)
        if user is not None:
            domain = snapshot.domain(user.domain)
            if domain is not None and domain.limits.max_messages_per_minute:
                return domain.limits.max_messages_per_minute
    return default


def postmaster_address(configured: str | None, snapshot: RoutingSnapshot) -> str | None:
    """Where mail to the bare <postmaster> (and postmaster@ a local domain without one)
    goes: the setting, else postmaster@ the first hosted domain (None: nowhere)."""
    if configured:
        return configured
    domains = snapshot.table.domains
    return f"postmaster@{domains[0].name}" if domains else None


def recipient_decision(
    client: Client,
    path: Path | None,
    snapshot: RoutingSnapshot,
    *,
    taken: int,
    max_recipients: int,
    postmaster: str | None,
    declared_size: int | None = None,
) -> str | TakeRecipient:
    """RCPT TO: the reply that refuses `path` (None: the bare <postmaster>, RFC 5321 §4.5.1),
    or the recipient to take. `taken` recipients are in the transaction already;
    `declared_size` is MAIL's SIZE= (RFC 1870), checked against the domain's own limit."""
    if taken >= max_recipients:
        return replies.TOO_MANY_RECIPIENTS  # RFC 5321 §4.5.3.1.10
    if path is None:
        return TakeRecipient(postmaster, local=True) if postmaster else replies.UNKNOWN_USER
    verdict = relay_verdict(
        path, authenticated=client.auth_user is not None, is_local_domain=snapshot.is_local_domain
    )
    if verdict is RelayVerdict.DENIED:
        return replies.RELAY_DENIED
    if verdict is RelayVerdict.REMOTE:
        return TakeRecipient(path.address, local=False)
    address = f"{path.local}@{path.ascii_domain}"
    if declared_size is not None and declared_size > domain_size_limit(snapshot, [address]):
        return replies.SIZE_EXCEEDED_FOR_DOMAIN  # RFC 1870 §6.1: 552 at RCPT
    mailbox = snapshot.resolve(address)
    if mailbox is None:
        if path.local.lower() == "postmaster" and postmaster:  # postmaster@ every local domain
            return TakeRecipient(postmaster, local=True)
        return replies.UNKNOWN_USER
    if mailbox.user.suspended:
        return replies.SUSPENDED
    # a domain we relay for checks its recipients as ours, but delivers them elsewhere
    return TakeRecipient(address, local=snapshot.is_local(address), user=mailbox.user)


def domain_size_limit(snapshot: RoutingSnapshot, recipients: list[str]) -> float:
    """The smallest max_message_size the recipients' own domains set (inf: none sets one;
    the gateway's max_message_size applies to every message anyway)."""
    if not snapshot.size_limited:
        return float("inf")
    limits = [
        domain.limits.max_message_size
        for domain in snapshot.recipient_domains(recipients)
        if domain is not None and domain.limits.max_message_size
    ]
    return min(limits, default=float("inf"))


def admission_refusal(verdict: RecipientVerdict) -> str | None:
    """The reply for a recipient its counters refused (None: admitted). The sender's rate
    is said first: it is the client's doing, not the recipient's."""
    if not verdict.sender_ok:
        return replies.SENDER_RATE
    if not verdict.under_quota:
        return replies.OVER_QUOTA
    if not verdict.rate_ok:
        return replies.RECIPIENT_RATE
    return None


def header_refusal(section: HeaderSection, max_received: int) -> tuple[str, str] | None:
    """(outcome, reply) for a header section refused before the filters, else None."""
    if section.count("received") > max_received:
        return "loop", replies.LOOP_DETECTED  # RFC 5321 §6.3
    problem = check_fields(section)
    if problem is not None:
        return "bad_headers", replies.BAD_HEADERS.format(reason=problem)
    return None
