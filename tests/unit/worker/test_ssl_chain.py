"""Drift test for ssl_chain.py: a real TLS handshake in memory (trustme certificates), the
handshake verifying nothing, and the chain read back exactly as the server sent it."""

from __future__ import annotations

import contextlib
import ssl

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mailkube_worker.ssl_chain import unverified_chain


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """Both ends of a TLS session over memory BIOs; the client's SSLObject, connected."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(c_in, c_out, server_hostname="mx.example.test")
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (tls_client, tls_server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if tls_client.version() and tls_server.version():
            break
    assert tls_client.version() is not None
    return tls_client


def test_the_presented_chain_is_read_whatever_was_verified() -> None:
    ca = trustme.CA()
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("mx.example.test")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies nothing: policies judge
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    chain = unverified_chain(handshake(server, client))
    sent = [
        x509.load_pem_x509_certificate(blob.bytes()).public_bytes(Encoding.DER)
        for blob in leaf.cert_chain_pems
    ]
    assert chain == sent
    assert len(chain) == 2  # leaf and intermediate, leaf first
    names = x509.load_der_x509_certificate(chain[0]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == ["mx.example.test"]
