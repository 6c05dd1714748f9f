"""From MailDomain and MailUser objects to a routing table and a verdict per object.

Pure functions on plain data, so that every rule (conflicts, missing domains, missing
Secrets, invalid specs) is tested without Kubernetes or Redis. The caller supplies what lives
in Secrets through lookups.

Rules:
- Objects being deleted are gone already.
- Older objects win (creationTimestamp, then namespace and name): a MailDomain whose domain
  another one serves gets DomainConflict; a MailUser whose address or alias another user
  already has gets AddressConflict. The earlier one keeps working.
- A MailUser's domain (and every alias's) must be a published MailDomain of its namespace:
  otherwise DomainNotFound (own address) or Invalid (alias).
- A missing password Secret or key: the user is published without a password hash (mail is
  delivered, login fails) and gets PasswordSecretMissing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mailkube_core.addresses import normalize_address, normalize_domain, split_address
from mailkube_core.mailbox import mailbox_dir
from mailkube_core.routing import (
    Domain,
    DomainLimits,
    DomainPolicy,
    RelayHost,
    RoutingTable,
    User,
)

from .dkim import PublishedKey
from .models import (
    MailDomainSpec,
    MailUserSpec,
    RelayCredentials,
    SecretKeyRef,
    parse_quantity,
)

Key = tuple[str, str]


def plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists (kopf bodies are live views)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ObjectRecord:
    """What the indexes keep of a MailDomain or MailUser."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str
    created: str
    resource_version: str
    generation: int | None
    deleting: bool
    spec: dict[str, Any]
    status: dict[str, Any]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ObjectRecord:
        meta = body.get("metadata") or {}
        return cls(
            api_version=str(body.get("apiVersion", "")),
            kind=str(body.get("kind", "")),
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            created=str(meta.get("creationTimestamp") or ""),
            resource_version=str(meta.get("resourceVersion") or ""),
            generation=meta.get("generation"),
            deleting=bool(meta.get("deletionTimestamp")),
            spec=plain(body.get("spec") or {}),
            status=plain(body.get("status") or {}),
        )

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def order(self) -> tuple[str, str, str]:
        return (self.created, self.namespace, self.name)

    def reference(self) -> dict[str, Any]:
        """The object as an Event's involvedObject."""
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
        }

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


@dataclass
class DomainOutcome:
    spec: MailDomainSpec | None = None
    domain: str | None = None
    #: why the domain is not in the table (Invalid, DomainConflict)
    rejected: Problem | None = None
    #: published, but something is wrong (RelaySecretMissing)
    warning: Problem | None = None
    keys: list[PublishedKey] = field(default_factory=list)
    users: int = 0

    @property
    def published(self) -> bool:
        return self.rejected is None


@dataclass
class UserOutcome:
    #: None: Ready; else the reason it is not
    problem: Problem | None = None
    published: bool = False
    mailbox: str | None = None
    can_login: bool = False


@dataclass
class Plan:
    table: RoutingTable
    domains: dict[Key, DomainOutcome]
    users: dict[Key, UserOutcome]


#: (namespace, ref) -> argon2id hash, or a Problem (Secret or key missing)
PasswordLookup = Callable[[str, SecretKeyRef], "str | Problem"]
#: (namespace, ref) -> (username, password), or a Problem
RelayLookup = Callable[[str, RelayCredentials], "tuple[str, str] | Problem"]
#: (MailDomain record, parsed spec) -> its DKIM keys, signing ones first
DkimLookup = Callable[[ObjectRecord, MailDomainSpec], list[PublishedKey]]


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors(include_url=False)
    )


def build(
    domains: list[ObjectRecord],
    users: list[ObjectRecord],
    *,
    passwords: PasswordLookup,
    dkim: DkimLookup,
    relay: RelayLookup,
) -> Plan:
    domain_outcomes: dict[Key, DomainOutcome] = {}
    table_domains: dict[str, Domain] = {}
    owner_of_domain: dict[str, ObjectRecord] = {}
    for record in sorted((d for d in domains if not d.deleting), key=lambda r: r.order):
        outcome = domain_outcomes[record.key] = DomainOutcome()
        try:
            spec = outcome.spec = MailDomainSpec.model_validate(record.spec)
            name = outcome.domain = normalize_domain(spec.domain)
            catch_all = normalize_address(spec.catch_all) if spec.catch_all else None
        except ValidationError as exc:
            outcome.rejected = Problem("Invalid", _errors(exc))
            continue
        except ValueError as exc:
            outcome.rejected = Problem("Invalid", str(exc))
            continue
        if name in owner_of_domain:
            outcome.rejected = Problem(
                "DomainConflict", f"{name} is already served by {owner_of_domain[name]}"
            )
            continue
        owner_of_domain[name] = record
        outcome.keys = dkim(record, spec)
        relay_host = None
        if spec.relay is not None:
            username = password = None
            if spec.relay.credentials_secret_ref is not None:
                found = relay(record.namespace, spec.relay.credentials_secret_ref)
                if isinstance(found, Problem):
                    outcome.warning = found
                else:
                    username, password = found
            relay_host = RelayHost(
                host=spec.relay.host,
                port=spec.relay.port,
                tls=spec.relay.tls,
                username=username,
                password=password,  # type: ignore[arg-type]
            )
        limits = spec.limits
        table_domains[name] = Domain(
            name=name,
            dkim=[k.key for k in outcome.keys],
            catch_all=catch_all,
            policy=DomainPolicy(
                dmarc=spec.policy.dmarc,
                spf_fail=spec.policy.spf_fail,
                dns_temp_error=spec.policy.dns_temp_error,
                require_tls_outbound=spec.policy.require_tls_outbound,
            ),
            limits=DomainLimits(
                max_message_size=parse_quantity(limits.max_message_size)
                if limits.max_message_size is not None
                else None,
                max_messages_per_minute=limits.max_messages_per_minute,
            ),
            relay=relay_host,
        )

    user_outcomes, table_users = _plan_users(users, owner_of_domain, domain_outcomes, passwords)
    table = RoutingTable(domains=list(table_domains.values()), users=table_users)
    return Plan(table=table, domains=domain_outcomes, users=user_outcomes)


def _plan_users(
    users: list[ObjectRecord],
    owner_of_domain: dict[str, ObjectRecord],
    domain_outcomes: dict[Key, DomainOutcome],
    passwords: PasswordLookup,
) -> tuple[dict[Key, UserOutcome], list[User]]:
    user_outcomes: dict[Key, UserOutcome] = {}
    table_users: list[User] = []
    owner_of_address: dict[str, ObjectRecord] = {}
    for record in sorted((u for u in users if not u.deleting), key=lambda r: r.order):
        outcome = user_outcomes[record.key] = UserOutcome()
        try:
            spec = MailUserSpec.model_validate(record.spec)
            address = normalize_address(spec.address)
            aliases = list(dict.fromkeys(normalize_address(a) for a in spec.aliases))
            aliases = [a for a in aliases if a != address]
            forward_to = [normalize_address(a) for a in spec.forward_to]
            send_as = [normalize_address(a) for a in spec.send_as]
            quota = parse_quantity(spec.quota) if spec.quota is not None else None
        except ValidationError as exc:
            outcome.problem = Problem("Invalid", _errors(exc))
            continue
        except ValueError as exc:
            outcome.problem = Problem("Invalid", str(exc))
            continue
        domain = split_address(address)[1]
        owner = owner_of_domain.get(domain)
        if owner is None or owner.namespace != record.namespace:
            outcome.problem = Problem(
                "DomainNotFound", f"no MailDomain for {domain} in namespace {record.namespace}"
            )
            continue
        foreign = [
            a for a in aliases
            if (o := owner_of_domain.get(split_address(a)[1])) is None
            or o.namespace != record.namespace
        ]  # fmt: skip
        if foreign:
            outcome.problem = Problem(
                "Invalid",
                f"alias {foreign[0]} is not in a MailDomain of namespace {record.namespace}",
            )
            continue
        taken = next((a for a in (address, *aliases) if a in owner_of_address), None)
        if taken is not None:
            outcome.problem = Problem(
                "AddressConflict", f"{taken} already belongs to {owner_of_address[taken]}"
            )
            continue
        password_hash: str | None = None
        if spec.password_secret_ref is not None:
            found = passwords(record.namespace, spec.password_secret_ref)
            if isinstance(found, Problem):
                outcome.problem = found
            else:
                password_hash = found
        for a in (address, *aliases):
            owner_of_address[a] = record
        table_users.append(
            User(
                address=address,
                password_hash=password_hash,
                quota=quota,
                aliases=aliases,
                forward_to=forward_to,
                keep_copy=spec.keep_copy,
                send_as=send_as,
                suspended=spec.suspended,
            )
        )
        outcome.published = True
        outcome.can_login = password_hash is not None and not spec.suspended
        outcome.mailbox = mailbox_dir(address) + "/"
        domain_outcomes[owner.key].users += 1
    return user_outcomes, table_users
