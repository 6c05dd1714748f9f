"""The `mailkube` command line."""
