"""The server TLS context: TLS 1.2 and newer, forward-secret AEAD ciphers only, and a
certificate that is reloaded when its files change (a cert-manager renewal, a Secret update).

The context object stays the same for the life of the process: listeners and sessions hold it,
and reloading loads the new pair into it, so new handshakes use the new certificate while
established connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from datetime import timedelta
from pathlib import Path

from mailkube_core.settings import SettingsError

log = logging.getLogger(__name__)

# Mozilla "intermediate" for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults, all AEAD).
CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)  # fmt: skip


def _stamp(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced, in place or by a Secret's symlink swap."""
    stamps = []
    for path in paths:
        st = os.stat(path)
        stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    # no renegotiation, no compression, a fresh key per handshake, our cipher order
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.options |= ssl.OP_SINGLE_ECDH_USE
    # RFC 3207 §4.1: a public MX cannot demand client certificates
    context.verify_mode = ssl.CERT_NONE
    return context


class CertificateStore:
    """Owns the server context and keeps its certificate current."""

    def __init__(
        self, cert_file: Path, key_file: Path, *, settings: str = "tls_cert_file/tls_key_file"
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = server_context()
        try:
            self._stamp = _stamp(cert_file, key_file)
            self.context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:  # at start: a settings problem, named as one
            raise SettingsError(
                f"invalid setting {settings} ({cert_file}, {key_file}): {exc}"
            ) from None
        self.reloads = 0
        self._task: asyncio.Task[None] | None = None

    def reload_if_changed(self) -> bool:
        """Load the pair again if either file changed. A pair that does not load (a half-written
        renewal, a key that does not match) is logged and tried again next time; the current
        certificate stays in use meanwhile."""
        try:
            stamp = _stamp(self.cert_file, self.key_file)
        except OSError as error:
            log.warning("TLS certificate files unreadable: %s", error)
            return False
        if stamp == self._stamp:
            return False
        try:
            # try the pair on a scratch context first, so a bad pair never reaches the live one
            server_context().load_cert_chain(self.cert_file, self.key_file)
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            log.warning("TLS certificate not reloaded: %s", error)
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"cert_file": str(self.cert_file)})
        return True

    def start(self, interval: timedelta) -> None:
        self._task = asyncio.create_task(self._watch(interval.total_seconds()), name="tls-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()
