"""`mailkube routing apply -f FILE` and `mailkube routing show`.

The file is the routing model in YAML, except that a user may give `password` — plaintext,
hashed with argon2id on apply, or an argon2id hash taken as is — instead of `password_hash`,
and a DKIM key may give `private_key_file` (relative to the file) instead of `private_key`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from ..redis_client import RedisClient
from ..routing import RoutingSnapshot, RoutingStore, RoutingTable, hash_password, is_argon2id_hash


class RoutingFileError(Exception):
    pass


def read_routing_file(path: Path) -> RoutingTable:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise RoutingFileError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RoutingFileError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RoutingFileError(f"{path}: expected a mapping with domains: and users:")
    try:
        for index, user in enumerate(data.get("users") or []):
            if isinstance(user, dict) and "password" in user:
                if "password_hash" in user:
                    raise RoutingFileError(
                        f"users.{index}: give password or password_hash, not both"
                    )
                password = str(user.pop("password"))
                user["password_hash"] = (
                    password if is_argon2id_hash(password) else hash_password(password)
                )
        for domain in data.get("domains") or []:
            for key in (domain.get("dkim") or []) if isinstance(domain, dict) else []:
                if isinstance(key, dict) and "private_key_file" in key:
                    key["private_key"] = (path.parent / key.pop("private_key_file")).read_text()
        return RoutingTable.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in e['loc']) or 'table'}: "
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors(include_url=False)
        ]
        raise RoutingFileError(
            f"{path} is not a valid routing table:\n  " + "\n  ".join(lines)
        ) from None
    except (OSError, ValueError) as exc:
        raise RoutingFileError(f"{path}: {exc}") from None


async def apply(redis: RedisClient, prefix: str, path: Path) -> int:
    table = read_routing_file(path)
    version = await RoutingStore(redis, prefix).replace(table)
    domains, users = len(table.domains), len(table.users)
    print(f"routing table version {version}: {domains} domain(s), {users} user(s)")
    return version


def redacted(table: RoutingTable) -> dict[str, Any]:
    """The table for display: secrets and password hashes replaced by markers."""

    def scrub(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return "<secret>"
        if isinstance(value, dict):
            return {
                k: ("<argon2id hash>" if k == "password_hash" and v else scrub(v))
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return scrub(table.model_dump(mode="python"))  # type: ignore[no-any-return]


def show(snapshot: RoutingSnapshot, *, as_yaml: bool) -> None:
    if as_yaml:
        print(
            yaml.safe_dump(
                {"version": snapshot.version, **redacted(snapshot.table)}, sort_keys=False
            )
        )
        return
    from .tables import table

    print(f"routing table version {snapshot.version}")
    print()
    print(table(
        ["DOMAIN", "USERS", "DKIM", "CATCH-ALL", "DMARC", "SPF FAIL", "RELAY", "RELAYED TO"],
        [
            [d.name, sum(1 for u in snapshot.table.users if u.domain == d.name),
             ",".join(f"{k.selector}/{k.algorithm.split('-')[0]}" for k in d.dkim) or "-",
             d.catch_all or "-", d.policy.dmarc or "default", d.policy.spf_fail or "default",
             f"{d.relay.host}:{d.relay.port}" if d.relay else "-",
             f"{d.inbound_relay.host}:{d.inbound_relay.port}" if d.inbound_relay else "-"]
            for d in snapshot.table.domains
        ],
    ))  # fmt: skip
    print()
    print(table(
        ["USER", "LOGIN", "QUOTA", "ALIASES", "FORWARD-TO", "SEND-AS"],
        [
            [u.address,
             "suspended" if u.suspended else ("yes" if u.password_hash else "no password"),
             u.quota if u.quota is not None else "-", ",".join(u.aliases) or "-",
             ",".join(u.forward_to) + (" (+copy)" if u.keep_copy and u.forward_to else "") or "-",
             ",".join(u.send_as) or "-"]
            for u in snapshot.table.users
        ],
    ))  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    routing = subparsers.add_parser("routing", help="publish or show the routing table")
    sub = routing.add_subparsers(dest="action", required=True)
    apply_p = sub.add_parser("apply", help="replace the routing table from a YAML file")
    apply_p.add_argument("-f", "--file", type=Path, required=True)
    show_p = sub.add_parser("show", help="show the current routing table (secrets hidden)")
    show_p.add_argument("-o", "--output", choices=["table", "yaml"], default="table")
