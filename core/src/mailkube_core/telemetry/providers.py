"""Builds (but does not install) the OpenTelemetry tracer and meter providers.

- Traces: ids are always generated (log correlation, W3C propagation through the queue); spans
  are exported with OTLP/HTTP in batches only when an OTLP endpoint is configured.
- Metrics: always readable by Prometheus (the /metrics endpoint of HealthServer); also pushed
  with OTLP/HTTP periodically when an OTLP endpoint is configured.

The OTLP exporters read the rest of their configuration (headers, timeout, TLS, compression,
``OTEL_METRIC_EXPORT_INTERVAL``) from the standard ``OTEL_*`` environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_NAMESPACE, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from prometheus_client import REGISTRY, CollectorRegistry

Signal = Literal["traces", "metrics"]

_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
_SIGNAL_ENDPOINT_ENV: dict[Signal, str] = {
    "traces": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "metrics": "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
}


def otlp_configured(signal: Signal, environ: Mapping[str, str] = os.environ) -> bool:
    """True when the environment names an OTLP endpoint for ``signal`` (generic or specific)."""
    return bool(
        environ.get(_ENDPOINT_ENV, "").strip()
        or environ.get(_SIGNAL_ENDPOINT_ENV[signal], "").strip()
    )


def build_resource(service: str, version: str) -> Resource:
    """The process identity; ``OTEL_RESOURCE_ATTRIBUTES`` adds to it, never overrides these."""
    return Resource.create(
        {SERVICE_NAME: service, SERVICE_VERSION: version, SERVICE_NAMESPACE: "mailkube"}
    )


class ObservedTracerProvider(TracerProvider):
    """The SDK's provider, knowing whether a span processor was ever added to it (through
    the public `add_span_processor`): without one, a recorded span reaches no one."""

    has_processors = False

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.has_processors = True


def spans_exported() -> bool:
    """Whether spans started now reach a span processor (an OTLP exporter, or a test's);
    True when the installed provider is not ours and cannot say. Where they do not, a hot
    path may start only the ids of a span (trace.NonRecordingSpan), for logs and the queue's
    trace context, at a fraction of the cost."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, ObservedTracerProvider) or provider.has_processors


_ids = RandomIdGenerator()
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)


def span_ids_only(parent: trace.Span | None = None) -> trace.NonRecordingSpan:
    """A span that is only its ids, for where `spans_exported()` is False: a new span id in
    the parent's trace, or in a new trace. Logs and the queue's trace context carry it."""
    parent_context = parent.get_span_context() if parent is not None else None
    if parent_context is not None and parent_context.is_valid:
        trace_id = parent_context.trace_id
    else:
        trace_id = _ids.generate_trace_id()
    return trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=trace_id,
            span_id=_ids.generate_span_id(),
            is_remote=False,
            trace_flags=_SAMPLED,
        )
    )


def build_tracer_provider(
    resource: Resource, environ: Mapping[str, str] = os.environ
) -> ObservedTracerProvider:
    # shutdown is Telemetry.shutdown's job (it flushes first); no atexit hook of the SDK's own
    provider = ObservedTracerProvider(resource=resource, shutdown_on_exit=False)
    if otlp_configured("traces", environ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def build_meter_provider(
    resource: Resource,
    environ: Mapping[str, str] = os.environ,
    registry: CollectorRegistry = REGISTRY,
) -> MeterProvider:
    """Registers a Prometheus collector on ``registry`` (unregistered again at shutdown)."""
    readers: list[MetricReader] = [PrometheusMetricReader(registry=registry)]
    if otlp_configured("metrics", environ):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    return MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
