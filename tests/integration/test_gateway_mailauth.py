"""Email authentication in the running gateway: SPF, DKIM, DMARC on the MX listener with the
Authentication-Results field and the domains' policies; DKIM signing of submitted mail.

The gateway's resolver asks the loopback DNS server (tests/dns/zones, mailauth.test.zone for
SPF and DMARC; DKIM keys added per test)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib
import authres
import authres.arc
import authres.dmarc
import dkim
import pytest
from dns_server import DnsServer, txt_strings
from gateway_harness import ALICE, ALICE_PASSWORD, LOCAL, Running, routing_table, running_gateway

from mailkube_core.routing import DkimKey, DomainPolicy
from mailkube_core.routing.dkim_keys import generate, public_record
from mailkube_gateway.mailauth.dkim_sign import sign

AUTHRES = authres.FeatureContext(authres.dmarc, authres.arc)


def mail(sender: str, subject: str = "hello", extra: str = "") -> str:
    return (
        f"{extra}From: {sender}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject}@x.test>\r\n\r\nhi\r\n"
    )


async def send_mx(gw: Running, mail_from: str, content: str | bytes) -> tuple[int, str]:
    async with gw.client(gw.mx, start_tls=False, local_hostname="client.mailauth.test") as smtp:
        await smtp.mail(mail_from)
        await smtp.rcpt(ALICE)
        try:
            reply = await smtp.data(content)
        except aiosmtplib.SMTPResponseException as error:
            return error.code, error.message
        return reply.code, reply.message


async def queued_body(gw: Running) -> bytes:
    [info] = await gw.messages()
    return await gw.body(info.id)


def results_of(body: bytes) -> dict[str, list[Any]]:
    """The Authentication-Results fields of the header section, by authserv-id."""
    header = body.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = header.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
    found: dict[str, list[Any]] = {}
    for line in unfolded:
        if line.lower().startswith("authentication-results:"):
            parsed = AUTHRES.parse(line)
            found.setdefault(parsed.authserv_id, []).append(parsed)
    return found


def methods(body: bytes) -> dict[str, str]:
    [ours] = results_of(body)["mx.test"]
    return {result.method: result.result for result in ours.results}


async def test_aligned_spf_pass_is_recorded_and_accepted(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        code, _ = await send_mx(gw, "bounce@pass.mailauth.test", mail("a@pass.mailauth.test"))
        assert code == 250
        body = await queued_body(gw)
    assert methods(body) == {
        "iprev": "pass", "spf": "pass", "dkim": "none", "arc": "none", "dmarc": "pass"
    }  # fmt: skip
    [ours] = results_of(body)["mx.test"]
    # the client's reverse name (tests/dns/zones/127.in-addr.arpa.zone), checked at connect
    assert ours.results[0].policy_iprev == "127.0.0.1"
    assert ours.results[1].smtp_mailfrom == "pass.mailauth.test"
    assert ours.results[-1].header_from == "pass.mailauth.test"
    # the field comes after our Received: and before the message's own fields
    assert body.index(b"Received:") < body.index(b"Authentication-Results:") < body.index(b"From:")


async def test_forged_results_for_our_authserv_id_are_removed(
    redis_url: str, tmp_path: Path
) -> None:
    forged = (
        "Authentication-Results: mx.test; dmarc=pass header.from=bank.example\r\n"
        "Authentication-Results: MX.TEST;\r\n\tdkim=pass header.d=bank.example\r\n"
        "Authentication-Results: elsewhere.example; spf=pass smtp.mailfrom=x.example\r\n"
    )
    async with running_gateway(redis_url, tmp_path) as gw:
        code, _ = await send_mx(gw, "a@remote.test", mail("a@remote.test", extra=forged))
        assert code == 250
        body = await queued_body(gw)
    found = results_of(body)
    assert len(found["mx.test"]) == 1  # ours only
    assert len(found["elsewhere.example"]) == 1
    assert b"bank.example" not in body


async def test_dmarc_reject_failure_is_refused(redis_url: str, tmp_path: Path) -> None:
    """SPF passes, but for pass.mailauth.test, not the From domain auth.test (p=reject)."""
    async with running_gateway(redis_url, tmp_path) as gw:
        code, text = await send_mx(gw, "bounce@pass.mailauth.test", mail("ceo@auth.test"))
        assert (code, text.split()[0]) == (550, "5.7.1")
        assert "DMARC policy of auth.test" in text
        assert await gw.messages() == []


async def test_dmarc_quarantine_failure_is_accepted_for_junk(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        # SPF passes for remote.test, another organizational domain: not aligned
        code, _ = await send_mx(gw, "a@remote.test", mail("a@quarantine.mailauth.test"))
        assert code == 250
        [info] = await gw.messages()
        body = await gw.body(info.id)
    assert info.envelope.annotations == {"quarantine": "email-auth"}
    assert methods(body)["dmarc"] == "fail"


async def test_monitor_policy_only_records_the_failure(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, dmarc_policy="monitor") as gw:
        code, _ = await send_mx(gw, "bounce@pass.mailauth.test", mail("ceo@auth.test"))
        assert code == 250
        [info] = await gw.messages()
        body = await gw.body(info.id)
    assert info.envelope.annotations == {}
    assert methods(body)["dmarc"] == "fail"


async def test_spf_fail_is_tagged_or_refused_by_the_domain_policy(
    redis_url: str, tmp_path: Path
) -> None:
    content = mail("a@fail.mailauth.test")
    async with running_gateway(redis_url, tmp_path) as gw:
        code, _ = await send_mx(gw, "a@fail.mailauth.test", content)
        assert code == 250
        assert methods(await queued_body(gw))["spf"] == "fail"
    strict = routing_table(policy=DomainPolicy(spf_fail="reject"))
    async with running_gateway(redis_url, tmp_path / "strict", table=strict) as gw:
        code, text = await send_mx(gw, "a@fail.mailauth.test", content)
        assert (code, text.split()[0]) == (550, "5.7.23")


async def test_dns_temporary_error_defers_or_accepts(
    redis_url: str, tmp_path: Path, dns_server: DnsServer
) -> None:
    dns_server.fail("down.mailauth.test")
    content = mail("a@down.mailauth.test")
    async with running_gateway(redis_url, tmp_path) as gw:
        code, text = await send_mx(gw, "a@down.mailauth.test", content)
        assert (code, text.split()[0]) == (451, "4.7.24")
        assert await gw.messages() == []
    lenient = routing_table(policy=DomainPolicy(dns_temp_error="accept"))
    async with running_gateway(redis_url, tmp_path / "lenient", table=lenient) as gw:
        code, _ = await send_mx(gw, "a@down.mailauth.test", content)
        assert code == 250
        assert methods(await queued_body(gw))["spf"] == "temperror"


async def test_authentication_checks_can_be_turned_off(redis_url: str, tmp_path: Path) -> None:
    async with running_gateway(redis_url, tmp_path, inbound_auth_checks=False) as gw:
        code, _ = await send_mx(gw, "bounce@pass.mailauth.test", mail("ceo@auth.test"))
        assert code == 250
        assert b"Authentication-Results" not in await queued_body(gw)


def serve_key(dns_server: DnsServer, domain: str, keys: list[DkimKey]) -> None:
    """Publish the public halves of `keys` in a zone of their own."""
    lines = []
    for key in keys:
        value = public_record(key.algorithm, key.private_key.get_secret_value())
        lines.append(f"{key.selector}._domainkey TXT {txt_strings(value)}")
    records = "\n".join(lines)
    dns_server.add_zone(
        domain, f"$TTL 60\n@ SOA ns hostmaster 1 3600 600 86400 60\n@ NS ns\n{records}\n"
    )


def new_key(selector: str, algorithm: str) -> DkimKey:
    return DkimKey(selector=selector, algorithm=algorithm, private_key=generate(algorithm))  # type: ignore[arg-type]


async def test_an_aligned_dkim_signature_passes_dmarc_without_spf(
    redis_url: str, tmp_path: Path, dns_server: DnsServer
) -> None:
    """SPF fails for fail.mailauth.test, but a valid signature of signed.mailauth.test, the
    From domain, aligns; DMARC of mailauth.test (sp=quarantine) passes."""
    key = new_key("in1", "ed25519-sha256")
    serve_key(dns_server, "signed.mailauth.test", [key])
    content = mail("news@signed.mailauth.test").encode()
    signed = sign(content, "signed.mailauth.test", [key]) + content
    async with running_gateway(redis_url, tmp_path) as gw:
        code, _ = await send_mx(gw, "a@fail.mailauth.test", signed)
        assert code == 250
        body = await queued_body(gw)
    assert methods(body) == {
        "iprev": "pass", "spf": "fail", "dkim": "pass", "arc": "none", "dmarc": "pass"
    }  # fmt: skip
    [ours] = results_of(body)["mx.test"]
    dkim_result = ours.results[2]  # after iprev and spf
    assert (dkim_result.header_d, dkim_result.header_s) == ("signed.mailauth.test", "in1")


async def test_a_broken_signature_is_recorded_as_fail(
    redis_url: str, tmp_path: Path, dns_server: DnsServer
) -> None:
    key = new_key("in2", "rsa-sha256")
    serve_key(dns_server, "tampered.mailauth.test", [key])
    content = mail("news@tampered.mailauth.test").encode()
    signed = sign(content, "tampered.mailauth.test", [key]) + content.replace(b"hi", b"ho")
    async with running_gateway(redis_url, tmp_path) as gw:
        code, _ = await send_mx(gw, "a@fail.mailauth.test", signed)
        # mailauth.test's sp=quarantine applies: accepted, for Junk
        assert code == 250
        [info] = await gw.messages()
        body = await gw.body(info.id)
    assert methods(body)["dkim"] == "fail"
    assert info.envelope.annotations == {"quarantine": "email-auth"}


@pytest.mark.parametrize("algorithms", [["rsa-sha256"], ["ed25519-sha256"],
                                        ["rsa-sha256", "ed25519-sha256"]])  # fmt: skip
async def test_submitted_mail_is_queued_signed(
    redis_url: str, tmp_path: Path, dns_server: DnsServer, algorithms: list[str]
) -> None:
    keys = [
        new_key(f"sub-{algorithm[:3]}-{len(algorithms)}", algorithm) for algorithm in algorithms
    ]
    serve_key(dns_server, LOCAL, keys)
    table = routing_table(dkim=keys)
    async with running_gateway(redis_url, tmp_path, table=table) as gw:
        async with gw.client(gw.submission) as smtp:
            await smtp.login(ALICE, ALICE_PASSWORD)
            errors, _ = await smtp.sendmail(ALICE, ["someone@remote.test"], mail(ALICE))
        assert errors == {}
        body = await queued_body(gw)
    message = body[body.index(b"Authentication-Results:") :]  # our Received: off
    fields = dkim.DKIM(message).headers
    signatures = [value for name, value in fields if name.lower() == b"dkim-signature"]
    assert len(signatures) == len(algorithms)
    for index, _ in enumerate(signatures):
        assert await asyncio.to_thread(dkim.DKIM(message).verify, index, dns_server.dkim_txt), (
            f"signature {index} does not verify"
        )
    [ours] = results_of(body)["mx.test"]
    assert [(r.method, r.result, r.smtp_auth) for r in ours.results] == [("auth", "pass", ALICE)]


async def test_mail_from_a_domain_without_keys_is_sent_unsigned(
    redis_url: str, tmp_path: Path
) -> None:
    async with running_gateway(redis_url, tmp_path) as gw:
        async with gw.client(gw.submission) as smtp:
            await smtp.login(ALICE, ALICE_PASSWORD)
            errors, _ = await smtp.sendmail(ALICE, ["someone@remote.test"], mail(ALICE))
        assert errors == {}
        body = await queued_body(gw)
    assert b"DKIM-Signature" not in body
    assert methods(body) == {"auth": "pass"}


async def test_a_from_header_the_user_may_not_use_is_not_signed_for(
    redis_url: str, tmp_path: Path, dns_server: DnsServer
) -> None:
    """A signature vouches for the From address: when alice may not use it, her MAIL FROM
    domain signs instead (so the signature does not align with the foreign From)."""
    key = new_key("sub-own", "ed25519-sha256")
    serve_key(dns_server, LOCAL, [key])
    table = routing_table(dkim=[key])
    async with running_gateway(redis_url, tmp_path, table=table) as gw:
        async with gw.client(gw.submission) as smtp:
            await smtp.login(ALICE, ALICE_PASSWORD)
            errors, _ = await smtp.sendmail(
                ALICE, ["someone@remote.test"], mail("ceo@bank.example")
            )
        assert errors == {}
        body = await queued_body(gw)
    assert b"d=example.test" in body  # signed for alice's MAIL FROM domain only
    assert b"d=bank.example" not in body
