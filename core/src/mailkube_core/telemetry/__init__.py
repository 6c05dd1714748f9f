"""Telemetry every Mailkube process shares: logs, traces, metrics and the health endpoints.

Typical start of a process::

    setup_logging("smtp-gateway", settings.log_level, settings.log_format)
    telemetry = setup_telemetry("smtp-gateway")
    health = HealthServer()
    health.add_readiness_check("redis", redis_ping)
    await health.start(host, port)
    ...
    await health.stop()
    await telemetry.shutdown()

The queue stores ``inject_trace_context()`` in each message envelope; the delivery worker starts
its span with ``context=extract_trace_context(envelope_headers)`` so one trace runs from SMTP
acceptance to final delivery.
"""

from .bootstrap import DEFAULT_VERSION, Telemetry, setup_telemetry
from .checks import Check
from .health import HealthServer
from .logs import setup_logging
from .propagation import extract_trace_context, inject_trace_context
from .providers import span_ids_only, spans_exported
from .tally import Tally

__all__ = [
    "DEFAULT_VERSION",
    "Check",
    "HealthServer",
    "Tally",
    "Telemetry",
    "extract_trace_context",
    "inject_trace_context",
    "setup_logging",
    "setup_telemetry",
    "span_ids_only",
    "spans_exported",
]
