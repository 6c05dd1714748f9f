"""ESMTP parameters of MAIL and RCPT (RFC 5321 §4.1.2 esmtp-param): SIZE (RFC 1870), BODY
(RFC 6152), SMTPUTF8 (RFC 6531), AUTH (RFC 4954 §5), REQUIRETLS (RFC 8689) and the DSN
parameters RET, ENVID, NOTIFY and ORCPT (RFC 3461)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mailkube_core.queue import Notify

from . import replies

# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); esmtp-value = 1*(%d33-60 / %d62-126)
# (any UTF-8 too, RFC 6531 §3.3)
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([^\x00-\x20=\x7f]+))?")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")


#: RFC 6152 8BITMIME, RFC 3030 BINARYMIME
BodyType = Literal["7BIT", "8BITMIME", "BINARYMIME"]


class ParamError(ValueError):
    """A parameter the gateway refuses; `reply` is the full SMTP reply."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class MailParams:
    size: int | None = None
    body: BodyType = "7BIT"
    smtputf8: bool = False
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None
    requiretls: bool = False


@dataclass(frozen=True)
class RcptParams:
    notify: frozenset[Notify] | None = None
    orcpt: str | None = None


def split_params(text: str) -> dict[str, str | None]:
    """'SIZE=100 BODY=8BITMIME' -> {'SIZE': '100', 'BODY': '8BITMIME'}; keywords upper-cased,
    values kept as sent (ENVID and ORCPT are case-sensitive)."""
    params: dict[str, str | None] = {}
    for token in text.split():
        match = _PARAM.fullmatch(token)
        if match is None:
            raise ParamError("501 5.5.4 Malformed parameter")
        keyword = match.group(1).upper()
        if keyword in params:
            raise ParamError(f"501 5.5.4 Duplicate parameter {keyword}")
        params[keyword] = match.group(2)
    return params


def decode_xtext(value: str) -> str:
    """RFC 3461 §4: xtext, '+XX' for bytes outside 33-126 and for '+' and '='."""
    if not _XTEXT.fullmatch(value):
        raise ValueError("malformed xtext")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def parse_mail_params(text: str, *, max_size: int) -> MailParams:
    params = split_params(text)
    size: int | None = None
    body: BodyType = "7BIT"
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None
    smtputf8 = requiretls = False
    for keyword, value in params.items():
        if keyword == "SIZE":
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                raise ParamError("501 5.5.4 SIZE needs a number")
            size = int(value)
            if size > max_size:  # RFC 1870 §6.1
                raise ParamError(replies.SIZE_EXCEEDED)
        elif keyword == "BODY":
            upper = (value or "").upper()
            if upper == "7BIT":
                body = "7BIT"
            elif upper == "8BITMIME":
                body = "8BITMIME"
            elif upper == "BINARYMIME":  # RFC 3030 §3: the content comes by BDAT only
                body = "BINARYMIME"
            else:
                raise ParamError("501 5.5.4 BODY must be 7BIT, 8BITMIME or BINARYMIME")
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise ParamError("501 5.5.4 SMTPUTF8 takes no value")
            smtputf8 = True
        elif keyword == "REQUIRETLS":
            if value is not None:
                raise ParamError("501 5.5.4 REQUIRETLS takes no value")
            requiretls = True
        elif keyword == "RET":
            upper = (value or "").upper()
            if upper == "FULL":
                ret = "FULL"
            elif upper == "HDRS":
                ret = "HDRS"
            else:
                raise ParamError("501 5.5.4 RET must be FULL or HDRS")
        elif keyword == "ENVID":
            try:
                envid = decode_xtext(value or "")
            except ValueError:
                raise ParamError("501 5.5.4 ENVID must be xtext") from None
            if not envid or len(value or "") > 100:  # RFC 3461 §4.4
                raise ParamError("501 5.5.4 ENVID must be 1 to 100 characters")
        elif keyword == "AUTH":
            # RFC 4954 §5: the identity a trusted relay vouches for; we trust no relay, so
            # it is accepted and ignored (§5: "MAY ... treat as if AUTH=<>")
            continue
        else:
            raise ParamError(f"555 5.5.4 Unsupported parameter {keyword}")
    return MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid,
                      requiretls=requiretls)  # fmt: skip


def parse_rcpt_params(text: str) -> RcptParams:
    params = split_params(text)
    notify: frozenset[Notify] | None = None
    orcpt: str | None = None
    for keyword, value in params.items():
        if keyword == "NOTIFY":
            try:
                notify = frozenset(Notify(item) for item in (value or "").upper().split(","))
            except ValueError:
                raise ParamError(
                    "501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"
                ) from None
            if Notify.NEVER in notify and len(notify) > 1:  # RFC 3461 §4.1
                raise ParamError("501 5.5.4 NOTIFY=NEVER cannot be combined")
        elif keyword == "ORCPT":
            # RFC 3461 §4.2: addr-type ";" xtext, at most 500 characters
            addr_type, sep, encoded = (value or "").partition(";")
            if not sep or not _ADDR_TYPE.fullmatch(addr_type) or len(value or "") > 500:
                raise ParamError("501 5.5.4 ORCPT must be addr-type;xtext")
            try:
                orcpt = f"{addr_type.lower()};{decode_xtext(encoded)}"
            except ValueError:
                raise ParamError("501 5.5.4 ORCPT must be addr-type;xtext") from None
        else:
            raise ParamError(f"555 5.5.4 Unsupported parameter {keyword}")
    return RcptParams(notify=notify, orcpt=orcpt)
