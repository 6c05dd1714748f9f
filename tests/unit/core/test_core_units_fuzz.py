"""Fuzz targets for the settings' unit parsers: any text is either refused with ValueError
(which pydantic turns into a one-line settings error) or parsed to a sane value."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from mailkube_core.settings import format_duration, parse_duration, parse_size
from mailkube_core.settings.loader import SettingsError, load_settings
from mailkube_core.settings.models import GatewaySettings

TEXT = st.one_of(st.text(max_size=30), st.from_regex(r"-?[0-9.e]{0,8}[a-z]{0,3}", fullmatch=True))


@given(TEXT)
def test_parse_duration_refuses_or_gives_a_non_negative_duration(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError:
        return
    assert isinstance(value, timedelta)
    assert value >= timedelta(0)


@given(st.integers(min_value=0, max_value=10**7))
def test_format_duration_round_trips_whole_seconds(seconds: int) -> None:
    delta = timedelta(seconds=seconds)
    assert parse_duration(format_duration(delta)) == delta


@given(TEXT)
def test_parse_size_refuses_or_gives_a_non_negative_int(text: str) -> None:
    try:
        value = parse_size(text)
    except ValueError:
        return
    assert isinstance(value, int)
    assert value >= 0


@given(st.dictionaries(st.sampled_from(["MAILKUBE_READ_TIMEOUT", "MAILKUBE_MAX_MESSAGE_SIZE",
                                        "MAILKUBE_MX_LISTEN", "MAILKUBE_TRUSTED_PROXIES"]),
                       st.text(max_size=20)))  # fmt: skip
def test_any_environment_loads_or_fails_with_one_line_per_field(env: dict[str, str]) -> None:
    try:
        load_settings(GatewaySettings, environ={"MAILKUBE_HOSTNAME": "mx.test", **env})
    except SettingsError as exc:
        lines = str(exc).splitlines()
        assert lines
        assert all(line.startswith("invalid setting") for line in lines)
