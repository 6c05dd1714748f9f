"""plan.build on plain dicts: the routing table and each object's verdict."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from pydantic import ValidationError

from mailkube_core.routing import InboundRelay, SpamPolicy, TlsPolicy
from mailkube_core.settings import OperatorSettings
from mailkube_operator.dkim import PublishedKey
from mailkube_operator.models import MailDomainSpec, RelayCredentials, SecretKeyRef
from mailkube_operator.plan import ObjectRecord, Plan, PlanCache, Problem, UserCache, build


def domain(name: str, spec: dict[str, Any], *, created: str = "2025-01-01T00:00:00Z",
           ns: str = "mail", deleting: bool = False) -> ObjectRecord:  # fmt: skip
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-{name}",
                            "creationTimestamp": created, "generation": 1}  # fmt: skip
    if deleting:
        meta["deletionTimestamp"] = "2025-02-01T00:00:00Z"
    return ObjectRecord.from_body(
        {"apiVersion": "mailkube.io/v1alpha1", "kind": "MailDomain", "metadata": meta, "spec": spec}
    )


def user(name: str, spec: dict[str, Any], *, created: str = "2025-01-02T00:00:00Z",
         ns: str = "mail") -> ObjectRecord:  # fmt: skip
    return ObjectRecord.from_body(
        {
            "apiVersion": "mailkube.io/v1alpha1",
            "kind": "MailUser",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": f"uid-{name}",
                "creationTimestamp": created,
                "generation": 1,
            },
            "spec": spec,
        }
    )


SECRETS = {("mail", "alice-pw", "password"): "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"}


def passwords(namespace: str, ref: SecretKeyRef) -> str | Problem:
    found = SECRETS.get((namespace, ref.name, ref.key))
    return found or Problem("PasswordSecretMissing", f"Secret {ref.name} has no key {ref.key}")


def no_dkim(record: ObjectRecord, spec: MailDomainSpec) -> list[PublishedKey]:
    return []


def relay(namespace: str, ref: RelayCredentials) -> tuple[str, str] | Problem:
    return Problem("RelaySecretMissing", f"Secret {ref.name} not found")


def plan(domains: list[ObjectRecord], users: list[ObjectRecord]) -> Plan:
    return build(domains, users, passwords=passwords, dkim=no_dkim, relay=relay,
                 mx_hostname="mx.example.net")  # fmt: skip


EXAMPLE = domain("example", {"domain": "Example.TEST", "catchAll": "alice@example.test",
                             "limits": {"maxMessageSize": "10Mi"}})  # fmt: skip


def test_domain_and_user_make_the_table() -> None:
    result = plan(
        [EXAMPLE],
        [user("alice", {"address": "Alice@example.test", "aliases": ["info@example.test"],
                        "quota": "1Gi", "passwordSecretRef": {"name": "alice-pw"}})],
    )  # fmt: skip
    assert [d.name for d in result.table.domains] == ["example.test"]
    assert result.table.domains[0].catch_all == "alice@example.test"
    assert result.table.domains[0].limits.max_message_size == 10 * 2**20
    (alice,) = result.table.users
    assert alice.address == "alice@example.test"
    assert alice.aliases == ["info@example.test"]
    assert alice.quota == 2**30
    assert alice.password_hash == SECRETS[("mail", "alice-pw", "password")]
    outcome = result.users[("mail", "alice")]
    assert outcome.problem is None
    assert outcome.can_login
    assert outcome.mailbox == "example.test/alice/"
    assert result.domains[("mail", "example")].users == 1


def test_user_without_domain_is_domain_not_found() -> None:
    result = plan([], [user("bob", {"address": "bob@example.test"})])
    assert result.table.users == []
    problem = result.users[("mail", "bob")].problem
    assert problem is not None
    assert problem.reason == "DomainNotFound"


def test_domain_in_another_namespace_does_not_count() -> None:
    result = plan([EXAMPLE], [user("bob", {"address": "bob@example.test"}, ns="other")])
    problem = result.users[("other", "bob")].problem
    assert problem is not None
    assert problem.reason == "DomainNotFound"


def test_deleting_domain_drops_it_and_its_users() -> None:
    gone = domain("example", {"domain": "example.test"}, deleting=True)
    result = plan([gone], [user("alice", {"address": "alice@example.test"})])
    assert result.table.domains == []
    assert result.table.users == []
    problem = result.users[("mail", "alice")].problem
    assert problem is not None
    assert problem.reason == "DomainNotFound"


def test_missing_password_secret_publishes_without_login() -> None:
    result = plan([EXAMPLE], [user("carol", {"address": "carol@example.test",
                                             "passwordSecretRef": {"name": "nope"}})])  # fmt: skip
    (carol,) = result.table.users
    assert carol.password_hash is None
    outcome = result.users[("mail", "carol")]
    assert outcome.published
    assert not outcome.can_login
    assert outcome.problem is not None
    assert outcome.problem.reason == "PasswordSecretMissing"


def test_same_address_twice_the_later_one_conflicts() -> None:
    first = user("alice-b", {"address": "alice@example.test"}, created="2025-01-02T00:00:00Z")
    later = user("alice-a", {"address": "ALICE@example.test"}, created="2025-01-03T00:00:00Z")
    result = plan([EXAMPLE], [later, first])
    assert [u.address for u in result.table.users] == ["alice@example.test"]
    assert result.users[("mail", "alice-b")].problem is None
    problem = result.users[("mail", "alice-a")].problem
    assert problem is not None
    assert problem.reason == "AddressConflict"
    assert "MailUser mail/alice-b" in problem.message


def test_same_creation_time_name_decides() -> None:
    a = user("a", {"address": "x@example.test"})
    b = user("b", {"address": "x@example.test"})
    result = plan([EXAMPLE], [b, a])
    assert result.users[("mail", "a")].problem is None
    assert result.users[("mail", "b")].problem is not None


def test_alias_equal_to_another_users_address_conflicts() -> None:
    alice = user("alice", {"address": "alice@example.test"}, created="2025-01-02T00:00:00Z")
    bob = user("bob", {"address": "bob@example.test", "aliases": ["alice@example.test"]},
               created="2025-01-03T00:00:00Z")  # fmt: skip
    result = plan([EXAMPLE], [alice, bob])
    assert [u.address for u in result.table.users] == ["alice@example.test"]
    problem = result.users[("mail", "bob")].problem
    assert problem is not None
    assert problem.reason == "AddressConflict"


def test_alias_outside_the_namespaces_domains_is_invalid() -> None:
    result = plan([EXAMPLE], [user("al", {"address": "al@example.test",
                                          "aliases": ["al@elsewhere.test"]})])  # fmt: skip
    problem = result.users[("mail", "al")].problem
    assert problem is not None
    assert problem.reason == "Invalid"
    assert "al@elsewhere.test" in problem.message


def test_invalid_spec_is_invalid_and_not_published() -> None:
    result = plan([EXAMPLE], [user("bad", {"address": "not-an-address", "quota": "lots"})])
    problem = result.users[("mail", "bad")].problem
    assert problem is not None
    assert problem.reason == "Invalid"
    assert "address" in problem.message
    assert "quota" in problem.message
    assert result.table.users == []


def test_two_maildomains_for_one_domain_the_later_conflicts() -> None:
    later = domain("example-2", {"domain": "example.test"}, created="2025-01-05T00:00:00Z")
    result = plan([later, EXAMPLE], [])
    assert len(result.table.domains) == 1
    assert result.domains[("mail", "example")].published
    rejected = result.domains[("mail", "example-2")].rejected
    assert rejected is not None
    assert rejected.reason == "DomainConflict"


def test_relay_without_its_secret_is_published_with_a_warning() -> None:
    spec = {
        "domain": "example.test",
        "relay": {"host": "relay.example.net", "credentialsSecretRef": {"name": "relay"}},
    }
    result = plan([domain("example", spec)], [])  # fmt: skip
    (published,) = result.table.domains
    assert published.relay is not None
    assert published.relay.host == "relay.example.net"
    assert published.relay.username is None
    warning = result.domains[("mail", "example")].warning
    assert warning is not None
    assert warning.reason == "RelaySecretMissing"


def test_spec_inbound_relay_reaches_the_routing_table_and_a_bad_one_is_invalid() -> None:
    spec = {"domain": "relayed.test", "inboundRelay": {"host": "mail.internal.example"}}
    (published,) = plan([domain("relayed", spec)], []).table.domains
    assert published.inbound_relay == InboundRelay(
        host="mail.internal.example", port=25, tls="opportunistic"
    )
    (plain_domain,) = plan([EXAMPLE], []).table.domains
    assert plain_domain.inbound_relay is None
    bad = {"domain": "relayed.test", "inboundRelay": {"host": "x.example", "port": 0,
                                                      "tls": "maybe"}}  # fmt: skip
    result = plan([domain("relayed", bad)], [])
    assert result.table.domains == []
    rejected = result.domains[("mail", "relayed")].rejected
    assert rejected is not None
    assert rejected.reason == "Invalid"
    assert "inboundRelay.port" in rejected.message
    assert "inboundRelay.tls" in rejected.message


def test_spec_spam_reaches_the_routing_table_unset_fields_left_to_the_gateway() -> None:
    spam = {"policy": "quarantine", "junkScore": 6, "greylisting": True}
    result = plan([domain("example", {"domain": "example.test", "spam": spam})], [])
    (published,) = result.table.domains
    assert published.spam == SpamPolicy(policy="quarantine", junk_score=6.0, greylisting=True)
    assert published.spam.reject_score is None  # the gateway's spam_reject_score decides
    assert published.spam.when_unavailable is None
    (plain_domain,) = plan([EXAMPLE], []).table.domains
    assert plain_domain.spam == SpamPolicy()


def test_spec_mta_sts_reaches_the_routing_table_with_our_mx_host() -> None:
    """The gateway serves the policy from the table; its text is the one whose hash is the id
    of the _mta-sts TXT record the status lists."""
    sts = {"mode": "enforce", "maxAge": 86400}
    result = plan([domain("example", {"domain": "example.test", "mtaSts": sts})], [])
    (published,) = result.table.domains
    assert published.mta_sts is not None
    assert published.mta_sts.text() == (
        "version: STSv1\r\nmode: enforce\r\nmx: mx.example.net\r\nmax_age: 86400\r\n"
    )
    (plain_domain,) = plan([EXAMPLE], []).table.domains
    assert plain_domain.mta_sts is None


def test_the_operators_tls_policies_reach_the_routing_table() -> None:
    """The settings' per-destination overrides (normalised there) become tls_policies,
    sorted so that the table does not change with the settings' order."""
    settings = OperatorSettings(tls_policies="Partner.Example=dane, bank.example=sts")
    result = build([EXAMPLE], [], passwords=passwords, dkim=no_dkim, relay=relay,
                   mx_hostname="mx.example.net", tls_policies=settings.tls_policies)  # fmt: skip
    assert result.table.tls_policies == [
        TlsPolicy(domain="bank.example", tls="sts"),
        TlsPolicy(domain="partner.example", tls="dane"),
    ]
    assert plan([EXAMPLE], []).table.tls_policies == []


def test_tls_policies_settings_refuse_what_the_table_would() -> None:
    with pytest.raises(ValidationError, match="listed twice"):
        OperatorSettings(tls_policies={"a.example": "dane", "A.example.": "sts"})
    with pytest.raises(ValidationError, match="not domain=policy"):
        OperatorSettings(tls_policies="a.example")
    with pytest.raises(ValidationError, match="opportunistic"):
        OperatorSettings(tls_policies={"a.example": "always"})


def test_junk_score_at_or_above_reject_score_is_invalid() -> None:
    """The CRD's CEL rule refuses it on Kubernetes 1.25+; older API servers (and kmock) let it
    through, so the operator checks it too."""
    spam = {"rejectScore": 10, "junkScore": 10}
    result = plan([domain("example", {"domain": "example.test", "spam": spam})], [])
    assert result.table.domains == []
    rejected = result.domains[("mail", "example")].rejected
    assert rejected is not None
    assert rejected.reason == "Invalid"
    assert "junkScore must be below rejectScore" in rejected.message
    bad_policy = plan([domain("x", {"domain": "example.test", "spam": {"policy": "drop"}})], [])
    problem = bad_policy.domains[("mail", "x")].rejected
    assert problem is not None
    assert "spam.policy" in problem.message


def test_a_changed_spec_domain_keeps_serving_the_domain_it_served() -> None:
    """spec.domain is immutable (a CEL rule, which API servers before 1.25 drop): the operator
    guards it too, from status.domain, and keeps mail to the old domain flowing."""
    served = dataclasses.replace(
        domain("example", {"domain": "renamed.test"}), status={"domain": "example.test"}
    )
    result = plan([served], [user("alice", {"address": "alice@example.test"})])
    assert [d.name for d in result.table.domains] == ["example.test"]
    outcome = result.domains[("mail", "example")]
    assert outcome.domain == "example.test"
    assert outcome.published
    assert outcome.warning == Problem(
        "DomainImmutable",
        "spec.domain cannot change (from example.test to renamed.test): still serving "
        "example.test; to serve renamed.test, create another MailDomain",
    )
    assert result.users[("mail", "alice")].published

    # the same domain, written differently, is no change
    same = dataclasses.replace(
        domain("example", {"domain": "EXAMPLE.test"}), status={"domain": "example.test"}
    )
    assert plan([same], []).domains[("mail", "example")].warning is None


def test_the_users_cache_follows_every_change() -> None:
    """The plan keeps each user's checked spec and table entry between plans (thousands of
    users): a changed spec, a new password hash or a deleted user is never served stale."""
    cache: UserCache = {}
    hashes = dict(SECRETS)

    def lookup(namespace: str, ref: SecretKeyRef) -> str | Problem:
        return hashes.get((namespace, ref.name, ref.key)) or Problem("PasswordSecretMissing", "")

    def planned(users: list[ObjectRecord]) -> Plan:
        return build([EXAMPLE], users, passwords=lookup, dkim=no_dkim, relay=relay,
                     mx_hostname="mx.example.net", users_cache=cache)  # fmt: skip

    alice = {"address": "alice@example.test", "passwordSecretRef": {"name": "alice-pw"}}
    first = planned([user("alice", alice), user("bob", {"address": "bob@example.test"})])
    assert (
        first.table
        == plan(
            [EXAMPLE], [user("alice", alice), user("bob", {"address": "bob@example.test"})]
        ).table
    )
    assert set(cache) == {("mail", "alice"), ("mail", "bob")}

    renamed = planned([user("alice", {**alice, "aliases": ["info@example.test"]})])
    assert renamed.table.users[0].aliases == ["info@example.test"]
    assert set(cache) == {("mail", "alice")}  # bob is gone

    hashes[("mail", "alice-pw", "password")] = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$bmV3"
    rehashed = planned([user("alice", {**alice, "aliases": ["info@example.test"]})])
    assert rehashed.table.users[0].password_hash == hashes[("mail", "alice-pw", "password")]

    invalid = planned([user("alice", {**alice, "quota": "lots"})])
    assert invalid.users[("mail", "alice")].problem is not None
    assert invalid.table.users == []


def test_a_plan_that_redoes_only_the_users_touched_equals_a_plan_of_all() -> None:
    """Random changes (aliases taken from each other, addresses moved between domains,
    users deleted and added, passwords lost and found, a domain added): after each, the plan
    kept between changes (PlanCache, redoing only what a change touches) gives the same
    table and verdicts as a plan made from nothing."""
    rng = random.Random(16)
    names = ["a.test", "b.test", "c.test"]
    domains = [domain(n.split(".")[0], {"domain": n}) for n in names]
    hashes = dict(SECRETS)

    def lookup(namespace: str, ref: SecretKeyRef) -> str | Problem:
        return hashes.get((namespace, ref.name, ref.key)) or Problem("PasswordSecretMissing", "")

    def spec() -> dict[str, Any]:
        result: dict[str, Any] = {"address": f"u{rng.randrange(12)}@{rng.choice(names)}"}
        result["aliases"] = [f"x{rng.randrange(8)}@{rng.choice(names)}"
                             for _ in range(rng.randrange(3))]  # fmt: skip
        if rng.random() < 0.3:
            result["passwordSecretRef"] = {"name": "alice-pw"}
        if rng.random() < 0.05:
            result["quota"] = "lots"  # invalid
        return result

    users = {f"n{i}": user(f"n{i}", spec(), created=f"2025-01-02T00:00:{i:02d}Z")
             for i in range(30)}  # fmt: skip
    cache = PlanCache()
    incremental = 0
    for step in range(300):
        what = rng.random()
        if what < 0.6:
            name = rng.choice(sorted(users))
            users[name] = user(name, spec(), created=users[name].created)
        elif what < 0.75 and users:
            del users[rng.choice(sorted(users))]
        elif what < 0.9:
            name = f"n{30 + step}"
            users[name] = user(
                name, spec(), created=f"2025-01-03T00:{step // 60:02d}:{step % 60:02d}Z"
            )
        elif what < 0.97:
            key = ("mail", "alice-pw", "password")
            if key in hashes:
                del hashes[key]
            else:
                hashes[key] = SECRETS[key]
        elif len(domains) == 3:
            domains.append(domain("d", {"domain": "d.test"}))
            names.append("d.test")
        state = cache.state
        kept = build(domains, list(users.values()), passwords=lookup, dkim=no_dkim, relay=relay,
                     mx_hostname="mx.example.net", cache=cache)  # fmt: skip
        incremental += cache.state is state and state is not None
        fresh = build(domains, list(users.values()), passwords=lookup, dkim=no_dkim, relay=relay,
                      mx_hostname="mx.example.net")  # fmt: skip
        assert kept.table == fresh.table, step
        assert [e.model_dump_json() for e in kept.entries.values()] == [
            e.model_dump_json() for e in fresh.entries.values()], step  # fmt: skip
        assert kept.users == fresh.users, step
        assert kept.domains == fresh.domains, step
    assert incremental > 100  # most plans redid only what a change touched


def test_an_unchanged_domain_keeps_its_entry_object() -> None:
    cache = PlanCache()
    other = domain("other", {"domain": "other.test"})
    alice = user("alice", {"address": "alice@example.test"})
    others = [user(f"u{i}", {"address": f"u{i}@other.test"}) for i in range(9)]
    first = build([EXAMPLE, other], [alice, *others], passwords=passwords, dkim=no_dkim,
                  relay=relay, mx_hostname="mx.example.net", cache=cache)  # fmt: skip
    moved = user("alice", {"address": "alice@example.test", "aliases": ["a@example.test"]})
    second = build([EXAMPLE, other], [moved, *others], passwords=passwords, dkim=no_dkim,
                   relay=relay, mx_hostname="mx.example.net", cache=cache)  # fmt: skip
    assert second.entries["other.test"] is first.entries["other.test"]
    assert second.entries["example.test"] is not first.entries["example.test"]
    assert second.entries["example.test"].users[0].aliases == ["a@example.test"]


def test_the_domain_served_recorded_in_status_does_not_parse_the_domain_again() -> None:
    """Every MailDomain's first status records the domain it serves (status.domain): the
    echo of 1,000 such writes must not make the next plan parse and redo every domain (the
    same parsed spec, the same verdict object's spec). A status.domain that differs from
    spec.domain still does (DomainImmutable)."""
    cache = PlanCache()

    def build_with(record: ObjectRecord) -> Plan:
        return build([record], [], passwords=passwords, dkim=no_dkim, relay=relay,
                     mx_hostname="mx.example.net", cache=cache)  # fmt: skip

    first = build_with(EXAMPLE).domains[("mail", "example")]
    recorded = dataclasses.replace(EXAMPLE, status={"domain": "example.test"})
    again = build_with(recorded).domains[("mail", "example")]
    assert again.spec is first.spec
    assert again.warning is None
    renamed = dataclasses.replace(recorded, status={"domain": "old.test"})
    moved = build_with(renamed).domains[("mail", "example")]
    assert moved.domain == "old.test"
    assert moved.warning is not None
    assert moved.warning.reason == "DomainImmutable"
