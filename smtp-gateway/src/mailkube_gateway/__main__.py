"""Entry point of `mailkube-gateway` (and `python -m mailkube_gateway`): the SMTP gateway."""

from mailkube_core.service import run_service
from mailkube_core.settings import GatewaySettings

from .app import serve


def main() -> None:
    run_service("gateway", GatewaySettings, serve)


if __name__ == "__main__":
    main()
