"""The SASL exchange of SMTP AUTH (RFC 4954 §4) for PLAIN (RFC 4616) and LOGIN: the
arguments, the 334 challenges, the client's base64 answers. Whether the credentials are good,
and who may try, is auth.py's and auth_throttle.py's."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable

from . import replies
from .auth import Credentials, MalformedCredentials, decode_plain

MECHANISMS = ("PLAIN", "LOGIN")
#: sends a reply to the client
Say = Callable[[str | bytes], Awaitable[None]]
#: reads one line from the client
Hear = Callable[[], Awaitable[bytes]]


def parse_auth(arg: str | None) -> tuple[str, str | None] | str:
    """'PLAIN dGVzdA==' -> ('PLAIN', 'dGVzdA=='); the reply refusing it otherwise."""
    args = (arg or "").split()
    if not args or len(args) > 2:
        return replies.AUTH_ARGUMENTS
    mechanism = args[0].upper()
    if mechanism not in MECHANISMS:
        return replies.AUTH_MECHANISM
    return mechanism, args[1] if len(args) > 1 else None


async def read_credentials(
    mechanism: str, initial: str | None, say: Say, hear: Hear
) -> Credentials | None:
    """Run the exchange; None if the client aborted or sent garbage (the reply is sent)."""
    try:
        if mechanism == "PLAIN":
            message = await _answer(initial, b"", say, hear)
            return None if message is None else decode_plain(message)
        user = await _answer(initial, b"Username:", say, hear)
        if user is None:
            return None
        password = await _answer(None, b"Password:", say, hear)
        if password is None:
            return None
        return Credentials(user.decode("utf-8"), password.decode("utf-8"))
    except (MalformedCredentials, UnicodeDecodeError):
        await say(replies.AUTH_SYNTAX)
        return None


async def _answer(initial: str | None, challenge: bytes, say: Say, hear: Hear) -> bytes | None:
    """The client's base64 answer to `challenge` (or its initial response); None if it
    aborted or sent garbage (the reply is sent)."""
    if initial is not None:
        if initial == "=":  # RFC 4954 §4: an empty initial response
            return b""
        return await _decoded(initial.encode("utf-8", "surrogateescape"), say)
    await say(b"334 " + base64.b64encode(challenge))
    blob = (await hear()).strip()
    if blob == b"*":  # RFC 4954 §4: the client cancels
        await say(replies.AUTH_ABORTED)
        return None
    return await _decoded(blob, say)


async def _decoded(blob: bytes, say: Say) -> bytes | None:
    try:
        return base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        await say(replies.AUTH_SYNTAX)
        return None
