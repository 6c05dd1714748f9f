"""Root-logger setup: one JSON object per line on stderr (or a readable line for humans).

Every record carries the service name, the current OpenTelemetry trace/span ids when a span is
active, and every ``extra=`` field of the log call. Formatting never raises: odd extras are
rendered with ``str`` (or a placeholder when even that fails).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

from opentelemetry import trace

LogFormat = Literal["json", "text"]

#: attributes every LogRecord has; anything else on a record came from ``extra=``
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
#: keys the formatter owns; an ``extra=`` field with one of these names gets an ``extra_`` prefix
_RESERVED = frozenset({"ts", "level", "logger", "msg", "service", "trace_id", "span_id", "exc"})


def setup_logging(service: str, level: str = "INFO", fmt: LogFormat = "json") -> None:
    """Send the root logger's records to stderr in ``fmt``, at ``level`` and above.

    Idempotent: handlers installed by an earlier call are replaced, handlers installed by
    anybody else are left alone. Raises ValueError for an unknown level or format.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(service)
    elif fmt == "text":
        formatter = TextFormatter(service)
    else:
        raise ValueError(f"unknown log format {fmt!r}, expected 'json' or 'text'")
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (so it follows redirections)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class _BaseFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The record as an ordered mapping: core fields, trace ids, extras, traceback."""
        out: dict[str, Any] = {
            "ts": _rfc3339(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": _message(record),
            "service": self.service,
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            out["trace_id"] = trace.format_trace_id(span_context.trace_id)
            out["span_id"] = trace.format_span_id(span_context.span_id)
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS:
                continue
            out[f"extra_{key}" if key in _RESERVED else key] = value
        exc = self._exception_text(record)
        if exc:
            out["exc"] = exc
        return out

    def _exception_text(self, record: logging.LogRecord) -> str:
        parts: list[str] = []
        try:
            if record.exc_info and record.exc_info[0] is not None:
                parts.append(self.formatException(record.exc_info))
            elif record.exc_text:
                parts.append(record.exc_text)
            if record.stack_info:
                parts.append(self.formatStack(record.stack_info))
        except Exception as error:  # a broken __str__ on the exception, for instance
            parts.append(f"<unformattable exception: {_safe_str(error)}>")
        return "\n".join(parts)


class JsonFormatter(_BaseFormatter):
    """One JSON object per record, no newlines inside (tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        data = self.fields(record)
        try:
            return _dumps(data)
        except (TypeError, ValueError, RecursionError):
            pass
        # some value cannot be encoded even via str (circular, non-str keys, NaN, ...):
        # encode field by field and fall back to str for the offenders
        safe: dict[str, Any] = {}
        for key, value in data.items():
            try:
                _dumps(value)
                safe[key] = value
            except (TypeError, ValueError, RecursionError):
                safe[key] = _safe_str(value)
        return _dumps(safe)


class TextFormatter(_BaseFormatter):
    """``<ts> <LEVEL> <logger>: <msg> key=value ...`` with the traceback on following lines."""

    def format(self, record: logging.LogRecord) -> str:
        data = self.fields(record)
        head = f"{data.pop('ts')} {data.pop('level'):<8} {data.pop('logger')}: {data.pop('msg')}"
        data.pop("service")
        exc = data.pop("exc", None)
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in data.items())
        line = f"{head} {pairs}" if pairs else head
        return f"{line}\n{exc}" if exc else line


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_safe_str, ensure_ascii=False, allow_nan=False)


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        try:
            return f"<unprintable {type(value).__qualname__}>"
        except Exception:
            return "<unprintable>"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception as error:  # e.g. log.info("%d", "x")
        return f"{_safe_str(record.msg)} <bad log arguments: {_safe_str(error)}>"


def _rfc3339(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else _safe_str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text
