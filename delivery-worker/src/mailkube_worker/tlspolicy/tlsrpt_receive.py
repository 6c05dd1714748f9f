"""TLS-RPT reports other senders send us (RFC 8460), parsed into Prometheus metrics.

A message delivered to one of `tlsrpt_mailboxes` is read after it is stored (the mailbox keeps
it as it came): each ``application/tlsrpt+gzip`` or ``application/tlsrpt+json`` part (§5.3)
is decompressed within `MAX_JSON` bytes and parsed strictly (§4.3 field names and types);
sessions are counted per reporting organisation, policy domain and result
(``success`` or the §4.3 result type of the failures).

Anyone can mail that mailbox, so the label values are bounded: result types outside §4.3 are
``other``, policy domains that are not ours are ``other``, and past `MAX_ORGANIZATIONS`
distinct organisation names a new one is ``other``.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any

from opentelemetry import metrics

log = logging.getLogger(__name__)

#: largest decompressed report accepted (a big sender's daily report is some kB)
MAX_JSON = 4 * 1024 * 1024
MAX_POLICIES = 10_000
MAX_DETAILS = 10_000
MAX_STRING = 1024
#: distinct organisation label values one process keeps
MAX_ORGANIZATIONS = 200
#: session counts above this are not believable (and overflow nothing downstream)
MAX_COUNT = 2**53
#: RFC 8460 §4.3.2.1-4.3.2.3 result types
RESULT_TYPES = frozenset({
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
})  # fmt: skip
POLICY_TYPES = frozenset({"tlsa", "sts", "no-policy-found"})
MEDIA_TYPES = {"application/tlsrpt+gzip": True, "application/tlsrpt+json": False}


class ReportError(ValueError):
    """Not a valid TLS-RPT report; the message says where."""


@dataclass(frozen=True)
class PolicyResult:
    policy_type: str
    policy_domain: str
    successes: int
    failures: int
    #: (result type, failed sessions) of the failure details
    details: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Report:
    organization: str
    report_id: str
    start: str
    end: str
    policies: tuple[PolicyResult, ...]


# -- JSON (§4.3) ------------------------------------------------------------------------------


def parse_json(data: bytes) -> Report:
    """A report from its JSON text. ReportError for anything not as §4.3 says."""
    if len(data) > MAX_JSON:
        raise ReportError(f"report larger than {MAX_JSON} bytes")
    try:
        document = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ReportError(f"not JSON: {exc}") from None
    top = _object(document, "report")
    date_range = _object(top.get("date-range"), "date-range")
    policies = _array(top.get("policies"), "policies", MAX_POLICIES)
    return Report(
        organization=_string(top.get("organization-name"), "organization-name"),
        report_id=_string(top.get("report-id"), "report-id"),
        start=_string(date_range.get("start-datetime"), "date-range.start-datetime"),
        end=_string(date_range.get("end-datetime"), "date-range.end-datetime"),
        policies=tuple(_policy(p, f"policies[{i}]") for i, p in enumerate(policies)),
    )


def _policy(value: Any, where: str) -> PolicyResult:
    entry = _object(value, where)
    policy = _object(entry.get("policy"), f"{where}.policy")
    summary = _object(entry.get("summary"), f"{where}.summary")
    policy_type = _string(policy.get("policy-type"), f"{where}.policy.policy-type")
    if policy_type not in POLICY_TYPES:
        raise ReportError(f"{where}.policy.policy-type: unknown {policy_type!r}")
    details = []
    raw_details = entry.get("failure-details")
    if raw_details is not None:
        for i, item in enumerate(_array(raw_details, f"{where}.failure-details", MAX_DETAILS)):
            at = f"{where}.failure-details[{i}]"
            detail = _object(item, at)
            details.append((
                _string(detail.get("result-type"), f"{at}.result-type"),
                _count(detail.get("failed-session-count"), f"{at}.failed-session-count"),
            ))  # fmt: skip
    return PolicyResult(
        policy_type=policy_type,
        policy_domain=_string(policy.get("policy-domain"), f"{where}.policy.policy-domain"),
        successes=_count(summary.get("total-successful-session-count"),
                         f"{where}.summary.total-successful-session-count"),
        failures=_count(summary.get("total-failure-session-count"),
                        f"{where}.summary.total-failure-session-count"),
        details=tuple(details),
    )  # fmt: skip


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReportError(f"{where}: expected an object")
    return value


def _array(value: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise ReportError(f"{where}: expected an array")
    if len(value) > limit:
        raise ReportError(f"{where}: more than {limit} entries")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ReportError(f"{where}: expected a non-empty string")
    if len(value) > MAX_STRING:
        raise ReportError(f"{where}: longer than {MAX_STRING} characters")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ReportError(f"{where}: expected a session count")
    return value


# -- the message (§5.3) -----------------------------------------------------------------------


def parse_message(body: bytes) -> list[Report]:
    """The reports of a message: every tlsrpt part. ReportError if there is none, or one is
    invalid."""
    message = email.message_from_bytes(body, policy=email.policy.compat32)
    parts = [p for p in message.walk() if p.get_content_type() in MEDIA_TYPES]
    if not parts:
        raise ReportError("no application/tlsrpt+gzip or application/tlsrpt+json part")
    return [parse_json(_payload(part)) for part in parts]


def _payload(part: Message) -> bytes:
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        raise ReportError("report part without content")
    if MEDIA_TYPES[part.get_content_type()]:
        return gunzip(raw, MAX_JSON)
    return raw


def gunzip(data: bytes, limit: int) -> bytes:
    """One gzip member, at most `limit` bytes once decompressed (a gzip bomb stops there)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ReportError(f"not gzip: {exc}") from None
    if len(out) > limit:
        raise ReportError(f"report larger than {limit} bytes once decompressed")
    if not inflater.eof:
        raise ReportError("truncated gzip data")
    if inflater.unused_data.strip(b"\0"):
        raise ReportError("data after the gzip member")
    return out


# -- metrics ----------------------------------------------------------------------------------

_meter = metrics.get_meter("mailkube.worker")
_reports = _meter.create_counter(
    "mailkube.worker.tlsrpt.reports",
    unit="{report}",
    description="TLS-RPT reports received in tlsrpt_mailboxes, by reporting organisation and "
    "outcome (counted, invalid)",
)
_sessions = _meter.create_counter(
    "mailkube.worker.tlsrpt.sessions",
    unit="{session}",
    description="TLS sessions other senders reported (TLS-RPT) by organisation, policy domain, "
    "policy type and result (success, or the RFC 8460 result type of the failures)",
)


@dataclass(frozen=True)
class SessionCount:
    organization: str
    policy_domain: str
    policy_type: str
    result: str
    sessions: int


def session_counts(
    report: Report, is_ours: Callable[[str], bool], organization: str
) -> list[SessionCount]:
    """What a report adds to the sessions counter (label values already bounded). Failures
    the summary counts beyond its failure details are `other`."""
    totals: dict[tuple[str, str, str], int] = {}
    for policy in report.policies:
        domain = policy.policy_domain.lower().rstrip(".")
        domain = domain if _is_ours(is_ours, domain) else "other"
        found = [("success", policy.successes)]
        detailed = 0
        for result, sessions in policy.details:
            found.append((result if result in RESULT_TYPES else "other", sessions))
            detailed += sessions
        found.append(("other", max(0, policy.failures - detailed)))
        for result, sessions in found:
            key = (domain, policy.policy_type, result)
            totals[key] = totals.get(key, 0) + sessions
    return [
        SessionCount(organization, domain, kind, result, sessions)
        for (domain, kind, result), sessions in totals.items()
        if sessions
    ]


def _is_ours(is_ours: Callable[[str], bool], domain: str) -> bool:
    try:
        return is_ours(domain)
    except ValueError:  # not a domain name at all
        return False


class ReportCounter:
    """Counts the reports of messages stored in the report mailboxes."""

    def __init__(self, mailboxes: list[str], is_ours: Callable[[str], bool]) -> None:
        self.mailboxes = frozenset(m.lower() for m in mailboxes)
        self.is_ours = is_ours
        self._organizations: set[str] = set()

    def wants(self, mailboxes: list[str]) -> bool:
        return any(m.lower() in self.mailboxes for m in mailboxes)

    def count(self, body: bytes) -> list[Report]:
        """Parse and count one message; an invalid one is counted as such and logged (the
        message stays in the mailbox for people to look at)."""
        try:
            reports = parse_message(body)
        except ReportError as exc:
            _reports.add(1, {"organization": "unknown", "outcome": "invalid"})
            log.warning("invalid TLS-RPT report", extra={"error": str(exc)})
            return []
        for report in reports:
            organization = self._organization(report.organization)
            _reports.add(1, {"organization": organization, "outcome": "counted"})
            for count in session_counts(report, self.is_ours, organization):
                _sessions.add(count.sessions, {
                    "organization": count.organization, "policy_domain": count.policy_domain,
                    "policy_type": count.policy_type, "result": count.result,
                })  # fmt: skip
        return reports

    def _organization(self, name: str) -> str:
        name = " ".join(name.split())[:100]
        if name in self._organizations:
            return name
        if len(self._organizations) >= MAX_ORGANIZATIONS:
            return "other"
        self._organizations.add(name)
        return name
