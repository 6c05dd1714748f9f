"""rspamd's HTTP protocol, client side: one message scanned with `POST /checkv2`.

    client = RspamdClient(settings)
    result = await client.check(content, request_headers(message, settings))

The request carries the message as its body and the envelope in rspamd's request headers
(IP, Helo, Hostname, From, one Rcpt per recipient, User, Queue-Id). When the
email-authentication stage ran, its SPF, DKIM and DMARC results go too, as the JSON headers
rspamd's http_headers plugin reads (/usr/share/rspamd/plugins/http_headers.lua), so rspamd
does not check them again.

The answer is parsed strictly into `RspamdResult`. Whatever else happens (connection refused
or reset, the deadline passed, a status other than 200, a body that is not the JSON rspamd
sends) is one exception, `RspamdUnavailable`, with a reason for the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

from mailkube_core.settings import GatewaySettings

from ..pipeline import AuthFacts, Message
from .http_post import Endpoint, HttpError, post

log = logging.getLogger(__name__)

RspamdAction = Literal[
    "no action", "greylist", "add header", "rewrite subject", "soft reject", "reject"
]
ACTIONS: frozenset[str] = frozenset(
    {"no action", "greylist", "add header", "rewrite subject", "soft reject", "reject"}
)
#: rspamd's answer for a message with a few hundred symbols is tens of KiB
MAX_RESPONSE = 2 * 1024 * 1024
USER_AGENT = "mailkube-gateway"


class RspamdUnavailable(Exception):
    """rspamd gave no usable verdict; str(error) says why (for logs, never for clients)."""


class Symbol(NamedTuple):
    name: str
    score: float
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class RspamdResult:
    action: RspamdAction
    score: float
    #: the score of rspamd's reject action
    required_score: float
    symbols: tuple[Symbol, ...] = ()
    #: `messages.smtp_message`: the text rspamd suggests for the SMTP reply
    smtp_message: str | None = None
    #: the rewritten Subject (action "rewrite subject"), decoded text
    subject: str | None = None
    #: a pre-filter decided without running the rules (GTUBE, settings)
    is_skipped: bool = False


# --- the answer -----------------------------------------------------------------------------


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RspamdUnavailable(f"{key} is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        raise RspamdUnavailable(f"{key} is out of range") from None
    if not math.isfinite(number):
        raise RspamdUnavailable(f"{key} is not finite")
    return number


def _optional_text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise RspamdUnavailable(f"{key} is not a string")
    return value


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise RspamdUnavailable(f"{key} is not an object")
    return value


def _symbol(name: str, data: Any) -> Symbol:
    # the types checked exactly (not isinstance): this runs for every symbol of every message
    if type(data) is not dict:
        raise RspamdUnavailable(f"symbol {name[:64]!r} is not an object")
    score = data.get("score")
    if type(score) is not float:
        score = _number(data, "score")
    elif not math.isfinite(score):
        raise RspamdUnavailable("score is not finite")
    options = data.get("options")
    if options is None:
        return Symbol(name, score)
    if type(options) is not list or not all(type(option) is str for option in options):
        raise RspamdUnavailable(f"options of symbol {name[:64]!r} are not strings")
    return Symbol(name, score, tuple(options))


def parse_result(body: bytes) -> RspamdResult:
    """rspamd's /checkv2 JSON, checked field by field; RspamdUnavailable for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise RspamdUnavailable(f"not JSON: {type(error).__name__}") from None
    if not isinstance(data, dict):
        raise RspamdUnavailable("not a JSON object")
    action = data.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        shown = action[:40] if isinstance(action, str) else type(action).__name__
        raise RspamdUnavailable(f"unknown action {shown!r}")
    is_skipped = data.get("is_skipped", False)
    if not isinstance(is_skipped, bool):
        raise RspamdUnavailable("is_skipped is not a boolean")
    symbols = _mapping(data, "symbols")
    return RspamdResult(
        action=cast(RspamdAction, action),
        score=_number(data, "score"),
        required_score=_number(data, "required_score"),
        symbols=tuple(_symbol(name, value) for name, value in symbols.items()),
        smtp_message=_optional_text(_mapping(data, "messages"), "smtp_message"),
        subject=_optional_text(data, "subject"),
        is_skipped=is_skipped,
    )


# --- the request ----------------------------------------------------------------------------

# our RFC 8601 results -> the words http_headers.lua knows (it has none for an SPF temperror:
# that header is left out, and rspamd checks SPF itself)
_SPF = {"pass": "pass", "fail": "fail", "softfail": "softfail", "neutral": "neutral",
        "none": "na", "permerror": "permfail"}  # fmt: skip
_DKIM = {"pass": "pass", "fail": "fail", "temperror": "tempfail", "permerror": "permfail",
         "neutral": "permfail", "policy": "permfail"}  # fmt: skip
_DMARC = {"pass": "pass", "none": "na", "temperror": "tempfail", "permerror": "permfail"}
# a DMARC fail, by what the domain's policy asked for this message
_DMARC_FAIL = {"reject": "reject", "quarantine": "quarantine", "none": "softfail"}


def _header_value(text: str) -> str:
    """Text as an HTTP header value: valid UTF-8 (arguments read with surrogateescape), no
    control characters."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:998]


def auth_headers(auth: AuthFacts) -> list[tuple[str, str]]:
    """SPF, DKIM and DMARC request headers for rspamd's http_headers plugin."""
    headers: list[tuple[str, str]] = []
    spf = _SPF.get(auth.spf)
    if spf is not None:
        headers.append(("SPF", json.dumps({"result": spf, "domain": auth.spf_domain})))
    if auth.dkim:
        results = [
            {"result": _DKIM.get(result, "permfail"), "domain": domain}
            for domain, result in auth.dkim
        ]
        headers.append(("DKIM", json.dumps({"results": results})))
    else:
        headers.append(("DKIM", json.dumps({"result": "na"})))
    if auth.dmarc == "fail":
        dmarc = _DMARC_FAIL.get(auth.dmarc_disposition, "softfail")
    else:
        dmarc = _DMARC.get(auth.dmarc, "permfail")
    headers.append(("DMARC", json.dumps({"result": dmarc, "domain": auth.from_domain})))
    return headers


def request_headers(message: Message, settings: GatewaySettings) -> list[tuple[str, str]]:
    """rspamd's request headers for one message (rspamd's protocol documentation, "Request
    headers")."""
    headers: list[tuple[str, str]] = [("User-Agent", USER_AGENT)]
    if message.client_ip and message.client_ip != "unknown":
        headers.append(("IP", message.client_ip))
    if message.helo:
        headers.append(("Helo", _header_value(message.helo)))
    if settings.client_rdns != "off":
        # what the reverse-DNS check found; without it (client_rdns off) rspamd looks the
        # name up itself
        client = message.client
        verified = client.reverse_verified and client.reverse_name
        headers.append(("Hostname", _header_value(client.reverse_name or "") if verified
                         else "unknown"))  # fmt: skip
    headers.append(("From", _header_value(message.mail_from) if message.mail_from else "<>"))
    headers.extend(("Rcpt", _header_value(rcpt)) for rcpt in message.recipients)
    if message.auth_user is not None:
        headers.append(("User", _header_value(message.auth_user)))
    if message.queue_id:
        headers.append(("Queue-Id", _header_value(message.queue_id)))
    if message.auth is not None:
        headers.extend(auth_headers(message.auth))
    return headers


# --- the client -----------------------------------------------------------------------------


class RspamdClient:
    """One per gateway process. At most `rspamd_max_connections` scans at once (more wait
    their turn, within their deadline); each is one HTTP exchange (http_post.py)."""

    def __init__(self, settings: GatewaySettings) -> None:
        assert settings.rspamd_url is not None
        self.endpoint = Endpoint.from_url(str(settings.rspamd_url).rstrip("/") + "/checkv2")
        self.url = f"{settings.rspamd_url}"
        self.timeout = settings.rspamd_timeout.total_seconds()
        self._slots = asyncio.Semaphore(settings.rspamd_max_connections)
        #: whether the last scan got a verdict (failures are logged when this changes)
        self.available = True

    async def check(self, content: bytes, headers: Sequence[tuple[str, str]]) -> RspamdResult:
        try:
            async with asyncio.timeout(self.timeout), self._slots:
                status, body = await post(self.endpoint, headers, content, limit=MAX_RESPONSE)
            if status != 200:
                raise RspamdUnavailable(f"HTTP status {status}")
            result = parse_result(body)
        except RspamdUnavailable as error:
            self._failed(str(error))
            raise
        except TimeoutError:
            reason = f"no answer within {self.timeout:g}s"
            self._failed(reason)
            raise RspamdUnavailable(reason) from None
        except HttpError as error:
            self._failed(str(error))
            raise RspamdUnavailable(str(error)) from None
        if not self.available:
            self.available = True
            log.info("rspamd available again", extra={"url": self.url})
        return result

    def _failed(self, reason: str) -> None:
        if self.available:
            self.available = False
            log.warning("rspamd unavailable", extra={"url": self.url, "reason": reason})
        else:
            log.debug("rspamd unavailable", extra={"url": self.url, "reason": reason})

    async def aclose(self) -> None:
        """Nothing stays open between scans; kept for the gateway's stop sequence."""
