"""Users suspended for submission (too many messages refused as spam:
mailkube_core.suspensions), as this gateway process knows them.

MAIL must not wait for Redis, so a user's suspension is read when the user authenticates
(one HGET, in the same write as AUTH's own Redis command) and remembered here; the scanning
stage adds a user the moment one of its refusals crosses the threshold. A suspension lifted
in Redis (`mailkube spam unsuspend`, the operator's annotation) is seen at the user's next
AUTH.
"""

from __future__ import annotations

import asyncio

from mailkube_core.addresses import normalize_address
from mailkube_core.redis_client import RedisClient
from mailkube_core.suspensions import is_suspended

from ..auth import Authenticator, AuthOutcome, Credentials


def _address(authcid: str) -> str:
    """The address `Authenticator.authenticate` looks the user up by."""
    try:
        return normalize_address(authcid)
    except ValueError:
        return authcid.lower()[:320]


class SuspendedUsers:
    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._users: set[str] = set()

    def __contains__(self, address: object) -> bool:
        return address in self._users

    def suspend(self, address: str) -> None:
        self._users.add(address)

    async def authenticate(
        self, authenticator: Authenticator, client_ip: str, credentials: Credentials
    ) -> tuple[AuthOutcome, str | None]:
        """`authenticator.authenticate`, with the user's suspension read alongside. Redis
        errors propagate, as authenticate's do."""
        address = _address(credentials.authcid)
        (outcome, user), suspended = await asyncio.gather(
            authenticator.authenticate(client_ip, credentials),
            is_suspended(self.redis, self.prefix, address),
        )
        if outcome is AuthOutcome.OK and user is not None:
            if user != address:  # not expected: both are the normalised address
                suspended = await is_suspended(self.redis, self.prefix, user)
            if suspended:
                self._users.add(user)
            else:
                self._users.discard(user)
        return outcome, user
