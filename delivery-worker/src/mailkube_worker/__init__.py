"""Mailkube the delivery worker (maildirs, remote SMTP, bounces).

Not built yet: see issue #5.
"""
