"""MTA-STS records and policies (RFC 8461), parsed strictly, and which MX hosts they allow.

- The `_mta-sts` TXT record (§3.1): `v=STSv1; id=<1-32 alphanumerics>;` plus extension
  fields; more than one STSv1 record (or none) means no policy is published.
- The policy file (§3.2): `key: value` lines (LF or CRLF); `version: STSv1`, `mode`,
  `max_age` (at most 31557600 s, §3.2) and, unless mode is none, at least one `mx` pattern.
  Unknown keys are extensions and ignored; a repeated known key other than `mx` is an error,
  as is a malformed line: a policy we cannot read exactly is no policy (§3.3).
- An MX pattern (§4.1) is a host name, or `*.` then a name matching exactly one more label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Mode = Literal["enforce", "testing", "none"]

MAX_AGE_LIMIT = 31557600  # §3.2: one year
MAX_POLICY_SIZE = 64 * 1024  # §3.3: "a maximum size of 64 KB"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})+")
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_TXT_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


class PolicyError(ValueError):
    """The text is not a valid MTA-STS record or policy; the message says why."""


@dataclass(frozen=True)
class StsRecord:
    id: str


@dataclass(frozen=True)
class StsPolicy:
    mode: Mode
    max_age: int
    mx: tuple[str, ...]

    def allows(self, host: str) -> bool:
        """Whether `host` (an MX name) matches one of the policy's patterns (§4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def to_text(self) -> str:
        lines = ["version: STSv1", f"mode: {self.mode}", *(f"mx: {m}" for m in self.mx),
                 f"max_age: {self.max_age}"]  # fmt: skip
        return "\r\n".join(lines) + "\r\n"


def parse_record(strings: list[str]) -> StsRecord:
    """The `_mta-sts` TXT record among the TXT strings found there (each one already the
    concatenation of its character-strings). PolicyError when there is not exactly one
    STSv1 record or it is malformed (§3.1: "senders MUST assume ... no policy")."""
    candidates = [s for s in strings if s.startswith("v=STSv1")]
    if not candidates:
        raise PolicyError("no v=STSv1 TXT record")
    if len(candidates) > 1:
        raise PolicyError("more than one v=STSv1 TXT record")
    fields: dict[str, str] = {}
    for part in candidates[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not _TXT_KEY.fullmatch(key) or not value:
            raise PolicyError(f"malformed field {part!r} in the TXT record")
        if key in fields:
            raise PolicyError(f"field {key} repeated in the TXT record")
        fields[key] = value
    if fields.get("v") != "STSv1":
        raise PolicyError("the TXT record does not start with v=STSv1")
    if "id" not in fields:
        raise PolicyError("the TXT record has no id")
    if not _ID.fullmatch(fields["id"]):
        raise PolicyError(f"bad id {fields['id']!r} (1 to 32 letters and digits)")
    return StsRecord(fields["id"])


def parse_policy(text: str) -> StsPolicy:
    """A policy file's body (already decoded as UTF-8); PolicyError names what is wrong."""
    if len(text.encode()) > MAX_POLICY_SIZE:
        raise PolicyError("policy larger than 64 KB")
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue  # blank lines (e.g. the final line break) carry nothing
        key, sep, value = line.partition(":")
        key, value = key.strip(" \t"), value.strip(" \t")
        if not sep or not _FIELD_NAME.fullmatch(key):
            raise PolicyError(f"line {number}: not a 'key: value' line")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise PolicyError(f"line {number}: control character in the value")
        if key == "mx":
            if not _valid_pattern(value):
                raise PolicyError(f"line {number}: bad mx pattern {value!r}")
            mx.append(value.lower().rstrip("."))
        elif key in ("version", "mode", "max_age"):
            if key in fields:
                raise PolicyError(f"line {number}: {key} given twice")
            fields[key] = value
        # any other key is an extension (§3.2: "additional ... fields"): ignored
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode!r} (enforce, testing or none)")
    age = fields.get("max_age", "")
    if not age.isascii() or not age.isdigit() or len(age) > 10 or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"bad max_age {age!r} (0 to {MAX_AGE_LIMIT} seconds)")
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} without any mx")
    return StsPolicy(mode, int(age), tuple(mx))  # type: ignore[arg-type]


def _valid_pattern(pattern: str) -> bool:
    name = pattern.removeprefix("*.").rstrip(".")
    return pattern.isascii() and _NAME.fullmatch(name) is not None


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: an exact name (case-insensitive), or `*.rest` matching `label.rest` for exactly
    one label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return host == pattern
