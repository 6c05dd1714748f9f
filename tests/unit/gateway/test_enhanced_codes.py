"""Enhanced status codes added to replies that lack one (RFC 2034 §3, RFC 3463), and every
reply the gateway composes carrying its own."""

from __future__ import annotations

import re

import pytest

from mailkube_gateway import replies
from mailkube_gateway.replies import with_enhanced_code

CODED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
        ("501 Syntax: QUIT", "501 5.5.4 Syntax: QUIT"),
        ("454 TLS not available", "454 4.7.0 TLS not available"),
        ("599 odd", "599 5.0.0 odd"),
        ("250", "250"),  # no text: nothing to preface
        ("250 ", "250 2.0.0"),
        ("250 2.1.0 Sender ok", "250 2.1.0 Sender ok"),
        ("550 5.7.1 Go away", "550 5.7.1 Go away"),
        # 3xx carry none: the AUTH challenge is base64, 354 the go-ahead
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
        ("334 ", "334 "),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        # multi-line: every line
        ("250-first\r\n250 last", "250-2.0.0 first\r\n250 2.0.0 last"),
        ("550-5.7.1 a\r\n550 b", "550-5.7.1 a\r\n550 5.0.0 b"),
        # a number that only looks like a code is text
        ("250 2.0 OK", "250 2.0.0 2.0 OK"),
        ("garbage", "garbage"),
    ],
)
def test_with_enhanced_code(reply: str, expected: str) -> None:
    assert with_enhanced_code(reply) == expected


def test_every_composed_reply_carries_a_code() -> None:
    for name in dir(replies):
        value = getattr(replies, name)
        if name.isupper() and isinstance(value, str) and value[:1] in "245":
            assert CODED.match(value), (name, value)
