"""Mailkube the SMTP gateway (MX 25, submission 587, implicit TLS 465). Not built yet: see issue #3."""
