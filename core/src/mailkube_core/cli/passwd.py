"""`mailkube passwd`: print an argon2id hash for a routing file or a Secret."""

from __future__ import annotations

import argparse
import getpass
import sys

from ..routing import hash_password


def run(from_stdin: bool) -> int:
    if from_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("mailkube passwd: the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("mailkube passwd: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    passwd = subparsers.add_parser("passwd", help="print an argon2id hash of a password")
    passwd.add_argument("--stdin", action="store_true", help="read the password from stdin")
