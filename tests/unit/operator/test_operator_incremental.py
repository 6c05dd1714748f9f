"""A reconcile of changed MailUsers only (the stores' TrackedIndex says which): the same
routing table and the same verdicts as a reconcile that walks every object, through a run of
changes (aliases added, conflicts made and freed, users deleted, moved to another domain)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from test_operator_reconciler import FakeKube, FakeStore, reconciler, record

from mailkube_core.routing.dkim_keys import generate
from mailkube_operator import plan
from mailkube_operator.plan import ObjectRecord
from mailkube_operator.reconciler import FULL_SWEEP_INTERVAL, Indexes, Reconciler
from mailkube_operator.store import TrackedIndex

KEY = generate("ed25519-sha256")


def domain(name: str, fqdn: str) -> ObjectRecord:
    return record(
        "MailDomain", name, {"domain": fqdn, "dkim": {"selector": "s", "algorithm": "ed25519"}}
    )


def user(name: str, address: str, aliases: list[str] | None = None, rv: str = "1") -> ObjectRecord:
    return record("MailUser", name, {"address": address, "aliases": aliases or []}, rv=rv)


def verdicts(r: Reconciler) -> dict[str, tuple[str, str]]:
    """Each object's Ready condition as last written: name -> (status, reason)."""
    out: dict[str, tuple[str, str]] = {}
    for _, name, status in cast(FakeKube, r.kube).patches:
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        out[name] = (ready["status"], ready["reason"])
        if "users" in status:  # a MailDomain: how many users it serves
            out[f"{name}.users"] = (str(status["users"]), "")
    return out


async def test_changed_users_only_give_what_a_full_pass_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    users_only = 0
    build_users_only = plan._build_users_only

    def counting(*args: Any, **kwargs: Any) -> plan.Plan:
        nonlocal users_only
        users_only += 1
        return build_users_only(*args, **kwargs)

    monkeypatch.setattr(plan, "_build_users_only", counting)
    domains = [domain("d1", "example.test"), domain("d2", "other.test")]
    users = {u.name: u for u in (user("alice", "alice@example.test", ["a1@example.test"]),
                                 user("bob", "bob@example.test"))}  # fmt: skip
    secrets = {("mail", f"{d.name}-dkim"): {"s.ed25519-sha256": KEY} for d in domains}
    full = reconciler(domains, list(users.values()))  # plain dicts: walks every object
    tracked = reconciler(domains, list(users.values()))
    indexes: list[TrackedIndex[Any]] = [TrackedIndex() for _ in range(4)]
    for d in domains:
        indexes[0][d.key] = [d]
    for u in users.values():
        indexes[1][u.key] = [u]
    for key, data in secrets.items():
        indexes[3][key] = [data]
    tracked.indexes = Indexes(*indexes)
    assert full.indexes is not None
    full.indexes.dkim_secrets = {key: [data] for key, data in secrets.items()}

    async def step(change: ObjectRecord | None, gone: str | None = None) -> None:
        if change is not None:
            users[change.name] = change
            indexes[1][change.key] = [change]
        if gone is not None:
            del indexes[1][users.pop(gone).key]
        assert full.indexes is not None
        full.indexes.users = {u.key: [u] for u in users.values()}
        await full.request()
        await tracked.request()
        assert cast(FakeStore, tracked.store).entries == cast(FakeStore, full.store).entries
        assert verdicts(tracked) == verdicts(full)

    await step(None)  # the first: a full pass for both
    assert users_only == 0
    await step(user("alice", "alice@example.test", ["a1@example.test", "shared@example.test"],
                    rv="2"))  # fmt: skip
    await step(user("carol", "shared@example.test"))
    assert verdicts(tracked)["carol"] == ("False", "AddressConflict")
    await step(None, gone="alice")
    assert verdicts(tracked)["carol"] == ("True", "Published")
    await step(user("bob", "bob@other.test", rv="2"))
    await step(user("dave", "dave@example.test", ["x@nowhere.test"]))
    assert verdicts(tracked)["dave"] == ("False", "Invalid")
    entries = cast(FakeStore, tracked.store).entries
    assert '"bob@other.test"' in entries["other.test"]
    assert '"alice@example.test"' not in entries["example.test"]
    assert verdicts(tracked)["d2.users"] == ("1", "")
    assert users_only >= 5  # the tracked reconciler planned the changed users only
    assert full.reconciles == tracked.reconciles

    # a MailDomain change: a full pass (the domains' part is planned again)
    before = users_only
    d3 = domain("d3", "third.test")
    indexes[0][d3.key] = [d3]
    indexes[3][("mail", "d3-dkim")] = [{"s.ed25519-sha256": KEY}]
    full.indexes.domains = {d.key: [d] for d in [*domains, d3]}
    full.indexes.dkim_secrets = {**full.indexes.dkim_secrets, ("mail", "d3-dkim"): [
        {"s.ed25519-sha256": KEY}]}  # fmt: skip
    await step(user("erin", "erin@third.test"))
    assert users_only == before
    assert verdicts(tracked)["erin"] == ("True", "Published")

    # the safety sweep: by time since the last full pass, not by the number of reconciles
    await step(user("erin", "erin@third.test", ["e1@third.test"], rv="2"))
    assert users_only == before + 1
    tracked._swept_at -= FULL_SWEEP_INTERVAL
    await step(user("erin", "erin@third.test", ["e2@third.test"], rv="3"))
    assert users_only == before + 1  # walked every object
    await step(user("erin", "erin@third.test", ["e3@third.test"], rv="4"))
    assert users_only == before + 2
    await full.close()
    await tracked.close()
