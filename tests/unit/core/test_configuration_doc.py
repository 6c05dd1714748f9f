"""docs/configuration.md is generated from the settings models; this fails when it is stale."""

from pathlib import Path

from mailkube_core.settings.reference import render

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_configuration_reference_matches_the_models() -> None:
    assert DOC.read_text() == render(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_is_documented() -> None:
    text = render()
    assert "| `max_message_size` | `MAILKUBE_MAX_MESSAGE_SIZE` | `26214400` |" in text
    assert "| `retry_intervals` | `MAILKUBE_RETRY_INTERVALS` | `5m,15m,30m,1h,4h,8h,1d` |" in text
    assert "|  |" not in text  # no setting without a meaning
