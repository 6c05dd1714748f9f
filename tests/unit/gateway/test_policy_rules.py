"""The gateway's relay, sender, recipient and acceptance rules (rules.py), without a socket."""

from __future__ import annotations

import pytest

from mailkube_core.routing import RoutingTable
from mailkube_core.routing.snapshot import RoutingSnapshot
from mailkube_gateway import replies
from mailkube_gateway.headers import parse_header_section
from mailkube_gateway.ratelimit import RecipientVerdict
from mailkube_gateway.relay import Path, parse_path
from mailkube_gateway.rules import (
    Client,
    TakeRecipient,
    admission_refusal,
    domain_size_limit,
    header_refusal,
    postmaster_address,
    recipient_decision,
    sender_limit,
    sender_refusal,
)

SNAPSHOT = RoutingSnapshot(
    RoutingTable.model_validate({
        "domains": [
            {"name": "example.test", "catch_all": None},
            {"name": "limited.test",
             "limits": {"max_messages_per_minute": 7, "max_message_size": 1000}},
            {"name": "catchall.test", "catch_all": "alice@example.test"},
            {"name": "relayed.test", "inbound_relay": {"host": "mail.internal.test"}},
        ],
        "users": [
            {"address": "alice@example.test", "aliases": ["info@example.test"],
             "send_as": ["news@example.test"], "quota": 1000},
            {"address": "gone@example.test", "suspended": True},
            {"address": "carol@limited.test"},
            {"address": "staff@relayed.test"},
        ],
    }),
    1,
)  # fmt: skip

MX = Client("mx", "192.0.2.1")
ALICE = Client("submission", "192.0.2.2", auth_user="alice@example.test")
NOBODY = Client("submission", "192.0.2.3")  # not authenticated (the session asks for AUTH)
NOT_SUSPENDED: frozenset[str] = frozenset()


def path(text: str) -> Path:
    parsed = parse_path(f"<{text}>", utf8=True)
    assert parsed is not None
    return parsed


def rcpt(client: Client, to: str | None, *, taken: int = 0) -> str | TakeRecipient:
    return recipient_decision(
        client, None if to is None else path(to), SNAPSHOT,
        taken=taken, max_recipients=3, postmaster="postmaster@example.test",
    )  # fmt: skip


# --- MAIL -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["alice@example.test", "ALICE@Example.Test",
                                    "info@example.test", "news@example.test"])  # fmt: skip
def test_a_user_sends_as_own_address_aliases_and_send_as(sender: str) -> None:
    assert sender_refusal(ALICE, path(sender), SNAPSHOT, NOT_SUSPENDED) is None


@pytest.mark.parametrize("sender", ["bob@example.test", "alice@elsewhere.test",
                                    "alice+tag@example.test"])  # fmt: skip
def test_a_user_cannot_send_as_someone_else(sender: str) -> None:
    assert sender_refusal(ALICE, path(sender), SNAPSHOT, NOT_SUSPENDED) == replies.NOT_OWNER


def test_a_suspended_or_vanished_user_owns_no_address() -> None:
    gone = Client("submission", "192.0.2.2", auth_user="gone@example.test")
    assert sender_refusal(gone, path("gone@example.test"), SNAPSHOT, NOT_SUSPENDED) == (
        replies.NOT_OWNER
    )
    removed = Client("submission", "192.0.2.2", auth_user="removed@example.test")
    assert sender_refusal(removed, path("removed@example.test"), SNAPSHOT, NOT_SUSPENDED) == (
        replies.NOT_OWNER
    )


def test_a_user_suspended_for_spam_is_refused_whatever_the_sender() -> None:
    suspended = {"alice@example.test"}
    for sender in (path("alice@example.test"), None):
        assert sender_refusal(ALICE, sender, SNAPSHOT, suspended) == (replies.SUBMISSION_SUSPENDED)


def test_the_null_sender_only_from_unauthenticated_mx_clients() -> None:
    """RFC 5321 §4.5.5: <> is for bounces between MTAs."""
    assert sender_refusal(MX, None, SNAPSHOT, NOT_SUSPENDED) is None
    assert sender_refusal(ALICE, None, SNAPSHOT, NOT_SUSPENDED) == replies.NULL_SENDER_NOT_ALLOWED
    assert sender_refusal(NOBODY, None, SNAPSHOT, NOT_SUSPENDED) == (
        replies.NULL_SENDER_NOT_ALLOWED
    )
    authenticated_on_mx = Client("mx", "192.0.2.2", auth_user="alice@example.test")
    assert sender_refusal(authenticated_on_mx, None, SNAPSHOT, NOT_SUSPENDED) == (
        replies.NULL_SENDER_NOT_ALLOWED
    )


def test_an_mx_sender_is_left_to_spf_and_dmarc() -> None:
    # even one of our own addresses: SPF/DMARC judge it with the message (mailauth/)
    assert sender_refusal(MX, path("alice@example.test"), SNAPSHOT, NOT_SUSPENDED) is None


def test_the_sender_limit_is_the_domains_for_its_users_else_the_default() -> None:
    carol = Client("submission", "192.0.2.2", auth_user="carol@limited.test")
    assert sender_limit(carol, SNAPSHOT, 100) == 7
    assert sender_limit(ALICE, SNAPSHOT, 100) == 100  # her domain sets none
    assert sender_limit(MX, SNAPSHOT, 100) == 100


# --- RCPT -----------------------------------------------------------------------------------


def test_mx_clients_reach_local_mailboxes_aliases_and_catch_alls() -> None:
    assert rcpt(MX, "alice@example.test") == TakeRecipient(
        "alice@example.test", local=True, user=SNAPSHOT.user("alice@example.test")
    )
    alias = rcpt(MX, "info@example.test")
    assert isinstance(alias, TakeRecipient)
    assert alias.user is not None
    assert alias.user.address == "alice@example.test"  # her quota applies
    catch_all = rcpt(MX, "anything@catchall.test")
    assert isinstance(catch_all, TakeRecipient)
    assert catch_all.local


@pytest.mark.parametrize(
    "to",
    ["bob@remote.test", "alice@example.test.remote.test", "alice@sub.example.test",
     "alice%example.test@remote.test"],
)  # fmt: skip
def test_no_open_relay_for_unauthenticated_clients(to: str) -> None:
    assert rcpt(MX, to) == replies.RELAY_DENIED
    assert rcpt(NOBODY, to) == replies.RELAY_DENIED


@pytest.mark.parametrize("to", ["alice%remote.test@example.test",
                                "remote.test!alice@example.test",
                                '"alice@remote.test"@example.test'])  # fmt: skip
def test_routing_characters_in_a_local_address_are_refused_unauthenticated(to: str) -> None:
    assert rcpt(MX, to) == replies.RELAY_DENIED


def test_an_authenticated_user_relays_anywhere() -> None:
    assert rcpt(ALICE, "bob@remote.test") == TakeRecipient("bob@remote.test", local=False)


def test_a_domain_we_relay_for_takes_its_known_recipients_from_anyone_as_not_local() -> None:
    assert rcpt(MX, "staff@relayed.test") == TakeRecipient(
        "staff@relayed.test", local=False, user=SNAPSHOT.user("staff@relayed.test")
    )
    assert rcpt(MX, "nobody@relayed.test") == replies.UNKNOWN_USER
    assert rcpt(MX, "staff@sub.relayed.test") == replies.RELAY_DENIED


def test_unknown_and_disabled_local_recipients() -> None:
    assert rcpt(MX, "nobody@example.test") == replies.UNKNOWN_USER
    assert rcpt(ALICE, "nobody@example.test") == replies.UNKNOWN_USER  # not relayed either
    assert rcpt(MX, "gone@example.test") == replies.SUSPENDED


def test_postmaster_is_always_accepted() -> None:
    """RFC 5321 §4.5.1: the bare <postmaster>, and postmaster@ each of our domains."""
    postmaster = TakeRecipient("postmaster@example.test", local=True)
    assert rcpt(MX, None) == postmaster
    assert rcpt(MX, "PostMaster@limited.test") == postmaster
    nowhere = recipient_decision(MX, None, SNAPSHOT, taken=0, max_recipients=3, postmaster=None)
    assert nowhere == replies.UNKNOWN_USER


def test_recipients_beyond_the_limit_get_452() -> None:
    """RFC 5321 §4.5.3.1.10: 452 for too many recipients, so the client sends the rest
    later; checked before anything else (a relay probe past the limit learns nothing)."""
    assert isinstance(rcpt(MX, "alice@example.test", taken=2), TakeRecipient)
    assert rcpt(MX, "alice@example.test", taken=3) == replies.TOO_MANY_RECIPIENTS
    assert rcpt(MX, "bob@remote.test", taken=3) == replies.TOO_MANY_RECIPIENTS


def test_a_declared_size_over_the_recipient_domains_limit_is_refused_at_rcpt() -> None:
    """RFC 1870 §6.1: 552 for the recipient whose domain takes less than SIZE= says."""

    def to(address: str, size: int | None) -> str | TakeRecipient:
        return recipient_decision(
            MX, path(address), SNAPSHOT, taken=0, max_recipients=3, postmaster=None,
            declared_size=size,
        )  # fmt: skip

    assert to("carol@limited.test", 1001) == replies.SIZE_EXCEEDED_FOR_DOMAIN
    assert isinstance(to("carol@limited.test", 1000), TakeRecipient)
    assert isinstance(to("carol@limited.test", None), TakeRecipient)
    assert isinstance(to("alice@example.test", 10**9), TakeRecipient)  # no limit of its own
    assert domain_size_limit(SNAPSHOT, ["alice@example.test", "carol@limited.test"]) == 1000
    assert domain_size_limit(SNAPSHOT, ["alice@example.test", "x@remote.test"]) == float("inf")


def test_the_postmaster_address_is_the_setting_else_the_first_domains() -> None:
    assert postmaster_address("abuse@example.test", SNAPSHOT) == "abuse@example.test"
    assert postmaster_address(None, SNAPSHOT) == "postmaster@example.test"
    assert postmaster_address(None, RoutingSnapshot.empty()) is None


@pytest.mark.parametrize(
    ("verdict", "reply"),
    [
        (RecipientVerdict(rate_ok=True, under_quota=True), None),
        (RecipientVerdict(rate_ok=True, under_quota=True, sender_ok=False), replies.SENDER_RATE),
        (RecipientVerdict(rate_ok=False, under_quota=False, sender_ok=False),
         replies.SENDER_RATE),
        (RecipientVerdict(rate_ok=True, under_quota=False), replies.OVER_QUOTA),
        (RecipientVerdict(rate_ok=False, under_quota=False), replies.OVER_QUOTA),
        (RecipientVerdict(rate_ok=False, under_quota=True), replies.RECIPIENT_RATE),
    ],
)  # fmt: skip
def test_admission_replies(verdict: RecipientVerdict, reply: str | None) -> None:
    assert admission_refusal(verdict) == reply


# --- the message ----------------------------------------------------------------------------


def test_too_many_received_fields_is_a_loop() -> None:
    """RFC 5321 §6.3."""
    content = b"Received: from a\r\n" * 4 + b"From: a@example.test\r\n\r\nbody\r\n"
    section = parse_header_section(content, max_size=64 * 1024)
    assert header_refusal(section, max_received=4) is None
    assert header_refusal(section, max_received=3) == ("loop", replies.LOOP_DETECTED)


def test_a_broken_header_section_is_refused_with_the_reason() -> None:
    content = b"From: a@example.test\r\nFrom: b@example.test\r\n\r\nbody\r\n"
    section = parse_header_section(content, max_size=64 * 1024)
    refusal = header_refusal(section, max_received=30)
    assert refusal is not None
    outcome, reply = refusal
    assert outcome == "bad_headers"
    assert reply.startswith("554 5.6.0 Message header error: ")
