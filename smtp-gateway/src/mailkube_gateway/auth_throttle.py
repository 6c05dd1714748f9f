"""Whether a client may try a password now, and how long it waits first: a function of what
Redis remembers about the client's network and the user (docs/gateway.md, "AUTH").

- The guesser is throttled where it is: a client network (an IPv4 address, an IPv6 /64) with
  `max_failures` failures within the window is refused (454 4.7.0, then the connection is
  closed), whatever user it names, for the rest of the window.
- Guessing one user's password from many networks is slowed, never refused: each try from a
  network the user has not logged in from waits before its password is checked, 1 second
  after the user's first failure, doubling with each further one, up to `max_delay`. The wait
  comes before the check, so a client that hangs up early learns nothing sooner.
- A network that logged in as the user before (remembered, with an expiry) is never refused
  for that user, and waits only for its own failures as that user: strangers elsewhere cannot
  stop or slow the user there.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: the wait after a user's first failure; it doubles with each further one
FIRST_DELAY = 1.0


def client_network(ip: str) -> str:
    """The network a client's failures count against: its IPv4 address (/32), or its IPv6
    /64 (one host's, or one home's, share of addresses). IPv4-mapped IPv6 addresses are IPv4.
    An address that is none ("unknown": a PROXY LOCAL connection) is a network of its own."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 4:
        return f"{address}/32"
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


@dataclass(frozen=True, slots=True)
class AuthHistory:
    """What Redis remembers when a client names a user, all within the failure window."""

    #: failures from the client's network, for any user
    network_failures: int = 0
    #: failures for the user, from any network
    user_failures: int = 0
    #: failures for the user from the client's network
    own_failures: int = 0
    #: the client's network logged in as the user before (and that is not forgotten yet)
    known: bool = False


@dataclass(frozen=True, slots=True)
class AuthRules:
    #: failures from one network within the window before it is refused
    max_failures: int
    #: the longest wait before a password is checked, in seconds
    max_delay: float


@dataclass(frozen=True, slots=True)
class AuthDecision:
    #: refused without checking the password: 454 4.7.0, and the connection is closed
    refused: bool
    #: seconds to wait before the password is checked
    delay: float
    #: for logs and metrics: known (a network the user logged in from), throttled (the
    #: network is refused), slowed (the user's failures add a wait), clear
    reason: str


def failure_delay(failures: int, max_delay: float) -> float:
    """0 before the first failure; then 1, 2, 4, ... seconds, up to `max_delay`."""
    if failures <= 0 or max_delay <= 0:
        return 0.0
    # min() before the power keeps a huge count from overflowing a float
    return min(max_delay, FIRST_DELAY * 2.0 ** min(failures - 1, 64))


def decide(history: AuthHistory, rules: AuthRules) -> AuthDecision:
    """May the client try the password it sent, and after how long?"""
    if history.known:
        delay = failure_delay(history.own_failures, rules.max_delay)
        return AuthDecision(refused=False, delay=delay, reason="known")
    if history.network_failures >= rules.max_failures:
        return AuthDecision(refused=True, delay=0.0, reason="throttled")
    delay = failure_delay(history.user_failures, rules.max_delay)
    return AuthDecision(refused=False, delay=delay, reason="slowed" if delay else "clear")
