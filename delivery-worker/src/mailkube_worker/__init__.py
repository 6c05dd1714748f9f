"""Mailkube the delivery worker (maildir and remote SMTP delivery, retries, bounces). Not built yet: see issue #5."""
