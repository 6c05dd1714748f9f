"""Telemetry bootstrap: JSON logs, providers, the health/metrics HTTP server, trace propagation.

The HTTP tests talk to a real HealthServer over real sockets on 127.0.0.1; every wait is bounded
by a deadline (asyncio.timeout), never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME
from opentelemetry.sdk.trace import ReadableSpan
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mailkube_core.telemetry import (
    HealthServer,
    Telemetry,
    extract_trace_context,
    inject_trace_context,
    setup_logging,
    setup_telemetry,
)
from mailkube_core.telemetry.providers import (
    build_meter_provider,
    build_resource,
    build_tracer_provider,
    otlp_configured,
)

OTLP_ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)
DEADLINE = 5.0
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored to its previous handlers and level afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    srv = HealthServer(check_timeout=0.2, request_timeout=0.5)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop()


# -- helpers -------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def send_raw(port: int, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes (or resets) the connection."""
    chunks: list[bytes] = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(DEADLINE):  # the server must close within the deadline
            try:
                writer.write(data)
                await writer.drain()
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
            except (ConnectionResetError, BrokenPipeError):
                pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return b"".join(chunks)


def parse(raw: bytes) -> Reply:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:200]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body) or not body
    return Reply(int(status), headers, body)


async def get(port: int, path: str, method: str = "GET") -> Reply:
    request = f"{method} {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: t\r\n\r\n".encode()
    return parse(await send_raw(port, request))


def json_lines(err: str) -> list[dict[str, object]]:
    lines = [line for line in err.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


class Unserialisable:
    def __str__(self) -> str:
        return "<unserialisable thing>"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    __repr__ = __str__


# -- logs ----------------------------------------------------------------------------------


def test_json_line_has_fields_extras_and_trace_ids(
    telemetry: Telemetry, root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("gateway", "DEBUG", "json")
    log = logging.getLogger("mailkube.test")
    with telemetry.tracer.start_as_current_span("op") as span:
        log.info(
            "queued %s", "abc", extra={"queue_id": "q1", "attempt": 3, "obj": Unserialisable()}
        )
    context = span.get_span_context()

    [record] = json_lines(capsys.readouterr().err)
    assert TS.fullmatch(str(record["ts"]))
    assert record["level"] == "INFO"
    assert record["logger"] == "mailkube.test"
    assert record["msg"] == "queued abc"
    assert record["service"] == "gateway"
    assert record["trace_id"] == f"{context.trace_id:032x}"
    assert record["span_id"] == f"{context.span_id:016x}"
    assert record["queue_id"] == "q1"
    assert record["attempt"] == 3
    assert record["obj"] == "<unserialisable thing>"
    assert "exc" not in record


def test_json_line_outside_span_and_with_exception(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("worker")
    log = logging.getLogger("mailkube.test")
    log.debug("below the level")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("delivery failed")

    [record] = json_lines(capsys.readouterr().err)
    assert record["level"] == "ERROR"
    assert record["msg"] == "delivery failed"
    assert "trace_id" not in record
    assert "span_id" not in record
    exc = str(record["exc"])
    assert exc.startswith("Traceback (most recent call last):")
    assert exc.endswith("ValueError: boom")


def test_odd_extras_and_bad_arguments_never_crash(
    root_logger: logging.Logger,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = root_logger.handlers[:]
    setup_logging("worker")
    # pytest's own capture handler re-raises on bad arguments (on purpose): leave only ours
    monkeypatch.setattr(
        root_logger, "handlers", [h for h in root_logger.handlers if h not in before]
    )
    log = logging.getLogger("mailkube.test")
    circular: list[object] = [1]
    circular.append(circular)
    log.warning(
        "odd",
        extra={
            "circular": circular,
            "tuple_keys": {(1, 2): "x"},
            "nan": math.nan,
            "unprintable": Unprintable(),
            "service": "not the service",
            "level": 42,
            "nested": {"ok": [1, "two", None]},
        },
    )
    log.warning("%d messages", "many")

    err = capsys.readouterr().err
    assert "Logging error" not in err
    first, second = json_lines(err)
    assert first["msg"] == "odd"
    assert first["service"] == "worker"
    assert first["level"] == "WARNING"
    assert first["extra_service"] == "not the service"
    assert first["extra_level"] == 42
    assert first["circular"] == "[1, [...]]"
    assert first["tuple_keys"] == "{(1, 2): 'x'}"
    assert first["nan"] == "nan"
    assert first["unprintable"] == "<unprintable Unprintable>"
    assert first["nested"] == {"ok": [1, "two", None]}
    assert str(second["msg"]).startswith("%d messages <bad log arguments:")


def test_text_format_is_one_readable_line(
    telemetry: Telemetry, root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("gateway", "info", "text")
    with telemetry.tracer.start_as_current_span("op") as span:
        logging.getLogger("mailkube.smtp").info(
            "accepted", extra={"queue_id": "q1", "note": "two words"}
        )

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    line = lines[0]
    ts, rest = line.split(" ", 1)
    assert TS.fullmatch(ts)
    assert rest.startswith("INFO     mailkube.smtp: accepted ")
    assert " queue_id=q1" in line
    assert ' note="two words"' in line
    assert f" trace_id={span.get_span_context().trace_id:032x}" in line


def test_setup_logging_is_idempotent(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("a", fmt="text")
    setup_logging("b", "WARNING", "json")
    log = logging.getLogger("mailkube.test")
    log.info("dropped")
    log.warning("kept")

    [record] = json_lines(capsys.readouterr().err)
    assert record["msg"] == "kept"
    assert record["service"] == "b"


def test_setup_logging_rejects_unknown_level(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("a", "LOUD")


# -- providers -----------------------------------------------------------------------------


def test_setup_telemetry_once_per_process(telemetry: Telemetry) -> None:
    assert setup_telemetry("mailkube-test") is telemetry
    assert setup_telemetry("someone-else") is telemetry
    assert trace.get_tracer_provider() is telemetry.tracer_provider
    assert telemetry.tracer_provider.resource.attributes[SERVICE_NAME] == "mailkube-test"
    with telemetry.tracer.start_as_current_span("op") as span:
        assert span.get_span_context().is_valid  # ids even without an exporter


def test_otlp_configured_by_generic_or_signal_endpoint() -> None:
    assert not otlp_configured("traces", {})
    assert not otlp_configured("traces", {"OTEL_EXPORTER_OTLP_ENDPOINT": " "})
    assert otlp_configured("traces", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert otlp_configured("metrics", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert otlp_configured("traces", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/v1/traces"})
    assert not otlp_configured(
        "metrics", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/v1/traces"}
    )


class _Collector(BaseHTTPRequestHandler):
    received: list[str]
    arrived: threading.Condition

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
        with self.arrived:
            self.received.append(self.path)
            self.arrived.notify_all()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def otlp_collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Collector]]:
    handler = type("Collector", (_Collector,), {"received": [], "arrived": threading.Condition()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for name in OTLP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{httpd.server_port}")
    try:
        yield handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(DEADLINE)


async def test_otlp_export_when_endpoint_set(otlp_collector: type[_Collector]) -> None:
    registry = CollectorRegistry()
    resource = build_resource("otlp-test", "0")
    tel = Telemetry(
        "otlp-test",
        "0",
        build_tracer_provider(resource),
        build_meter_provider(resource, registry=registry),
    )
    with tel.tracer.start_as_current_span("exported"):
        pass
    tel.meter.create_counter("otlp_test_events").add(1)
    await tel.shutdown()  # flushes: one POST per signal

    with otlp_collector.arrived:
        assert otlp_collector.arrived.wait_for(
            lambda: {"/v1/traces", "/v1/metrics"} <= set(otlp_collector.received),
            timeout=DEADLINE,
        ), otlp_collector.received


async def test_shutdown_twice_unregisters_prometheus_collector() -> None:
    registry = CollectorRegistry()
    resource = build_resource("private", "0")
    tel = Telemetry(
        "private",
        "0",
        build_tracer_provider(resource, environ={}),
        build_meter_provider(resource, environ={}, registry=registry),
    )
    tel.meter.create_counter("private_events").add(2)
    assert b"private_events_total" in generate_latest(registry)

    await asyncio.gather(tel.shutdown(), tel.shutdown())
    await tel.shutdown()
    assert tel.closed
    assert b"private_events_total" not in generate_latest(registry)


# -- health server -------------------------------------------------------------------------


async def test_metrics_shows_counter(telemetry: Telemetry, server: HealthServer) -> None:
    counter = telemetry.meter.create_counter("mailkube_test_events", description="test")
    counter.add(2, {"kind": "probe"})
    counter.add(1, {"kind": "probe"})

    reply = await get(server.port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == CONTENT_TYPE_LATEST
    text = reply.body.decode()
    samples = [line for line in text.splitlines() if line.startswith("mailkube_test_events_total{")]
    assert len(samples) == 1, text
    assert 'kind="probe"' in samples[0]
    assert samples[0].endswith(" 3.0")


async def test_healthz(server: HealthServer) -> None:
    reply = await get(server.port, "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert reply.headers["connection"] == "close"

    alive = False
    server.add_liveness_check("event-loop", lambda: alive)
    reply = await get(server.port, "/healthz")
    assert reply.status == 503
    assert b"event-loop: returned False" in reply.body
    alive = True
    assert (await get(server.port, "/healthz")).status == 200


async def test_readyz_follows_checks(server: HealthServer) -> None:
    assert (await get(server.port, "/readyz")).status == 200  # nothing to wait for

    redis_up = False
    routing = asyncio.Event()

    async def routing_loaded() -> bool:
        return routing.is_set()

    server.add_readiness_check("redis", lambda: redis_up)
    server.add_readiness_check("routing", routing_loaded)
    reply = await get(server.port, "/readyz")
    assert reply.status == 503
    assert reply.body == b"not ready\nredis: returned False\nrouting: returned False\n"

    redis_up = True
    reply = await get(server.port, "/readyz")
    assert reply.status == 503
    assert reply.body == b"not ready\nrouting: returned False\n"

    routing.set()
    reply = await get(server.port, "/readyz")
    assert (reply.status, reply.body) == (200, b"ok\n")


async def test_readyz_counts_raising_and_hanging_checks_as_failing(server: HealthServer) -> None:
    def broken() -> bool:
        raise ConnectionError("redis down")

    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    server.add_readiness_check("broken", broken)
    server.add_readiness_check("hangs", hangs)
    reply = await get(server.port, "/readyz")
    assert reply.status == 503
    assert b"broken: raised ConnectionError\n" in reply.body
    assert b"hangs: timed out after 0.2s\n" in reply.body

    server.remove_readiness_check("broken")
    server.remove_readiness_check("hangs")
    assert (await get(server.port, "/readyz")).status == 200


async def test_unknown_path_and_method(server: HealthServer) -> None:
    assert (await get(server.port, "/nope")).status == 404
    assert (await get(server.port, "/metrics/extra")).status == 404
    reply = await get(server.port, "/healthz", method="POST")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    assert (await get(server.port, "/readyz?verbose=1")).status == 200


async def test_head_has_headers_only(server: HealthServer) -> None:
    reply = await get(server.port, "/healthz", method="HEAD")
    assert reply.status == 200
    assert reply.headers["content-length"] == "3"
    assert reply.body == b""


@pytest.mark.parametrize(
    ("junk", "status"),
    [
        pytest.param(b"A" * 10 * 1024, 414, id="10KiB-without-newline"),
        pytest.param(b"\x00\xff\x13\x87binary junk\r\n\r\n", 400, id="binary-line"),
        pytest.param(b"GET /healthz\r\n\r\n", 400, id="no-version"),
        pytest.param(b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 6000, 431, id="endless-headers"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nX-Long: " + b"y" * 9000, 431, id="long-header"),
        pytest.param(b"GET /he", None, id="silent-after-partial-line"),
        pytest.param(b"", None, id="silent"),
    ],
)
async def test_garbage_is_closed_and_server_survives(
    server: HealthServer, junk: bytes, status: int | None
) -> None:
    raw = await send_raw(server.port, junk)  # raises TimeoutError if never closed
    if status is not None and raw:  # the answer may be lost to a reset: unread junk remained
        assert parse(raw).status == status
    if status is None:  # the request timed out: 408, or nothing at all
        assert raw == b"" or parse(raw).status == 408

    reply = await get(server.port, "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")


async def test_client_hanging_up_early_does_not_hurt(server: HealthServer) -> None:
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metr")
        writer.close()
        await writer.wait_closed()
    assert (await get(server.port, "/healthz")).status == 200


async def test_all_addresses_port_zero_and_stop() -> None:
    srv = HealthServer()
    await srv.start(None, 0)
    port = srv.port
    assert port > 0
    try:
        assert (await get(port, "/healthz")).status == 200
    finally:
        await srv.stop()
        await srv.stop()
    assert not srv.running
    with pytest.raises(ConnectionRefusedError):
        async with asyncio.timeout(DEADLINE):
            await asyncio.open_connection("127.0.0.1", port)


async def test_port_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = HealthServer().port


# -- propagation ---------------------------------------------------------------------------


def test_inject_extract_round_trip_keeps_trace(telemetry: Telemetry) -> None:
    tracer = telemetry.tracer
    with tracer.start_as_current_span("smtp session") as parent:
        carrier = inject_trace_context()
    parent_context = parent.get_span_context()
    version, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert (version, trace_id, span_id) == (
        "00",
        f"{parent_context.trace_id:032x}",
        f"{parent_context.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled (1.45 also sets the W3C "random trace id" bit, 0x02)
    envelope = json.loads(json.dumps(carrier))  # as stored in the queue

    # the consumer's own span is current, but the envelope's context is the parent
    with (
        tracer.start_as_current_span("poll loop"),
        tracer.start_as_current_span("deliver", context=extract_trace_context(envelope)) as child,
    ):
        pass
    assert isinstance(child, ReadableSpan)
    assert child.get_span_context().trace_id == parent_context.trace_id
    assert child.parent is not None
    assert child.parent.span_id == parent_context.span_id


def test_no_span_no_context(telemetry: Telemetry) -> None:
    assert inject_trace_context() == {}
    with telemetry.tracer.start_as_current_span("root", context=extract_trace_context({})) as a:
        pass
    junk = {"traceparent": "00-zzzz-not-a-trace-01"}
    with telemetry.tracer.start_as_current_span("root", context=extract_trace_context(junk)) as b:
        pass
    assert isinstance(a, ReadableSpan)
    assert isinstance(b, ReadableSpan)
    assert a.parent is None
    assert b.parent is None
    assert a.get_span_context().trace_id != b.get_span_context().trace_id


def test_a_tally_exports_the_cumulative_sum_of_each_attribute_set() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from mailkube_core.telemetry import Tally

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    tally = Tally(provider.get_meter("t"), "t.messages", unit="{message}", description="d")

    def exported() -> dict[tuple[tuple[str, str], ...], tuple[int, bool]]:
        data = reader.get_metrics_data()
        assert data is not None
        (metric,) = data.resource_metrics[0].scope_metrics[0].metrics
        assert metric.name == "t.messages"
        return {
            tuple(sorted(point.attributes.items())): (point.value, metric.data.is_monotonic)
            for point in metric.data.data_points
        }

    tally.add(1, {"listener": "mx", "outcome": "queued"})
    tally.add(2, {"listener": "mx", "outcome": "queued"})
    tally.add(1, {"listener": "submission", "outcome": "queued"})
    assert exported() == {
        (("listener", "mx"), ("outcome", "queued")): (3, True),
        (("listener", "submission"), ("outcome", "queued")): (1, True),
    }
    tally.add(1, {"listener": "mx", "outcome": "queued"})
    assert exported()[(("listener", "mx"), ("outcome", "queued"))] == (4, True)
    assert tally.value({"listener": "mx", "outcome": "queued"}) == 4
    provider.shutdown()


def test_the_provider_says_whether_any_span_processor_sees_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway records its session spans only when someone sees them; it asks through
    the provider's public add_span_processor, not the SDK's private processor list."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from mailkube_core.telemetry import spans_exported
    from mailkube_core.telemetry.providers import ObservedTracerProvider

    for name in OTLP_ENV:
        monkeypatch.delenv(name, raising=False)
    provider = build_tracer_provider(build_resource("spans-test", "0"))
    assert isinstance(provider, ObservedTracerProvider)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    assert not spans_exported()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert spans_exported()

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    with_otlp = build_tracer_provider(build_resource("spans-test", "0"))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: with_otlp)
    assert spans_exported()
    with_otlp.shutdown()

    # someone else's provider: it cannot say, so spans are recorded
    foreign = TracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: foreign)
    assert spans_exported()


def test_span_ids_only_continues_the_parent_trace_or_starts_one() -> None:
    from mailkube_core.telemetry import span_ids_only

    parent = span_ids_only()
    child = span_ids_only(parent)
    parent_context, child_context = parent.get_span_context(), child.get_span_context()
    assert parent_context.is_valid
    assert child_context.is_valid
    assert child_context.trace_id == parent_context.trace_id
    assert child_context.span_id != parent_context.span_id
    assert not child.is_recording()
    # an invalid parent (no span) does not lend its zero trace id
    orphan = span_ids_only(trace.INVALID_SPAN)
    assert orphan.get_span_context().trace_id != 0
    assert span_ids_only().get_span_context().trace_id != parent_context.trace_id
