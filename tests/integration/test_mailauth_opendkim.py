"""Signatures made by `dkim_sign.sign` verify with an independent implementation, OpenDKIM's
`opendkim-testmsg` (RSA and Ed25519), and a changed message fails with it.

opendkim-testmsg reads the message on stdin (exit 0 and no output: verified) and looks keys up
with the C library's resolver, which reads /etc/resolv.conf and asks port 53. So the test runs
a DnsServer on port 53 of a loopback address of its own, and runs opendkim-testmsg in a private
mount namespace (`unshare --mount`, as root) where /etc/resolv.conf is bind-mounted from a file
naming that server.
"""

from __future__ import annotations

import random
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dns_server import DnsServer, txt_strings

from mailkube_core.routing import DkimKey
from mailkube_core.routing.dkim_keys import generate, public_record
from mailkube_gateway.mailauth.dkim_sign import sign

OPENDKIM_TESTMSG = "/usr/sbin/opendkim-testmsg"
DOMAIN = "opendkim.test"

MESSAGES = {
    "plain": (
        b"From: Alice <alice@opendkim.test>\r\n"
        b"To: Bob <bob@example.org>\r\n"
        b"Subject: Lunch on Friday\r\n"
        b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <lunch-1@opendkim.test>\r\n"
        b"\r\n"
        b"Shall we meet at noon?\r\n"
    ),
    # what relaxed canonicalization is for: folding, runs of white space, trailing blanks
    # and empty lines; an unsigned Received, a MIME body. (OpenDKIM refuses a message with a
    # field RFC 5322 §3.6 allows once, e.g. Cc or From, given twice: "Syntax error".)
    "messy": (
        b"Received: from client.example by mx.opendkim.test; Tue, 24 Nov 2026 10:00:00 +0000\r\n"
        b'From: "Alice  Liddell" <alice@opendkim.test>\r\n'
        b"To: bob@example.org,\r\n"
        b"\tcarol@example.org\r\n"
        b"Cc: dave@example.org,  \r\n"
        b"  erin@example.org\r\n"
        b"Subject:   A   subject  with   spaces   \r\n"
        b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <messy-1@opendkim.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b1"\r\n'
        b"List-Unsubscribe: <https://opendkim.test/u/1>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"\r\n"
        b"--b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"Gr\xc3\xbc\xc3\x9fe  \t aus   Wien   \r\n"
        b"--b1--\r\n"
        b"\r\n"
        b"\r\n"
    ),
}


@dataclass(frozen=True)
class Port53:
    server: DnsServer
    resolv_conf: Path

    def verify(self, message: bytes) -> subprocess.CompletedProcess[bytes]:
        """opendkim-testmsg on `message` (-C: the message has CRLF line endings)."""
        script = f'mount --bind "$1" /etc/resolv.conf && exec {OPENDKIM_TESTMSG} -C'
        return subprocess.run(
            ["unshare", "--mount", "sh", "-c", script, "sh", str(self.resolv_conf)],
            input=message,
            capture_output=True,
            timeout=60,
            check=False,
        )


@dataclass(frozen=True)
class Keys:
    rsa: DkimKey
    ed: DkimKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=DkimKey(selector="rsa", algorithm="rsa-sha256", private_key=generate("rsa-sha256")),
        ed=DkimKey(
            selector="ed", algorithm="ed25519-sha256", private_key=generate("ed25519-sha256")
        ),
    )


@pytest.fixture(scope="module")
def port53(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Port53]:
    server = None
    for _ in range(50):  # another run may hold port 53 of the address picked: take another
        host = f"127.53.{random.randint(0, 255)}.{random.randint(1, 254)}"
        try:
            server = DnsServer(host=host, port=53).start()
            break
        except OSError:
            continue
    assert server is not None, "no loopback address with port 53 free"
    records = "\n".join(
        f"{key.selector}._domainkey TXT {txt_strings(record(key))}" for key in (keys.rsa, keys.ed)
    )
    server.add_zone(DOMAIN, f"$TTL 60\n@ SOA ns hostmaster 1 3600 600 86400 60\n{records}\n")
    resolv_conf = tmp_path_factory.mktemp("opendkim") / "resolv.conf"
    resolv_conf.write_text(f"nameserver {server.host}\noptions attempts:2 timeout:2\n")
    try:
        yield Port53(server, resolv_conf)
    finally:
        server.stop()


def record(key: DkimKey) -> str:
    return public_record(key.algorithm, key.private_key.get_secret_value())


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_signature_verifies_with_opendkim(
    port53: Port53, keys: Keys, algorithm: str, name: str
) -> None:
    key = keys.rsa if algorithm == "rsa-sha256" else keys.ed
    message = MESSAGES[name]
    signed = sign(message, DOMAIN, [key]) + message
    done = port53.verify(signed)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert (f"{key.selector}._domainkey.{DOMAIN}.", "TXT") in {
        (q_name, q_type) for q_name, q_type, _ in port53.server.queries
    }


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
@pytest.mark.parametrize(
    ("original", "changed"),
    [
        (b"Shall we meet at noon?", b"Shall we meet at one?"),  # body
        (b"Subject: Lunch on Friday", b"Subject: Lunch on Monday"),  # a signed field
        (b"Date: Tue, 24", b"Date: Wed, 25"),  # another
    ],
)
def test_changed_message_fails_with_opendkim(
    port53: Port53, keys: Keys, algorithm: str, original: bytes, changed: bytes
) -> None:
    key = keys.rsa if algorithm == "rsa-sha256" else keys.ed
    message = MESSAGES["plain"]
    signed = sign(message, DOMAIN, [key]) + message
    assert port53.verify(signed).returncode == 0
    done = port53.verify(signed.replace(original, changed))
    assert done.returncode != 0
    assert b"Bad signature" in done.stderr


def test_both_signatures_of_a_dual_signed_message_verify_with_opendkim(
    port53: Port53, keys: Keys
) -> None:
    """opendkim-testmsg reports one verdict per message, so each signature of the pair is
    checked alone."""
    message = MESSAGES["messy"]
    fields = sign(message, DOMAIN, [keys.rsa, keys.ed])
    rsa_field, ed_field = re.split(rb"(?=DKIM-Signature:)", fields)[1:]
    assert b"a=rsa-sha256" in rsa_field
    assert b"a=ed25519-sha256" in ed_field
    for field in (rsa_field, ed_field):
        done = port53.verify(field + message)
        assert (done.returncode, done.stderr) == (0, b"")
