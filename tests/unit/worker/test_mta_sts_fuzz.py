"""Fuzzing the MTA-STS parsers (like chasquid's sts fuzz test): random text and valid
policies mutated byte by byte are either refused with PolicyError or give a policy that
holds together; nothing else ever escapes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailkube_worker.tlspolicy.mta_sts import (
    MAX_AGE_LIMIT,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_record,
)

VALID = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.com\r\nmx: *.example.net\r\n" \
        "max_age: 86400\r\n"  # fmt: skip
LINES = st.sampled_from([
    "version: STSv1", "mode: enforce", "mode: testing", "mode: none", "mx: a.example",
    "mx: *.example", "max_age: 0", "max_age: 31557600", "mode:", "x: y", ":", "", " ",
])  # fmt: skip


def _check(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicyError:
        return
    assert policy.mode in ("enforce", "testing", "none")
    assert 0 <= policy.max_age <= MAX_AGE_LIMIT
    assert policy.mode == "none" or policy.mx
    assert parse_policy(policy.to_text()) == policy


@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    _check(text)


@given(st.lists(LINES, max_size=12), st.sampled_from(["\n", "\r\n"]))
def test_shuffled_valid_lines(lines: list[str], newline: str) -> None:
    _check(newline.join(lines))


@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6))
def test_mutated_valid_policy(mutations: list[tuple[int, int]]) -> None:
    data = bytearray(VALID.encode())
    for position, value in mutations:
        data[position % len(data)] = value
    _check(data.decode("utf-8", "replace"))


@given(st.lists(st.text(max_size=60), max_size=4))
def test_random_records(strings: list[str]) -> None:
    try:
        record = parse_record(strings)
    except PolicyError:
        return
    assert 1 <= len(record.id) <= 32
    assert record.id.isalnum()


@given(st.text(max_size=40), st.text(max_size=40))
def test_mx_matching_never_raises(pattern: str, host: str) -> None:
    assert mx_matches(pattern, host) in (True, False)
