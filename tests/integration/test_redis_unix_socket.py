"""redis_url may name a Unix socket (unix://path?db=N), as the settings say: the clients every
component opens (connect_redis, and the gateway's multiplexed one) reach Redis through it."""

from __future__ import annotations

from pathlib import Path

from redis_servers import RedisServer

from mailkube_core.queue import Envelope, Queue, Recipient
from mailkube_core.redis_client import connect_redis
from mailkube_core.redis_multiplexed import multiplexed
from mailkube_core.settings import CommonSettings


async def test_a_unix_socket_redis_url_queues_and_claims(tmp_path: Path) -> None:
    socket = tmp_path / "redis.sock"
    server = RedisServer(
        tmp_path / "redis", config={"unixsocket": str(socket), "unixsocketperm": "700"}
    ).start()
    try:
        client = connect_redis(CommonSettings(redis_url=f"unix://{socket}?db=0"))
        hot = multiplexed(client)
        try:
            assert await client.ping()
            queue = Queue(hot, prefix="unix")
            await queue.ensure_groups()
            envelope = Envelope(
                mail_from="sender@remote.test", recipients=[Recipient(address="a@example.test")]
            )
            body = b"Subject: x\r\n\r\nbody\r\n"
            ids = await queue.enqueue(envelope, body, is_local=lambda _: True)
            claimed = await queue.claim("w", "local", 0, count=5, block=None)
            assert [c.id for c in claimed] == ids
            assert claimed[0].body == body
            # every connection (the pool's and the multiplexed one) is a Unix socket's
            clients = await client.client_list()
            assert len(clients) >= 2
            assert {c["addr"] for c in clients} == {f"{socket}:0"}
        finally:
            await hot.aclose()
            await client.aclose()
    finally:
        server.stop()
