"""Mailkube the Kubernetes operator (custom resources to routing).

Not built yet: see issue #6.
"""
