"""Operator start and stop: kopf settings, login, Redis, the reconciler, the first publish,
the Redis check (`Reconciler.check_redis`, every REDIS_CHECK_INTERVAL or retry_delay if that
is shorter), the DNS check (dnscheck.check_loop) and the submission suspensions
(suspensions.check_loop)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from datetime import timedelta
from typing import Any

import kopf

from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import RoutingStore
from mailkube_core.settings import OperatorSettings

from .. import dane, dnscheck, suspensions
from ..kube import Kube, KubeError, configuration_from
from ..login import connection_info, follow_token_file, token_file
from ..models import DOMAINS, GROUP, USERS
from ..reconciler import Indexes, Reconciler
from ..secrets import fingerprint_key, hashes_key, random_key
from ..state import OperatorState, state_of

log = logging.getLogger(__name__)

REDIS_CHECK_INTERVAL = timedelta(seconds=5)
FINGERPRINT_KEY_TRIES = 3
RESYNC_INTERVAL = timedelta(minutes=10)


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
    config = configuration_from(connection_info(ours, settings, logger))
    if (path := token_file(ours)) is not None:
        follow_token_file(config, path)
    # every call fails after redis_timeout (a frozen Redis, a node gone without a reset)
    state.redis = connect_redis(ours)
    reconciler = Reconciler(
        settings=ours,
        store=RoutingStore(state.redis, ours.key_prefix),
        kube=Kube(config),
        redis=state.redis,
    )
    # before the Secrets are listed: their fingerprints are made with this key
    state.fingerprint_key = await _fingerprint_key(reconciler.kube, ours, logger)
    reconciler.secrets.key = state.fingerprint_key
    # everything, before kopf watches: the first reconcile sees every object
    await _list_until_done(state, reconciler.kube, logger)
    stores = state.stores
    reconciler.indexes = Indexes(
        domains=stores.domains.index, users=stores.users.index,
        password_secrets=stores.password_secrets.index, dkim_secrets=stores.dkim_secrets.index,
    )  # fmt: skip
    await reconciler.secrets.load(state.redis, hashes_key(ours.key_prefix))
    state.reconciler = reconciler
    state.resync = asyncio.create_task(_resync(state), name="resync")
    state.freeze = asyncio.create_task(_freeze_heap(reconciler), name="freeze-heap")
    state.initial_publish = asyncio.create_task(_initial_publish(state), name="initial-publish")
    state.redis_check = asyncio.create_task(_check_redis(state), name="redis-check")
    state.suspension_check = asyncio.create_task(
        suspensions.check_loop(
            reconciler.suspensions, state.redis, ours, lambda: _suspensions_changed(reconciler)
        ),
        name="suspension-check",
    )
    if ours.dns_check_interval:
        state.dns_check = asyncio.create_task(
            dnscheck.check_loop(reconciler, ours), name="dns-check"
        )
    if ours.mx_tls_secret:
        state.dane_check = asyncio.create_task(
            dane.check_loop(reconciler.kube, ours, lambda k: _dane_keys_changed(reconciler, k)),
            name="dane-check",
        )


def _watched_namespace(settings: OperatorSettings) -> str | None:
    return None if settings.cluster_wide else settings.namespace


async def _list_until_done(state: OperatorState, kube: Kube, logger: Any) -> None:
    """LIST every kind into the stores, retried every retry_delay until it works (the operator
    is not ready meanwhile: a partial picture would unpublish what it has not seen)."""
    while True:
        try:
            await state.stores.load(kube, _watched_namespace(state.settings))
        except KubeError as exc:
            logger.warning("listing MailDomains, MailUsers and Secrets failed (%s); retrying", exc)
            await asyncio.sleep(state.settings.retry_delay.total_seconds())
        else:
            return


async def _freeze_heap(reconciler: Reconciler) -> None:
    """Once the first table is out, the heap holds every object (hundreds of MB at 10,000
    users): gc.freeze() takes it out of the cyclic collector's reach, so a full collection,
    which would walk all of it (a second or more), does not stall a change. Objects freed
    later are still freed by reference counting.

    Again after each reconcile that wrote BULK_WRITES statuses or more (the first start's):
    each write's watch echo replaced the object's copy, so thousands of new long-lived
    copies are outside the frozen part, where every full collection would walk them (during
    a first start at 10,000 users, before the first freeze, each took 0.5-1.6 s). Only what
    is outside is collected then, so a cycle among frozen objects that becomes garbage later
    stays: the objects are long-lived index copies, freed by reference counting when
    replaced."""
    await reconciler.published.wait()
    gc.collect()
    gc.freeze()
    while True:
        await reconciler.bulk_written.wait()
        reconciler.bulk_written.clear()
        gc.collect()
        gc.freeze()


async def _resync(state: OperatorState) -> None:
    """LIST again every RESYNC_INTERVAL: what the watch could not say (an object deleted
    between the first LIST and kopf's own) is dropped, and a reconcile follows a change."""
    reconciler = state.reconciler
    assert reconciler is not None
    while True:
        await asyncio.sleep(RESYNC_INTERVAL.total_seconds())
        try:
            changed = await state.stores.load(reconciler.kube, _watched_namespace(state.settings))
        except KubeError as exc:
            log.warning("the periodic LIST failed: %s", exc)
            continue
        if changed:
            await reconciler.request()


async def _fingerprint_key(kube: Kube, settings: OperatorSettings, logger: Any) -> bytes:
    """The stored fingerprint key; tried FINGERPRINT_KEY_TRIES times (an API server that just
    restarted may refuse for a moment), then a key of this run only: every password is hashed
    again, which is slow but loses nothing."""
    for attempt in range(1, FINGERPRINT_KEY_TRIES + 1):
        try:
            return await fingerprint_key(kube, settings.namespace)
        except KubeError as exc:
            if attempt == FINGERPRINT_KEY_TRIES:
                logger.warning(
                    "the password fingerprint key could not be read or made (%s): every "
                    "password is hashed again at each start until it can", exc,
                )  # fmt: skip
                break
            logger.warning("reading the password fingerprint key failed (%s); retrying", exc)
            await asyncio.sleep(settings.retry_delay.total_seconds())
    return random_key()


async def _dane_keys_changed(reconciler: Reconciler, keys: dane.DaneKeys) -> None:
    """New TLSA records to list: every MailDomain's status changes."""
    reconciler.dane_keys = keys
    await _suspensions_changed(reconciler)


async def _suspensions_changed(reconciler: Reconciler) -> None:
    """Reconcile, unless no handler has yet: kopf may still be filling the indexes (the first
    reconcile then uses the suspensions read)."""
    if reconciler.reconciles:
        await reconciler.request()


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


def login(memo: Any, settings: kopf.OperatorSettings, logger: Any, **_: Any) -> kopf.ConnectionInfo:
    """Credentials read afresh at every login: kopf logs in again after a 401 (an expired
    token), and the rotated token is in the file by then."""
    return connection_info(state_of(memo).settings, settings, logger)


async def cleanup(memo: Any, **_: Any) -> None:
    state = state_of(memo)
    for task in (state.initial_publish, state.redis_check, state.dns_check,
                 state.suspension_check, state.dane_check, state.resync,
                 state.freeze):  # fmt: skip
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
