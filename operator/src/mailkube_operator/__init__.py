"""Mailkube the Kubernetes operator (MailDomain and MailUser into the routing table). Not built yet: see issue #6."""
