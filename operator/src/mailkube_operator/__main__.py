"""Entry point of `mailkube-operator`: MailDomain and MailUser resources into the routing
table (see docs/operator.md)."""

from __future__ import annotations

from mailkube_core.service import run_service
from mailkube_core.settings import OperatorSettings

from .app import serve


def main() -> None:
    run_service("operator", OperatorSettings, serve)


if __name__ == "__main__":
    main()
