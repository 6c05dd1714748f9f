"""kube.py against the emulator: an API error keeps the server's explanation (the Status
body's reason and message), so conditions and Events can say which permission or field was
refused; no answer at all is status 0."""

from __future__ import annotations

import socket

import pytest
from kube_emulator import KubeEmulator, mailkube_resources
from kubernetes import client

from mailkube_operator.kube import Kube, KubeError

pytestmark = pytest.mark.kmock(cls=KubeEmulator)

FORBIDDEN = (
    'secrets is forbidden: User "system:serviceaccount:mail:mail-mailkube-operator" cannot '
    'create resource "secrets" in API group "" in the namespace "mail"'
)


def kube_for(url: str) -> Kube:
    config = client.Configuration()
    config.host = url
    return Kube(config)


async def test_an_api_error_carries_the_servers_message(kmock: KubeEmulator) -> None:
    mailkube_resources(kmock)
    kmock.fail(403, action="CREATE", plural="secrets", reason="Forbidden", message=FORBIDDEN)
    kube = kube_for(str(kmock.url))
    try:
        body = {"metadata": {"name": "x", "namespace": "mail"}, "data": {}}
        with pytest.raises(KubeError) as caught:
            await kube.create_secret("mail", body)
    finally:
        kube.close()
    assert caught.value.status == 403
    assert str(caught.value) == f"Kubernetes API 403 Forbidden: {FORBIDDEN}"


async def test_a_not_found_is_none_and_a_refused_read_an_error(kmock: KubeEmulator) -> None:
    mailkube_resources(kmock)
    kube = kube_for(str(kmock.url))
    try:
        assert await kube.read_secret_data("mail", "absent") is None
        kmock.fail(500, action="FETCH", plural="secrets", message="etcdserver: request timed out")
        with pytest.raises(KubeError, match="500 InternalError: etcdserver: request timed out"):
            await kube.read_secret_data("mail", "absent")
    finally:
        kube.close()


def test_an_error_without_a_status_body_keeps_what_there_is() -> None:
    plain = client.ApiException(status=502, reason="Bad Gateway")
    plain.body = "upstream connect error"
    said = "Kubernetes API 502 Bad Gateway: upstream connect error"
    assert str(KubeError.from_api(plain)) == said
    bare = client.ApiException(status=503, reason="Service Unavailable")
    assert str(KubeError.from_api(bare)) == "Kubernetes API 503 Service Unavailable"


async def test_no_answer_is_status_zero() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    kube = kube_for(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(KubeError) as caught:
            await kube.read_secret_data("mail", "x")
    finally:
        kube.close()
    assert caught.value.status == 0
    assert "unreachable" in str(caught.value)
