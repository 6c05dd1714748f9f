"""Incoming TLS-RPT reports (tlsrpt_mailboxes): a `mailkube-worker` process delivers reports
to the report mailbox, as the gateway queued them, and /metrics counts their sessions per
organisation, policy domain and result; an invalid report is delivered all the same and
counted as invalid; mail to other mailboxes is not read."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conditions import eventually
from prometheus_client.parser import text_string_to_metric_families
from worker_harness import (
    WorkerProcess,
    apply_routing,
    enqueue,
    maildir_files,
    message,
    table,
    worker_settings,
)

from mailkube_core.routing import User
from mailkube_worker.tlspolicy.tlsrpt import build_report, report_message
from mailkube_worker.tlspolicy.tlsrpt_store import Outcome

REPORTS = "tls-reports@example.test"
STS = ("sts", ("version: STSv1", "mode: enforce"), ("mx.example.test",))


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


def report(organization: str, outcomes: dict[Outcome, int]) -> bytes:
    built = build_report("example.test", "2026-12-06", outcomes, organization=organization,
                         contact="postmaster@sender.test",
                         report_id=f"{organization}-1")  # fmt: skip
    return report_message(built, domain="example.test", submitter="sender.test",
                          sender="tlsrpt@sender.test", recipients=[REPORTS], unique="1",
                          now=datetime(2026, 12, 7, tzinfo=UTC))  # fmt: skip


async def test_reports_delivered_to_the_report_mailbox_become_metrics(
    redis_url: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    settings = worker_settings(redis_url, tmp_path / "mail")
    routing = await apply_routing(
        settings, table(User(address=REPORTS), User(address="alice@example.test"))
    )
    worker = WorkerProcess(settings, "pod-r", MAILKUBE_ROLE="local",
                           MAILKUBE_TLSRPT_MAILBOXES=REPORTS)  # fmt: skip
    workers.append(worker)
    await worker.ready()
    await enqueue(settings, [REPORTS], report("Sender Inc", {
        Outcome(*STS, "success", "mx.example.test", "192.0.2.1"): 40,
        Outcome(*STS, "certificate-expired", "mx.example.test", "192.0.2.1"): 3,
    }), mail_from="tlsrpt@sender.test", routing=routing)  # fmt: skip
    await enqueue(settings, [REPORTS], message("not a report", to=REPORTS), routing=routing)
    # a report to another mailbox is only mail
    await enqueue(settings, ["alice@example.test"], report("Elsewhere", {
        Outcome(*STS, "certificate-expired", "mx.example.test", "192.0.2.1"): 9,
    }), routing=routing)  # fmt: skip

    metrics = ""

    async def counted() -> bool:
        nonlocal metrics
        metrics = await asyncio.to_thread(get, worker.port, "/metrics")
        return "mailkube_worker_tlsrpt_reports_total" in metrics and 'outcome="invalid"' in metrics

    await eventually(counted)
    assert len(maildir_files(tmp_path / "mail", REPORTS)) == 2  # both kept in the mailbox
    sessions = {
        (sample.labels["organization"], sample.labels["policy_domain"],
         sample.labels["policy_type"], sample.labels["result"]): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "mailkube_worker_tlsrpt_sessions_total"
    }  # fmt: skip
    assert sessions == {
        ("Sender Inc", "example.test", "sts", "success"): 40.0,
        ("Sender Inc", "example.test", "sts", "certificate-expired"): 3.0,
    }
    assert "Elsewhere" not in metrics
    reports = [line for line in metrics.splitlines()
               if line.startswith("mailkube_worker_tlsrpt_reports_total{")]  # fmt: skip
    assert len(reports) == 2
    assert all(line.endswith(" 1.0") for line in reports)
    assert worker.stop() == 0
