"""Next hops other than the recipient domain's MX hosts.

Smart host (relay) mode, for clouds that block port 25: all remote mail goes through one
relay (`smart_host` setting), or mail from a sender domain through that domain's relay (the
routing table's `relay`, from the MailDomain resource). AUTH credentials come from a mounted
file (a Secret) or the routing table, never from the environment.

Inbound relay: mail to a domain we relay for (the routing table's `inbound_relay`) goes to
that domain's next hop."""

from __future__ import annotations

from dataclasses import dataclass

from mailkube_core.addresses import split_address
from mailkube_core.routing import RoutingSnapshot
from mailkube_core.settings import WorkerSettings

from .smtp_client import TlsMode


@dataclass(frozen=True)
class Relay:
    host: str
    port: int
    tls: TlsMode
    auth: tuple[str, str] | None

    @property
    def destination(self) -> str:
        return f"[{self.host}]:{self.port}"


_TLS: dict[str, TlsMode] = {
    "starttls": "required", "implicit": "implicit", "none": "none",
    "opportunistic": "opportunistic",
}  # fmt: skip


def inbound_next_hop(snapshot: RoutingSnapshot, domain: str) -> Relay | None:
    """Where mail to `domain` goes when we relay for it; None: not relayed."""
    hop = snapshot.inbound_relay(domain)
    if hop is None:
        return None
    return Relay(hop.host, hop.port, _TLS[hop.tls], None)


def relay_for(sender: str, snapshot: RoutingSnapshot, settings: WorkerSettings) -> Relay | None:
    """The sender domain's relay, else the global smart host, else None (deliver by MX)."""
    try:
        domain = snapshot.domain(split_address(sender)[1]) if sender else None
    except ValueError:
        domain = None
    if domain is not None and domain.relay is not None:
        relay = domain.relay
        auth = None
        if relay.username and relay.password is not None:
            auth = (relay.username, relay.password.get_secret_value())
        return Relay(relay.host, relay.port, _TLS[relay.tls], auth)
    smart = settings.smart_host
    if smart is None:
        return None
    auth = None
    if smart.username and smart.password_file is not None:
        auth = (smart.username, smart.password_file.read_text().strip())
    return Relay(smart.host, smart.port, _TLS[smart.tls], auth)
