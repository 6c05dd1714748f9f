"""Every reply the gateway composes itself, in one place (docs/gateway.md lists them).

Each carries an RFC 3463 enhanced status code, as ENHANCEDSTATUSCODES promises (RFC 2034 §3).
Replies aiosmtpd composes without one (NOOP, RSET, QUIT, STARTTLS) get one from
`with_enhanced_code`, which every reply but the greeting and the answer to HELO or EHLO passes
through.
"""

from __future__ import annotations

import re

_ENHANCED = re.compile(r"\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")
# the code added to a reply that has none, by its basic code (RFC 3463 classes and subjects)
_DEFAULT_ENHANCED = {
    "220": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0", "252": "2.0.0",
    "421": "4.7.0", "451": "4.3.0", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "552": "5.3.4", "553": "5.1.3",
    "554": "5.7.0", "555": "5.5.4",
}  # fmt: skip


def _line_with_code(line: str) -> str:
    if len(line) < 4 or line[3] not in " -" or line[0] not in "245" or _ENHANCED.match(line):
        return line
    code = line[:3]
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    return f"{line[:4]}{enhanced} {line[4:]}" if line[4:] else f"{line[:4]}{enhanced}"


def with_enhanced_code(reply: str) -> str:
    """'250 OK' -> '250 2.0.0 OK': every 2xx, 4xx and 5xx line of a reply (multi-line ones
    too) that lacks an RFC 3463 code gets its class's. 3xx lines (334 challenges, 354) carry
    none (RFC 2034 §3 names 2xx, 4xx and 5xx)."""
    if "\r\n" not in reply:
        return _line_with_code(reply)
    return "\r\n".join(_line_with_code(line) for line in reply.split("\r\n"))


# --- connection ---------------------------------------------------------------------------
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
SERVER_BUSY = "421 4.3.2 Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"

# --- connection-level checks (screening/): after the greeting, to every command but EHLO,
# HELO, NOOP, RSET and QUIT (a client refused at connect may retry for ever) -----------------
# in place of the 220 (RFC 5321 §4.3.2: 554 is the refusal at connection establishment);
# X.5.1: a command out of sequence (RFC 3463 §3.6); then the connection is closed
TALKED_EARLY = "554 5.5.1 Protocol error: client talked before the greeting"
EARLY_TALKER = "554 5.7.1 Service unavailable; client [{ip}] blocked: it talked before the greeting"
DNSBL_BLOCKED = "554 5.7.1 Service unavailable; client [{ip}] blocked using {zone}"
# RFC 7372: X.7.25 reverse DNS validation failed
RDNS_REJECTED = "550 5.7.25 Client host rejected: cannot find your reverse hostname, [{ip}]"
RDNS_TEMP = "450 4.7.25 Client host rejected: cannot find your reverse hostname, [{ip}]"

# --- syntax -------------------------------------------------------------------------------
UNKNOWN_COMMAND = "500 5.5.2 Command not recognized"
BAD_SYNTAX = "500 5.5.2 Error: bad syntax"
LINE_TOO_LONG = "500 5.5.2 Command line too long"
NEED_HELO = "503 5.5.1 Error: send {helo} first"
# a command that failed for a reason of our own (a bug): logged, and the client tries again
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"
RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address> [parameters]"
BAD_SENDER_SYNTAX = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT_SYNTAX = "501 5.1.3 Bad recipient address syntax"
NESTED_MAIL = "503 5.5.1 Sender already specified"
NEED_MAIL = "503 5.5.1 Need MAIL command first"
NEED_RCPT = "503 5.5.1 Need RCPT command first"
DATA_SYNTAX = "501 5.5.4 Syntax: DATA"

# --- MAIL -----------------------------------------------------------------------------------
SENDER_OK = "250 2.1.0 Sender ok"
SIZE_EXCEEDED = "552 5.3.4 Message size exceeds fixed maximum message size"
SIZE_EXCEEDED_FOR_DOMAIN = "552 5.3.4 Message size exceeds the recipient domain's maximum"
NULL_SENDER_NOT_ALLOWED = "553 5.7.1 The null sender is not allowed here"
NOT_OWNER = "553 5.7.1 Sender address not owned by the authenticated user"
SUBMISSION_SUSPENDED = (
    "550 5.7.1 Submission suspended for this account: too many messages refused as spam; "
    "contact your administrator"
)
SENDER_RATE = "450 4.7.1 Too many messages from this sender, try again later"

# --- RCPT -----------------------------------------------------------------------------------
RECIPIENT_OK = "250 2.1.5 Recipient ok"
RELAY_DENIED = "554 5.7.1 Relay access denied"
UNKNOWN_USER = "550 5.1.1 No such user here"
SUSPENDED = "550 5.2.1 Mailbox disabled, not accepting messages"
OVER_QUOTA = "452 4.2.2 Mailbox full, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
RECIPIENT_RATE = "450 4.7.1 Too many messages for this recipient, try again later"
NON_ASCII_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter"

# --- DATA -----------------------------------------------------------------------------------
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
CHUNK_OK = "250 2.0.0 {size} octets received"
DATA_AFTER_BDAT = "503 5.5.1 DATA cannot follow BDAT in one transaction; send RSET"
DATA_FOR_BINARYMIME = "503 5.5.1 BODY=BINARYMIME content must be sent with BDAT"
QUEUED = "250 2.0.0 Ok: queued as {ids}"
BARE_LINE_ENDING = "554 5.6.0 Bare CR or LF in message; lines must end with CRLF (RFC 5321 §2.3.8)"
HEADER_TOO_BIG = "552 5.3.4 Header section too large"
LOOP_DETECTED = "554 5.4.6 Too many Received headers: mail loop"
BAD_HEADERS = "554 5.6.0 Message header error: {reason}"
TEMP_FAILURE = "451 4.3.0 Temporary failure, try again later"
# the sessions in DATA hold this process's data_memory_limit (RFC 3463 X.3.1: system full)
DATA_NO_MEMORY = "452 4.3.1 Insufficient system storage, try again later"
# greylisting (spam/greylist.py, RFC 6647): the wait left, in clear text
GREYLISTED = "451 4.7.1 Greylisted: this sender is new here, try again in {seconds} seconds"

# --- DATA: content scanning (spam/verdict.py); {text} is rspamd's, made safe, or the default
SPAM_REJECTED = "554 5.7.1 {text}"
SUBMISSION_SPAM_REJECTED = "550 5.7.1 {text}"
SPAM_REJECTED_TEXT = "Message rejected as spam"
SPAM_DEFERRED = "451 4.7.1 {text}"
SPAM_DEFERRED_TEXT = "Message looks like spam, try again later"
SPAM_CHECK_UNAVAILABLE = "451 4.3.0 Spam check unavailable, try again later"

# --- AUTH -----------------------------------------------------------------------------------
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
# the client's network (IPv4 address, IPv6 /64) failed auth_max_failures times, then close
AUTH_THROTTLED = "454 4.7.0 Too many failed authentications from your network, try again later"
AUTH_NOT_OFFERED = "503 5.5.1 AUTH not available on this port"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_ALREADY = "503 5.5.1 Already authenticated"
AUTH_IN_TRANSACTION = "503 5.5.1 AUTH not allowed during a mail transaction"  # RFC 4954 §4
AUTH_ARGUMENTS = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
AUTH_SYNTAX = "501 5.5.2 Malformed authentication data"
AUTH_ABORTED = "501 5.7.0 Authentication aborted"
AUTH_MECHANISM = "504 5.5.4 Unrecognized authentication type"
AUTH_TEMP = "454 4.7.0 Temporary authentication failure"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
#: RFC 8689 §4.1: REQUIRETLS is only accepted over TLS
REQUIRETLS_NEEDS_TLS = "530 5.7.10 REQUIRETLS needs TLS"
TLS_FAILED = "554 5.7.0 Command refused due to lack of security"
