"""rspamd down, slow, or answering what rspamd would not: the message gets the policy's rule
(accept, tagged unchecked; or 451 4.3.0) within the deadline, the gateway never crashes, and
the session goes on. A small HTTP stub plays the broken rspamd; it also shows what the
gateway sends."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import aiosmtplib
import pytest
from conditions import eventually
from gateway_harness import ALICE, free_port, running_gateway
from test_gateway_spam import fields, mail, queued, send, table, transaction

from mailkube_core.routing import SpamPolicy

UNAVAILABLE = (451, "4.3.0 Spam check unavailable, try again later")
CLEAN = json.dumps(
    {
        "action": "no action",
        "score": 0.5,
        "required_score": 15.0,
        "symbols": {"STUB": {"name": "STUB", "score": 0.5}},
    }
).encode()


@dataclass
class Stub:
    """An HTTP server that answers every request the same way: `answer` (raw HTTP), or
    "slow" (never, within any test's deadline), or "reset" (a TCP reset after the request)."""

    answer: bytes | str
    url: str = ""
    #: each request: its header lines (name, value) in order, and its body
    requests: list[tuple[list[tuple[str, str]], bytes]] = field(default_factory=list)
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"(?im)^content-length: *(\d+)", head)
            body = await reader.readexactly(int(match.group(1)) if match else 0)
            lines = head.decode().split("\r\n")[1:-2]
            pairs = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
            self.requests.append((pairs, body))
            if self.answer == "slow":
                await self._released.wait()
            elif self.answer == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                assert isinstance(self.answer, bytes)
                writer.write(self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def stub(answer: bytes | str) -> AsyncIterator[Stub]:
    server_stub = Stub(answer)
    server = await asyncio.start_server(server_stub.handle, "127.0.0.1", 0)
    server_stub.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield server_stub
    finally:
        server_stub._released.set()
        server.close()


def http(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


BROKEN = {
    "garbage JSON": http("200 OK", b'{"action": "no action", "score": '),
    "not rspamd's JSON": http("200 OK", b'{"action": "discard", "score": 1, "required_score": 2}'),
    "HTML": http("200 OK", b"<html>hello</html>", "text/html"),
    "status 500": http("500 Internal Server Error", b'{"error": "oops"}'),
    "reset": "reset",
}


@pytest.mark.parametrize("kind", BROKEN)
async def test_a_broken_rspamd_defers_and_the_session_goes_on(
    redis_url: str, tmp_path: Path, kind: str
) -> None:
    async with (
        stub(BROKEN[kind]) as rspamd,
        running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url) as gw,
    ):
        async with gw.client(gw.mx, start_tls=False) as smtp:
            assert await transaction(smtp, mail(), "someone@remote.test", (ALICE,)) == UNAVAILABLE
            assert (await smtp.noop()).code == 250
            assert await transaction(smtp, mail(), "someone@remote.test", (ALICE,)) == UNAVAILABLE
        assert len(rspamd.requests) == 2
        assert await gw.messages() == []


@pytest.mark.parametrize("kind", BROKEN)
async def test_a_broken_rspamd_under_accept_queues_it_unchecked(
    redis_url: str, tmp_path: Path, kind: str
) -> None:
    policy = SpamPolicy(when_unavailable="accept")
    async with (
        stub(BROKEN[kind]) as rspamd,
        running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url,
                        table=table(example_test=policy)) as gw,
    ):  # fmt: skip
        code, _ = await send(gw, mail())
        assert code == 250
        info, body = await queued(gw)
    assert fields(body, "X-Spam-Status") == ["unchecked"]
    assert fields(body, "X-Spamd-Result") == []
    assert info.envelope.annotations == {}


async def test_rspamd_unreachable_follows_the_gateway_setting(
    redis_url: str, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with running_gateway(redis_url, tmp_path, rspamd_url=closed) as gw:
        assert await send(gw, mail()) == UNAVAILABLE
    async with running_gateway(
        redis_url, tmp_path, rspamd_url=closed, spam_unavailable="accept"
    ) as gw:
        code, _ = await send(gw, mail())
        assert code == 250
        _, body = await queued(gw)
    assert fields(body, "X-Spam-Status") == ["unchecked"]


async def test_one_domain_deferring_defers_the_message(redis_url: str, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    policies = table(example_test=SpamPolicy(when_unavailable="accept"),
                     limited_test=SpamPolicy(when_unavailable="defer"))  # fmt: skip
    async with running_gateway(
        redis_url, tmp_path, rspamd_url=closed, spam_unavailable="accept", table=policies
    ) as gw:
        assert await send(gw, mail(), recipients=(ALICE, "lim@limited.test")) == UNAVAILABLE
        assert (await send(gw, mail()))[0] == 250


@pytest.mark.parametrize("rule", ["defer", "accept"])
async def test_a_slow_rspamd_gets_the_rule_at_the_deadline(
    redis_url: str, tmp_path: Path, rule: str
) -> None:
    deadline = 1.0
    async with (
        stub("slow") as rspamd,
        running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url, spam_unavailable=rule,
                        rspamd_timeout=timedelta(seconds=deadline)) as gw,
    ):  # fmt: skip
        async with gw.client(gw.mx, start_tls=False) as smtp:
            await smtp.mail("someone@remote.test")
            await smtp.rcpt(ALICE)
            started = time.monotonic()
            try:
                reply = await smtp.data(mail())
                code = reply.code
            except aiosmtplib.SMTPResponseException as error:
                code = error.code
            waited = time.monotonic() - started
            assert (await smtp.noop()).code == 250
        assert deadline * 0.9 <= waited < deadline + 3
        assert code == (451 if rule == "defer" else 250)
        assert len(await gw.messages()) == (0 if rule == "defer" else 1)


async def test_the_request_carries_the_envelope_and_the_message(
    redis_url: str, tmp_path: Path
) -> None:
    async with (
        stub(http("200 OK", CLEAN)) as rspamd,
        running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url) as gw,
    ):
        content = mail(sender="a@pass.mailauth.test")
        code, _ = await send(
            gw, content, mail_from="a@pass.mailauth.test", recipients=(ALICE, "lim@limited.test")
        )
        assert code == 250
        info, body = await queued(gw)
    [(headers, sent)] = rspamd.requests
    named = dict(headers)
    assert named["IP"] == "127.0.0.1"
    assert named["Helo"]
    assert named["Hostname"] == "client.screen.test"  # the verified reverse name (screening)
    assert named["From"] == "a@pass.mailauth.test"
    assert [value for name, value in headers if name == "Rcpt"] == [ALICE, "lim@limited.test"]
    assert "User" not in named
    assert body.decode().find(named["Queue-Id"]) > 0  # the transaction id of Received:
    assert json.loads(named["SPF"]) == {"result": "pass", "domain": "pass.mailauth.test"}
    assert json.loads(named["DKIM"]) == {"result": "na"}
    assert json.loads(named["DMARC"]) == {"result": "pass", "domain": "pass.mailauth.test"}
    # the message as the client sent it, without what the gateway adds
    assert sent == content.encode()
    assert fields(body, "X-Spamd-Result") == ["default: False [0.50 / 15.00]; STUB(0.50)[]"]
    assert info.envelope.annotations == {}


GREYLIST_ADVICE = json.dumps(
    {"action": "greylist", "score": 4.5, "required_score": 15.0,
     "symbols": {"DOUBTFUL": {"name": "DOUBTFUL", "score": 4.5}}}
).encode()  # fmt: skip


async def test_rspamds_advice_to_greylist_is_carried_out_by_mailkubes_greylisting(
    redis_url: str, tmp_path: Path
) -> None:
    # greylisting is off for the domain: only rspamd's advice greylists this message
    options = {"greylist_delay": "1s", "greylist_auto_pass_after": 0}
    async with (
        stub(http("200 OK", GREYLIST_ADVICE)) as rspamd,
        running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url, **options) as gw,
    ):
        content = mail()
        code, text = await send(gw, content)
        assert (code, text.split(":")[0]) == (451, "4.7.1 Greylisted")
        assert await gw.messages() == []

        async def retried() -> tuple[int, str] | None:
            reply = await send(gw, content)
            if reply[0] == 250:
                return reply
            assert reply[0] == 451, reply
            return None

        # a sending MTA retries; rspamd advises the same, the triplet has passed by then
        await eventually(retried, timeout=15)
        _, body = await queued(gw)
        assert fields(body, "X-Spam-Status")[0].startswith("No, score=4.50")
    # under the tag policy the advice is only recorded
    async with (
        stub(http("200 OK", GREYLIST_ADVICE)) as rspamd,
        running_gateway(redis_url, tmp_path / "tag", rspamd_url=rspamd.url, spam_policy="tag",
                        **options) as gw,
    ):  # fmt: skip
        assert (await send(gw, mail()))[0] == 250
