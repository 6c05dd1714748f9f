"""Fetching an MTA-STS policy: `https://mta-sts.<domain>/.well-known/mta-sts.txt` (RFC 8461
§3.3), with a certificate valid for that name under the WebPKI trust store, no redirects, a
200 answer of type text/plain, at most 64 KB, all within one deadline.

A small HTTP/1.1 client of its own: the worker needs one GET, and its own resolver (the MX
resolver's DNS servers) decides where `mta-sts.<domain>` is.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

from .mta_sts import MAX_POLICY_SIZE, PolicyError, StsPolicy, parse_policy

PATH = "/.well-known/mta-sts.txt"
_HEADERS_LIMIT = 16 * 1024

#: a host name -> its addresses (IPv6 and IPv4), [] when it has none
AddressLookup = Callable[[str], Awaitable[list[str]]]


class FetchError(Exception):
    """The policy could not be fetched or read; the message says why (for logs and TLS-RPT
    `sts-webpki-invalid` / `sts-policy-fetch-error` / `sts-policy-invalid`)."""

    def __init__(self, text: str, result_type: str = "sts-policy-fetch-error") -> None:
        super().__init__(text)
        self.result_type = result_type


async def fetch_policy(
    domain: str,
    addresses: AddressLookup,
    context: ssl.SSLContext,
    *,
    limit: float,
    port: int = 443,
) -> tuple[StsPolicy, str]:
    """The policy of `domain` and its text; FetchError otherwise."""
    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(limit):
            found = await addresses(host)
            if not found:
                raise FetchError(f"{host} has no address")
            last: Exception | None = None
            for address in found:
                try:
                    text = await _get(address, port, host, context)
                except FetchError:
                    raise
                except ssl.SSLError as exc:
                    raise FetchError(f"{host}: TLS: {exc}", "sts-webpki-invalid") from exc
                except (OSError, asyncio.IncompleteReadError) as exc:
                    last = exc
                    continue
                try:
                    return parse_policy(text), text
                except PolicyError as exc:
                    raise FetchError(f"{host}: {exc}", "sts-policy-invalid") from exc
            raise FetchError(f"{host}: {last}")
    except TimeoutError:
        raise FetchError(f"{host}: no policy within {limit:g}s") from None


async def _get(address: str, port: int, host: str, context: ssl.SSLContext) -> str:
    reader, writer = await asyncio.open_connection(address, port, ssl=context, server_hostname=host)
    try:
        writer.write(
            f"GET {PATH} HTTP/1.1\r\nHost: {host}\r\nAccept: text/plain\r\n"
            f"User-Agent: mailkube-mta-sts\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        head = await _read_head(reader, host)
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise FetchError(f"{host}: not an HTTP answer: {status_line[:80]!r}")
        headers = _headers(header_lines)
        status = int(parts[1])
        if status != 200:
            # §3.3: "HTTP 3xx redirects MUST NOT be followed"; anything else is no policy
            raise FetchError(f"{host}: HTTP {status} for {PATH}")
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "text/plain":
            raise FetchError(f"{host}: Content-Type {media or 'missing'!r}, not text/plain",
                             "sts-policy-invalid")  # fmt: skip
        body = await _read_body(reader, headers, host)
    finally:
        writer.close()
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise FetchError(f"{host}: policy is not UTF-8", "sts-policy-invalid") from None


async def _read_head(reader: asyncio.StreamReader, host: str) -> str:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise FetchError(f"{host}: HTTP headers too large") from None
    except asyncio.IncompleteReadError:
        raise FetchError(f"{host}: connection closed before the HTTP headers") from None
    if len(head) > _HEADERS_LIMIT:
        raise FetchError(f"{host}: HTTP headers too large")
    return head[:-4].decode("latin-1")


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], host: str) -> bytes:
    too_large = FetchError(f"{host}: policy larger than {MAX_POLICY_SIZE} bytes",
                           "sts-policy-invalid")  # fmt: skip
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line = (await reader.readline()).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise FetchError(f"{host}: bad chunked encoding") from None
            if size == 0:
                return body
            if len(body) + size > MAX_POLICY_SIZE:
                raise too_large
            body += await reader.readexactly(size)
            await reader.readline()
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise FetchError(f"{host}: bad Content-Length {length!r}")
        if int(length) > MAX_POLICY_SIZE:
            raise too_large
        try:
            return await reader.readexactly(int(length))
        except asyncio.IncompleteReadError:
            raise FetchError(f"{host}: connection closed inside the policy") from None
    body = await reader.read(MAX_POLICY_SIZE + 1)
    while len(body) <= MAX_POLICY_SIZE:
        more = await reader.read(MAX_POLICY_SIZE + 1 - len(body))
        if not more:
            return body
        body += more
    raise too_large
