"""RFC 3464 DSNs parse with the email package and carry the right fields, whatever the
envelope and results (a hypothesis fuzz test), plus the exact fields for known cases."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailkube_core.queue import Envelope, Notify, Recipient, RecipientResult, RecipientStatus
from mailkube_worker.dsn import DsnRecipient, build_dsn, encode_address

NOW = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)
ORIGINAL = (b"From: bob@example.test\r\nTo: x@remote.test\r\nSubject: hi\r\n"
            b"Message-ID: <1@example.test>\r\n\r\nbody line\r\n.\r\nmore\r\n")  # fmt: skip


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def dsn(recipients: list[DsnRecipient], **envelope: object) -> EmailMessage:
    env = Envelope(
        mail_from=str(envelope.pop("mail_from", "bob@example.test")),
        recipients=[r.recipient for r in recipients],
        received_at=NOW - timedelta(hours=1),
        **envelope,  # type: ignore[arg-type]
    )
    raw = build_dsn(reporting_mta="mx.example.test", queue_id="01ABC.0", envelope=env,
                    body=ORIGINAL, recipients=recipients, action="failed", now=NOW)  # fmt: skip
    return parse(raw)


def test_failed_dsn_fields() -> None:
    result = RecipientResult(status=RecipientStatus.FAILED, enhanced_code="5.1.1", smtp_code=550,
                             diagnostic="550 5.1.1 no such user", remote_mta="mx.remote.test",
                             at=NOW)  # fmt: skip
    rcpt = Recipient(address="x@remote.test", orcpt="rfc822;X@Remote.test")
    msg = dsn([DsnRecipient(rcpt, result)], envid="ENV 1")
    assert msg["To"] == "bob@example.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    human, status, original = msg.get_payload()  # type: ignore[misc]
    assert "no such user" in human.get_content()
    per_message, per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_message["Original-Envelope-Id"] == "ENV 1"
    assert per_message["Arrival-Date"] == "Tue, 24 Nov 2026 02:00:00 +0000"
    assert per_rcpt["Final-Recipient"] == "rfc822;x@remote.test"
    assert per_rcpt["Original-Recipient"] == "rfc822;X@Remote.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.remote.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert per_rcpt["Last-Attempt-Date"] == "Tue, 24 Nov 2026 03:00:00 +0000"
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: hi" in original.get_content()
    assert "body line" not in original.get_content()


def test_ret_full_returns_the_whole_message() -> None:
    result = RecipientResult(status=RecipientStatus.FAILED, enhanced_code="5.0.0")
    msg = dsn([DsnRecipient(Recipient(address="x@remote.test"), result)], ret="FULL")
    returned = msg.get_payload()[2]  # type: ignore[index]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "hi"
    assert "more" in inner.get_payload()


def test_utf8_addresses_use_rfc6533_escapes() -> None:
    assert encode_address("jürgen@example.test") == "utf-8;j\\x{FC}rgen@example.test"
    assert encode_address("a+b=c@example.test") == "rfc822;a+b=c@example.test"
    assert encode_address("a b@x") == "utf-8;a\\x{20}b@x"


_text = st.text(min_size=0, max_size=60)
_CODE = r"[2-5]\.[0-9]{1,3}\.[0-9]{1,3}"
_address = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="@"),
        min_size=1,
        max_size=20,
    ),
    st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,2}", fullmatch=True),
)
_result = st.builds(
    RecipientResult,
    status=st.sampled_from([RecipientStatus.FAILED, RecipientStatus.DEFERRED]),
    enhanced_code=st.one_of(st.none(), st.from_regex(_CODE, fullmatch=True), _text),
    smtp_code=st.one_of(st.none(), st.integers(200, 599)),
    diagnostic=st.one_of(st.none(), st.text(max_size=2000)),
    remote_mta=st.one_of(st.none(), _text),
    at=st.datetimes(timezones=st.just(UTC)),
)  # fmt: skip
_recipient = st.builds(
    Recipient,
    address=_address,
    notify=st.one_of(st.none(), st.just(frozenset({Notify.FAILURE, Notify.DELAY}))),
    orcpt=st.one_of(st.none(), st.builds(lambda a: f"rfc822;{a}", _address), _text),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.tuples(_recipient, _result), min_size=1, max_size=5),
    sender=_address,
    envid=st.one_of(st.none(), _text),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    body=st.one_of(st.binary(max_size=3000), st.just(ORIGINAL)),
    action=st.sampled_from(["failed", "delayed", "delivered", "relayed"]),
)
def test_any_dsn_parses_and_has_the_right_parts(
    items: list[tuple[Recipient, RecipientResult]],
    sender: str,
    envid: str | None,
    ret: str | None,
    body: bytes,
    action: str,
) -> None:
    env = Envelope(mail_from=sender, recipients=[r for r, _ in items], envid=envid, ret=ret,  # type: ignore[arg-type]
                   received_at=NOW)  # fmt: skip
    raw = build_dsn(
        reporting_mta="mx.example.test", queue_id="01ABC.0", envelope=env, body=body,
        recipients=[DsnRecipient(r, res) for r, res in items], action=action,  # type: ignore[arg-type]
        now=NOW, retry_until=NOW + timedelta(days=2),
    )  # fmt: skip
    assert b"\n" not in raw.replace(b"\r\n", b"")[: raw.find(b"\r\n\r\n")]  # CRLF headers
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = msg.get_payload()
    assert isinstance(parts, list)
    assert len(parts) == 3
    human, status, returned = parts
    assert human.get_content_type() == "text/plain"
    human.get_content()  # decodes
    assert status.get_content_type() == "message/delivery-status"
    assert status.as_bytes().isascii()
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    assert len(blocks) == 1 + len(items)
    assert blocks[0]["Reporting-MTA"] == "dns; mx.example.test"
    for block, (recipient, result) in zip(blocks[1:], items, strict=True):
        assert isinstance(block, Message)
        assert block["Final-Recipient"] == encode_address(recipient.address)
        assert block["Action"] == action
        code = str(block["Status"])
        assert code[0] in {"delayed": "4", "failed": "45", "delivered": "2", "relayed": "2"}[action]
        if action == "failed" and result.enhanced_code and result.enhanced_code[:1] in "45":
            assert code in (result.enhanced_code, "5.0.0")
        assert ("Original-Recipient" in block) == bool(recipient.orcpt)
    assert returned.get_content_type() in ("text/rfc822-headers", "message/rfc822")
