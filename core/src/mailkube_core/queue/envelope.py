"""What travels with a queued message: the SMTP envelope, its RFC 3461 DSN parameters, the
session's trace context, and each recipient's delivery state."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Lane = Literal["local", "remote"]
LANES: tuple[Lane, ...] = ("local", "remote")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Notify(StrEnum):
    """RFC 3461 §4.1 NOTIFY values."""

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


class Recipient(BaseModel):
    model_config = ConfigDict(frozen=True)

    address: str
    #: None: the client gave no NOTIFY, so the RFC 3461 §4.1 default (failure, and delay at
    #: the MTA's discretion) applies
    notify: frozenset[Notify] | None = None
    #: RFC 3461 §4.2 ORCPT as "addr-type;address", xtext already decoded
    orcpt: str | None = None

    @field_validator("notify")
    @classmethod
    def _never_alone(cls, value: frozenset[Notify] | None) -> frozenset[Notify] | None:
        if value is not None and Notify.NEVER in value and len(value) > 1:
            raise ValueError("NOTIFY=NEVER cannot be combined with other values (RFC 3461 §4.1)")
        return value


class Envelope(BaseModel):
    """Immutable once queued; per-recipient progress lives beside it (`RecipientResult`)."""

    model_config = ConfigDict(frozen=True)

    #: "" is the null reverse-path <> (bounces): never bounced to
    mail_from: str
    recipients: list[Recipient] = Field(min_length=1)
    #: RFC 3461 §4.3 RET and §4.4 ENVID
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None
    body_type: Literal["7BIT", "8BITMIME", "BINARYMIME"] = "7BIT"
    smtputf8: bool = False
    #: RFC 8689: deliver only over TLS that MTA-STS or DANE validated, to hosts offering it
    requiretls: bool = False
    received_at: datetime = Field(default_factory=utcnow)
    client_address: str | None = None
    client_helo: str | None = None
    auth_user: str | None = None
    listener: str | None = None
    #: W3C traceparent/tracestate of the SMTP session, so one trace runs to final delivery
    trace_context: dict[str, str] = Field(default_factory=dict)
    #: verdicts for the worker, e.g. {"quarantine": "dmarc"}
    annotations: dict[str, str] = Field(default_factory=dict)
    #: what the producer checked of a text body, so that the worker need not scan it again
    #: before DATA: every CR and LF is in a CRLF pair (RFC 5321 §2.3.8). False: not checked
    #: (the worker checks). The gateway checked what it read and the fields it added.
    crlf_checked: bool = False
    #: a line of the body may start with "." (DATA stuffs it, RFC 5321 §4.5.2); False only
    #: when the producer knows none does, so the worker skips looking for one
    dot_lines: bool = True

    def wants_dsn(self, index: int, kind: Literal["failure", "delay", "success"]) -> bool:
        """Whether recipient `index` asked for this kind of DSN (RFC 3461 §4.1); never for <>."""
        if not self.mail_from:
            return False
        notify = self.recipients[index].notify
        if notify is None:
            return kind in ("failure", "delay")
        return Notify(kind.upper()) in notify


class RecipientStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


class RecipientResult(BaseModel):
    """The last outcome for one recipient, in the terms an RFC 3464 DSN needs."""

    model_config = ConfigDict(frozen=True)

    status: RecipientStatus
    #: RFC 3463 enhanced status code, e.g. "5.1.1"
    enhanced_code: str | None = None
    #: the SMTP reply code, when a server answered
    smtp_code: int | None = None
    diagnostic: str | None = None
    remote_mta: str | None = None
    at: datetime = Field(default_factory=utcnow)
    #: a failure DSN has been handed to the failure hook for this recipient
    reported: bool = False

    @property
    def final(self) -> bool:
        return self.status in (RecipientStatus.DELIVERED, RecipientStatus.FAILED)
