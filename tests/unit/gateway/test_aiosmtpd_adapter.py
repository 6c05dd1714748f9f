"""Drift test for aiosmtpd_adapter.py: fails when an aiosmtpd release (or Python's asyncio)
changes what the adapter relies on, before a session can misbehave in production."""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

from aiosmtpd.smtp import SMTP
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from mailkube_gateway.aiosmtpd_adapter import ProtocolBase

PYPROJECT = Path(__file__).parents[3] / "smtp-gateway" / "pyproject.toml"


class _NoHooks:
    pass


class _Probe(ProtocolBase):
    pass


def _pinned() -> SpecifierSet:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (spec,) = [d for d in dependencies if d.startswith("aiosmtpd")]
    return SpecifierSet(spec.removeprefix("aiosmtpd").split(";")[0].strip())


def test_the_installed_aiosmtpd_is_in_the_pinned_range_and_the_range_is_closed() -> None:
    pinned = _pinned()
    assert Version(version("aiosmtpd")) in pinned
    assert any(s.operator in ("<", "<=", "==", "~=") for s in pinned), (
        "an open range lets a release that changes the internals in unnoticed"
    )


async def test_adopt_sets_every_field_the_constructor_sets() -> None:
    loop = asyncio.get_running_loop()
    theirs = SMTP(
        _NoHooks(), data_size_limit=1000, enable_SMTPUTF8=True, decode_data=False,
        hostname="mx.example.test", ident="ESMTP test", tls_context=None,
        require_starttls=False, timeout=30.0, auth_required=True, auth_require_tls=True,
        loop=loop,
    )  # fmt: skip
    ours = _Probe.__new__(_Probe)
    ours._adopt(
        loop=loop, line_limit=2**16, ident="ESMTP test", hostname="mx.example.test",
        data_size_limit=1000, tls_context=None, require_starttls=False, timeout=30.0,
        auth_required=True,
    )  # fmt: skip
    missing = set(vars(theirs)) - set(vars(ours))
    assert missing == set(), f"aiosmtpd's constructor sets {missing}, _adopt does not"
    assert bool(ours.require_starttls) == bool(theirs.require_starttls)  # theirs: None
    for name in ("data_size_limit", "enable_SMTPUTF8", "_decode_data", "hostname",
                 "_timeout_duration", "_tls_handshake_okay",
                 "_tls_protocol", "_original_transport", "session", "envelope", "transport",
                 "_auth_require_tls", "_auth_required", "__ident__"):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_the_hooks_the_adapter_overrides_are_still_called_so() -> None:
    assert _parameters(SMTP._handle_client) == ["self"]
    assert _parameters(SMTP._set_rset_state) == ["self"]
    assert _parameters(SMTP._set_post_data_state) == ["self"]
    assert _parameters(SMTP._reset_timeout) == ["self", "duration"]
    assert _parameters(SMTP._timeout_cb) == ["self"]
    assert _parameters(SMTP._cb_client_connected) == ["self", "reader", "writer"]
    # where aiosmtpd calls them, and reads the state the adapter keeps
    made = inspect.getsource(SMTP.connection_made)
    for name in ("_set_rset_state", "_reset_timeout", "_original_transport",
                 "_handle_client", "_handler_coroutine", "_tls_handshake_okay"):  # fmt: skip
        assert name in made, name
    lost = inspect.getsource(SMTP.connection_lost)
    for name in ("_timeout_handle", "_original_transport", "_handler_coroutine"):
        assert name in lost, name
    assert "self._reader" in inspect.getsource(SMTP._cb_client_connected)
    assert "self._writer" in inspect.getsource(SMTP._cb_client_connected)
    assert "_set_rset_state" in inspect.getsource(SMTP.smtp_RSET)
    assert "_tls_protocol" in inspect.getsource(SMTP.smtp_STARTTLS)


async def test_asyncio_still_has_what_begin_tls_and_buffered_use() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"EHLO x\r\n")
    assert bytes(reader._buffer) == b"EHLO x\r\n"  # type: ignore[attr-defined]
    parameters = _parameters(asyncio.sslproto.SSLProtocol.__init__)
    assert parameters[:6] == ["self", "loop", "app_protocol", "sslcontext", "waiter",
                              "server_side"]  # fmt: skip
    assert "_app_transport" in inspect.getsource(asyncio.sslproto.SSLProtocol.__init__)
