"""rotation.advance: the staged DKIM rollover as a pure function of state, spec and time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailkube_operator import rotation
from mailkube_operator.models import DkimSpec
from mailkube_operator.rotation import Generation, RotationState, Step, advance

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def spec(**fields: Any) -> DkimSpec:
    return DkimSpec.model_validate({"selector": "mk", **fields})


def published(answer: str | None) -> Callable[[Generation], rotation.Wait | None]:
    return lambda _gen: None if answer is None else rotation.Wait(answer)


def keys_of(step: Step) -> list[str]:
    return [w.data_key for w in step.needed]


def test_no_rotation_configured_leaves_the_legacy_rules() -> None:
    step = advance(None, spec(), data_keys={"mk.rsa-sha256"}, now=T0, requested=False,
                   published=published(None))  # fmt: skip
    assert step.state is None
    assert step.condition is None


def test_a_scheduled_rotation_lists_first_signs_after_publication_then_retires() -> None:
    dkim = spec(rotation={"every": "180d", "overlap": "7d"})
    data = {"mk.rsa-sha256"}
    step = advance(None, dkim, data_keys=data, now=T0, requested=False, published=published(None))
    assert step.state is not None
    assert step.state.active == Generation(selector="mk", base="mk", algorithm="rsa-2048",
                                           since=T0)  # fmt: skip
    assert step.state.next is None
    assert step.events == []
    assert step.condition is not None
    assert (step.condition.status, step.condition.reason) == ("False", "Scheduled")
    assert step.due == T0 + 180 * DAY
    state = step.state

    # not due yet: nothing moves
    early = advance(state, dkim, data_keys=data, now=T0 + 179 * DAY, requested=False,
                    published=published(None))  # fmt: skip
    assert early.state == state

    # due: the next key is made and listed, but does not sign while unpublished
    at = T0 + 180 * DAY
    started = advance(state, dkim, data_keys=data, now=at, requested=False,
                      published=published("the DNS check finds mk-2._domainkey"))  # fmt: skip
    assert started.state is not None
    assert started.state.active.selector == "mk"
    assert started.state.next is not None
    assert started.state.next.selector == "mk-2"
    assert keys_of(started) == ["mk.rsa-sha256", "mk-2.rsa-sha256"]
    assert [r for r, _ in started.events] == ["DKIMRotationStarted"]
    assert started.condition is not None
    assert started.condition.reason == "WaitingForPublication"
    assert "mk-2._domainkey" in started.condition.message
    state = started.state
    data = {"mk.rsa-sha256", "mk-2.rsa-sha256"}

    waiting = advance(state, dkim, data_keys=data, now=at + DAY, requested=False,
                      published=published("the DNS check finds mk-2._domainkey"))  # fmt: skip
    assert waiting.state == state
    assert waiting.events == []
    assert waiting.due is None  # the DNS check's finding will ask again, no timer

    timed = advance(state, dkim, data_keys=data, now=at + DAY, requested=False,
                    published=lambda _gen: rotation.Wait("a time", at + 3 * DAY))  # fmt: skip
    assert timed.due == at + 3 * DAY

    # published: the new key signs, the old one retires for the overlap
    switched = advance(state, dkim, data_keys=data, now=at + 2 * DAY, requested=False,
                       published=published(None))  # fmt: skip
    assert switched.state is not None
    assert switched.state.active.selector == "mk-2"
    assert switched.state.active.since == at + 2 * DAY
    assert [g.selector for g in switched.state.retiring] == ["mk"]
    assert [r for r, _ in switched.events] == ["DKIMKeySwitched"]
    assert switched.remove == []
    assert switched.condition is not None
    assert switched.condition.reason == "Overlap"
    assert switched.due == at + 9 * DAY
    state = switched.state

    overlap = advance(state, dkim, data_keys=data, now=at + 8 * DAY, requested=False,
                      published=published(None))  # fmt: skip
    assert overlap.remove == []

    retired = advance(state, dkim, data_keys=data, now=at + 9 * DAY, requested=False,
                      published=published(None))  # fmt: skip
    assert retired.remove == ["mk.rsa-sha256"]
    assert [r for r, _ in retired.events] == ["DKIMKeyRetired"]
    assert retired.state is not None
    assert retired.state.retiring == []
    assert keys_of(retired) == ["mk-2.rsa-sha256"]
    assert retired.due == at + 2 * DAY + 180 * DAY


def test_the_annotation_starts_a_rotation_once() -> None:
    dkim = spec(algorithm="both")
    data = {"mk.rsa-sha256", "mk-ed25519.ed25519-sha256"}
    step = advance(None, dkim, data_keys=data, now=T0, requested=True, published=published("x"))
    assert step.annotation_handled
    assert step.state is not None
    assert step.state.next is not None
    assert step.state.next.selectors() == ["mk-2", "mk-2-ed25519"]
    assert [r for r, _ in step.events] == ["DKIMRotationStarted"]

    again = advance(step.state, dkim, data_keys=data, now=T0, requested=True,
                    published=published("x"))  # fmt: skip
    assert again.state == step.state
    assert [r for r, _ in again.events] == ["DKIMRotationInProgress"]


def test_a_spec_change_is_staged_and_replaces_a_pending_key() -> None:
    state = RotationState(active=Generation(selector="mk", base="mk", algorithm="rsa-2048",
                                            since=T0))  # fmt: skip
    dkim = spec(selector="y2026", rotation={})
    step = advance(state, dkim, data_keys={"mk.rsa-sha256"}, now=T0, requested=False,
                   published=published("x"))  # fmt: skip
    assert step.state is not None
    assert step.state.active.selector == "mk"  # still signing
    assert step.state.next is not None
    assert step.state.next.selector == "y2026"

    # changed again before it was published: the unpublished key goes, another is made
    ed = spec(selector="y2026", algorithm="ed25519", rotation={})
    data = {"mk.rsa-sha256", "y2026.rsa-sha256"}
    replaced = advance(step.state, ed, data_keys=data, now=T0, requested=False,
                       published=published("x"))  # fmt: skip
    assert replaced.remove == ["y2026.rsa-sha256"]
    assert replaced.state is not None
    assert replaced.state.next is not None
    assert (replaced.state.next.selector, replaced.state.next.algorithm) == ("y2026", "ed25519")
    assert keys_of(replaced) == ["mk.rsa-sha256", "y2026.ed25519-sha256"]


def test_an_algorithm_change_gets_a_new_selector() -> None:
    state = RotationState(active=Generation(selector="mk", base="mk", algorithm="rsa-2048",
                                            since=T0))  # fmt: skip
    step = advance(state, spec(algorithm="ed25519", rotation={}), data_keys={"mk.rsa-sha256"},
                   now=T0, requested=False, published=published("x"))  # fmt: skip
    assert step.state is not None
    assert step.state.next is not None
    # the same name would hold two records of different keys
    assert step.state.next.selector == "mk-2"


def test_rotated_selectors_stay_one_dns_label() -> None:
    long = "s" * 55
    state = RotationState(active=Generation(selector=long, base=long, algorithm="both",
                                            since=T0))  # fmt: skip
    step = advance(state, spec(selector=long, algorithm="both"), data_keys=set(), now=T0,
                   requested=True, published=published("x"))  # fmt: skip
    assert step.state is not None
    assert step.state.next is not None
    assert all(len(s) <= 63 for s in step.state.next.selectors())
    assert step.state.next.selector.endswith("-2")


def test_the_state_round_trips_through_the_secret() -> None:
    state = RotationState(
        active=Generation(selector="mk-2", base="mk", algorithm="ed25519", since=T0),
        retiring=[Generation(selector="mk", base="mk", algorithm="rsa-2048", since=T0)],
    )
    assert rotation.load_state({rotation.STATE_KEY: state.dump()}) == state
    assert rotation.load_state({rotation.STATE_KEY: "not json"}) is None
    assert rotation.load_state({}) is None


@pytest.mark.parametrize(
    ("listed", "dns_check", "now", "expected"),
    [
        (False, False, T0 + DAY, "its records are listed in status"),
        (True, False, T0, "propagationDelay"),
        (True, False, T0 + timedelta(hours=1), None),
        (True, True, T0 + DAY, "the DNS check finds mk-2._domainkey.example.org."),
    ],
)
def test_propagation_wait(
    listed: bool, dns_check: bool, now: datetime, expected: str | None
) -> None:
    gen = Generation(selector="mk-2", base="mk", algorithm="rsa-2048", since=T0)
    wait = rotation.propagation_wait(
        gen, now=now, rotation=None, listed=listed, dns_check=dns_check,
        dns_missing=lambda selectors: [f"{s}._domainkey.example.org." for s in selectors],
    )  # fmt: skip
    if expected is None:
        assert wait is None
    else:
        assert wait is not None
        assert expected in wait.message


@pytest.mark.parametrize("every", ["0s", "soon", "7"])
def test_a_rotation_period_must_be_a_positive_duration(every: str) -> None:
    with pytest.raises(ValueError, match="every"):
        spec(rotation={"every": every})
