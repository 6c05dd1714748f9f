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

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_NAMESPACE, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
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


def build_tracer_provider(
    resource: Resource, environ: Mapping[str, str] = os.environ
) -> TracerProvider:
    # shutdown is Telemetry.shutdown's job (it flushes first); no atexit hook of the SDK's own
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
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
