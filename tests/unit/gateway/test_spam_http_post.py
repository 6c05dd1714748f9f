"""The one-exchange HTTP client the gateway asks rspamd with (spam/http_post.py): the request
it writes, the answers it takes and the ones it refuses, against servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailkube_gateway.spam.http_post import (
    Endpoint,
    HttpError,
    build_request,
    parse_response,
    post,
)


def test_a_complete_answer_gives_its_status_and_body() -> None:
    data = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    assert parse_response(data) == (200, b"{}")


def test_without_a_length_the_body_runs_to_the_end() -> None:
    assert parse_response(b"HTTP/1.0 500 Oops\r\n\r\nbroken") == (500, b"broken")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "no complete header section"),
        (b"SPAMD/1.1 0 EX_OK\r\n\r\n{}", "no HTTP status line"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n{}", "no HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "cut short"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "bad Content"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", "Transfer"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n{}", "malformed header field"),
    ],
)
def test_a_broken_answer_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(HttpError, match=why):
        parse_response(data)


def test_bytes_past_the_length_are_not_the_body() -> None:
    assert parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}junk")[1] == b"{}"


@given(st.binary(max_size=300))
def test_any_bytes_give_an_answer_or_http_error(data: bytes) -> None:
    try:
        status, body = parse_response(data)
    except HttpError:
        return
    assert 0 <= status <= 999
    assert isinstance(body, bytes)


def test_the_request_is_http_1_0_with_its_length_and_headers() -> None:
    endpoint = Endpoint.from_url("http://rspamd.example:11333/checkv2")
    request = build_request(endpoint, [("IP", "192.0.2.1"), ("Rcpt", "a@b.test")], b"body")
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"POST /checkv2 HTTP/1.0",
        b"Host: rspamd.example:11333",
        b"IP: 192.0.2.1",
        b"Rcpt: a@b.test",
        b"Content-Length: 4",
    ]
    assert body == b"body"


@pytest.mark.parametrize(
    ("url", "host", "port", "header", "tls"),
    [
        ("http://127.0.0.1:11333", "127.0.0.1", 11333, "127.0.0.1:11333", False),
        ("http://rspamd/", "rspamd", 80, "rspamd", False),
        ("https://rspamd.example/checkv2", "rspamd.example", 443, "rspamd.example", True),
        ("http://[::1]:11333/checkv2", "::1", 11333, "[::1]:11333", False),
    ],
)
def test_endpoints_from_urls(url: str, host: str, port: int, header: str, tls: bool) -> None:
    endpoint = Endpoint.from_url(url)
    assert (endpoint.host, endpoint.port, endpoint.host_header) == (host, port, header)
    assert (endpoint.tls is not None) == tls


def test_only_http_urls_are_endpoints() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Endpoint.from_url("ftp://rspamd/")


# --- against servers on loopback -------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[int]:
    listening = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    try:
        yield int(listening.sockets[0].getsockname()[1])
    finally:
        listening.close()
        await listening.wait_closed()


async def test_a_post_reads_the_answer_to_the_end() -> None:
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head + await reader.readexactly(5))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n")
        await writer.drain()
        writer.write(b'{"a":1}')  # in a second segment
        writer.close()

    async with server(answer) as port:
        endpoint = Endpoint.from_url(f"http://localhost:{port}/checkv2")
        assert await post(endpoint, [("IP", "192.0.2.1")], b"hello", limit=1024) == (
            200,
            b'{"a":1}',
        )
        # the name was looked up once and is kept for its time
        assert endpoint._addresses
    assert seen[0].startswith(b"POST /checkv2 HTTP/1.0\r\n")
    assert seen[0].endswith(b"\r\n\r\nhello")


async def test_an_answer_over_the_limit_is_refused() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000)
        await writer.drain()
        await reader.read()  # no end from here: the client must stop reading by itself
        writer.close()

    async with server(answer) as port:
        endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/")
        async with asyncio.timeout(3):
            with pytest.raises(HttpError, match="larger than 1024"):
                await post(endpoint, [], b"", limit=1024)


async def test_nobody_listening_is_an_http_error() -> None:
    async with server(lambda r, w: w.close()) as port:
        pass  # closed again: the port is free
    endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/")
    with pytest.raises(HttpError, match="cannot connect"):
        await post(endpoint, [], b"", limit=1024)


async def test_a_reset_connection_is_an_http_error() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()  # RST

    async with server(reset) as port:
        endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/")
        with pytest.raises(HttpError):
            await post(endpoint, [], b"", limit=1024)


async def test_a_cancelled_exchange_closes_its_connection() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client goes
        closed.set()

    async with server(silent) as port:
        endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await post(endpoint, [], b"", limit=1024)
        async with asyncio.timeout(5):
            await closed.wait()
