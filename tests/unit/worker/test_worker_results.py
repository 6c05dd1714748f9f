"""SMTP replies become recipient outcomes with RFC 3463 codes."""

from __future__ import annotations

import pytest

from mailkube_core.queue import RecipientStatus
from mailkube_worker.results import enhanced_code, from_reply


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (550, "5.1.1 no such user", "5.1.1"),
        (550, "no such user", "5.0.0"),
        (451, "4.7.1 greylisted", "4.7.1"),
        (451, "5.7.1 class disagrees", "4.0.0"),
        (250, "2.0.0 ok", "2.0.0"),
        (421, "4.4.2\ttimeout", "4.4.2"),
        (554, "5.1.10x", "5.0.0"),
    ],
)
def test_enhanced_code(code: int, text: str, expected: str) -> None:
    assert enhanced_code(code, text) == expected


def test_reply_classes() -> None:
    assert from_reply(250, "ok", "mx").status is RecipientStatus.DELIVERED
    assert from_reply(452, "4.2.2 full", "mx").status is RecipientStatus.DEFERRED
    bad = from_reply(550, "5.1.1 no such\nuser", "mx.example")
    assert bad.status is RecipientStatus.FAILED
    assert bad.diagnostic == "550 5.1.1 no such user"
    assert bad.remote_mta == "mx.example"
    assert from_reply(354, "odd", None).status is RecipientStatus.DEFERRED
