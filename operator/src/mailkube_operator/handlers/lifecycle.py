"""Operator start and stop: kopf settings, login, Redis, the reconciler, the first publish,
the Redis check (`Reconciler.check_redis`, every REDIS_CHECK_INTERVAL or retry_delay if that
is shorter) and the DNS check (dnscheck.check_loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

import kopf

from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import RoutingStore
from mailkube_core.settings import OperatorSettings

from .. import dnscheck
from ..kube import Kube, KubeError, configuration_from
from ..models import DOMAINS, GROUP, USERS
from ..publish import Indexes, Reconciler
from ..state import OperatorState, state_of

log = logging.getLogger(__name__)

REDIS_CHECK_INTERVAL = timedelta(seconds=5)
#: Redis calls that hang (a node gone without a reset) fail after this many seconds
REDIS_TIMEOUT = 10.0


def connection_info(
    settings: OperatorSettings, kopf_settings: kopf.OperatorSettings, logger: Any
) -> kopf.ConnectionInfo:
    if settings.kube_api_server:
        return kopf.ConnectionInfo(server=settings.kube_api_server)
    info = kopf.login_via_client(logger=logger, settings=kopf_settings)
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials (in-cluster or kubeconfig)")
    return info


async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **kwargs: Any) -> None:
    state = state_of(memo)
    ours = state.settings
    timeout = ours.watch_timeout.total_seconds()
    settings.watching.server_timeout = int(timeout)
    settings.watching.client_timeout = int(timeout) + 30
    settings.watching.connect_timeout = 30
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # kopf's warnings become Events; ours: Reconciler
    settings.scanning.disabled = not ours.cluster_wide
    state.connection = connection_info(ours, settings, logger)
    state.redis = connect_redis(
        ours, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
    )
    reconciler = Reconciler(
        settings=ours,
        store=RoutingStore(state.redis, ours.key_prefix),
        kube=Kube(configuration_from(state.connection)),
    )
    reconciler.indexes = Indexes.from_kwargs(kwargs)
    state.reconciler = reconciler
    state.initial_publish = asyncio.create_task(_initial_publish(state), name="initial-publish")
    state.redis_check = asyncio.create_task(_check_redis(state), name="redis-check")
    if ours.dns_check_interval:
        state.dns_check = asyncio.create_task(
            dnscheck.check_loop(reconciler, ours), name="dns-check"
        )


async def _check_redis(state: OperatorState) -> None:
    reconciler = state.reconciler
    assert reconciler is not None
    interval = min(REDIS_CHECK_INTERVAL, state.settings.retry_delay).total_seconds()
    while True:
        await asyncio.sleep(interval)
        try:
            await reconciler.check_redis()
        except Exception:  # a bug: say so, keep checking
            log.exception("the Redis check failed")


async def _initial_publish(state: OperatorState) -> None:
    """With no MailDomain or MailUser at all no handler ever runs: publish the (empty) table
    anyway, once the API confirms there is nothing, so a stale table does not linger."""
    reconciler = state.reconciler
    assert reconciler is not None
    await asyncio.sleep(state.settings.initial_publish_delay.total_seconds())
    namespace = None if state.settings.cluster_wide else state.settings.namespace
    while reconciler.reconciles == 0:
        try:
            count = await reconciler.kube.count(DOMAINS, namespace)
            count += await reconciler.kube.count(USERS, namespace)
        except KubeError as exc:
            log.warning("listing MailDomains and MailUsers failed: %s", exc)
        else:
            if count == 0:
                await reconciler.request()
                if reconciler.healthy:
                    return
        await asyncio.sleep(state.settings.retry_delay.total_seconds())


def login(memo: Any, **_: Any) -> kopf.ConnectionInfo | None:
    return state_of(memo).connection


async def cleanup(memo: Any, **_: Any) -> None:
    state = state_of(memo)
    for task in (state.initial_publish, state.redis_check, state.dns_check):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if state.reconciler is not None:
        await state.reconciler.close()
        state.reconciler.kube.close()
    if state.redis is not None:
        await state.redis.aclose()


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.startup(registry=registry)(startup)
    kopf.on.login(registry=registry)(login)
    kopf.on.cleanup(registry=registry)(cleanup)
