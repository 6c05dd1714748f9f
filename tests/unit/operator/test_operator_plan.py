"""plan.build on plain dicts: the routing table and each object's verdict."""

from __future__ import annotations

from typing import Any

from mailkube_operator.dkim import PublishedKey
from mailkube_operator.models import MailDomainSpec, RelayCredentials, SecretKeyRef
from mailkube_operator.plan import ObjectRecord, Plan, Problem, build


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
    return build(domains, users, passwords=passwords, dkim=no_dkim, relay=relay)


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
