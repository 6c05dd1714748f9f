"""TLS-RPT (RFC 8460): the `_smtp._tls` TXT record, the daily aggregate report (JSON, §4.3)
built from the outcomes the store counted, and the report as a message (§5.3) or an HTTPS
body (§5.4). Pure functions of values; tlsrpt_send.py delivers them."""

from __future__ import annotations

import email.policy
import email.utils
import gzip
import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

from .tlsrpt_store import Outcome

MEDIA_TYPE = "application/tlsrpt+gzip"
_FIELD = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=\s*(.*?)\s*")


class RecordError(ValueError):
    """The TXT strings hold no valid TLSRPTv1 record; the message says why."""


@dataclass(frozen=True)
class ReportTargets:
    mailto: tuple[str, ...]
    https: tuple[str, ...]


def parse_record(strings: list[str]) -> ReportTargets:
    """§3: exactly one record starting `v=TLSRPTv1`, with `rua=` a comma-separated list of
    mailto: and https: URIs (other schemes are ignored; none usable is an error)."""
    records = [s for s in strings if s.startswith("v=TLSRPTv1")]
    if len(records) != 1:
        raise RecordError("no TLSRPTv1 record" if not records else "more than one TLSRPTv1 record")
    fields: dict[str, str] = {}
    for part in records[0].split(";"):
        if not part.strip():
            continue
        match = _FIELD.fullmatch(part)
        if match is None:
            raise RecordError(f"malformed field {part.strip()!r}")
        fields.setdefault(match.group(1).lower(), match.group(2))
    if fields.get("v") != "TLSRPTv1":
        raise RecordError("version is not TLSRPTv1")
    mailto: list[str] = []
    https: list[str] = []
    for uri in (u.strip() for u in fields.get("rua", "").split(",")):
        scheme, _, rest = uri.partition(":")
        if scheme.lower() == "mailto" and "@" in rest:
            mailto.append(urllib.parse.unquote(rest.split("?")[0]))
        elif scheme.lower() == "https" and rest.startswith("//"):
            https.append(uri)
    if not mailto and not https:
        raise RecordError("no mailto: or https: rua")
    return ReportTargets(tuple(mailto), tuple(https))


def day_range(day: str) -> tuple[datetime, datetime]:
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    return start, start + timedelta(days=1) - timedelta(seconds=1)


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(domain: str, day: str, outcomes: Mapping[Outcome, int], *, organization: str,
                 contact: str, report_id: str) -> dict[str, Any]:  # fmt: skip
    """The §4.3 JSON object for one policy domain and one UTC day."""
    start, end = day_range(day)
    policies: dict[tuple[str, tuple[str, ...], tuple[str, ...]], dict[str, Any]] = {}
    for outcome, count in sorted(outcomes.items(), key=lambda item: item[0].field()):
        key = (outcome.policy_type, outcome.policy_strings, outcome.mx_patterns)
        entry = policies.setdefault(key, {"success": 0, "failure": 0, "details": {}, "hosts": []})
        if outcome.mx_host and outcome.mx_host not in entry["hosts"]:
            entry["hosts"].append(outcome.mx_host)
        if outcome.result == "success":
            entry["success"] += count
            continue
        entry["failure"] += count
        where = (outcome.result, outcome.mx_host, outcome.ip)
        entry["details"][where] = entry["details"].get(where, 0) + count
    items = []
    for (kind, strings, patterns), entry in policies.items():
        policy: dict[str, Any] = {"policy-type": kind, "policy-domain": domain}
        if strings:
            policy["policy-string"] = list(strings)
        mx = list(patterns) if kind == "sts" else entry["hosts"]
        if mx:
            policy["mx-host"] = mx
        details = []
        for (result, host, ip), count in entry["details"].items():
            detail: dict[str, Any] = {"result-type": result, "failed-session-count": count}
            if host:
                detail["receiving-mx-hostname"] = host
            if ip:
                detail["receiving-ip"] = ip
            details.append(detail)
        items.append({
            "policy": policy,
            "summary": {"total-successful-session-count": entry["success"],
                        "total-failure-session-count": entry["failure"]},
            **({"failure-details": details} if details else {}),
        })  # fmt: skip
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _iso(start), "end-datetime": _iso(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": items,
    }


def report_body(report: Mapping[str, Any]) -> bytes:
    """§5.1: the JSON, gzipped (a fixed mtime: the same report gives the same bytes)."""
    return gzip.compress(json.dumps(report, indent=1).encode(), mtime=0)


def filename(submitter: str, domain: str, day: str, unique: str) -> str:
    """§5.1: sender "!" policy-domain "!" begin "!" end "!" unique-id ".json.gz"."""
    start, end = day_range(day)
    return f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}!{unique}.json.gz"


def report_message(report: Mapping[str, Any], *, domain: str, submitter: str, sender: str,
                   recipients: list[str], unique: str, now: datetime) -> bytes:  # fmt: skip
    """§5.3: multipart/report; report-type="tlsrpt", a human-readable part and the gzipped
    JSON as application/tlsrpt+gzip, with the TLS-Report-Domain/-Submitter headers."""
    day = report["date-range"]["start-datetime"][:10]
    # the §5.3 Subject is longer than 78: unfolded, so its text stays as the RFC spells it
    message = EmailMessage(policy=email.policy.SMTP.clone(max_line_length=998))
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = email.utils.format_datetime(now)
    message["Subject"] = (
        f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    )
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message["Message-ID"] = email.utils.make_msgid(domain=submitter)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(
        f"This is an aggregate TLS report (RFC 8460)\nfrom {submitter}\nfor {domain}, {day}.\n",
        cte="7bit",
    )
    message.add_attachment(report_body(report), maintype="application", subtype="tlsrpt+gzip",
                           filename=filename(submitter, domain, day, unique))  # fmt: skip
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes()
