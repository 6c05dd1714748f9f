"""Greylisting (spam/greylist.py): the decisions as pure functions, then the stage on a real
Redis (the triplet's life, auto-pass of networks and of SPF-authorised known domains, what
goes to the AOF, Redis Cluster, Redis down)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conditions import eventually
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis_servers import RedisCluster, RedisServer
from redis_writes import record_writes

from mailkube_core.redis_multiplexed import multiplexed
from mailkube_core.routing import Domain, RoutingReader, RoutingSnapshot, RoutingStore, RoutingTable
from mailkube_core.routing.models import SpamPolicy
from mailkube_core.settings import GatewaySettings
from mailkube_gateway.pipeline import Action, AuthFacts, ClientFacts, Message, Verdict
from mailkube_gateway.spam import greylist
from mailkube_gateway.spam.greylist import (
    EARLY,
    KNOWN,
    NEW,
    PASSED,
    Decision,
    Greylisting,
    client_network,
    decide,
    triplet_hash,
)

# --- pure -------------------------------------------------------------------------------------


def test_triplets_take_the_client_network() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::9") == "2001:db8:1:2::/64"
    assert client_network("::ffff:192.0.2.1") == "192.0.2.0/24"
    assert client_network("unknown") == "unknown"


def test_triplets_ignore_case() -> None:
    net = "192.0.2.0/24"
    assert triplet_hash(net, "A@Example.ORG", "Bob@X.test") == triplet_hash(
        net, "a@example.org", "bob@x.test"
    )
    assert triplet_hash(net, "a@example.org", "bob@x.test") != triplet_hash(
        net, "a@example.org", "carol@x.test"
    )
    assert triplet_hash(net, "", "bob@x.test") != triplet_hash("192.0.3.0/24", "", "bob@x.test")


@pytest.mark.parametrize(
    ("reply", "known", "expected"),
    [
        ([0, 300000, NEW], False, Decision(False, "new", 300)),
        ([0, 1001, EARLY], False, Decision(False, "early_retry", 2)),
        ([0, 0, NEW], False, Decision(False, "new", 1)),  # never "try again in 0 seconds"
        ([0, 5000, KNOWN, NEW, EARLY], False, Decision(False, "new", 5)),
        ([0, 4000, PASSED, EARLY], False, Decision(False, "early_retry", 4)),
        ([0, 0, PASSED, KNOWN], False, Decision(True, "passed", retried=True)),
        ([0, 0, KNOWN], False, Decision(True, "known")),
        ([1], False, Decision(True, "auto_pass_network")),
        ([0, 300000, NEW], True, Decision(True, "auto_pass_domain")),
        ([0, 0, PASSED], True, Decision(True, "auto_pass_domain", retried=True)),
    ],
)
def test_decisions(reply: list[int], known: bool, expected: Decision) -> None:
    assert decide(reply, domain_known=known) == expected


# --- the stage on Redis -----------------------------------------------------------------------

LOCAL = "example.test"


def reader(*domains: Domain) -> RoutingReader:
    routing = RoutingReader(RoutingStore(Redis()))  # never started: the snapshot is set here
    table = RoutingTable(domains=list(domains) or [Domain(name=LOCAL)])
    routing.snapshot = RoutingSnapshot(table, 1)
    return routing


def settings(**overrides: Any) -> GatewaySettings:
    options: dict[str, Any] = {
        "key_prefix": "t",
        "greylisting": True,
        "greylist_delay": timedelta(milliseconds=300),
        "greylist_retry_window": timedelta(seconds=30),
        "greylist_auto_pass_after": 0,
    }
    return GatewaySettings(**{**options, **overrides})


def mail(
    ip: str = "192.0.2.10",
    sender: str = "a@remote.test",
    recipients: tuple[str, ...] = (f"bob@{LOCAL}",),
    **fields: Any,
) -> Message:
    options: dict[str, Any] = {"listener": "mx", "auth_user": None, **fields}
    return Message(mail_from=sender, recipients=list(recipients), client_ip=ip, helo="x",
                   content=b"From: a\r\n\r\nhi\r\n", **options)  # fmt: skip


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = multiplexed(Redis.from_url(redis_url))
    assert isinstance(client, Redis)
    try:
        yield client
    finally:
        await client.aclose()


def grey(redis: Any, routing: RoutingReader | None = None, **overrides: Any) -> Greylisting:
    return Greylisting(settings(**overrides), routing or reader(), redis)


async def passes(stage: Greylisting, message: Message) -> Verdict:
    """Retry `message` until greylisting lets it through (within a deadline)."""

    async def retried() -> Verdict | None:
        verdict = await stage.check(message)
        return verdict if verdict.action is Action.ACCEPT else None

    result = await eventually(retried, timeout=10)
    assert result is not None
    return result


def reason_count(reason: str) -> int:
    return greylist._verdicts.value({"reason": reason})


async def test_a_triplet_is_deferred_then_passes_after_the_delay_then_is_known(
    redis: Redis,
) -> None:
    stage = grey(redis, greylist_delay=timedelta(seconds=1))
    counts = {r: reason_count(r) for r in ("new", "early_retry", "passed", "known")}
    first = await stage.check(mail())
    assert first.action is Action.DEFER
    assert first.reply == ("451 4.7.1 Greylisted: this sender is new here, try again in 1 seconds")
    early = await stage.check(mail())
    assert early.action is Action.DEFER
    assert str(early.reply).startswith("451 4.7.1 Greylisted")
    await passes(stage, mail())
    assert (await stage.check(mail())).action is Action.ACCEPT  # known now
    assert reason_count("new") == counts["new"] + 1
    assert reason_count("early_retry") > counts["early_retry"]
    assert reason_count("passed") == counts["passed"] + 1
    assert reason_count("known") == counts["known"] + 1
    # the same network, another address of the sender's pool: the same triplet
    assert (await stage.check(mail(ip="192.0.2.200"))).action is Action.ACCEPT
    # another network, another sender, another recipient: new triplets
    assert (await stage.check(mail(ip="192.0.3.10"))).action is Action.DEFER
    assert (await stage.check(mail(sender="b@remote.test"))).action is Action.DEFER
    assert (await stage.check(mail(recipients=(f"carol@{LOCAL}",)))).action is Action.DEFER


async def test_a_triplet_not_retried_within_the_window_is_forgotten(redis: Redis) -> None:
    stage = grey(redis, greylist_delay=timedelta(0), greylist_retry_window=timedelta(seconds=1))
    assert (await stage.check(mail())).action is Action.DEFER
    tag = "{t:grey:192.0.2.0/24}"

    async def forgotten() -> bool:
        return not await redis.keys(f"{tag}:t:*")

    await eventually(forgotten)
    verdict = await stage.check(mail())
    assert verdict.action is Action.DEFER  # new again
    assert "try again in 1 seconds" in str(verdict.reply)


async def test_every_recipient_must_pass(redis: Redis) -> None:
    stage = grey(redis)
    await stage.check(mail())
    await passes(stage, mail())
    both = mail(recipients=(f"bob@{LOCAL}", f"carol@{LOCAL}"))
    assert (await stage.check(both)).action is Action.DEFER  # carol's triplet is new
    await passes(stage, both)


async def test_a_network_passes_after_enough_retried_messages(redis: Redis) -> None:
    stage = grey(redis, greylist_auto_pass_after=2)
    for sender in ("a@remote.test", "b@remote.test"):
        assert (await stage.check(mail(sender=sender))).action is Action.DEFER
        await passes(stage, mail(sender=sender))
    counted = reason_count("auto_pass_network")
    # a third sender from the same /24, never seen: let through at once
    assert (await stage.check(mail(ip="192.0.2.99", sender="c@else.test"))).action is (
        Action.ACCEPT
    )
    assert reason_count("auto_pass_network") == counted + 1
    # known messages do not count: another network needs two retries of its own
    assert (await stage.check(mail(ip="198.51.100.1"))).action is Action.DEFER


def spf(result: str, domain: str) -> AuthFacts:
    return AuthFacts(spf=result, spf_domain=domain, dkim=(), dmarc="none", from_domain=domain)


async def test_spf_authorised_senders_of_a_known_domain_pass(redis: Redis) -> None:
    stage = grey(redis)
    first = mail(sender="a@known.test", auth=spf("pass", "known.test"))
    assert (await stage.check(first)).action is Action.DEFER  # the domain is not known yet
    await passes(stage, first)

    async def marked() -> bool:  # the mark goes out with the next command
        return bool(await redis.exists("{t:greydom:known.test}"))

    await redis.ping()
    await eventually(marked)
    other = mail(ip="203.0.113.5", sender="news@known.test", recipients=(f"carol@{LOCAL}",))
    assert (await stage.check(other)).action is Action.DEFER  # no SPF result
    other.auth = spf("softfail", "known.test")
    assert (await stage.check(other)).action is Action.DEFER
    other.auth = spf("pass", "known.test")
    assert (await stage.check(other)).action is Action.ACCEPT
    stranger = mail(ip="203.0.113.5", sender="x@unknown.test", auth=spf("pass", "unknown.test"))
    assert (await stage.check(stranger)).action is Action.DEFER


async def test_exempt_and_allow_listed_clients_pass_without_redis(redis: Redis) -> None:
    stage = grey(redis, spam_exempt_networks=["192.0.2.0/25"])
    assert (await stage.check(mail(ip="192.0.2.10"))).action is Action.ACCEPT
    dnswl = mail(ip="198.51.100.7", client=ClientFacts(dnsbl_score=-2))
    assert (await stage.check(dnswl)).action is Action.ACCEPT
    assert await redis.keys("*") == []
    assert (await stage.check(mail(ip="192.0.2.200"))).action is Action.DEFER  # outside /25


async def test_where_greylisting_does_not_apply(redis: Redis) -> None:
    stage = grey(redis)
    assert (await stage.check(mail(listener="submission"))).action is Action.ACCEPT
    assert (await stage.check(mail(auth_user=f"bob@{LOCAL}"))).action is Action.ACCEPT
    # a domain that turned it off, under a gateway that has it on
    off = grey(redis, reader(Domain(name=LOCAL, spam=SpamPolicy(greylisting=False))))
    assert (await off.check(mail())).action is Action.ACCEPT
    assert await redis.keys("*") == []
    # a domain that turned it on, under a gateway that has it off; one recipient of
    # several is enough (the strictest wins)
    on = grey(
        redis,
        reader(Domain(name=LOCAL, spam=SpamPolicy(greylisting=True)), Domain(name="b.test")),
        greylisting=False,
    )
    assert (await on.check(mail(recipients=("x@b.test",)))).action is Action.ACCEPT
    assert (await on.check(mail(recipients=("x@b.test", f"bob@{LOCAL}")))).action is (Action.DEFER)


async def test_redis_down_defers_rather_than_accepts() -> None:
    unreachable = Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    try:
        verdict = await grey(unreachable).check(mail())
    finally:
        await unreachable.aclose()
    assert verdict.action is Action.DEFER
    assert verdict.reply == "451 4.3.0 Temporary failure, try again later"


async def test_first_tries_stay_out_of_the_aof_and_passes_go_in(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    client = multiplexed(Redis.from_url(server.url))
    try:
        stage = grey(client, greylist_delay=timedelta(0))
        assert (await stage.check(mail(sender="first@remote.test"))).action is Action.DEFER
        assert (await stage.check(mail(sender="retried@remote.test"))).action is Action.DEFER
        assert (await stage.check(mail(sender="retried@remote.test"))).action is Action.ACCEPT
        await client.set("durable", "yes")  # an ordinary write: the AOF is written up to here

        def aof() -> bytes:
            return b"".join(p.read_bytes() for p in (tmp_path / "redis").rglob("*.aof*"))

        net = "192.0.2.0/24"
        first = triplet_hash(net, "first@remote.test", f"bob@{LOCAL}").encode()
        retried = triplet_hash(net, "retried@remote.test", f"bob@{LOCAL}").encode()
        assert b"durable" in aof()
        assert first not in aof()
        assert retried in aof()
        assert b"{t:grey:192.0.2.0/24}:passes" in aof()
        # and so after a restart, the sender that retried is still known
        await client.aclose()
        server.restart()
        client = multiplexed(Redis.from_url(server.url))
        stage = grey(client, greylist_delay=timedelta(0))
        assert (await stage.check(mail(sender="retried@remote.test"))).action is Action.ACCEPT
        assert (await stage.check(mail(sender="first@remote.test"))).action is Action.DEFER
    finally:
        await client.aclose()
        server.stop()


@pytest.mark.cluster
async def test_one_script_per_message_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    client = ClusterClient.from_url(redis_cluster.url)
    try:
        stage = grey(client, greylist_delay=timedelta(0), greylist_auto_pass_after=1)
        rcpts = tuple(f"user{n}@{LOCAL}" for n in range(10))  # keys that would spread
        assert (await stage.check(mail(recipients=rcpts))).action is Action.DEFER
        assert (await stage.check(mail(recipients=rcpts))).action is Action.ACCEPT
        assert (await stage.check(mail(sender="new@x.test"))).action is Action.ACCEPT  # auto
    finally:
        await client.aclose()


async def test_a_message_costs_one_round_trip(redis: Redis) -> None:
    """Every triplet in one script, and the sender domain's mark asked beside it: one write
    on the hot path's shared connection."""
    stage = grey(redis)
    message = mail(sender="a@known.test", auth=spf("pass", "known.test"),
                   recipients=tuple(f"u{n}@{LOCAL}" for n in range(5)))  # fmt: skip
    await stage.check(message)  # the scripts are loaded
    writes = record_writes(redis)
    assert (await stage.check(message)).action is Action.DEFER  # an early retry
    assert len(writes) == 1
    assert writes[0].count(b"EVALSHA") == 2
