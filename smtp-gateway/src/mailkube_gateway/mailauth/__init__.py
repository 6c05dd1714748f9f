"""Email authentication: SPF, DKIM, ARC, DMARC, Authentication-Results, DKIM signing."""
