"""An in-memory routing table with the indexes the SMTP hot path looks up (no Redis there)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..addresses import normalize_address, normalize_domain, split_address
from .models import Domain, InboundRelay, RoutingTable, User


@dataclass(frozen=True)
class Mailbox:
    """Where a local address lands."""

    user: User
    via: Literal["address", "alias", "catch_all"]


class RoutingSnapshot:
    def __init__(self, table: RoutingTable, version: int) -> None:
        self.table = table
        self.version = version
        self._domains = {domain.name: domain for domain in table.domains}
        self._users = {user.address: user for user in table.users}
        self._aliases = {alias: user for user in table.users for alias in user.aliases}
        self._tls = {policy.domain: policy.tls for policy in table.tls_policies}
        #: some domain limits the size of the messages it takes (rules.domain_size_limit):
        #: when none does, no message needs its recipients' domains looked at
        self.size_limited = any(domain.limits.max_message_size for domain in table.domains)
        #: the greylisting values domains set themselves (None: the gateway's): when none
        #: differs from the gateway's, no message needs its recipients' domains looked at
        self.greylisting_values = frozenset(
            domain.spam.greylisting for domain in table.domains
            if domain.spam.greylisting is not None
        )  # fmt: skip

    @classmethod
    def empty(cls) -> RoutingSnapshot:
        return cls(RoutingTable(), 0)

    def domain(self, name: str) -> Domain | None:
        try:
            return self._domains.get(normalize_domain(name))
        except ValueError:
            return None

    def tls_policy(self, domain: str) -> Literal["opportunistic", "required", "dane", "sts"] | None:
        """The outbound TLS override for a destination domain, None: its DNS decides."""
        try:
            return self._tls.get(normalize_domain(domain))
        except ValueError:
            return None

    def recipient_domains(self, recipients: Iterable[str]) -> list[Domain | None]:
        """The domain of each recipient address (None where it is not ours): whose policies
        apply to a message."""
        return [self.domain(address.rpartition("@")[2]) for address in recipients]

    def is_local_domain(self, name: str) -> bool:
        """One of our domains: mail to it is accepted from anyone (mailboxes or relayed)."""
        return self.domain(name) is not None

    def is_local(self, address: str) -> bool:
        """The address is in one of our mailbox domains (whether or not a mailbox exists):
        mail to it goes to the local lane. A domain we relay for (`inbound_relay`) is ours
        but not local: its mail goes to the remote lane."""
        try:
            domain = self.domain(split_address(address)[1])
        except ValueError:
            return False
        return domain is not None and domain.inbound_relay is None

    def inbound_relay(self, domain: str) -> InboundRelay | None:
        """The next hop of a domain we relay for; None for others."""
        found = self.domain(domain)
        return found.inbound_relay if found is not None else None

    def user(self, address: str) -> User | None:
        """The user whose own address this is (for AUTH and send-as checks)."""
        try:
            return self._users.get(normalize_address(address))
        except ValueError:
            return None

    def resolve(self, address: str) -> Mailbox | None:
        """The mailbox a local address delivers to: the user's own address, then aliases,
        then the domain's catch-all. None for unknown addresses and remote domains."""
        try:
            key = normalize_address(address)
        except ValueError:
            return None
        if user := self._users.get(key):
            return Mailbox(user, "address")
        if user := self._aliases.get(key):
            return Mailbox(user, "alias")
        domain = self._domains.get(split_address(key)[1])
        if domain and domain.catch_all:
            target = self._users.get(domain.catch_all) or self._aliases.get(domain.catch_all)
            if target:
                return Mailbox(target, "catch_all")
        return None

    def may_send_as(self, user: User, mail_from: str) -> bool:
        """MAIL FROM a submitting user may use: own address, aliases, send-as."""
        try:
            address = normalize_address(mail_from)
        except ValueError:
            return False
        return address == user.address or address in user.aliases or address in user.send_as
