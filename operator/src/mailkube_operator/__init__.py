"""Mailkube the Kubernetes operator: MailDomain and MailUser resources into the routing table,
DKIM keys, status with the DNS records to publish (docs/operator.md)."""
