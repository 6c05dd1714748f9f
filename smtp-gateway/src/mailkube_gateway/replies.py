"""Every reply the gateway composes itself, in one place (docs/gateway.md lists them).

Each carries an RFC 3463 enhanced status code, as ENHANCEDSTATUSCODES promises (RFC 2034 §3).
Replies aiosmtpd composes without one get a code added in `session.with_enhanced_code`.
"""

from __future__ import annotations

# --- connection ---------------------------------------------------------------------------
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
SERVER_BUSY = "421 4.3.2 Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"

# --- syntax -------------------------------------------------------------------------------
UNKNOWN_COMMAND = "500 5.5.2 Command not recognized"
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
NULL_SENDER_NOT_ALLOWED = "553 5.7.1 The null sender is not allowed here"
NOT_OWNER = "553 5.7.1 Sender address not owned by the authenticated user"
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
QUEUED = "250 2.0.0 Ok: queued as {ids}"
BARE_LINE_ENDING = "554 5.6.0 Bare CR or LF in message; lines must end with CRLF (RFC 5321 §2.3.8)"
HEADER_TOO_BIG = "552 5.3.4 Header section too large"
LOOP_DETECTED = "554 5.4.6 Too many Received headers: mail loop"
BAD_HEADERS = "554 5.6.0 Message header error: {reason}"
TEMP_FAILURE = "451 4.3.0 Temporary failure, try again later"

# --- AUTH -----------------------------------------------------------------------------------
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_LOCKED = "454 4.7.0 Too many failed authentications, try again later"
AUTH_NOT_OFFERED = "503 5.5.1 AUTH not available on this port"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_ALREADY = "503 5.5.1 Already authenticated"
AUTH_SYNTAX = "501 5.5.2 Malformed authentication data"
AUTH_ABORTED = "501 5.7.0 Authentication aborted"
AUTH_MECHANISM = "504 5.5.4 Unrecognized authentication type"
AUTH_TEMP = "454 4.7.0 Temporary authentication failure"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
