"""The routing table model and its in-memory snapshot (no Redis)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from mailkube_core.routing import (
    DkimKey,
    Domain,
    DomainEntry,
    RelayHost,
    RoutingSnapshot,
    RoutingTable,
    TableGlobals,
    TlsPolicy,
    User,
    join_table,
    split_table,
)

PRIVATE_KEY = (
    "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIsecretsecret\n-----END PRIVATE KEY-----"
)
RELAY_PASSWORD = "relay-password-do-not-print"


def table(**extra: Any) -> RoutingTable:
    data: dict[str, Any] = {
        "domains": [
            {"name": "Example.Test.", "catch_all": "postmaster@example.test"},
            {"name": "bücher.example"},
            {"name": "aliased.test", "catch_all": "team@aliased.test"},
        ],
        "users": [
            {
                "address": "Alice@Example.Test",
                "aliases": ["a.smith@example.test", "alice@bücher.example"],
                "send_as": ["news@example.test"],
            },
            {"address": "postmaster@example.test"},
            {"address": "bob@aliased.test", "aliases": ["team@aliased.test"]},
        ],
    }
    data.update(extra)
    return RoutingTable.model_validate(data)


@pytest.fixture
def snapshot() -> RoutingSnapshot:
    return RoutingSnapshot(table(), 3)


# --- table validation ---------------------------------------------------------------------


def test_table_normalises_names_and_addresses() -> None:
    t = table()
    assert [d.name for d in t.domains] == ["example.test", "xn--bcher-kva.example", "aliased.test"]
    alice = t.users[0]
    assert alice.address == "alice@example.test"
    assert alice.aliases == ["a.smith@example.test", "alice@xn--bcher-kva.example"]
    assert alice.domain == "example.test"


def test_duplicate_domain_is_rejected() -> None:
    with pytest.raises(ValidationError, match="domain listed twice"):
        RoutingTable(domains=[Domain(name="example.test"), Domain(name="EXAMPLE.test.")])


def test_tls_policies_are_looked_up_by_normalised_domain() -> None:
    routing = RoutingTable(tls_policies=[TlsPolicy(domain="Example.NET.", tls="dane")])
    snapshot = RoutingSnapshot(routing, 1)
    assert snapshot.tls_policy("example.net") == "dane"
    assert snapshot.tls_policy("EXAMPLE.net") == "dane"
    assert snapshot.tls_policy("other.net") is None
    with pytest.raises(ValidationError, match="tls_policies: domain listed twice"):
        RoutingTable(tls_policies=[TlsPolicy(domain="a.test", tls="sts"),
                                   TlsPolicy(domain="A.test", tls="dane")])  # fmt: skip
    with pytest.raises(ValidationError, match="tls"):
        TlsPolicy(domain="a.test", tls="may")  # type: ignore[arg-type]


def test_user_in_unknown_domain_is_rejected() -> None:
    with pytest.raises(
        ValidationError, match=r"user carol@elsewhere\.test: domain elsewhere\.test"
    ):
        RoutingTable(
            domains=[Domain(name="example.test")], users=[User(address="carol@elsewhere.test")]
        )


def test_alias_owned_twice_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"address shared@example\.test belongs to both"):
        RoutingTable(
            domains=[Domain(name="example.test")],
            users=[
                User(address="a@example.test", aliases=["shared@example.test"]),
                User(address="b@example.test", aliases=["Shared@Example.test"]),
            ],
        )


def test_alias_equal_to_another_users_address_is_rejected() -> None:
    with pytest.raises(ValidationError, match="belongs to both"):
        RoutingTable(
            domains=[Domain(name="example.test")],
            users=[
                User(address="a@example.test"),
                User(address="b@example.test", aliases=["a@example.test"]),
            ],
        )


def test_same_user_twice_is_rejected() -> None:
    with pytest.raises(ValidationError, match="belongs to both"):
        RoutingTable(
            domains=[Domain(name="example.test")],
            users=[User(address="a@example.test"), User(address="A@example.test")],
        )


def test_alias_outside_local_domains_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"alias a@remote\.test of b@example\.test"):
        RoutingTable(
            domains=[Domain(name="example.test")],
            users=[User(address="b@example.test", aliases=["a@remote.test"])],
        )


def test_bad_address_in_table_is_rejected() -> None:
    with pytest.raises(ValidationError):
        User(address="not an address")
    with pytest.raises(ValidationError):
        Domain(name="bad_domain.test")


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        User.model_validate({"address": "a@example.test", "pasword_hash": "x"})


def test_bad_dkim_selector_is_rejected() -> None:
    with pytest.raises(ValidationError):
        DkimKey(selector="bad selector", algorithm="ed25519-sha256", private_key=PRIVATE_KEY)  # type: ignore[arg-type]


def test_negative_quota_is_rejected() -> None:
    with pytest.raises(ValidationError):
        User(address="a@example.test", quota=-1)


# --- secrets --------------------------------------------------------------------------------


def secret_table() -> RoutingTable:
    return RoutingTable.model_validate(
        {
            "domains": [
                {
                    "name": "example.test",
                    "dkim": [
                        {"selector": "s1", "algorithm": "rsa-sha256", "private_key": PRIVATE_KEY},
                        {
                            "selector": "s0",
                            "algorithm": "rsa-sha256",
                            "private_key": PRIVATE_KEY,
                            "signing": False,
                        },
                    ],
                    "relay": {"host": "relay.test", "username": "u", "password": RELAY_PASSWORD},
                }
            ]
        }
    )


def test_secrets_are_in_clear_in_json_and_round_trip() -> None:
    t = secret_table()
    data = json.loads(t.model_dump_json())
    domain = data["domains"][0]
    assert domain["dkim"][0]["private_key"] == PRIVATE_KEY
    assert domain["relay"]["password"] == RELAY_PASSWORD
    again = RoutingTable.model_validate_json(t.model_dump_json())
    assert again == t
    assert again.domains[0].dkim[0].private_key.get_secret_value() == PRIVATE_KEY


def test_secrets_are_hidden_in_repr_and_str() -> None:
    t = secret_table()
    for text in (repr(t), str(t), repr(t.domains[0]), repr(t.domains[0].relay)):
        assert PRIVATE_KEY not in text
        assert "secretsecret" not in text
        assert RELAY_PASSWORD not in text


def test_signing_keys_skip_retired_keys() -> None:
    domain = secret_table().domains[0]
    assert [key.selector for key in domain.signing_keys()] == ["s1"]


def test_relay_defaults() -> None:
    relay = RelayHost(host="relay.test")
    assert (relay.port, relay.tls, relay.password) == (587, "starttls", None)


# --- snapshot lookups -----------------------------------------------------------------------


def test_resolve_own_address(snapshot: RoutingSnapshot) -> None:
    mailbox = snapshot.resolve("ALICE@example.test.")
    assert mailbox is not None
    assert (mailbox.user.address, mailbox.via) == ("alice@example.test", "address")


def test_resolve_alias(snapshot: RoutingSnapshot) -> None:
    mailbox = snapshot.resolve("A.Smith@Example.Test")
    assert mailbox is not None
    assert (mailbox.user.address, mailbox.via) == ("alice@example.test", "alias")
    idn = snapshot.resolve("alice@BÜCHER.example")
    assert idn is not None
    assert (idn.user.address, idn.via) == ("alice@example.test", "alias")


def test_resolve_catch_all(snapshot: RoutingSnapshot) -> None:
    mailbox = snapshot.resolve("nobody@example.test")
    assert mailbox is not None
    assert (mailbox.user.address, mailbox.via) == ("postmaster@example.test", "catch_all")


def test_resolve_catch_all_to_an_alias(snapshot: RoutingSnapshot) -> None:
    mailbox = snapshot.resolve("whoever@aliased.test")
    assert mailbox is not None
    assert (mailbox.user.address, mailbox.via) == ("bob@aliased.test", "catch_all")


def test_address_wins_over_alias_and_alias_over_catch_all() -> None:
    snap = RoutingSnapshot(table(), 1)
    # postmaster@example.test is both a user and the catch-all target
    own = snap.resolve("postmaster@example.test")
    assert own is not None
    assert own.via == "address"
    # an alias in a domain with a catch-all resolves as the alias
    alias = snap.resolve("a.smith@example.test")
    assert alias is not None
    assert (alias.user.address, alias.via) == ("alice@example.test", "alias")


def test_resolve_without_catch_all_is_none(snapshot: RoutingSnapshot) -> None:
    assert snapshot.resolve("nobody@bücher.example") is None


def test_resolve_catch_all_to_missing_user_is_none() -> None:
    snap = RoutingSnapshot(
        RoutingTable(domains=[Domain(name="example.test", catch_all="ghost@example.test")]), 1
    )
    assert snap.resolve("anyone@example.test") is None


def test_resolve_remote_and_invalid_is_none(snapshot: RoutingSnapshot) -> None:
    assert snapshot.resolve("alice@remote.test") is None
    assert snapshot.resolve("not an address") is None
    assert snapshot.resolve("") is None


def test_is_local(snapshot: RoutingSnapshot) -> None:
    assert snapshot.is_local("anyone@EXAMPLE.test")
    assert snapshot.is_local("x@bücher.example")
    assert snapshot.is_local("x@xn--bcher-kva.example.")
    assert not snapshot.is_local("alice@remote.test")
    assert not snapshot.is_local("no-at-sign")
    assert snapshot.is_local_domain("Example.Test.")
    assert not snapshot.is_local_domain("bad_domain")


def test_domain_and_user_lookup(snapshot: RoutingSnapshot) -> None:
    domain = snapshot.domain("EXAMPLE.TEST")
    assert domain is not None
    assert domain.catch_all == "postmaster@example.test"
    user = snapshot.user("Alice@Example.Test")
    assert user is not None
    assert user.address == "alice@example.test"
    # an alias is not a user (no AUTH with an alias)
    assert snapshot.user("a.smith@example.test") is None
    assert snapshot.user("garbage") is None


def test_may_send_as(snapshot: RoutingSnapshot) -> None:
    alice = snapshot.user("alice@example.test")
    assert alice is not None
    assert snapshot.may_send_as(alice, "Alice@Example.Test")
    assert snapshot.may_send_as(alice, "a.smith@example.test")
    assert snapshot.may_send_as(alice, "alice@bücher.example")
    assert snapshot.may_send_as(alice, "NEWS@example.test")
    assert not snapshot.may_send_as(alice, "postmaster@example.test")
    assert not snapshot.may_send_as(alice, "alice@remote.test")
    assert not snapshot.may_send_as(alice, "")
    assert not snapshot.may_send_as(alice, "<>")


def test_empty_snapshot() -> None:
    snap = RoutingSnapshot.empty()
    assert snap.version == 0
    assert snap.resolve("a@example.test") is None
    assert not snap.is_local("a@example.test")


def test_mailbox_dir_keeps_every_local_part_inside_its_domain() -> None:
    from mailkube_core.mailbox import mailbox_dir

    assert mailbox_dir("alice@example.test") == "example.test/alice"
    assert mailbox_dir("..@example.test") == "example.test/%2E."
    assert mailbox_dir(".hidden@example.test") == "example.test/%2Ehidden"
    assert mailbox_dir("a/../../etc@example.test") == "example.test/a%2F..%2F..%2Fetc"


def test_a_domain_entry_checks_what_is_per_domain() -> None:
    with pytest.raises(ValidationError, match=r"not in domain one\.test"):
        DomainEntry.model_validate(
            {"domain": {"name": "one.test"}, "users": [{"address": "a@two.test"}]}
        )
    with pytest.raises(ValidationError, match="belongs to both"):
        DomainEntry.model_validate({
            "domain": {"name": "one.test"},
            "users": [{"address": "a@one.test", "aliases": ["x@one.test"]},
                      {"address": "b@one.test", "aliases": ["X@one.test"]}],
        })  # fmt: skip
    # an alias in another domain is the writer's to check across the table
    entry = DomainEntry.model_validate({
        "domain": {"name": "one.test"},
        "users": [{"address": "a@one.test", "aliases": ["a@two.test"]}],
    })  # fmt: skip
    assert entry.users[0].aliases == ["a@two.test"]


def test_a_table_split_into_entries_and_joined_again_is_the_same() -> None:
    table = RoutingTable.model_validate({
        "domains": [{"name": "b.test"}, {"name": "a.test"}, {"name": "c.test"}],
        "users": [{"address": "x@a.test"}, {"address": "y@b.test"}, {"address": "z@a.test"}],
        "tls_policies": [{"domain": "remote.test", "tls": "dane"}],
    })  # fmt: skip
    entries, globals_ = split_table(table)
    assert [u.address for u in entries["a.test"].users] == ["x@a.test", "z@a.test"]
    assert entries["c.test"].users == []
    parsed = {n: DomainEntry.model_validate_json(e.model_dump_json()) for n, e in entries.items()}
    joined = join_table(parsed, TableGlobals.model_validate_json(globals_.model_dump_json()))
    assert [d.name for d in joined.domains] == ["b.test", "a.test", "c.test"]
    assert joined.tls_policies == table.tls_policies
    assert sorted(u.address for u in joined.users) == sorted(u.address for u in table.users)
    # a domain the order does not list comes after the listed ones, by name
    later = join_table({**parsed, "0.test": DomainEntry(domain=Domain(name="0.test"))}, globals_)
    assert [d.name for d in later.domains] == ["b.test", "a.test", "c.test", "0.test"]
