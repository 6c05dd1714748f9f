"""SMTP AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN, against the routing table, with
failed attempts throttled per client address and per user across every gateway (Redis)."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from opentelemetry import metrics

from mailkube_core.addresses import normalize_address
from mailkube_core.routing import PasswordVerifier, RoutingReader
from mailkube_core.settings import GatewaySettings

from .ratelimit import Limits

log = logging.getLogger(__name__)
_attempts = metrics.get_meter("mailkube.gateway").create_counter(
    "mailkube.gateway.auth_attempts", unit="{attempt}", description="AUTH attempts by outcome"
)


class AuthOutcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    #: too many failures from this address or for this user: 454 4.7.0 and hang up
    LOCKED = "locked"


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
    ) -> None:
        self.settings = settings
        self.routing = routing
        self.verifier = verifier
        self.limits = limits

    async def locked_out(self, client_ip: str) -> bool:
        failures = await self.limits.auth_failures("ip", client_ip)
        return failures >= self.settings.auth_max_failures

    async def authenticate(
        self, client_ip: str, credentials: Credentials
    ) -> tuple[AuthOutcome, str | None]:
        """(outcome, the user's address when OK). Redis errors propagate (454 4.7.0)."""
        try:
            name = normalize_address(credentials.authcid)
        except ValueError:
            name = credentials.authcid.lower()[:320]
        limit = self.settings.auth_max_failures
        if await self.limits.auth_failures("user", name) >= limit:
            _attempts.add(1, {"outcome": "locked"})
            return AuthOutcome.LOCKED, None
        user = self.routing.snapshot.user(name)
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
            _attempts.add(1, {"outcome": "ok"})
            return AuthOutcome.OK, user.address
        window = self.settings.auth_failure_window
        by_ip = await self.limits.record_auth_failure("ip", client_ip, window)
        by_user = await self.limits.record_auth_failure("user", name, window)
        log.info(
            "authentication failed",
            extra={"client_ip": client_ip, "user": name, "failures": max(by_ip, by_user)},
        )
        if by_ip >= limit or by_user >= limit:
            _attempts.add(1, {"outcome": "locked"})
            return AuthOutcome.LOCKED, None
        _attempts.add(1, {"outcome": "failed"})
        return AuthOutcome.FAILED, None
