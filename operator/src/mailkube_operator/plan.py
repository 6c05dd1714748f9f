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
- spec.domain is immutable: once a MailDomain has served a domain (status.domain), a changed
  spec.domain keeps serving the old one with a DomainImmutable warning.
- A missing password Secret or key: the user is published without a password hash (mail is
  delivered, login fails) and gets PasswordSecretMissing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mailkube_core.addresses import normalize_address, normalize_domain, split_address
from mailkube_core.mailbox import mailbox_dir
from mailkube_core.routing import (
    Domain,
    DomainEntry,
    DomainLimits,
    DomainPolicy,
    InboundRelay,
    RelayHost,
    RoutingTable,
    TableGlobals,
    TlsPolicy,
    User,
    join_table,
)

from .dkim import PublishedKey
from .dnsrecords import mta_sts_policy
from .models import (
    MailDomainSpec,
    MailUserSpec,
    RelayCredentials,
    SecretKeyRef,
    parse_quantity,
)
from .spam import routing_policy

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
    annotations: dict[str, str] = field(default_factory=dict)

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
            annotations={str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
        )

    #: (namespace, name); and the order older objects win by (creationTimestamp first)
    key: Key = field(init=False, repr=False, compare=False)
    order: tuple[str, str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # plain attributes, not properties: read for every object at every plan
        object.__setattr__(self, "key", (self.namespace, self.name))
        object.__setattr__(self, "order", (self.created, self.namespace, self.name))

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
    #: the user's address, normalised (None: the spec has none that can be used)
    address: str | None = None
    published: bool = False
    mailbox: str | None = None
    can_login: bool = False


@dataclass
class Plan:
    #: the routing table as stored: domain -> its entry (the table's order), and the rest.
    #: An entry whose domain and users are unchanged is the same object as in the plan before
    #: (with the same PlanCache), so that a publish serialises only the entries that changed.
    entries: dict[str, DomainEntry]
    globals: TableGlobals
    domains: dict[Key, DomainOutcome]
    #: a plan of changed users only shares this with the PlanCache (copying 10,000 verdicts
    #: was the largest size-dependent cost of a change): valid until the next build with
    #: that cache
    users: Mapping[Key, UserOutcome]
    #: the users planned again (changed, added, deleted, or touched by one that was); None:
    #: all of them. The others' verdicts are the same objects as in the plan before.
    redone: set[Key] | None = None
    #: the MailDomains whose verdicts may differ from the plan before; None: any of them
    redone_domains: set[Key] | None = None
    #: the domains whose entries may differ from the plan before (the others are the same
    #: objects, and no domain came or went); None: any of them
    redone_entries: set[str] | None = None
    #: how many users the table holds
    published_users: int = 0

    @property
    def table(self) -> RoutingTable:
        """The whole table (not checked again: the plan's rules are the table's checks
        across domains: DomainConflict, AddressConflict, DomainNotFound, Invalid aliases)."""
        return join_table(self.entries, self.globals)


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


@dataclass(frozen=True)
class _ParsedDomain:
    """A MailDomain's spec, checked: the spec (spec.domain as served), the domain, its
    catch-all, and the DomainImmutable warning if spec.domain was changed."""

    spec: MailDomainSpec
    name: str
    catch_all: str | None
    warning: Problem | None


@dataclass
class PlanCache:
    """What a plan keeps for the next one (the caller keeps it): each object's checked spec
    and the table entries made from it, so that a plan over thousands of objects neither
    checks every unchanged spec again nor makes new entries for unchanged domains."""

    users: UserCache = field(default_factory=dict)
    #: MailDomain -> its spec and status.domain as last parsed, and the result
    domains: dict[Key, tuple[dict[str, Any], Any, _ParsedDomain | Problem]] = field(
        default_factory=dict
    )
    #: MailDomain -> what its Domain was made from, and the Domain
    made: dict[Key, tuple[tuple[Any, ...], Domain]] = field(default_factory=dict)
    #: domain -> its entry in the last plan
    entries: dict[str, DomainEntry] = field(default_factory=dict)
    #: the users' part of the last plan
    state: UsersState | None = None
    #: MailDomain -> its verdict in the last plan
    outcomes: dict[Key, DomainOutcome] = field(default_factory=dict)
    #: the domains' part of the last plan: each domain's owner, and the Domains in the
    #: table's order (what a plan of changed users only starts from); and its globals
    owner_of_domain: dict[str, ObjectRecord] = field(default_factory=dict)
    table_domains: dict[str, Domain] = field(default_factory=dict)
    globals: TableGlobals | None = None


def _same_outcome(old: DomainOutcome, new: DomainOutcome) -> bool:
    return (
        old.spec is new.spec
        and old.domain == new.domain
        and old.rejected == new.rejected
        and old.warning == new.warning
        and (old.keys is new.keys or (not old.keys and not new.keys))
        and old.users == new.users
    )


def _parse_still_holds(
    cached: tuple[dict[str, Any], Any, _ParsedDomain | Problem], spec: dict[str, Any], served: Any
) -> bool:
    """Whether a MailDomain's last parse is still its parse now. status.domain counts only
    where it differs from spec.domain (the DomainImmutable warning): our own status write
    recording the domain we serve (every MailDomain's first status, 1,000 of them at once)
    must not make the next plan parse and redo every domain."""
    if cached[0] != spec:
        return False
    if cached[1] == served:
        return True
    parsed = cached[2]
    if not isinstance(parsed, _ParsedDomain) or parsed.warning is not None:
        return False
    return served in (None, "", parsed.name)


def _parse_domain(record: ObjectRecord) -> _ParsedDomain | Problem:
    try:
        spec = MailDomainSpec.model_validate(record.spec)
        name = normalize_domain(spec.domain)
        warning = None
        served = record.status.get("domain")
        if isinstance(served, str) and served and served != name:
            # spec.domain is immutable; API servers before 1.25 drop the CEL rule
            warning = Problem(
                "DomainImmutable",
                f"spec.domain cannot change (from {served} to {name}): still serving "
                f"{served}; to serve {name}, create another MailDomain",
            )
            spec = spec.model_copy(update={"domain": served})
            name = served
        catch_all = normalize_address(spec.catch_all) if spec.catch_all else None
    except ValidationError as exc:
        return Problem("Invalid", _errors(exc))
    except ValueError as exc:
        return Problem("Invalid", str(exc))
    return _ParsedDomain(spec, name, catch_all, warning)


def _make_domain(
    parsed: _ParsedDomain,
    keys: list[PublishedKey],
    relay: tuple[str | None, str | None] | None,
    mx_hostname: str,
) -> Domain:
    spec, limits = parsed.spec, parsed.spec.limits
    relay_host = None
    if spec.relay is not None:
        username, password = relay or (None, None)
        relay_host = RelayHost(
            host=spec.relay.host,
            port=spec.relay.port,
            tls=spec.relay.tls,
            username=username,
            password=password,  # type: ignore[arg-type]
        )
    return Domain(
        name=parsed.name,
        dkim=[k.key for k in keys],
        catch_all=parsed.catch_all,
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
        spam=routing_policy(spec.spam),
        relay=relay_host,
        inbound_relay=(
            InboundRelay(
                host=spec.inbound_relay.host,
                port=spec.inbound_relay.port,
                tls=spec.inbound_relay.tls,
            )
            if spec.inbound_relay is not None
            else None
        ),
        mta_sts=mta_sts_policy(spec.mta_sts, mx_hostname) if spec.mta_sts else None,
    )


def build(
    domains: list[ObjectRecord],
    users: list[ObjectRecord],
    *,
    passwords: PasswordLookup,
    dkim: DkimLookup,
    relay: RelayLookup,
    mx_hostname: str,
    tls_policies: Mapping[str, str] | None = None,
    users_cache: UserCache | None = None,
    cache: PlanCache | None = None,
    changed_users: Mapping[Key, ObjectRecord | None] | None = None,
) -> Plan:
    """`mx_hostname`: our MX host, the one MX of the MTA-STS policies the gateway serves;
    `tls_policies`: the outbound TLS overrides (domain -> tls) of the operator's settings;
    `cache`: kept by the caller between plans (or only `users_cache`, the users' part).

    `changed_users`: the caller vouches that since the last plan with this cache only these
    users changed (key -> its copy now, None: gone), and nothing else did (no MailDomain, no
    Secret, the same settings): the plan starts from the last one and looks at these users
    only, and at what they touch (`domains` and `users` are not read). None: a full plan."""
    if cache is None:
        cache = PlanCache(users={} if users_cache is None else users_cache)
    if changed_users is not None and cache.state is not None and cache.globals is not None:
        return _build_users_only(changed_users, passwords, cache)
    domain_outcomes: dict[Key, DomainOutcome] = {}
    table_domains: dict[str, Domain] = {}
    owner_of_domain: dict[str, ObjectRecord] = {}
    for record in sorted((d for d in domains if not d.deleting), key=lambda r: r.order):
        outcome = domain_outcomes[record.key] = DomainOutcome()
        served = record.status.get("domain")
        cached = cache.domains.get(record.key)
        if cached is None or not _parse_still_holds(cached, record.spec, served):
            cached = (record.spec, served, _parse_domain(record))
            cache.domains[record.key] = cached
        parsed = cached[2]
        if isinstance(parsed, Problem):
            outcome.rejected = parsed
            continue
        spec, name = outcome.spec, outcome.domain = parsed.spec, parsed.name
        outcome.warning = parsed.warning
        if name in owner_of_domain:
            outcome.rejected = Problem(
                "DomainConflict", f"{name} is already served by {owner_of_domain[name]}"
            )
            continue
        owner_of_domain[name] = record
        outcome.keys = dkim(record, spec)
        credentials: tuple[str | None, str | None] | None = None
        if spec.relay is not None and spec.relay.credentials_secret_ref is not None:
            found = relay(record.namespace, spec.relay.credentials_secret_ref)
            if isinstance(found, Problem):
                outcome.warning = outcome.warning or found
            else:
                credentials = found
        inputs = (parsed, outcome.keys, credentials, mx_hostname)
        made = cache.made.get(record.key)
        if made is None or made[0] != inputs:
            made = (inputs, _make_domain(parsed, outcome.keys, credentials, mx_hostname))
            cache.made[record.key] = made
        elif made[0][0] is not parsed or made[0][1] is not outcome.keys:
            cache.made[record.key] = (inputs, made[1])  # equal: compared by identity next
        table_domains[name] = made[1]

    state, touched, redone = _plan_users(
        users, owner_of_domain, passwords, cache.users, cache.state
    )
    cache.state = state
    for record in owner_of_domain.values():
        domain_outcomes[record.key].users = state.counts.get(record.key, 0)
    for key, outcome in domain_outcomes.items():
        # the verdict from before if it is the same (the same objects: a cheap comparison
        # for the status step, which compares it with the one last written)
        before = cache.outcomes.get(key)
        if before is not None and _same_outcome(before, outcome):
            domain_outcomes[key] = before
    cache.outcomes = dict(domain_outcomes)
    cache.owner_of_domain, cache.table_domains = owner_of_domain, table_domains
    overrides = [TlsPolicy.model_validate({"domain": d, "tls": t})
                 for d, t in sorted((tls_policies or {}).items())]  # fmt: skip
    globals_ = TableGlobals(tls_policies=overrides, order=list(table_domains))
    if cache.globals is not None and cache.globals == globals_:
        globals_ = cache.globals  # the same object: the publish compares by identity first
    cache.globals = globals_
    entries: dict[str, DomainEntry] = {}
    for name, domain in table_domains.items():
        old = cache.entries.get(name)
        if old is None or old.domain is not domain or name in touched:
            old = DomainEntry.model_construct(
                domain=domain, users=list(state.members[name].values())
            )
        entries[name] = old
    cache.entries = entries
    live = {d.key for d in domains}
    for gone in [k for k in cache.domains if k not in live]:
        del cache.domains[gone]
    for gone in [k for k in cache.made if k not in live]:
        del cache.made[gone]
    return Plan(
        entries=entries,
        globals=globals_,
        domains=domain_outcomes,
        users=dict(state.outcomes),
        redone=redone,
        published_users=sum(state.counts.values()),
    )


def _build_users_only(
    changed_users: Mapping[Key, ObjectRecord | None],
    passwords: PasswordLookup,
    cache: PlanCache,
) -> Plan:
    """build() when only `changed_users` changed: the domains' part is the last plan's; the
    users a change touches are planned again, and the entries and verdicts of their domains
    made again. What it costs does not depend on how many domains and users there are."""
    state, globals_ = cache.state, cache.globals
    assert state is not None
    assert globals_ is not None
    again = _plan_users_again(None, cache.owner_of_domain, passwords, cache.users, state,
                              changed_users=changed_users)  # fmt: skip
    if again is None:  # too many touched: all of them (the domains' part is still the same)
        state = cache.state = _plan_all_users(
            [r for r in state.records.values() if r.key not in changed_users]
            + [r for r in changed_users.values() if r is not None],
            cache.owner_of_domain, state.owners, passwords, cache.users,
        )  # fmt: skip
        touched, redone = set(state.owners), None
    else:
        touched, redone = again
    entries = cache.entries
    redone_domains: set[Key] = set()
    if touched:
        entries = dict(entries)
        outcomes = cache.outcomes = dict(cache.outcomes)
        for name in touched:
            owner = state.owners.get(name)
            if owner is None or name not in entries:
                continue
            entries[name] = DomainEntry.model_construct(
                domain=cache.table_domains[name], users=list(state.members[name].values())
            )
            before = outcomes.get(owner)
            count = state.counts.get(owner, 0)
            if before is not None and before.users != count:
                outcomes[owner] = dataclasses.replace(before, users=count)
                redone_domains.add(owner)
        cache.entries = entries
    return Plan(
        entries=entries,
        globals=globals_,
        domains=dict(cache.outcomes),
        users=state.outcomes,
        redone=redone,
        redone_domains=redone_domains,
        redone_entries=set(touched),
        published_users=sum(state.counts.values()),
    )


@dataclass(frozen=True)
class ParsedUser:
    """A MailUser's spec, checked and normalised."""

    spec: MailUserSpec
    address: str
    aliases: list[str]
    forward_to: list[str]
    send_as: list[str]
    quota: int | None
    #: the address's domain, and the domain of each alias that is in another domain
    domain: str = ""
    alias_domains: tuple[str, ...] = ()
    mailbox: str = ""


#: MailUser key -> its spec as last parsed, and the result (ParsedUser, or why it is invalid),
#: then its password hash and the routing-table entry made from them: a plan over thousands of
#: users does not check and normalise every unchanged spec again (the caller keeps it)
UserCache = dict[Key, tuple[dict[str, Any], "ParsedUser | Problem", "_Made | None"]]
#: the password hash a routing-table entry was made with, and the entry
_Made = tuple[str | None, User]


def parse_user(spec_data: dict[str, Any]) -> ParsedUser | Problem:
    try:
        spec = MailUserSpec.model_validate(spec_data)
        address = normalize_address(spec.address)
        aliases = list(dict.fromkeys(normalize_address(a) for a in spec.aliases))
        aliases = [a for a in aliases if a != address]
        forward_to = [normalize_address(a) for a in spec.forward_to]
        send_as = [normalize_address(a) for a in spec.send_as]
        quota = parse_quantity(spec.quota) if spec.quota is not None else None
    except ValidationError as exc:
        return Problem("Invalid", _errors(exc))
    except ValueError as exc:
        return Problem("Invalid", str(exc))
    domain = split_address(address)[1]
    alias_domains = tuple(dict.fromkeys(split_address(a)[1] for a in aliases))
    return ParsedUser(spec, address, aliases, forward_to, send_as, quota, domain,
                      alias_domains, mailbox_dir(address) + "/")  # fmt: skip


@dataclass
class UsersState:
    """The users' part of the last plan, so that the next one redoes only the users a change
    touches: those changed, added or deleted, and every user naming one of their addresses
    (own or alias, before or after), transitively (a user refused for a conflict frees its
    other addresses). Every other user's verdict and entry are kept (the same objects)."""

    #: the domains' owners it was made with: domain -> MailDomain key (any change: all again)
    owners: dict[str, Key]
    #: each user planned (not being deleted), and its verdict
    records: dict[Key, ObjectRecord]
    outcomes: dict[Key, UserOutcome]
    #: user -> the addresses its spec names (own first); address -> the users naming it
    addresses: dict[Key, tuple[str, ...]]
    claims: dict[str, set[Key]]
    #: domain -> its published users; MailDomain key -> how many
    members: dict[str, dict[Key, User]]
    counts: dict[Key, int]
    #: user -> what its password lookup gave (users with a passwordSecretRef)
    passwords: dict[Key, str | Problem]


def _parsed(record: ObjectRecord, cache: UserCache) -> tuple[Any, ParsedUser | Problem, Any]:
    cached = cache.get(record.key)
    if cached is None or (cached[0] is not record.spec and cached[0] != record.spec):
        cached = (record.spec, parse_user(record.spec), None)
        cache[record.key] = cached
    return cached


def _named(parsed: ParsedUser | Problem) -> tuple[str, ...]:
    return () if isinstance(parsed, Problem) else (parsed.address, *parsed.aliases)


def _plan_user(
    record: ObjectRecord,
    owner_of_domain: Mapping[str, ObjectRecord],
    owner_of_address: dict[str, ObjectRecord],
    passwords: PasswordLookup,
    cache: UserCache,
    looked_up: dict[Key, str | Problem],
) -> tuple[UserOutcome, User | None, ObjectRecord | None]:
    """One user's verdict, its table entry if it is published, and its domain's owner."""
    key = record.key
    outcome = UserOutcome()
    cached = _parsed(record, cache)
    parsed = cached[1]
    if isinstance(parsed, Problem):
        outcome.problem = parsed
        return outcome, None, None
    spec, address, aliases = parsed.spec, parsed.address, parsed.aliases
    outcome.address = address
    domain = parsed.domain
    owner = owner_of_domain.get(domain)
    if owner is None or owner.namespace != record.namespace:
        outcome.problem = Problem(
            "DomainNotFound", f"no MailDomain for {domain} in namespace {record.namespace}"
        )
        return outcome, None, None
    if parsed.alias_domains:
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
            return outcome, None, None
    if address in owner_of_address:
        taken: str | None = address
    else:
        taken = next((a for a in aliases if a in owner_of_address), None) if aliases else None
    if taken is not None:
        outcome.problem = Problem(
            "AddressConflict", f"{taken} already belongs to {owner_of_address[taken]}"
        )
        return outcome, None, None
    password_hash: str | None = None
    if spec.password_secret_ref is not None:
        found = looked_up[key] = passwords(record.namespace, spec.password_secret_ref)
        if isinstance(found, Problem):
            outcome.problem = found
        else:
            password_hash = found
    owner_of_address[address] = record
    for a in aliases:
        owner_of_address[a] = record
    made = cached[2]
    if made is None or made[0] != password_hash:
        made = (password_hash, User(
            address=address,
            password_hash=password_hash,
            quota=parsed.quota,
            aliases=aliases,
            forward_to=parsed.forward_to,
            keep_copy=spec.keep_copy,
            send_as=parsed.send_as,
            suspended=spec.suspended,
        ))  # fmt: skip
        cache[key] = (cached[0], parsed, made)
    outcome.published = True
    outcome.can_login = password_hash is not None and not spec.suspended
    outcome.mailbox = parsed.mailbox
    return outcome, made[1], owner


#: a change touching more users than this share of them is planned over all users
INCREMENTAL_SHARE = 0.2


def _plan_users(
    users: list[ObjectRecord],
    owner_of_domain: dict[str, ObjectRecord],
    passwords: PasswordLookup,
    cache: UserCache,
    state: UsersState | None,
) -> tuple[UsersState, set[str], set[Key] | None]:
    """The users' verdicts and entries (the new state), the domains whose published users
    changed, and the users planned again (None: all; then all domains are in the second)."""
    owners = {name: record.key for name, record in owner_of_domain.items()}
    if state is not None and state.owners == owners:
        again = _plan_users_again(users, owner_of_domain, passwords, cache, state)
        if again is not None:
            return state, *again
    return _plan_all_users(users, owner_of_domain, owners, passwords, cache), set(owners), None


def _plan_all_users(
    users: list[ObjectRecord],
    owner_of_domain: dict[str, ObjectRecord],
    owners: dict[str, Key],
    passwords: PasswordLookup,
    cache: UserCache,
) -> UsersState:
    state = UsersState(owners, {}, {}, {}, {}, {name: {} for name in owners}, {}, {})
    owner_of_address: dict[str, ObjectRecord] = {}
    for record in sorted((u for u in users if not u.deleting), key=lambda r: r.order):
        key = record.key
        state.records[key] = record
        outcome, user, owner = _plan_user(
            record, owner_of_domain, owner_of_address, passwords, cache, state.passwords
        )
        state.outcomes[key] = outcome
        named = state.addresses[key] = _named(cache[key][1])
        for address in named:
            state.claims.setdefault(address, set()).add(key)
        if user is not None and owner is not None:
            state.members[split_address(user.address)[1]][key] = user
            state.counts[owner.key] = state.counts.get(owner.key, 0) + 1
    if len(cache) > len(state.records):  # some were deleted
        for gone in [k for k in cache if k not in state.records]:
            del cache[gone]
    return state


def _plan_users_again(
    users: list[ObjectRecord] | None,
    owner_of_domain: dict[str, ObjectRecord],
    passwords: PasswordLookup,
    cache: UserCache,
    state: UsersState,
    changed_users: Mapping[Key, ObjectRecord | None] | None = None,
) -> tuple[set[str], set[Key]] | None:
    """Plan again only the users a change touches (UsersState), updating `state`; the
    domains whose published users changed, and the users planned again (or deleted). None
    if too many are touched (plan them all).

    `users`: every user, compared with the last plan's, and every password lookup checked
    again; or (None) `changed_users`, the only users that changed (None: gone), with no
    Secret changed: no other user is looked at."""
    records = state.records
    changed: dict[Key, ObjectRecord] = {}
    gone: set[Key] = set()
    if users is None:
        assert changed_users is not None
        for key, record in changed_users.items():
            if record is None or record.deleting:
                if key in records:
                    gone.add(key)
            elif records.get(key) is not record:
                changed[key] = record
    else:
        live = 0
        for record in users:
            if record.deleting:
                continue
            live += 1
            if records.get(record.key) is not record:
                changed[record.key] = record
        new = sum(1 for key in changed if key not in records)
        if live - new != len(records):
            current = {u.key for u in users if not u.deleting}
            gone = {key for key in records if key not in current}
        for key, looked in state.passwords.items():  # a password Secret may have changed
            if key in changed or key in gone:
                continue
            ref = cache[key][1].spec.password_secret_ref  # type: ignore[union-attr]
            if ref is not None and passwords(records[key].namespace, ref) != looked:
                changed[key] = records[key]
    if not changed and not gone:
        return set(), set()
    if len(changed) + len(gone) > INCREMENTAL_SHARE * max(len(records), 1):
        return None
    # what the changed and deleted users named, before and after; then who names it
    seeds: set[str] = set()
    for key in (*changed, *gone):
        seeds.update(state.addresses.get(key, ()))
        for address in state.addresses.pop(key, ()):
            state.claims[address].discard(key)
            if not state.claims[address]:
                del state.claims[address]
    for key, record in changed.items():
        named = state.addresses[key] = _named(_parsed(record, cache)[1])
        seeds.update(named)
        for address in named:
            state.claims.setdefault(address, set()).add(key)
    affected = set(changed)
    pending = list(seeds)
    while pending:
        for key in state.claims.get(pending.pop(), ()):
            if key not in affected:
                affected.add(key)
                pending.extend(state.addresses[key])
    if len(affected) > INCREMENTAL_SHARE * max(len(records), 1):
        return None
    touched: set[str] = set()

    def leave(key: Key) -> None:
        before = state.outcomes.pop(key, None)
        state.passwords.pop(key, None)
        if before is not None and before.published and before.address is not None:
            domain = split_address(before.address)[1]
            state.members[domain].pop(key, None)
            owner = state.owners[domain]
            state.counts[owner] -= 1
            touched.add(domain)

    for key in gone:
        leave(key)
        del records[key]
        cache.pop(key, None)
    owner_of_address: dict[str, ObjectRecord] = {}
    for key in affected:
        records[key] = changed.get(key) or records[key]
    for record in sorted((records[key] for key in affected), key=lambda r: r.order):
        key = record.key
        leave(key)
        outcome, user, owner = _plan_user(
            record, owner_of_domain, owner_of_address, passwords, cache, state.passwords
        )
        state.outcomes[key] = outcome
        if user is not None and owner is not None:
            domain = split_address(user.address)[1]
            members = state.members[domain]
            members[key] = user
            if len(members) > 1:  # in the plan's order (oldest first)
                ordered = sorted(members, key=lambda k: records[k].order)
                state.members[domain] = {k: members[k] for k in ordered}
            state.counts[owner.key] = state.counts.get(owner.key, 0) + 1
            touched.add(domain)
    return touched, affected | gone
