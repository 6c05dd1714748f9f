"""The SASL exchange of AUTH (sasl.py) against a scripted client, without a socket."""

from __future__ import annotations

import base64

import pytest

from mailkube_gateway import replies
from mailkube_gateway.auth import Credentials
from mailkube_gateway.sasl import parse_auth, read_credentials


def b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


class Client:
    """Answers each 334 with the next of `lines`; records what the server said."""

    def __init__(self, *lines: bytes) -> None:
        self.lines = list(lines)
        self.said: list[str] = []

    async def say(self, reply: str | bytes) -> None:
        self.said.append(reply.decode() if isinstance(reply, bytes) else reply)

    async def hear(self) -> bytes:
        return self.lines.pop(0) + b"\r\n"


@pytest.mark.parametrize(
    ("arg", "parsed"),
    [("PLAIN", ("PLAIN", None)), ("plain =", ("PLAIN", "=")),
     ("LOGIN dXNlcg==", ("LOGIN", "dXNlcg==")),
     (None, replies.AUTH_ARGUMENTS), ("", replies.AUTH_ARGUMENTS),
     ("PLAIN a b", replies.AUTH_ARGUMENTS), ("CRAM-MD5", replies.AUTH_MECHANISM),
     ("XOAUTH2 x", replies.AUTH_MECHANISM)],
)  # fmt: skip
def test_auth_arguments(arg: str | None, parsed: object) -> None:
    assert parse_auth(arg) == parsed


async def test_plain_with_an_initial_response_and_after_a_challenge() -> None:
    client = Client()
    found = await read_credentials("PLAIN", b64(b"\0alice@x.test\0pw"), client.say, client.hear)
    assert found == Credentials("alice@x.test", "pw")
    assert client.said == []
    client = Client(b64(b"admin\0alice@x.test\0pw").encode())
    found = await read_credentials("PLAIN", None, client.say, client.hear)
    assert found == Credentials("alice@x.test", "pw", "admin")
    assert client.said == ["334 "]


async def test_login_asks_for_user_and_password() -> None:
    client = Client(b64(b"alice@x.test").encode(), b64(b"pw").encode())
    found = await read_credentials("LOGIN", None, client.say, client.hear)
    assert found == Credentials("alice@x.test", "pw")
    assert client.said == [f"334 {b64(b'Username:')}", f"334 {b64(b'Password:')}"]


@pytest.mark.parametrize(
    ("mechanism", "initial", "lines", "reply"),
    [("PLAIN", None, [b"*"], replies.AUTH_ABORTED),  # RFC 4954 §4: the client cancels
     ("LOGIN", None, [b64(b"u").encode(), b"*"], replies.AUTH_ABORTED),
     ("PLAIN", "!!!", [], replies.AUTH_SYNTAX), ("PLAIN", "é", [], replies.AUTH_SYNTAX),
     ("PLAIN", None, [b"%%%"], replies.AUTH_SYNTAX),
     ("PLAIN", b64(b"no separators"), [], replies.AUTH_SYNTAX),
     ("PLAIN", b64(b"\0\xff\0pw"), [], replies.AUTH_SYNTAX),  # not UTF-8
     ("LOGIN", b64(b"\xff"), [b64(b"pw").encode()], replies.AUTH_SYNTAX),
     ("PLAIN", "=", [], replies.AUTH_SYNTAX)],  # an empty message is not authzid\0authcid\0pw
)  # fmt: skip
async def test_aborts_and_garbage_get_their_reply_and_no_credentials(
    mechanism: str, initial: str | None, lines: list[bytes], reply: str
) -> None:
    client = Client(*lines)
    assert await read_credentials(mechanism, initial, client.say, client.hear) is None
    assert client.said[-1] == reply
