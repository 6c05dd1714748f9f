"""Human-friendly units for settings: durations ("90s", "5m", "48h", "1h30m") and sizes
("25MiB", "26214400")."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
}  # fmt: skip


def parse_duration(value: Any) -> Any:
    """'1h30m' -> timedelta(hours=1, minutes=30); a bare number is seconds. Negative, infinite
    and overflowing values are refused. Anything but a number or a string goes to pydantic
    unchanged, so that its error names the field."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _seconds(float(value), value)
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        seconds = _sum_of_parts(text, value)
    return _seconds(seconds, value)


def _sum_of_parts(text: str, original: str) -> float:
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {original!r} (use e.g. 90s, 5m, 48h, 1h30m)")
    return total


def _seconds(seconds: float, original: object) -> timedelta:
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {original!r} (must be finite and not negative)")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"not a duration: {original!r} (too long)") from None


def parse_size(value: Any) -> Any:
    """'25MiB' -> 26214400; a bare number is bytes."""
    if not isinstance(value, str):
        return value
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 26214400, 25MiB, 100KiB)")
    unit = (match.group(2) or "b").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
