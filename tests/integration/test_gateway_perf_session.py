"""What the session does to be cheap per connection, checked against what it replaces: it sets
aiosmtpd's state itself (no method scans per connection), dispatches from one table per class,
re-arms the idle timer by moving a deadline, and records the session span only when a span
processor would see it."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from aiosmtpd.smtp import SMTP
from conditions import eventually
from gateway_harness import ALICE, RawClient, message, running_gateway
from opentelemetry import trace

from mailkube_gateway.listeners import BACKLOG
from mailkube_gateway.session import IDENT, GatewaySMTP

#: aiosmtpd state the gateway deliberately leaves empty: AUTH, handler hooks (PROXY included)
#: and command dispatch are the session's own
NOT_AIOSMTPD = {"_auth_methods", "_handle_hooks", "_smtp_methods", "event_handler"}


class _NoHooks:
    pass


async def test_the_session_sets_the_state_aiosmtpd_would(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gateway:
        settings = gateway.app.settings
        for spec in gateway.app.specs:
            ours = GatewaySMTP(gateway.app.gateway, spec)
            theirs = SMTP(
                _NoHooks(),
                data_size_limit=settings.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=settings.hostname,
                ident=IDENT,
                tls_context=ours.tls_context,
                require_starttls=spec.require_tls,
                timeout=settings.read_timeout.total_seconds(),
                auth_required=spec.auth_required,
                auth_require_tls=True,
                loop=asyncio.get_running_loop(),
            )
            missing = set(vars(theirs)) - set(vars(ours))
            assert missing == set(), f"aiosmtpd sets {missing}, the session does not"
            for name, value in vars(theirs).items():
                if name in NOT_AIOSMTPD or name.startswith("_stream") or name in (
                    "_loop", "_closed", "_over_ssl", "_strong_reader", "_reject_connection",
                    "_client_connected_cb", "_drain_waiters", "_paused", "_connection_lost",
                    "_task", "_source_traceback", "command_size_limits",
                ):  # fmt: skip
                    continue
                assert bool(getattr(ours, name)) == bool(value), name
                if not isinstance(value, (asyncio.AbstractEventLoop, type(None), bool)):
                    assert getattr(ours, name) == value, name
            # the session's line limit for the stream (aiosmtpd's constructor uses the class's)
            reader = ours._stream_reader
            assert reader._limit == GatewaySMTP.line_length_limit  # type: ignore[union-attr]
            expected = {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY"}
            assert set(ours._commands) >= expected | {"HELP", "STARTTLS", "AUTH", "EXPN"}


async def test_help_lists_what_the_listener_offers(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gateway:
        mx = await RawClient.connect(gateway.mx)
        await mx.command("EHLO client.test")
        reply = await mx.command("HELP")
        assert reply.startswith("250 2.0.0 Supported commands: ")
        offered = set(reply.split(": ", 1)[1].split())
        assert {"EHLO", "MAIL", "RCPT", "DATA", "STARTTLS"} <= offered
        assert "AUTH" not in offered  # not on MX without auth_on_mx
        assert (await mx.command("FROB")).startswith("500")
        await mx.close()
        submission = await RawClient.connect(gateway.submission)
        await submission.command("EHLO client.test")
        # RFC 3207: only EHLO, NOOP, QUIT and STARTTLS before TLS on submission
        assert (await submission.command("HELP")).startswith("530")
        await submission.close()


async def test_an_active_client_is_not_timed_out_and_an_idle_one_is(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path, read_timeout="1s") as gateway:
        client = await RawClient.connect(gateway.mx)
        await client.command("EHLO client.test")
        # busy for three times the read timeout: every command moves the deadline
        for _ in range(6):
            assert (await client.command("NOOP")).startswith("250")
            await asyncio.sleep(0.5)  # the client's pace, not a wait for the server
        # then idle: 421 after about a second
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await client.reply(timeout=10)).startswith("421 4.4.2")
        assert loop.time() - started < 5
        assert await client.closed()


async def test_messages_continue_the_session_trace_with_or_without_an_exporter(
    redis_url: str, tmp_path: Path, telemetry: object
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    async with running_gateway(redis_url, tmp_path) as gateway:
        # no span processor: the session span is ids only, the message span is its child
        await _send(gateway.mx)
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        await _send(gateway.mx)

        async def exported() -> bool:
            names = {span.name for span in exporter.get_finished_spans()}
            return {"smtp.session", "smtp.message"} <= names

        await eventually(exported)
        spans = {span.name: span for span in exporter.get_finished_spans()}
        session, msg = spans["smtp.session"], spans["smtp.message"]
        assert msg.parent is not None
        assert msg.parent.span_id == session.context.span_id
        messages = await gateway.messages()
        assert len(messages) == 2
        traces = [m.envelope.trace_context["traceparent"].split("-")[1] for m in messages]
        assert f"{session.context.trace_id:032x}" in traces
        assert all(len(t) == 32 and t != "0" * 32 for t in traces)
        assert len(set(traces)) == 2
        exporter.shutdown()


async def _send(port: int) -> None:
    client = await RawClient.connect(port)
    await client.command("EHLO client.test")
    await client.command("MAIL FROM:<someone@remote.test>")
    await client.command(f"RCPT TO:<{ALICE}>")
    await client.command("DATA")
    reply = await client.command(message().encode() + b".")
    assert reply.startswith("250"), reply
    await client.command("QUIT")
    await client.closed()


async def test_listeners_keep_their_backlog(redis_url: str, tmp_path: Path) -> None:
    """asyncio's create_server listens again with 100 unless told otherwise: a burst of
    connections beyond that would wait for SYN retries."""
    async with running_gateway(redis_url, tmp_path) as gateway:
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{gateway.mx}"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert out[0] == "LISTEN"
        assert int(out[2]) == BACKLOG  # Send-Q of a listening socket: its backlog
