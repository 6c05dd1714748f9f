"""The spam-defence stages of the gateway's pipeline, in order, built from the settings
(app.py puts them after email authentication, whose results they read, and before DKIM
signing): greylisting first (a deferred message costs rspamd nothing), then content scanning
with rspamd when `rspamd_url` is set."""

from __future__ import annotations

from mailkube_core.redis_client import RedisClient
from mailkube_core.routing import RoutingReader
from mailkube_core.settings import GatewaySettings

from ..pipeline import Stage
from .greylist import Greylisting
from .rspamd import RspamdClient
from .stage import RspamdStage
from .suspended import SuspendedUsers


def build_spam_stages(
    settings: GatewaySettings,
    routing: RoutingReader,
    redis: RedisClient,
    suspended: SuspendedUsers,
) -> list[Stage]:
    greylisting = Greylisting(settings, routing, redis)
    stages: list[Stage] = [greylisting]
    if settings.rspamd_url is not None:
        client = RspamdClient(settings)
        stages.append(RspamdStage(settings, routing, redis, client, suspended, greylisting))
    return stages
