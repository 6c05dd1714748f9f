"""`mailkube delivery probe DOMAIN`: what the delivery worker finds for mail to DOMAIN — MX
hosts, MTA-STS policy, TLSA records and their DNSSEC status, TLS-RPT record, and each host's
TLS and certificates against the policy (like Postfix's posttls-finger).

The probe is the worker's own code (mailkube_worker.tlspolicy.probe), run as a child
process so that core does not import a component: run it where the worker is installed,
e.g. `kubectl exec deploy/mailkube-worker-remote -- mailkube delivery probe example.com`.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

PROBE = "mailkube_worker.tlspolicy.probe"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("delivery", help="outbound delivery diagnostics")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    probe = actions.add_parser(
        "probe", help="MX hosts, MTA-STS, DANE/TLSA and each host's TLS for a domain"
    )
    probe.add_argument("domain", help="the destination domain, e.g. example.com")


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("mailkube_worker") is None:
        print("mailkube: delivery probe needs the delivery worker (mailkube-worker); run it "
              "in a worker pod", file=sys.stderr)  # fmt: skip
        return 2
    config = ["-c", args.config] if args.config else []
    return subprocess.call([sys.executable, "-m", PROBE, *config, args.domain])
