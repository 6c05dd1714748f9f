"""Mailkube the SMTP gateway (MX, submission, implicit TLS).

Not built yet: see issue #3.
"""
