"""Mailkube the SMTP gateway: MX (25), submission (587) and implicit TLS (465) on aiosmtpd,
accepting a message only once it is durably queued in Redis."""
