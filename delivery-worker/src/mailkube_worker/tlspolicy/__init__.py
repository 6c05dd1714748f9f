"""Outbound transport security policies: MTA-STS (RFC 8461), DANE (RFC 7672) and the TLS
reports that record how they went (RFC 8460).

Parsing and deciding are pure functions of values (mta_sts, dane's matching, verdicts);
fetching, DNS and Redis live in their own modules (sts_fetch, sts_cache, dane's lookup,
tlsrpt)."""
