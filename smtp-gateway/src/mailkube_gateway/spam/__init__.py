"""Spam defence stages of the filter pipeline: the per-message policy, content scanning
with rspamd, greylisting (docs/spam.md)."""
