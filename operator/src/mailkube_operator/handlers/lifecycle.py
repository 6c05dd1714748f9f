"""Operator start and stop: kopf settings, login, Redis, the reconciler, the first publish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import RoutingStore
from mailkube_core.settings import OperatorSettings

from ..kube import Kube, KubeError, configuration_from
from ..models import DOMAINS, GROUP, USERS
from ..publish import Indexes, Reconciler
from ..state import OperatorState, state_of

log = logging.getLogger(__name__)


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
    settings.posting.level = logging.WARNING  # our own Normal events go through kopf.event
    settings.scanning.disabled = not ours.cluster_wide
    state.connection = connection_info(ours, settings, logger)
    state.redis = connect_redis(ours)
    reconciler = Reconciler(
        settings=ours,
        store=RoutingStore(state.redis, ours.key_prefix),
        kube=Kube(configuration_from(state.connection)),
    )
    reconciler.indexes = Indexes.from_kwargs(kwargs)
    state.reconciler = reconciler
    state.initial_publish = asyncio.create_task(_initial_publish(state), name="initial-publish")


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
    if state.initial_publish is not None:
        state.initial_publish.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await state.initial_publish
    if state.reconciler is not None:
        await state.reconciler.close()
        state.reconciler.kube.close()
    if state.redis is not None:
        await state.redis.aclose()


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.startup(registry=registry)(startup)
    kopf.on.login(registry=registry)(login)
    kopf.on.cleanup(registry=registry)(cleanup)
