"""W3C trace context in and out of plain string mappings (queue message envelopes)."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import CarrierValT, Getter, Setter


class _DictSetter(Setter[dict[str, str]]):
    def set(self, carrier: dict[str, str], key: str, value: CarrierValT) -> None:
        carrier[key] = value if isinstance(value, str) else ",".join(value)


class _MappingGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_SETTER = _DictSetter()
_GETTER = _MappingGetter()


def inject_trace_context(context: Context | None = None) -> dict[str, str]:
    """The current (or given) context as propagation headers: ``traceparent``, and
    ``tracestate``/``baggage`` when there are any. Empty when no span is active."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context, setter=_SETTER)
    return carrier


def extract_trace_context(carrier: Mapping[str, str], context: Context | None = None) -> Context:
    """A context continuing the trace in ``carrier``, to pass as ``context=`` to
    ``tracer.start_as_current_span``.

    Built on ``context`` or, by default, on an empty context rather than the current one: a
    message whose envelope holds no (or a malformed) trace context starts a new trace instead of
    becoming a child of whatever span happens to be current in the consumer.
    """
    return propagate.extract(
        carrier, context=Context() if context is None else context, getter=_GETTER
    )
