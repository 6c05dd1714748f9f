"""Connection-level checks of MX clients, before any content is read (docs/spam.md):

    dnsbl.py          DNS block and allow lists, weighted and added up (postscreen-style)
    rdns.py           the client's reverse name, forward-confirmed (FCrDNS, RFC 8601 iprev)
    early_talkers.py  clients that talked before the greeting, remembered in Redis
    screen.py         one connection's checks: started at connect, asked before MAIL

What they learn reaches the filter pipeline as `pipeline.ClientFacts`.
"""
