"""Mailkube core: the contracts every component imports."""
