"""Content scanning with rspamd in the running gateway: the tests' real rspamd (GTUBE is a
reject, the test patterns give add header and soft reject), the domains' spam policies and
thresholds, the X-Spam fields, what rspamd is told, and submissions refused as spam up to the
user's suspension. rspamd down, slow or answering garbage is in test_gateway_spam_failures.py.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from gateway_harness import (
    ALICE,
    ALICE_PASSWORD,
    BOB,
    BOB_PASSWORD,
    Running,
    routing_table,
    running_gateway,
)

from mailkube_core.cli.rspamd_local import (
    ADD_HEADER_PATTERN,
    GTUBE,
    SOFT_REJECT_PATTERN,
    LocalRspamd,
)
from mailkube_core.redis_client import connect_redis
from mailkube_core.routing import RoutingTable, SpamPolicy
from mailkube_core.suspensions import is_suspended, rejections_key
from mailkube_gateway.spam.stage import _scans

LIMITED = "lim@limited.test"
SUSPENDED = (
    "5.7.1 Submission suspended for this account: too many messages refused as spam; "
    "contact your administrator"
)


def mail(
    body: str = "Lunch on Friday?",
    *,
    sender: str = "someone@remote.test",
    to: str = ALICE,
    subject: str = "hello",
    extra: str = "",
) -> str:
    """A message with today's date (an old one is a spam sign to rspamd)."""
    return (
        f"{extra}From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: {formatdate(time.time())}\r\nMessage-ID: <{time.time_ns()}@remote.test>\r\n"
        f"\r\n{body}\r\n"
    )


def table(**spam: SpamPolicy) -> RoutingTable:
    """The harness's table with spam policies by domain (dots as underscores)."""
    base = routing_table()
    domains = [
        domain.model_copy(update={"spam": spam.get(domain.name.replace(".", "_"), domain.spam)})
        for domain in base.domains
    ]
    return base.model_copy(update={"domains": domains})


async def send(
    gw: Running,
    content: str,
    *,
    mail_from: str = "someone@remote.test",
    recipients: tuple[str, ...] = (ALICE,),
    port: int | None = None,
    login: tuple[str, str] | None = None,
) -> tuple[int, str]:
    """One message in its own session: the reply to DATA (or to MAIL, if refused there)."""
    if port is None:
        client = gw.client(gw.mx, start_tls=False)
    elif port == gw.submissions:
        client = gw.client(port, use_tls=True)
    else:
        client = gw.client(port, start_tls=True)
    async with client as smtp:
        if login is not None:
            await smtp.login(*login)
        return await transaction(smtp, content, mail_from, recipients)


async def transaction(
    smtp: aiosmtplib.SMTP, content: str, mail_from: str, recipients: tuple[str, ...]
) -> tuple[int, str]:
    try:
        await smtp.mail(mail_from)
        for rcpt in recipients:
            await smtp.rcpt(rcpt)
        reply = await smtp.data(content)
    except aiosmtplib.SMTPResponseException as error:
        return error.code, error.message
    return reply.code, reply.message


def header_of(body: bytes) -> str:
    return body.split(b"\r\n\r\n", 1)[0].decode()


def fields(body: bytes, name: str) -> list[str]:
    """The unfolded values of every `name` field."""
    unfolded = header_of(body).replace("\r\n\t", " ").replace("\r\n ", " ")
    prefix = f"{name.lower()}:"
    return [
        line.split(":", 1)[1].strip()
        for line in unfolded.split("\r\n")
        if line.lower().startswith(prefix)
    ]


async def queued(gw: Running) -> tuple[Any, bytes]:
    [info] = await gw.messages()
    return info, await gw.body(info.id)


# --- inbound ----------------------------------------------------------------------------------


async def test_gtube_is_rejected_and_nothing_queued(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    before = _scans.value({"result": "reject", "kind": "inbound"})
    async with running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url) as gw:
        code, text = await send(gw, mail(GTUBE))
        assert (code, text) == (554, "5.7.1 Gtube pattern")
        assert await gw.messages() == []
    assert _scans.value({"result": "reject", "kind": "inbound"}) == before + 1


async def test_clean_mail_is_accepted_as_not_spam_and_forged_fields_are_gone(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    forged = "X-Spam: Yes\r\nx-spam-status: No, score=-100 required=1\r\nX-Spam-Flag: NO\r\n"
    async with running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url) as gw:
        code, _ = await send(gw, mail(extra=forged))
        assert code == 250
        info, body = await queued(gw)
    assert info.envelope.annotations == {}
    [status] = fields(body, "X-Spam-Status")
    assert status.startswith("No, score=")
    assert status.endswith(" required=15.00")
    assert fields(body, "X-Spam") == []
    assert fields(body, "X-Spam-Flag") == []
    [result] = fields(body, "X-Spamd-Result")
    assert result.startswith("default: False [")
    assert len(fields(body, "X-Spam-Score")) == 1


@pytest.mark.parametrize(
    ("where", "policy", "junk"),
    [
        ("gateway", "reject", True),
        ("gateway", "quarantine", True),
        ("gateway", "tag", False),
        ("domain", "reject", True),
        ("domain", "quarantine", True),
        ("domain", "tag", False),
    ],
)
async def test_add_header_spam_by_policy(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd, where: str, policy: Any, junk: bool
) -> None:
    options: dict[str, Any] = {"rspamd_url": rspamd.url}
    if where == "gateway":
        options["spam_policy"] = policy
    else:  # the gateway's default is the opposite: the domain's setting must win
        options["spam_policy"] = "tag" if junk else "reject"
        options["table"] = table(example_test=SpamPolicy(policy=policy))
    async with running_gateway(redis_url, tmp_path, **options) as gw:
        code, _ = await send(gw, mail(ADD_HEADER_PATTERN))
        assert code == 250
        info, body = await queued(gw)
    assert info.envelope.annotations == ({"quarantine": "rspamd"} if junk else {})
    assert fields(body, "X-Spam") == ["Yes"]
    [status] = fields(body, "X-Spam-Status")
    assert status.startswith("Yes, score=")
    [result] = fields(body, "X-Spamd-Result")
    assert "MAILKUBE_TEST_ADD_HEADER(8.00)[]" in result
    assert fields(body, "Subject") == ["hello"]


async def test_the_subject_of_spam_is_marked_when_asked(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    policy = SpamPolicy(policy="tag", rewrite_subject=True)
    async with running_gateway(
        redis_url, tmp_path, rspamd_url=rspamd.url, table=table(example_test=policy)
    ) as gw:
        await send(gw, mail(ADD_HEADER_PATTERN, subject="offer"))
        await send(gw, mail(subject="lunch"))
        bodies = [await gw.body(info.id) for info in await gw.messages()]
    subjects = sorted(fields(body, "Subject")[0] for body in bodies)
    assert subjects == ["***SPAM*** offer", "lunch"]


async def test_a_soft_reject_is_deferred(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    async with running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url) as gw:
        code, text = await send(gw, mail(SOFT_REJECT_PATTERN))
        assert (code, text) == (451, "4.7.1 Mailkube test pattern: try again later")
        assert await gw.messages() == []


async def test_a_domain_with_the_policy_off_is_not_scanned(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    policy = SpamPolicy(policy="off")
    async with running_gateway(
        redis_url, tmp_path, rspamd_url=rspamd.url, table=table(example_test=policy)
    ) as gw:
        code, _ = await send(gw, mail(GTUBE, extra="X-Spam: No\r\n"))
        assert code == 250
        _, body = await queued(gw)
    assert fields(body, "X-Spam-Status") == []
    assert fields(body, "X-Spam") == []  # removed all the same


async def test_the_strictest_of_two_recipient_domains_wins(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    policies = table(example_test=SpamPolicy(policy="tag"),
                     limited_test=SpamPolicy(policy="reject"))  # fmt: skip
    async with running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url, table=policies) as gw:
        code, _ = await send(gw, mail(GTUBE), recipients=(ALICE, LIMITED))
        assert code == 554
        code, _ = await send(gw, mail(GTUBE), recipients=(ALICE,))
        assert code == 250  # alice's domain alone only tags
        code, _ = await send(gw, mail(ADD_HEADER_PATTERN), recipients=(ALICE, LIMITED))
        assert code == 250
        quarantined = [info for info in await gw.messages() if info.envelope.annotations]
    [both] = quarantined
    assert [r.address for r in both.envelope.recipients] == [ALICE, LIMITED]


async def test_thresholds_override_rspamds_actions(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    """The add-header pattern scores about 11: a reject at reject_score 10; clean mail
    (about 0) is spam at junk_score -50; GTUBE is forced, whatever the thresholds."""
    async with running_gateway(
        redis_url, tmp_path, rspamd_url=rspamd.url, spam_reject_score=10.0,
        table=table(limited_test=SpamPolicy(junk_score=-50.0, reject_score=1000.0)),
    ) as gw:  # fmt: skip
        code, _ = await send(gw, mail(ADD_HEADER_PATTERN))
        assert code == 554
        code, _ = await send(gw, mail(), recipients=(LIMITED,))
        assert code == 250
        code, _ = await send(gw, mail(GTUBE), recipients=(LIMITED,))
        assert code == 554
        info, body = await queued(gw)
    assert info.envelope.annotations == {"quarantine": "rspamd"}
    [status] = fields(body, "X-Spam-Status")
    assert status.startswith("Yes, ")
    assert status.endswith(" required=1000.00")


async def test_email_authentication_reaches_rspamd(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    """rspamd's http_headers plugin turns our results into its symbols (its own checks would
    not say "http header")."""
    sender = "a@pass.mailauth.test"
    async with running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url) as gw:
        code, _ = await send(gw, mail(sender=sender), mail_from=sender)
        assert code == 250
        _, body = await queued(gw)
    [result] = fields(body, "X-Spamd-Result")
    assert "R_SPF_ALLOW(-0.20)[http header]" in result
    assert "DMARC_POLICY_ALLOW(" in result
    assert "R_DKIM_NA(0.00)[http header]" in result


# --- submission -------------------------------------------------------------------------------


async def refusals(gw: Running, address: str) -> int:
    client = connect_redis(gw.app.settings)
    try:
        value = await client.get(rejections_key(gw.app.settings.key_prefix, address))
    finally:
        await client.aclose()
    return int(value or 0)


async def suspended(gw: Running, address: str) -> bool:
    client = connect_redis(gw.app.settings)
    try:
        return await is_suspended(client, gw.app.settings.key_prefix, address)
    finally:
        await client.aclose()


async def test_submitted_gtube_is_refused_and_counted(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    async with running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url) as gw:
        code, text = await send(
            gw, mail(GTUBE, sender=ALICE, to=BOB), mail_from=ALICE, recipients=(BOB,),
            port=gw.submission, login=(ALICE, ALICE_PASSWORD),
        )  # fmt: skip
        assert (code, text) == (550, "5.7.1 Gtube pattern")
        assert await gw.messages() == []
        assert await refusals(gw, ALICE) == 1
        assert not await suspended(gw, ALICE)


async def test_submitted_soft_reject_is_deferred_and_not_counted(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    async with running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url) as gw:
        code, text = await send(
            gw, mail(SOFT_REJECT_PATTERN, sender=ALICE), mail_from=ALICE,
            recipients=("someone@remote.test",), port=gw.submissions,
            login=(ALICE, ALICE_PASSWORD),
        )  # fmt: skip
        assert (code, text) == (451, "4.7.1 Mailkube test pattern: try again later")
        assert await refusals(gw, ALICE) == 0


async def test_submitted_spam_is_tagged_and_clean_mail_left_alone(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    async with running_gateway(redis_url, tmp_path, rspamd_url=rspamd.url) as gw:
        for body in (ADD_HEADER_PATTERN, "See you on Friday"):
            code, _ = await send(
                gw, mail(body, sender=ALICE, subject=body), mail_from=ALICE,
                recipients=("someone@remote.test",), port=gw.submission,
                login=(ALICE, ALICE_PASSWORD),
            )  # fmt: skip
            assert code == 250
        bodies = {
            fields(b, "Subject")[0]: b
            for b in [await gw.body(info.id) for info in await gw.messages()]
        }
    assert fields(bodies[ADD_HEADER_PATTERN], "X-Spam") == ["Yes"]
    assert fields(bodies["See you on Friday"], "X-Spam-Status") == []


async def test_a_user_refused_too_often_is_suspended(
    redis_url: str, tmp_path: Path, rspamd: LocalRspamd
) -> None:
    async with running_gateway(
        redis_url, tmp_path, rspamd_url=rspamd.url, submission_spam_suspend_after=2
    ) as gw:
        async with gw.client(gw.submission) as smtp:
            await smtp.login(ALICE, ALICE_PASSWORD)
            spam = mail(GTUBE, sender=ALICE, to=BOB)
            assert (await transaction(smtp, spam, ALICE, (BOB,)))[0] == 550
            assert (await transaction(smtp, spam, ALICE, (BOB,)))[0] == 550
            # this session's own refusal crossed the threshold: at once, no Redis asked
            clean = mail(sender=ALICE, to=BOB)
            assert await transaction(smtp, clean, ALICE, (BOB,)) == (550, SUSPENDED)
            assert (await smtp.noop()).code == 250
        assert await suspended(gw, ALICE)
        # a new session reads the suspension at AUTH
        code, text = await send(
            gw, mail(sender=ALICE, to=BOB), mail_from=ALICE, recipients=(BOB,),
            port=gw.submissions, login=(ALICE, ALICE_PASSWORD),
        )  # fmt: skip
        assert (code, text) == (550, SUSPENDED)
        # nobody else is
        code, _ = await send(
            gw, mail(sender=BOB, to=ALICE), mail_from=BOB, recipients=(ALICE,),
            port=gw.submission, login=(BOB, BOB_PASSWORD),
        )  # fmt: skip
        assert code == 250
        # mail to the suspended user still arrives
        code, _ = await send(gw, mail(), recipients=(ALICE,))
        assert code == 250
        assert len(await gw.messages()) == 2


async def test_a_suspension_from_elsewhere_is_read_at_auth_without_rspamd(
    redis_url: str, tmp_path: Path
) -> None:
    """Another gateway (or the CLI's count) suspended the user; this one has no rspamd."""
    from mailkube_core.suspensions import record_spam_rejection

    async with running_gateway(redis_url, tmp_path) as gw:
        client = connect_redis(gw.app.settings)
        try:
            await record_spam_rejection(
                client, gw.app.settings.key_prefix, ALICE, gw.app.settings.submission_spam_window,
                threshold=1,
            )  # fmt: skip
        finally:
            await client.aclose()
        code, text = await send(
            gw, mail(sender=ALICE, to=BOB), mail_from=ALICE, recipients=(BOB,),
            port=gw.submission, login=(ALICE, ALICE_PASSWORD),
        )  # fmt: skip
        assert (code, text) == (550, SUSPENDED)


async def test_the_suspension_is_read_in_the_same_write_as_auths_redis_command(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAIL asks Redis nothing; AUTH's one extra command costs no round trip of its own."""
    from mailkube_core import redis_multiplexed

    writes: list[bytes] = []
    flush = redis_multiplexed._Connection._flush

    def recording(connection: Any) -> None:
        writes.append(b"".join(connection.outgoing))
        flush(connection)

    monkeypatch.setattr(redis_multiplexed._Connection, "_flush", recording)
    async with running_gateway(redis_url, tmp_path) as gw, gw.client(gw.submission) as smtp:
        await smtp.login(ALICE, ALICE_PASSWORD)
        at_auth = list(writes)
        await smtp.mail(ALICE)
        assert writes == at_auth
    suspended_key = f"{{{gw.app.settings.key_prefix}:spam}}:suspended".encode()
    # AUTH's own: the client network's failures, and the user's (under the user's own tag)
    network_failures = b":authfail:127.0.0.1/32}"
    assert any(
        suspended_key in write and network_failures in write and b":authuser:" in write
        for write in at_auth
    )
