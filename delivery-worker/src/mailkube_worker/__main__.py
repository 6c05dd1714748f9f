"""Entry point of `mailkube-worker`: the delivery worker (maildirs, remote SMTP, bounces).

    mailkube-worker [--role local|remote|all]

Settings come from MAILKUBE_* and MAILKUBE_CONFIG like every process; `--role` overrides the
`role` setting.
"""

from __future__ import annotations

import argparse
import os

from mailkube_core.service import run_service
from mailkube_core.settings import WorkerSettings

from .app import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mailkube-worker", description="Mailkube delivery worker")
    parser.add_argument(
        "--role",
        choices=("local", "remote", "all"),
        help="local: maildirs (mounts the mail volume); remote: SMTP out; all: both "
        "(default: the role setting, itself `all` by default)",
    )
    args = parser.parse_args(argv)
    if args.role:
        # the environment overrides the settings file, so this overrides both
        os.environ["MAILKUBE_ROLE"] = args.role
    run_service("worker", WorkerSettings, serve)


if __name__ == "__main__":
    main()
