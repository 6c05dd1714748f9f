"""Mailkube the delivery worker: claims queued messages and delivers them into maildirs
(`local` role) or to remote hosts over SMTP (`remote` role), with retries and RFC 3464
bounces."""
