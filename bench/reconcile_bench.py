"""The operator's reconcile alone, in process: D MailDomains and U MailUsers with a fake API
and a fake routing store (tests/unit/operator/test_operator_reconciler.py's FakeKube), one
alias change at a time; the CPU of each reconcile (median and max of 20), the heap frozen
after the first as the operator does. What bench/operator_bench.py measures without the API
server, kopf and the network.

    .venv/bin/python bench/reconcile_bench.py 1000 10000
    .venv/bin/python bench/reconcile_bench.py 1000 10000 --profile   # cProfile, by own time
    .venv/bin/python bench/reconcile_bench.py 1000 10000 --untracked # indexes without dirty sets
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "unit" / "operator")]

from test_operator_reconciler import FakeKube, record, set_index  # noqa: E402

from mailkube_core.routing import RoutingStore  # noqa: E402
from mailkube_core.routing.dkim_keys import generate  # noqa: E402
from mailkube_core.settings import OperatorSettings  # noqa: E402
from mailkube_operator.kube import Kube  # noqa: E402
from mailkube_operator.reconciler import Indexes, Reconciler  # noqa: E402
from mailkube_operator.store import TrackedIndex  # noqa: E402


class CountingStore:
    """A routing store that keeps only how many entries each write took."""

    def __init__(self) -> None:
        self.version = 0
        self.written: list[int] = []

    async def apply(self, changed: dict[str, str], deleted: list[str], globals_json: str, *,
                    expected_version: int | None = None) -> int:  # fmt: skip
        self.version += 1
        self.written.append(len(changed) + len(deleted))
        return self.version

    async def replace_entries(self, entries: dict[str, str], globals_json: str) -> tuple[int, int]:
        self.version += 1
        self.written.append(len(entries))
        return self.version, len(entries)


async def run(domains_n: int, users_n: int, profile: bool, tracked: bool) -> None:
    settings = OperatorSettings.model_validate(
        {"hostname": "op.example.test", "retry_delay": "30s", "log_format": "text"}
    )
    store = CountingStore()
    r = Reconciler(settings=settings, store=cast(RoutingStore, store), kube=cast(Kube, FakeKube()))
    key = generate("ed25519-sha256")
    spec: dict[str, Any] = {"selector": "bench", "algorithm": "ed25519"}
    domains = [record("MailDomain", f"d{d}", {"domain": f"d{d}.example.test", "dkim": spec})
               for d in range(domains_n)]  # fmt: skip
    users = [record("MailUser", f"u{u}", {"address": f"u{u}@d{u % domains_n}.example.test"})
             for u in range(users_n)]  # fmt: skip
    secrets = {("mail", f"d{d}-dkim"): {"bench.ed25519-sha256": key} for d in range(domains_n)}
    set_index(r, domains, users, secrets)
    start = time.process_time()
    await r.request()
    print(f"first reconcile: {time.process_time() - start:.3f} s CPU")
    # the index catches up with the statuses written
    written = {name: status for _, name, status in cast(FakeKube, r.kube).patches}
    domains = [record("MailDomain", d.name, d.spec, rv="2", status=written[d.name])
               for d in domains]  # fmt: skip
    users = [record("MailUser", u.name, u.spec, rv="2", status=written[u.name]) for u in users]
    set_index(r, domains, users, secrets)
    await r.request()
    if tracked:  # the stores' indexes, which record the keys that change (store.TrackedIndex)
        indexes: list[TrackedIndex[Any]] = [TrackedIndex() for _ in range(4)]
        for index, objects in zip(indexes[:2], (domains, users), strict=True):
            for o in objects:
                index[o.key] = [o]
        for key, data in secrets.items():
            indexes[3][key] = [data]
        r.indexes = Indexes(*indexes)
        await r.request()  # everything is new to it: a full pass
    gc.collect()
    gc.freeze()
    profiler = cProfile.Profile()
    times = []
    for i in range(20):
        u = (i * 7919) % users_n
        users[u] = record(
            "MailUser", f"u{u}",
            {**users[u].spec, "aliases": [f"alias{i}@d{u % domains_n}.example.test"]},
            rv=str(10 + i), status=users[u].status,
        )  # fmt: skip
        if tracked:
            assert r.indexes is not None
            cast(TrackedIndex[Any], r.indexes.users)[users[u].key] = [users[u]]
        else:
            set_index(r, domains, users, secrets)
        start = time.process_time()
        if profile:
            profiler.enable()
        await r.request()
        if profile:
            profiler.disable()
        times.append(time.process_time() - start)
    print(f"a change: {statistics.median(times):.4f} s CPU (median of 20), max "
          f"{max(times):.4f} s; entries written: {store.written[-5:]}")  # fmt: skip
    if profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    await r.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("domains", type=int)
    parser.add_argument("users", type=int)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--untracked", action="store_true",
                        help="plain dicts as indexes: each reconcile walks all")  # fmt: skip
    args = parser.parse_args()
    asyncio.run(run(args.domains, args.users, args.profile, not args.untracked))


if __name__ == "__main__":
    main()
