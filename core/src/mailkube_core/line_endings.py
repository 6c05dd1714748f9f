"""Line endings of a message: CR and LF may appear only together, as CRLF (RFC 5321 §2.3.8).
The gateway refuses a message with a bare one (SMTP smuggling), and the worker checks again
before it sends one on by DATA."""

from __future__ import annotations


def has_bare_line_ending(content: bytes) -> bool:
    """Any CR not followed by LF, or LF not preceded by CR.

    With a CRs, b LFs and c CRLF pairs (c <= a, c <= b): a + b == 2c exactly when a == b == c,
    i.e. when every CR and every LF is part of a CRLF. Two C-speed passes (translate counts
    CR and LF together, count finds the pairs), a quarter cheaper than counting each."""
    singles = len(content) - len(content.translate(None, b"\r\n"))
    return singles != 2 * content.count(b"\r\n")
