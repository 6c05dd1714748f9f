"""The tests' rspamd answers what the spam tests rely on: GTUBE is a reject, the add-header
and soft-reject test patterns give those actions, and plain mail passes."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from mailkube_core.cli.rspamd_local import (
    ADD_HEADER_PATTERN,
    GTUBE,
    SOFT_REJECT_PATTERN,
    LocalRspamd,
)


def _check(rspamd: LocalRspamd, body: str) -> dict[str, object]:
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    message = (
        "From: someone@remote.test\r\nTo: alice@example.test\r\nSubject: hello\r\n"
        f"Date: {date}\r\nMessage-ID: <m1@remote.test>\r\n\r\n{body}\r\n"
    )
    request = urllib.request.Request(
        f"{rspamd.url}/checkv2",
        data=message.encode(),
        headers={"IP": "192.0.2.1", "From": "someone@remote.test", "Rcpt": "alice@example.test"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(json.load(response))


@pytest.mark.parametrize(
    ("body", "action"),
    [
        (GTUBE, "reject"),
        (ADD_HEADER_PATTERN, "add header"),
        (SOFT_REJECT_PATTERN, "soft reject"),
        ("Lunch on Friday?", "no action"),
    ],
)
def test_rspamd_actions(rspamd: LocalRspamd, body: str, action: str) -> None:
    assert _check(rspamd, body)["action"] == action
