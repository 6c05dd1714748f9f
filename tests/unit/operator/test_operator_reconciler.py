"""The reconciler on plain dicts, with a fake API and a fake routing store: statuses and events
written once however often it runs before the index catches up, failed steps not tried again
before retry_delay, an unexpected error retried, an unreachable API a KubeError."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any, cast
from unittest.mock import ANY

import kopf
import pytest
from conditions import eventually

from mailkube_core.routing import (
    DomainEntry,
    RoutingStore,
    RoutingTable,
    TableGlobals,
    VersionConflict,
    join_table,
)
from mailkube_core.routing.dkim_keys import generate
from mailkube_core.settings import OperatorSettings
from mailkube_operator import dkim
from mailkube_operator import reconciler as reconciler_module
from mailkube_operator.handlers import domains, lifecycle
from mailkube_operator.kube import Kube, KubeError
from mailkube_operator.plan import ObjectRecord
from mailkube_operator.reconciler import STATUS_WRITERS, Indexes, Reconciler
from mailkube_operator.state import OperatorState


class FakeKube:
    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, str]] = {}
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.events: list[tuple[str, str, str]] = []
        self.fail_create: Exception | None = None
        self.fail_patch: Exception | None = None
        self.creates = 0
        #: what patch_status returns as the version it made, in turn (then None)
        self.written_versions: list[str] = []

    async def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> None:
        self.creates += 1
        if self.fail_create is not None:
            raise self.fail_create
        self.secrets[body["metadata"]["name"]] = dict(body["data"])

    async def patch_secret_data(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.secrets[name].update(data)

    async def patch_status(self, plural: str, namespace: str, name: str,
                           status: dict[str, Any]) -> str | None:  # fmt: skip
        if self.fail_patch is not None:
            raise self.fail_patch
        self.patches.append((plural, name, status))
        return self.written_versions.pop(0) if self.written_versions else None

    async def post_event(self, involved: dict[str, Any], *, type_: str, reason: str,
                         message: str, source: str) -> None:  # fmt: skip
        self.events.append((involved["name"], type_, reason))


class FakeStore:
    """The routing store's writes: each table written, whole, in `tables`; the entries each
    write took in `writes`."""

    def __init__(self) -> None:
        self.tables: list[RoutingTable] = []
        self.writes: list[tuple[dict[str, str], list[str]]] = []
        self.entries: dict[str, str] = {}

    async def apply(self, changed: dict[str, str], deleted: list[str], globals_json: str, *,
                    expected_version: int | None = None) -> int:  # fmt: skip
        if expected_version is not None and expected_version != len(self.tables):
            raise VersionConflict(f"at {len(self.tables)}")
        self.writes.append((dict(changed), list(deleted)))
        self.entries = {**{n: d for n, d in self.entries.items() if n not in deleted}, **changed}
        entries = {n: DomainEntry.model_validate_json(d) for n, d in self.entries.items()}
        self.tables.append(join_table(entries, TableGlobals.model_validate_json(globals_json)))
        return len(self.tables)

    async def replace_entries(self, entries: dict[str, str],
                              globals_json: str) -> tuple[int, int]:  # fmt: skip
        changed = {n: d for n, d in entries.items() if self.entries.get(n) != d}
        deleted = [n for n in self.entries if n not in entries]
        return await self.apply(changed, deleted, globals_json), len(changed) + len(deleted)

    async def version(self) -> int:
        return len(self.tables)


def record(kind: str, name: str, spec: dict[str, Any], *, rv: str = "1",
           status: dict[str, Any] | None = None) -> ObjectRecord:  # fmt: skip
    return ObjectRecord.from_body({
        "apiVersion": "mailkube.io/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": "mail", "uid": f"uid-{name}", "generation": 1,
                     "creationTimestamp": "2025-01-01T00:00:00Z", "resourceVersion": rv},
        "spec": spec, "status": status or {}})  # fmt: skip


DOMAIN = {"domain": "example.test", "dkim": {"algorithm": "ed25519"}}


def reconciler(domains: list[ObjectRecord], users: list[ObjectRecord],
               kube: FakeKube | None = None) -> Reconciler:  # fmt: skip
    settings = OperatorSettings.model_validate(
        {"hostname": "op.example.test", "retry_delay": "30s", "log_format": "text"}
    )
    result = Reconciler(
        settings=settings, store=cast(RoutingStore, FakeStore()),
        kube=cast(Kube, kube or FakeKube()),
    )  # fmt: skip
    set_index(result, domains, users)
    return result


def set_index(r: Reconciler, domains: list[ObjectRecord], users: list[ObjectRecord],
              dkim_secrets: dict[Any, dict[str, str]] | None = None) -> None:  # fmt: skip
    r.indexes = Indexes(
        domains={d.key: [d] for d in domains}, users={u.key: [u] for u in users},
        password_secrets={},
        dkim_secrets={key: [data] for key, data in (dkim_secrets or {}).items()},
    )  # fmt: skip


def fake(r: Reconciler) -> FakeKube:
    return cast(FakeKube, r.kube)


async def test_status_and_events_once_while_the_index_lags_behind() -> None:
    domain = record("MailDomain", "example", DOMAIN)
    user = record("MailUser", "alice", {"address": "alice@example.test"})
    r = reconciler([domain], [user])
    try:
        await r.request()
        await r.request()  # the index has not seen the status writes yet
        kube = fake(r)
        assert [(plural, name) for plural, name, _ in kube.patches] == [
            ("maildomains", "example"), ("mailusers", "alice")]  # fmt: skip
        assert kube.events == [
            ("example", "Normal", "DKIMKeyCreated"),
            ("example", "Normal", "Ready"),
            ("alice", "Normal", "Published"),
        ]
        assert len(cast(FakeStore, r.store).tables) == 1

        # the index catches up (a new resourceVersion, our status): nothing to write
        written = {name: status for _, name, status in kube.patches}
        set_index(
            r,
            [record("MailDomain", "example", DOMAIN, rv="2", status=written["example"])],
            [record("MailUser", "alice", {"address": "alice@example.test"}, rv="2",
                    status=written["alice"])],
        )  # fmt: skip
        await r.request()
        assert len(kube.patches) == 2
        assert len(kube.events) == 3
    finally:
        await r.close()


async def test_a_copy_older_than_our_write_does_not_write_or_announce_again() -> None:
    """Our annotation removal (version 2) can reach the index after our status write (3):
    that copy is older than our write, however new its version looks."""
    domain = record("MailDomain", "example", DOMAIN)
    user = record("MailUser", "alice", {"address": "alice@example.test"})
    r = reconciler([domain], [user])
    kube = fake(r)
    kube.written_versions = ["4", "3"]
    try:
        await r.request()
        assert len(kube.patches) == 2
        assert len(kube.events) == 3
        set_index(
            r,
            [record("MailDomain", "example", DOMAIN, rv="2")],
            [record("MailUser", "alice", {"address": "alice@example.test"}, rv="2")],
        )  # fmt: skip
        await r.request()
        assert len(kube.patches) == 2, "the stale copy was taken for the status"
        assert len(kube.events) == 3

        # the index shows a copy newer than our write, with a status someone else changed
        written = {name: status for _, name, status in kube.patches}
        changed = {**written["alice"], "mailbox": "elsewhere"}
        set_index(
            r,
            [record("MailDomain", "example", DOMAIN, rv="5", status=written["example"])],
            [record("MailUser", "alice", {"address": "alice@example.test"}, rv="5",
                    status=changed)],
        )  # fmt: skip
        await r.request()
        assert [(name, status["mailbox"]) for _, name, status in kube.patches[2:]] == [
            ("alice", written["alice"]["mailbox"])]  # fmt: skip
        assert len(kube.events) == 3
    finally:
        await r.close()


async def test_a_failed_step_waits_for_retry_delay() -> None:
    r = reconciler([record("MailDomain", "example", DOMAIN)], [])
    kube = fake(r)
    kube.fail_create = KubeError(403, "Forbidden")
    try:
        await r.request()
        await r.request()
        await r.request()
        assert kube.creates == 1  # not again before retry_delay, however often asked
        status = kube.patches[-1][2]
        keys = next(c for c in status["conditions"] if c["type"] == "DKIMKeyReady")
        assert (keys["status"], keys["reason"]) == ("False", "DKIMSecretFailed")
        assert keys["message"] == "Secret example-dkim: Kubernetes API 403 Forbidden"
        assert kube.events == [("example", "Warning", "DKIMSecretFailed")]
        assert r._retry is not None
        assert not r._retry.done()

        kube.fail_create = None
        r.not_before.clear()  # retry_delay has passed
        await r.request()
        assert kube.creates == 2
        assert ("example", "Normal", "Ready") in kube.events
    finally:
        await r.close()


async def test_an_unexpected_error_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    r = reconciler([record("MailDomain", "example", DOMAIN)], [])
    fake(r).fail_patch = RuntimeError("a bug")
    try:
        await r.request()
        assert "reconcile failed; retrying" in caplog.text
        assert r._retry is not None
        assert not r._retry.done()
    finally:
        await r.close()


async def test_an_unreachable_api_is_a_kube_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from kubernetes import client

    config = client.Configuration()
    config.host = f"http://127.0.0.1:{port}"
    kube = Kube(config)
    try:
        with pytest.raises(KubeError) as raised:
            await kube.read_secret_data("mail", "x")
        assert raised.value.status == 0
        assert "unreachable" in str(raised.value)
    finally:
        kube.close()


def condition_in(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return dict(next(c for c in status["conditions"] if c["type"] == type_))


async def test_docs_show_the_dkim_selectors_in_the_order_the_operator_writes() -> None:
    spec = {"domain": "example.org", "dkim": {"selector": "mk2025", "algorithm": "both"}}
    r = reconciler([record("MailDomain", "example", spec)], [])
    try:
        await r.request()
    finally:
        await r.close()
    status = fake(r).patches[-1][2]
    docs = (Path(__file__).resolve().parents[3] / "docs" / "operator.md").read_text()
    message = condition_in(status, "DKIMKeyReady")["message"]
    assert f"message: {message}\n" in docs
    written = [rec["name"] for rec in status["dnsRecords"] if rec["purpose"] == "dkim"]
    assert re.findall(r"name: (\S+\._domainkey\.example\.org\.)", docs) == written


async def test_a_changed_spec_domain_is_refused_and_the_old_one_kept() -> None:
    r = reconciler([record("MailDomain", "example", {"domain": "example.test"})], [])
    try:
        await r.request()
        first = fake(r).patches[-1][2]
        assert first["domain"] == "example.test"
        assert condition_in(first, "Ready")["status"] == "True"

        renamed = record("MailDomain", "example", {"domain": "renamed.test"}, rv="3",
                         status=first)  # fmt: skip
        set_index(r, [renamed], [])
        await r.request()
        status = fake(r).patches[-1][2]
        assert status["domain"] == "example.test"
        ready = condition_in(status, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "DomainImmutable")
        assert [d.name for d in cast(FakeStore, r.store).tables[-1].domains] == ["example.test"]
        assert ("example", "Warning", "DomainImmutable") in fake(r).events
    finally:
        await r.close()


async def test_each_dkim_secret_is_parsed_once_per_content(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parsing an RSA key costs ~30 ms: a plan must not parse every domain's keys again."""
    parsed: list[str] = []
    real = dkim.record_of

    def counting(algorithm: Any, private_key: str) -> str:
        parsed.append(algorithm)
        return real(algorithm, private_key)

    monkeypatch.setattr(dkim, "record_of", counting)
    spec = {"domain": "example.test", "dkim": {"algorithm": "rsa-2048"}}
    pem = generate("rsa-sha256")
    r = reconciler([], [])
    try:
        for version in range(2, 6):  # four changes: a user's, a status echo, ...
            users = [record("MailUser", "alice", {"address": "alice@example.test"},
                            rv=str(version))]  # fmt: skip
            domain = record("MailDomain", "example", spec, rv=str(version))
            set_index(r, [domain], users, {("mail", "example-dkim"): {"mailkube.rsa-sha256": pem}})
            await r.request()
        assert parsed == ["rsa-sha256"]
        assert [k.selector for k in cast(FakeStore, r.store).tables[-1].domains[0].dkim] == [
            "mailkube"]  # fmt: skip

        # a new key in the Secret is parsed (once)
        other = generate("ed25519-sha256")
        both = {"mailkube.rsa-sha256": pem, "old.ed25519-sha256": other}
        set_index(r, [domain], users, {("mail", "example-dkim"): both})
        await r.request()
        await r.request()
        assert sorted(parsed) == ["ed25519-sha256", "rsa-sha256", "rsa-sha256"]
    finally:
        await r.close()


async def test_the_echo_of_our_own_status_write_plans_nothing() -> None:
    domain = record("MailDomain", "example", DOMAIN)
    r = reconciler([domain], [])
    fake(r).written_versions = ["7"]
    memo = kopf.Memo(state=OperatorState(r.settings, reconciler=r))
    try:
        await r.request()
        assert r.reconciles == 1
        echo = {"metadata": {"namespace": "mail", "name": "example", "uid": "uid-example",
                             "resourceVersion": "7"}}  # fmt: skip
        assert r.is_echo("maildomains", echo)
        await domains.domain_changed(memo=memo, body=echo)
        assert r.reconciles == 1  # not planned again

        changed = {"metadata": {**echo["metadata"], "resourceVersion": "8"}}
        assert not r.is_echo("maildomains", changed)
        await domains.domain_changed(memo=memo, body=changed)
        assert r.reconciles == 2
        # another object's write, or the same name made again, is no echo
        assert not r.is_echo("mailusers", echo)
        again = {"metadata": {**echo["metadata"], "uid": "another-uid"}}
        assert not r.is_echo("maildomains", again)
        # a deletion whose last copy carries our write's version is no echo either
        fake(r).written_versions = ["9"]
        set_index(r, [record("MailDomain", "example", DOMAIN, rv="8")], [])
        await r.request()
        gone = {"metadata": {**echo["metadata"], "resourceVersion": "9"}}
        assert r.is_echo("maildomains", gone)
        assert not r.is_echo("maildomains", gone, "DELETED")
        before = r.reconciles
        await domains.domain_changed(memo=memo, body=gone, type="DELETED")
        assert r.reconciles == before + 1
    finally:
        await r.close()


async def test_the_heap_is_frozen_once_the_first_table_is_out_and_after_bulk_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full collection of a 10,000-user heap stalls a change for a second: after the first
    publish the heap goes out of the cyclic collector's reach (gc.freeze), and again after a
    reconcile wrote BULK_WRITES statuses (their echoes' copies are new objects)."""
    frozen: list[bool] = []
    monkeypatch.setattr(lifecycle.gc, "freeze", lambda: frozen.append(True))
    monkeypatch.setattr(lifecycle.gc, "collect", lambda: 0)
    monkeypatch.setattr(reconciler_module, "BULK_WRITES", 2)
    r = reconciler([record("MailDomain", "example", DOMAIN)], [])
    waiting = asyncio.create_task(lifecycle._freeze_heap(r))

    async def frozen_times(n: int) -> bool:
        return len(frozen) == n

    try:
        await asyncio.sleep(0)  # let it start waiting
        assert frozen == []
        await r.request()  # the first table, and the domain's status: one write
        await eventually(lambda: frozen_times(1))
        assert not r.bulk_written.is_set()
        users = [record("MailUser", f"u{i}", {"address": f"u{i}@example.test"}) for i in range(2)]
        set_index(r, [record("MailDomain", "example", DOMAIN)], users)
        await r.request()  # two users' statuses (and the domain's count): a bulk write
        await eventually(lambda: frozen_times(2))
        assert not waiting.done()
    finally:
        waiting.cancel()
        await r.close()


class SlowStatusKube(FakeKube):
    """Each status patch is an API round trip: it yields to the loop until released."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.most = 0
        self.release = asyncio.Event()

    async def patch_status(self, plural: str, namespace: str, name: str,
                           status: dict[str, Any]) -> str | None:  # fmt: skip
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
            return await super().patch_status(plural, namespace, name, status)
        finally:
            self.in_flight -= 1


async def test_statuses_are_written_several_at_a_time_and_no_more() -> None:
    users = [record("MailUser", f"u{n}", {"address": f"u{n}@example.test"}) for n in range(30)]
    kube = SlowStatusKube()
    r = reconciler([record("MailDomain", "example", DOMAIN)], users, kube)
    try:
        running = asyncio.create_task(r.request())

        async def saturated() -> bool:
            return kube.in_flight == STATUS_WRITERS

        await eventually(saturated)
        kube.release.set()
        await running
        assert kube.most == STATUS_WRITERS
        assert sorted(name for _, name, _ in kube.patches) == sorted(
            ["example", *(f"u{n}" for n in range(30))]
        )
        assert len([e for e in kube.events if e[2] == "Published"]) == 30
    finally:
        await r.close()


async def test_a_user_change_writes_its_domain_only_and_a_moved_table_is_compared() -> None:
    """After the first publish, a MailUser change writes its domain's entry and nothing else
    (and only that user's status); a table replaced behind the operator's back is compared
    with the stored entries, not with what it last wrote."""
    names = ["one", "two", "three"]
    keys = {("mail", f"{n}-dkim"): {"mailkube.ed25519-sha256": generate("ed25519-sha256")}
            for n in names}  # fmt: skip
    domains = [record("MailDomain", n, {"domain": f"{n}.test", "dkim": {"algorithm": "ed25519"}})
               for n in names]  # fmt: skip
    users = [record("MailUser", f"u{i}", {"address": f"u{i}@{names[i % 3]}.test"})
             for i in range(12)]  # fmt: skip
    r = reconciler(domains, users)
    set_index(r, domains, users, keys)
    store = cast(FakeStore, r.store)
    try:
        await r.request()
        assert sorted(store.writes[-1][0]) == ["one.test", "three.test", "two.test"]
        # the index catches up with the statuses written
        written = {name: status for _, name, status in fake(r).patches}
        domains = [record("MailDomain", d.name, d.spec, rv="2", status=written[d.name])
                   for d in domains]  # fmt: skip
        users = [record("MailUser", u.name, u.spec, rv="2", status=written[u.name])
                 for u in users]  # fmt: skip
        set_index(r, domains, users, keys)
        await r.request()
        patches = len(fake(r).patches)

        users[4] = record("MailUser", "u4", {"address": "u4@two.test",
                                             "aliases": ["info@two.test"]}, rv="3",
                          status=users[4].status)  # fmt: skip
        set_index(r, domains, users, keys)
        await r.request()
        assert store.writes[-1] == ({"two.test": store.entries["two.test"]}, [])
        assert [d.name for d in store.tables[-1].domains] == ["one.test", "three.test", "two.test"]
        assert "info@two.test" in store.entries["two.test"]
        assert [name for _, name, _ in fake(r).patches[patches:]] == []  # still Ready

        # someone else wrote over our table: compared with what Redis holds
        store.entries.pop("one.test")
        await store.apply({}, [], store.tables[-1].model_dump_json(include={"tls_policies"}))
        await r.check_redis()
        assert store.writes[-1][0] == {"one.test": ANY}
    finally:
        await r.close()


async def test_a_user_status_write_that_failed_is_tried_again_though_nothing_changed() -> None:
    """The status step looks only at the users a plan redid, and at those whose status was
    not found right last time: a failed write is retried with no change to the user."""
    domain = record("MailDomain", "example", DOMAIN)
    users = [record("MailUser", f"u{i}", {"address": f"u{i}@example.test"}) for i in range(10)]
    r = reconciler([domain], users)
    kube = fake(r)
    try:
        await r.request()
        written = {name: status for _, name, status in kube.patches}
        domain = record("MailDomain", "example", DOMAIN, rv="2", status=written["example"])
        users = [record("MailUser", u.name, u.spec, rv="2", status=written[u.name])
                 for u in users]  # fmt: skip
        set_index(r, [domain], users)
        await r.request()
        before = len(kube.patches)

        users[3] = record("MailUser", "u3", {"address": "u3@example.test", "quota": "lots"},
                          rv="3", status=users[3].status)  # fmt: skip
        set_index(r, [domain], users)
        kube.fail_patch = KubeError(500, "Internal Server Error")
        await r.request()
        assert len(kube.patches) == before  # failed
        kube.fail_patch = None
        r.not_before.clear()  # retry_delay has passed
        await r.request()  # the retry: the same copies as before
        # the domain counts one user less
        assert [name for _, name, _ in kube.patches[before:]] == ["example", "u3"]
        ready = condition_in(kube.patches[-1][2], "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "Invalid")
    finally:
        await r.close()
