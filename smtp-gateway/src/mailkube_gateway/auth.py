"""SMTP AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN, against the routing table. Who may
try, and after how long, is auth_throttle's decision on what every gateway remembers in Redis:
the guessing network throttled, one user's guessers slowed, the networks the user logged in
from never refused."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from opentelemetry import metrics

from mailkube_core.addresses import normalize_address
from mailkube_core.routing import PasswordVerifier, RoutingReader
from mailkube_core.settings import GatewaySettings

from .auth_throttle import AuthRules, client_network, decide
from .ratelimit import Limits

log = logging.getLogger(__name__)
_attempts = metrics.get_meter("mailkube.gateway").create_counter(
    "mailkube.gateway.auth_attempts", unit="{attempt}", description="AUTH attempts by outcome"
)


class AuthOutcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    #: too many failures from this client's network: 454 4.7.0 and hang up
    THROTTLED = "throttled"


@dataclass(frozen=True)
class Credentials:
    authcid: str
    password: str
    authzid: str = ""


class MalformedCredentials(ValueError):
    pass


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedCredentials("credentials are not UTF-8") from None


def decode_plain(message: bytes) -> Credentials:
    """RFC 4616 §2: [authzid] NUL authcid NUL passwd."""
    parts = message.split(b"\x00")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise MalformedCredentials("PLAIN message is not authzid\\0authcid\\0passwd")
    return Credentials(_text(parts[1]), _text(parts[2]), _text(parts[0]))


class Authenticator:
    def __init__(
        self,
        settings: GatewaySettings,
        routing: RoutingReader,
        verifier: PasswordVerifier,
        limits: Limits,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.routing = routing
        self.verifier = verifier
        self.limits = limits
        self.rules = AuthRules(
            max_failures=settings.auth_max_failures,
            max_delay=settings.auth_max_delay.total_seconds(),
        )
        #: how a decision's delay is waited for (tests record it instead)
        self.sleep = sleep

    async def authenticate(
        self, client_ip: str, credentials: Credentials
    ) -> tuple[AuthOutcome, str | None]:
        """(outcome, the user's address when OK). Redis errors propagate (454 4.7.0)."""
        name = _address(credentials.authcid)
        network = client_network(client_ip)
        history = await self.limits.auth_history(name, network)
        decision = decide(history, self.rules)
        user = self.routing.snapshot.user(name)
        # a name that is no user may be a password typed into the wrong field: never logged
        logged_user = user.address if user is not None else None
        if decision.refused:
            _attempts.add(1, {"outcome": "refused", "reason": decision.reason})
            log.info(
                "authentication refused",
                extra={"client_ip": client_ip, "user": logged_user, "reason": decision.reason,
                       "network_failures": history.network_failures},
            )  # fmt: skip
            return AuthOutcome.THROTTLED, None
        if decision.delay:
            await self.sleep(decision.delay)
        # verified even for unknown users (against a dummy hash), so timing tells nothing
        password_hash = user.password_hash if user else None
        valid = await self.verifier.verify(password_hash, credentials.password)
        if valid and credentials.authzid:
            # RFC 4616 §2: an authorization identity other than the authenticated one would
            # mean acting as someone else; nobody may here
            try:
                valid = normalize_address(credentials.authzid) == name
            except ValueError:
                valid = False
        if valid and user is not None and not user.suspended:
            await self.limits.record_auth_success(
                name, network, self.settings.auth_remember_networks
            )
            _attempts.add(1, {"outcome": "ok", "reason": decision.reason})
            return AuthOutcome.OK, user.address
        counted = await self.limits.record_auth_failure(
            name, network, self.settings.auth_failure_window, history
        )
        after = decide(counted, self.rules)
        log.info(
            "authentication failed",
            extra={"client_ip": client_ip, "user": logged_user, "reason": decision.reason,
                   "delay": decision.delay, "network_failures": counted.network_failures,
                   "user_failures": counted.user_failures},
        )  # fmt: skip
        if after.refused:  # the next try would be refused: the guesser is cut off now
            _attempts.add(1, {"outcome": "refused", "reason": after.reason})
            return AuthOutcome.THROTTLED, None
        _attempts.add(1, {"outcome": "failed", "reason": decision.reason})
        return AuthOutcome.FAILED, None


def _address(authcid: str) -> str:
    """The user an AUTH attempt names: its normalised address, or the name as it came
    (lower-case, bounded) when it is none."""
    try:
        return normalize_address(authcid)
    except ValueError:
        return authcid.lower()[:320]
