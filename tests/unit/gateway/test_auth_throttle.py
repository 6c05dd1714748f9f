"""Who may try a password, and after how long (auth_throttle.py): values in, decision out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailkube_gateway.auth_throttle import (
    AuthDecision,
    AuthHistory,
    AuthRules,
    client_network,
    decide,
    failure_delay,
)

RULES = AuthRules(max_failures=5, max_delay=15.0)


@pytest.mark.parametrize(
    ("ip", "network"),
    [
        ("203.0.113.7", "203.0.113.7/32"),
        ("203.0.113.8", "203.0.113.8/32"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7/32"),
        ("::1", "::/64"),
        ("unknown", "unknown"),
    ],
)
def test_client_network(ip: str, network: str) -> None:
    assert client_network(ip) == network


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(-1, 0.0), (0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 15.0), (10**9, 15.0)],
)
def test_failure_delay_doubles_up_to_the_bound(failures: int, delay: float) -> None:
    assert failure_delay(failures, 15.0) == delay


def test_no_delay_when_turned_off() -> None:
    assert failure_delay(7, 0.0) == 0.0


def test_a_clean_history_tries_at_once() -> None:
    assert decide(AuthHistory(), RULES) == AuthDecision(refused=False, delay=0.0, reason="clear")


def test_the_guessing_network_is_refused_at_max_failures() -> None:
    assert not decide(AuthHistory(network_failures=4), RULES).refused
    assert decide(AuthHistory(network_failures=5), RULES) == AuthDecision(
        refused=True, delay=0.0, reason="throttled"
    )


def test_a_users_failures_from_anywhere_slow_tries_from_unknown_networks() -> None:
    decision = decide(AuthHistory(user_failures=3, own_failures=0), RULES)
    assert decision == AuthDecision(refused=False, delay=4.0, reason="slowed")
    assert decide(AuthHistory(user_failures=10_000), RULES).delay == 15.0


def test_a_known_network_is_never_refused_and_waits_only_for_its_own_failures() -> None:
    history = AuthHistory(network_failures=1000, user_failures=1000, own_failures=0, known=True)
    assert decide(history, RULES) == AuthDecision(refused=False, delay=0.0, reason="known")
    history = AuthHistory(network_failures=1000, user_failures=1000, own_failures=2, known=True)
    assert decide(history, RULES) == AuthDecision(refused=False, delay=2.0, reason="known")


@given(
    network=st.integers(0, 10**6),
    user=st.integers(0, 10**6),
    own=st.integers(0, 10**6),
    known=st.booleans(),
    max_failures=st.integers(1, 100),
    max_delay=st.floats(0, 3600),
)
def test_decisions_are_bounded(
    network: int, user: int, own: int, known: bool, max_failures: int, max_delay: float
) -> None:
    rules = AuthRules(max_failures=max_failures, max_delay=max_delay)
    decision = decide(AuthHistory(network, user, own, known), rules)
    assert 0.0 <= decision.delay <= max_delay
    assert decision.refused == (not known and network >= max_failures)
    if decision.refused:
        assert decision.delay == 0.0
