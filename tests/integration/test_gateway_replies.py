"""Every reply of the gateway carries an RFC 3463 enhanced status code, as the
ENHANCEDSTATUSCODES it advertises promises (RFC 2034 §3: "the text part of all 2xx, 4xx, and
5xx SMTP responses other than the initial greeting and any response to HELO or EHLO"), before
EHLO and after HELO as well: a battery of garbage, sent as raw bytes."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from gateway_harness import ALICE, RawClient, running_gateway

from mailkube_gateway.policy import Policy

#: a reply line with an enhanced status code
ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |\r?$)")

# commands out of sequence and garbage, for any point of a session
GARBAGE: list[bytes] = [
    b"",
    b"X" * 600,  # over RFC 5321's 512 octets
    b"NOOP " + b"Y" * 70_000,  # over the stream's own line limit
    "ÉHLO client.test".encode(),
    b"\xff\xfe\x00\x01",
    b"FOO bar",
    b"BDAT 0 LAST",  # an empty chunk: nothing follows the command line
    b"MAIL",
    b"MAIL TO:<a@remote.test>",
    b"MAIL FROM:",
    b"MAIL FROM:a@remote.test>",
    b"MAIL FROM:<a@@remote.test>",
    b"MAIL FROM:<a@remote.test> SIZE=abc",
    b"MAIL FROM:<a@remote.test> FOO=bar",
    b"RCPT",
    b"RCPT TO:<" + ALICE.encode() + b">",
    b"DATA",
    b"DATA now",
    b"AUTH",
    b"AUTH PLAIN",
    b"AUTH FOO",
    b"VRFY",
    b"VRFY alice",
    b"EXPN staff",
    b"HELP",
    b"HELP me",
    b"NOOP",
    b"NOOP anything",
    b"RSET",
    b"RSET now",
    b"QUIT now",
    b"STARTTLS now",
    b"EHLO",
    b"HELO",
]

# within a transaction (after MAIL FROM was accepted)
IN_TRANSACTION: list[bytes] = [
    b"MAIL FROM:<b@remote.test>",
    b"RCPT",
    b"RCPT FROM:<x@y>",
    b"RCPT TO:",
    b"RCPT TO:<nobody@example.test>",
    b"RCPT TO:<a@@example.test>",
    b"RCPT TO:<someone@elsewhere.test>",
    b"RCPT TO:<" + ALICE.encode() + b"> NOTIFY=SOMETIMES",
    b"RCPT TO:<" + ALICE.encode() + b"> FOO=bar",
    b"DATA",
    b"AUTH PLAIN",
    b"RSET",
]


def without_code(reply: str) -> list[str]:
    """The lines of `reply` that should carry an enhanced code and do not (3xx replies, the
    334 challenge and the 354 go-ahead, carry none: RFC 2034 §3 names 2xx, 4xx and 5xx)."""
    lines = reply.splitlines()
    assert lines, "no reply"
    return [line for line in lines if line[:1] != "3" and not ENHANCED.match(line)]


async def battery(client: RawClient, commands: list[bytes]) -> list[str]:
    """Send each command; the replies that lack a code, with the command that got them."""
    missing = []
    for command in commands:
        reply = await client.command(command)
        missing += [f"{command[:40]!r} -> {line}" for line in without_code(reply)]
    return missing


async def test_every_reply_carries_an_enhanced_status_code(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, max_errors=1000) as gw:
        missing: list[str] = []
        # MX, before any HELO or EHLO, then after HELO, then after EHLO
        for greeting in (None, b"HELO client.test", b"EHLO client.test"):
            client = await RawClient.connect(gw.mx)
            if greeting is not None:
                assert (await client.command(greeting)).startswith("250")
            missing += await battery(client, GARBAGE)
            if greeting is not None:
                await client.command(greeting)  # the battery's EHLO/HELO errors reset nothing
                missing += await battery(client, [b"MAIL FROM:<a@remote.test>", *IN_TRANSACTION])
            missing += await battery(client, [b"QUIT"])
            assert await client.closed()

        # STARTTLS after HELO: its 220 too
        client = await RawClient.connect(gw.mx)
        await client.command(b"HELO client.test")
        missing += await battery(client, [b"STARTTLS"])
        await client.writer.start_tls(gw.tls.client_context(), server_hostname="localhost")
        missing += await battery(client, [b"MAIL FROM:<a@remote.test>", b"STARTTLS", b"QUIT"])

        # submission: STARTTLS first, AUTH first, AUTH garbage
        client = await RawClient.connect(gw.submission)
        missing += await battery(client, [b"MAIL FROM:<a@remote.test>", b"AUTH PLAIN", b"FOO"])
        await client.command(b"EHLO client.test")
        missing += await battery(client, [b"AUTH PLAIN", b"DATA", b"STARTTLS now"])
        missing += await battery(client, [b"STARTTLS"])
        await client.writer.start_tls(gw.tls.client_context(), server_hostname="localhost")
        missing += await battery(client, [b"MAIL FROM:<a@remote.test>", b"AUTH PLAIN"])
        await client.command(b"EHLO client.test")
        no_nul = base64.b64encode(b"no separators here")
        bad_utf8 = base64.b64encode(b"\0\xff\xfe\0\xff")
        missing += await battery(
            client,
            [
                b"MAIL FROM:<" + ALICE.encode() + b">",
                b"AUTH",
                b"AUTH PLAIN a b c",
                b"AUTH FOO",
                b"AUTH PLAIN !!!notbase64",
                b"AUTH PLAIN " + no_nul,
                b"AUTH PLAIN " + bad_utf8,
                b"AUTH PLAIN",  # 334, then garbage
                b"%%%",
                b"AUTH PLAIN",  # 334, then cancelled
                b"*",
                b"AUTH LOGIN",  # 334 Username, then garbage
                b"\xff\xff",
                b"AUTH LOGIN " + base64.b64encode(b"\xff"),
                b"STARTTLS",
                b"QUIT",
            ],
        )
        assert missing == [], "\n".join(missing)


async def test_an_internal_error_is_a_temporary_reply_that_names_nothing(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a command is logged; the client gets 451 4.3.0, not the exception's text, and
    the session goes on."""

    async def broken(*args: object) -> str:
        raise RuntimeError("secret internals")

    async with running_gateway(redis_url, tmp_path) as gw:
        client = await RawClient.connect(gw.mx)
        await client.command(b"EHLO client.test")
        monkeypatch.setattr(Policy, "rcpt", broken)
        await client.command(b"MAIL FROM:<a@remote.test>")
        reply = await client.command(b"RCPT TO:<" + ALICE.encode() + b">")
        assert reply.startswith("451 4.3.0 "), reply
        assert "secret" not in reply
        assert "RuntimeError" not in reply
        assert (await client.command(b"NOOP")).startswith("250 2.0.0")
