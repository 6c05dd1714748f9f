"""RFC 3464 delivery status notifications (bounces and delay warnings).

    multipart/report; report-type=delivery-status          (RFC 6522)
      1. text/plain                  what happened, for people
      2. message/delivery-status     per-message fields, then one block per recipient
      3. text/rfc822-headers         the original headers, or message/rfc822 for RET=FULL

The report is 7-bit ASCII except for what the original message brings (its headers, or all
of it) and a non-ASCII sender in To:. Non-ASCII addresses in the report use the RFC 6533
`utf-8` address type with its \\x{HEX} escapes, so the machine-readable part stays ASCII.
"""

from __future__ import annotations

import quopri
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Literal

from mailkube_core.queue import Envelope, Recipient, RecipientResult

#: RFC 3464 §2.3.3 (expanded, for mailing lists, is not something Mailkube does)
Action = Literal["failed", "delayed", "delivered", "relayed"]
_SUBJECTS: dict[str, str] = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
}
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f<>]")
#: RFC 6533 §3 QCHAR: printable ASCII but '+', '=', '\\' and space
_QCHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")


@dataclass(frozen=True)
class DsnRecipient:
    recipient: Recipient
    result: RecipientResult


def encode_address(address: str) -> str:
    """An address-type and address for Final-/Original-Recipient (RFC 3464 §2.3.2)."""
    if address.isascii() and address.isprintable() and " " not in address:
        return f"rfc822;{address}"
    chars = (c if _QCHAR.fullmatch(c) else f"\\x{{{ord(c):X}}}" for c in address)
    return "utf-8;" + "".join(chars)


def _original_recipient(orcpt: str) -> str:
    """RFC 3461 §4.2 ORCPT as given ("addr-type;address", xtext decoded)."""
    kind, sep, address = orcpt.partition(";")
    if not sep:
        return encode_address(orcpt)
    if kind.strip().lower() == "rfc822" and not address.isascii():
        return encode_address(address)
    return f"{_text(kind.strip())};{_text(address.strip())}"


def _text(value: str, limit: int = 900) -> str:
    """One line of printable ASCII (remote replies can carry anything)."""
    return " ".join(_UNPRINTABLE.sub("?", value).split())[:limit]


def _status(result: RecipientResult, action: Action) -> str:
    code = result.enhanced_code or ""
    if action in ("delivered", "relayed"):
        return code if _STATUS.fullmatch(code) and code[0] == "2" else "2.0.0"
    if not (_STATUS.fullmatch(code) and code[0] in "45"):
        return "4.0.0" if action == "delayed" else "5.0.0"
    # RFC 3464 §2.3.4: a delayed recipient has a transient (4.x.x) status
    return "4" + code[1:] if action == "delayed" else code


def _fold(name: str, value: str) -> str:
    """A header field folded at spaces below 78 columns where it can be (RFC 5322 §2.2.3)."""
    line, lines = f"{name}: ", []
    for word in value.split(" "):
        if len(line) + len(word) > 76 and line.strip():
            lines.append(line.rstrip())
            line = " "
        line += word + " "
    lines.append(line.rstrip())
    return "\r\n".join(lines)


def _split_headers(body: bytes) -> bytes:
    """The header section of a message, CRLF line ends, without the blank line."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = body.find(sep)
        if end != -1:
            body = body[:end]
            break
    return b"\r\n".join(body.replace(b"\r\n", b"\n").split(b"\n"))


def _crlf(data: bytes) -> bytes:
    return b"\r\n".join(data.replace(b"\r\n", b"\n").split(b"\n"))


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    envelope: Envelope,
    body: bytes,
    recipients: Sequence[DsnRecipient],
    action: Action,
    now: datetime,
    full_limit: int = 102400,
    retry_until: datetime | None = None,
) -> bytes:
    """The whole DSN message (CRLF line ends), ready to enqueue with sender <>."""
    if not recipients:
        raise ValueError("a DSN reports at least one recipient")
    boundary = f"=_mailkube_{secrets.token_hex(12)}"
    while boundary.encode() in body:
        boundary = f"=_mailkube_{secrets.token_hex(12)}"
    mailer_daemon = f"MAILER-DAEMON@{reporting_mta}"
    subject = _SUBJECTS[action]
    sender = envelope.mail_from
    head = [
        f"From: Mail Delivery System <{mailer_daemon}>",
        # UTF-8 when the sender is (RFC 6532 §3.2; the DSN then goes out with SMTPUTF8)
        f"To: <{_CONTROL.sub('?', sender)}>",
        f"Subject: {subject}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{secrets.token_hex(16)}@{reporting_mta}>",
        # RFC 3834 §5: an automatic response; RFC 3464 §4 wants no replies to it either
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"',
    ]

    human = _human_text(reporting_mta, envelope, recipients, action, retry_until)
    if human.isascii():
        human_part = ["Content-Type: text/plain; charset=us-ascii",
                      "Content-Transfer-Encoding: 7bit"]  # fmt: skip
        human_body = _crlf(human.encode())
    else:
        human_part = ["Content-Type: text/plain; charset=utf-8",
                      "Content-Transfer-Encoding: quoted-printable"]  # fmt: skip
        human_body = _crlf(quopri.encodestring(human.encode()))

    # RFC 3464 §2.2: per-message fields
    status_lines = [f"Reporting-MTA: dns; {reporting_mta}", f"X-Mailkube-Queue-ID: {queue_id}"]
    if envelope.envid:
        status_lines.append(f"Original-Envelope-Id: {_text(envelope.envid)}")
    status_lines.append(f"Arrival-Date: {format_datetime(envelope.received_at)}")
    for item in recipients:  # RFC 3464 §2.3: per-recipient fields, a blank line before each
        result = item.result
        status_lines.append("")
        if item.recipient.orcpt:
            status_lines.append(f"Original-Recipient: {_original_recipient(item.recipient.orcpt)}")
        status_lines.append(f"Final-Recipient: {encode_address(item.recipient.address)}")
        status_lines.append(f"Action: {action}")
        status_lines.append(f"Status: {_status(result, action)}")
        if result.remote_mta:
            status_lines.append(f"Remote-MTA: dns; {_text(result.remote_mta, 255)}")
        if result.diagnostic:
            kind = "smtp" if result.smtp_code else "X-Mailkube"
            status_lines.append(_fold("Diagnostic-Code", f"{kind}; {_text(result.diagnostic)}"))
        status_lines.append(f"Last-Attempt-Date: {format_datetime(result.at)}")
        if action == "delayed" and retry_until is not None:
            status_lines.append(f"Will-Retry-Until: {format_datetime(retry_until)}")

    # RFC 3461 §4.3: RET=FULL asks for the whole message; headers otherwise (and for a
    # message too big to send back, or a binary one: the report is not BINARYMIME, and
    # RFC 3030 §3 forbids sending binary content without it)
    binary = envelope.body_type == "BINARYMIME"
    if envelope.ret == "FULL" and len(body) <= full_limit and not binary:
        returned_type, returned = "message/rfc822", _crlf(body)
        description = "Message"
    else:
        returned_type, returned = "text/rfc822-headers", _split_headers(body) + b"\r\n"
        description = "Message Headers"
    if action in ("failed", "delayed"):
        description = "Undelivered " + description
    returned_part = [f"Content-Type: {returned_type}", f"Content-Description: {description}"]
    if not returned.isascii():
        returned_part.append("Content-Transfer-Encoding: 8bit")

    delimiter = f"--{boundary}"
    out = [
        "\r\n".join(head).encode(),
        b"",
        b"This is a MIME-encapsulated message.",
        b"",
        delimiter.encode(),
        "\r\n".join([*human_part, "Content-Description: Notification"]).encode(),
        b"",
        human_body,
        b"",
        delimiter.encode(),
        b"Content-Type: message/delivery-status\r\nContent-Description: Delivery report",
        b"",
        "\r\n".join(status_lines).encode(),
        b"",
        delimiter.encode(),
        "\r\n".join(returned_part).encode(),
        b"",
        returned.rstrip(b"\r\n"),
        b"",
        f"--{boundary}--".encode(),
        b"",
    ]
    return b"\r\n".join(out)


def _human_text(
    reporting_mta: str,
    envelope: Envelope,
    recipients: Sequence[DsnRecipient],
    action: Action,
    retry_until: datetime | None,
) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if action in ("delivered", "relayed"):
        lines += ["Your message was delivered to the recipients below, as you asked to be told.",
                  "(Relayed: handed to a system that sends no delivery notices itself.)"
                  if action == "relayed" else "",
                  "", "Recipients:"]  # fmt: skip
    elif action == "failed":
        lines += ["Your message could not be delivered to one or more recipients.",
                  "It has been returned below (its headers, or all of it if you asked).",
                  "", "The following recipients failed permanently:"]  # fmt: skip
    else:
        until = f" until {format_datetime(retry_until)}" if retry_until else ""
        lines += ["Your message has not been delivered yet to the recipients below.",
                  f"The mail system will keep trying{until}.",
                  "You do not need to send it again.",
                  "", "Delayed recipients:"]  # fmt: skip
    for item in recipients:
        reason = " ".join((item.result.diagnostic or "no reason given").split())
        lines.append(f"  <{item.recipient.address}>: {reason}")
    lines.append("")
    return "\n".join(lines)
