"""The operator at a hosting platform's scale, against a real API server on loopback
(tests/kube_apiserver.py: etcd, kube-apiserver and kube-controller-manager 1.20.2), logged in
with the chart's ServiceAccount token, and a private redis-server.

1. D MailDomains (each with its DKIM Secret already there: RSA + Ed25519, `algorithm: both`),
   U MailUsers spread over them, P of them with a password Secret;
2. the operator (`python -m mailkube_operator`, as in its pod) starts: time until /readyz,
   until the routing table holds every user, until every object's status is written;
3. C changes, one at a time (a MailUser's alias): the time from the API's answer to the
   table in Redis having it (p50/p99), and the operator's CPU per change;
4. SIGTERM (time to exit), a new process: time to ready and published again, and whether any
   password was hashed again (the stored hashes are compared);
5. sizes: RSS of the operator, apiserver and etcd; the table in Redis (bytes: every
   domain's entry), a gateway's first load of it (RoutingReader.start: time, memory), and
   its reload after one change (a delta: the one domain fetched, the snapshot rebuilt).

    .venv/bin/python bench/operator_bench.py                        # 1,000 / 10,000
    .venv/bin/python bench/operator_bench.py --domains 100 --users 1000 --changes 50
    .venv/bin/python bench/operator_bench.py --json results.json

Every wait has a deadline; the servers die with this process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from chart_render import base_values, render  # noqa: E402
from kube_apiserver import ControlPlane  # noqa: E402
from kubernetes import client  # noqa: E402
from redis_servers import RedisServer, free_port  # noqa: E402

from mailkube_core import parent_death  # noqa: E402
from mailkube_core.redis_client import connect_redis  # noqa: E402
from mailkube_core.routing import RoutingReader, RoutingStore  # noqa: E402
from mailkube_core.routing.dkim_keys import generate  # noqa: E402
from mailkube_core.settings import OperatorSettings  # noqa: E402
from mailkube_operator.secrets import hashes_key  # noqa: E402

NS = "mail"
GROUP, VERSION = "mailkube.io", "v1alpha1"
MERGE = "application/merge-patch+json"
PREFIX = "mailkube"


def now() -> float:
    return time.monotonic()


async def until(check: Callable[[], Awaitable[bool]], limit: float, what: str,
                interval: float = 0.1) -> float:  # fmt: skip
    """Poll check() until true; the time it took. TimeoutError naming `what` at the deadline."""
    start = now()
    while not await check():
        if now() - start > limit:
            raise TimeoutError(f"{what}: not within {limit:g}s")
        await asyncio.sleep(interval)
    return now() - start


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return cpu, rss


class Operator:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        env = {**env, "MAILKUBE_TELEMETRY_LISTEN": f"127.0.0.1:{self.port}"}
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailkube_operator"], env=env, stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=parent_death.preexec(signal.SIGKILL),
            )  # fmt: skip

    async def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the operator exited with {self.process.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await reader.read()
        writer.close()
        return response.startswith(b"HTTP/1.1 200")

    def stats(self) -> tuple[float, int]:
        return proc_stats(self.process.pid)

    def stop(self) -> tuple[float, int]:
        start = now()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(120)
        return now() - start, code


def make_objects(domains: int, users: int, passwords: int) -> list[dict[str, Any]]:
    rsa = [generate("rsa-sha256") for _ in range(8)]  # reused: generating is not measured
    objects: list[dict[str, Any]] = []
    for d in range(domains):
        name = f"d{d}"
        data = {"bench.rsa-sha256": rsa[d % len(rsa)],
                "bench-ed25519.ed25519-sha256": generate("ed25519-sha256")}  # fmt: skip
        objects.append({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": f"{name}-dkim", "namespace": NS,
                         "labels": {"mailkube.io/dkim-for": name}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        })  # fmt: skip
        objects.append({
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "MailDomain",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"domain": f"{name}.example.test",
                     "dkim": {"selector": "bench", "algorithm": "both"}},
        })  # fmt: skip
    for u in range(users):
        spec: dict[str, Any] = {"address": f"u{u}@d{u % domains}.example.test"}
        if u < passwords:
            objects.append({
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": f"u{u}-pw", "namespace": NS},
                "stringData": {"password": f"password-of-u{u}"},
            })  # fmt: skip
            spec["passwordSecretRef"] = {"name": f"u{u}-pw"}
        objects.append({"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailUser",
                        "metadata": {"name": f"u{u}", "namespace": NS}, "spec": spec})  # fmt: skip
    return objects


def create_all(plane: ControlPlane, objects: list[dict[str, Any]], threads: int = 8) -> float:
    api = plane.api_client()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)

    def create(obj: dict[str, Any]) -> None:
        if obj["kind"] == "Secret":
            core.create_namespaced_secret(NS, obj)
        else:
            plural = "maildomains" if obj["kind"] == "MailDomain" else "mailusers"
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, plural, obj)

    start = now()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, objects))
    return now() - start


def count_ready(plane: ControlPlane, plural: str) -> int:
    custom = client.CustomObjectsApi(plane.api_client())
    items = custom.list_namespaced_custom_object(GROUP, VERSION, NS, plural)["items"]
    done = 0
    for item in items:
        status = item.get("status") or {}
        generation = (item.get("metadata") or {}).get("generation")
        if status.get("observedGeneration") == generation and any(
            c.get("type") == "Ready" for c in status.get("conditions") or []
        ):
            done += 1
    return done


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="operator-bench-"))
    results: dict[str, Any] = {
        "domains": args.domains, "users": args.users, "passwords": args.passwords,
        "changes": args.changes,
    }  # fmt: skip
    plane = ControlPlane(work / "kube")
    redis_server = RedisServer(work / "redis", appendfsync="everysec")
    operator: Operator | None = None
    try:
        t = now()
        plane.start()
        redis_server.start()
        results["control_plane_start_s"] = round(now() - t, 2)
        plane.core().create_namespace({"metadata": {"name": NS}})
        rendered = render(base_values(), release="mail", namespace=NS)
        manifests = [m for m in rendered.manifests
                     if "helm.sh/hook" not in (m["metadata"].get("annotations") or {})]  # fmt: skip
        crds = [m for m in manifests if m["kind"] == "CustomResourceDefinition"]
        plane.apply(crds, NS)
        for crd in crds:
            plane.wait_established(crd["metadata"]["name"])
        rbac = [m for m in manifests
                if m["kind"] in ("ServiceAccount", "Role", "RoleBinding")]  # fmt: skip
        plane.apply(rbac, NS)
        account = next(m["metadata"]["name"] for m in rbac if m["kind"] == "ServiceAccount")
        token_file = work / "token"
        token_file.write_text(plane.service_account_token(NS, account))

        objects = make_objects(args.domains, args.users, args.passwords)
        results["create_objects"] = len(objects)
        results["create_s"] = round(create_all(plane, objects), 1)
        print(f"created {len(objects)} objects in {results['create_s']} s", file=sys.stderr)

        settings = OperatorSettings.model_validate({
            "redis_url": redis_server.url, "hostname": "operator-0", "namespace": NS,
            "kube_api_server": plane.url, "kube_token_file": str(token_file),
            "kube_ca_file": str(plane.ca_file), "log_level": "WARNING",
        })  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
        env.update({
            "MAILKUBE_REDIS_URL": redis_server.url, "MAILKUBE_HOSTNAME": "operator-0",
            "MAILKUBE_NAMESPACE": NS, "MAILKUBE_KUBE_API_SERVER": plane.url,
            "MAILKUBE_KUBE_TOKEN_FILE": str(token_file),
            "MAILKUBE_KUBE_CA_FILE": str(plane.ca_file),
            "MAILKUBE_LOG_LEVEL": "WARNING", "MAILKUBE_INITIAL_PUBLISH_DELAY": "1s",
        })  # fmt: skip
        redis = connect_redis(settings)
        store = RoutingStore(redis, PREFIX)

        async def published() -> bool:
            try:
                snapshot = await store.load()
            except Exception:
                return False
            return len(snapshot.table.users) == args.users

        async def statuses() -> bool:
            users = await asyncio.to_thread(count_ready, plane, "mailusers")
            domains = await asyncio.to_thread(count_ready, plane, "maildomains")
            return users == args.users and domains == args.domains

        # -- first start ------------------------------------------------------------------
        log = work / "operator.log"
        t = now()
        operator = Operator(env, log)
        await until(operator.ready, args.timeout, "first start: /readyz")
        results["first_ready_s"] = round(now() - t, 1)
        await until(published, args.timeout, "first start: every user published", 0.5)
        results["first_published_s"] = round(now() - t, 1)
        await until(statuses, args.timeout, "first start: every status written", 5)
        results["first_statuses_s"] = round(now() - t, 1)
        cpu, rss = operator.stats()
        results["first_start_cpu_s"] = round(cpu, 1)
        results["operator_rss_mb"] = round(rss / 2**20)
        print(f"first start: {results}", file=sys.stderr)

        # -- idle: what the operator spends with nothing changing (its timers, the periodic
        # checks), so a change's own cost can be told from the background's ----------------
        cpu_before, _ = operator.stats()
        await asyncio.sleep(args.idle)  # a measurement window, not a wait for state
        idle_cpu_per_s = (operator.stats()[0] - cpu_before) / args.idle
        results["idle_cpu_per_s"] = round(idle_cpu_per_s, 4)

        # -- changes, one at a time -------------------------------------------------------
        custom = client.CustomObjectsApi(plane.api_client())
        latencies: list[float] = []
        slowest_at = 0.0
        profiler = None
        if args.py_spy:
            profiler = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--pid", str(operator.process.pid), "--rate", "200",
                "--format", "raw", "--output", args.py_spy,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        cpu_before, _ = operator.stats()
        changes_start = now()
        for i in range(args.changes):
            user = f"u{(i * 7919) % args.users}"
            domain = f"d{(i * 7919) % args.users % args.domains}.example.test"
            alias = f"alias{i}@{domain}"
            await asyncio.to_thread(
                custom.patch_namespaced_custom_object, GROUP, VERSION, NS, "mailusers", user,
                {"spec": {"aliases": [alias]}},
            )  # fmt: skip
            t = now()

            async def has_alias(alias: str = alias, domain: str = domain) -> bool:
                # the raw JSON of the domain's entry: parsing takes CPU the operator needs
                raw = await redis.hget(store.domains_key, domain)
                return raw is not None and f'"{alias}"'.encode() in raw

            await until(has_alias, 60, f"change {i}", interval=0.01)
            latencies.append(now() - t)
            if latencies[-1] == max(latencies):
                slowest_at = time.time()
        cpu_after, rss = operator.stats()
        changes_s = now() - changes_start
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            await asyncio.wait_for(profiler.wait(), 60)
        results["change_slowest"] = f"#{latencies.index(max(latencies))} at {slowest_at:.3f}"
        latencies.sort()
        results["change_p50_s"] = round(statistics.median(latencies), 3)
        results["change_p99_s"] = round(latencies[min(len(latencies) - 1,
                                                      int(len(latencies) * 0.99))], 3)  # fmt: skip
        results["change_max_s"] = round(latencies[-1], 3)
        results["cpu_per_change_s"] = round((cpu_after - cpu_before) / args.changes, 4)
        # less the background's CPU over the same time (idle_cpu_per_s)
        net = cpu_after - cpu_before - idle_cpu_per_s * changes_s
        results["cpu_per_change_net_s"] = round(net / args.changes, 4)
        results["operator_rss_after_changes_mb"] = round(rss / 2**20)
        # the last change's status too, before the restart
        await until(statuses, args.timeout, "statuses after the changes", 2)

        # -- restart ----------------------------------------------------------------------
        stored_before = await redis.hgetall(hashes_key(PREFIX))
        version_before = (await store.load()).version
        stop_s, code = operator.stop()
        results["sigterm_exit_s"] = round(stop_s, 2)
        results["sigterm_exit_code"] = code

        async def republished() -> bool:
            return (await store.load()).version > version_before

        t = now()
        operator = Operator(env, log)
        await until(operator.ready, args.timeout, "restart: /readyz")
        results["restart_ready_s"] = round(now() - t, 1)
        await until(republished, args.timeout, "restart: published again", 0.2)
        results["restart_published_s"] = round(now() - t, 1)
        cpu, rss = operator.stats()
        results["restart_cpu_s"] = round(cpu, 1)
        results["restart_rss_mb"] = round(rss / 2**20)
        stored_after = await redis.hgetall(hashes_key(PREFIX))
        results["restart_rehashed"] = len(set(stored_after.items()) - set(stored_before.items()))

        # -- sizes --------------------------------------------------------------------------
        stored = await store.stored()
        results["table_bytes"] = sum(len(d) for d in stored.entries.values())
        results["largest_entry_bytes"] = max(len(d) for d in stored.entries.values())
        tracemalloc.start()
        t, cpu = now(), time.process_time()
        reader = RoutingReader(store, dt.timedelta(seconds=60))
        await reader._reload()
        results["table_load_s"] = round(now() - t, 3)
        results["table_load_cpu_s"] = round(time.process_time() - cpu, 3)
        results["table_load_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
        assert len(reader.snapshot.table.users) == args.users
        # one change more (the operator still runs): the reader's delta
        alias = f"alias-last@d{7 % args.domains}.example.test"
        await asyncio.to_thread(
            custom.patch_namespaced_custom_object, GROUP, VERSION, NS, "mailusers",
            f"u{7 % args.users}", {"spec": {"aliases": [alias]}},
        )  # fmt: skip
        before = reader.snapshot.version
        await until(lambda: _moved(store, before), 60, "the last change", interval=0.01)
        t, cpu = now(), time.process_time()
        await reader._reload()
        results["delta_reload_s"] = round(now() - t, 4)
        results["delta_reload_cpu_s"] = round(time.process_time() - cpu, 4)
        results["delta_reload_fetched"] = reader.fetched
        assert reader.snapshot.resolve(alias) is not None
        for name, process in (("apiserver", plane.apiserver), ("etcd", plane.etcd)):
            assert process.process is not None
            results[f"{name}_rss_mb"] = round(proc_stats(process.process.pid)[1] / 2**20)
        await redis.aclose()
    finally:
        if operator is not None and operator.process.poll() is None:
            operator.process.kill()
        plane.stop()
        redis_server.stop()
    return results


async def _moved(store: RoutingStore, version: int) -> bool:
    return await store.version() > version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument(
        "--passwords",
        type=int,
        default=100,
        help="users with a password Secret (argon2id: ~0.2 s each at first)",
    )
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--idle",
        type=float,
        default=20,
        help="seconds of no change in which the background CPU is measured",
    )
    parser.add_argument(
        "--py-spy",
        metavar="FILE",
        help="profile the operator during the changes (py-spy raw output)",
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if args.py_spy and shutil.which("py-spy") is None:
        parser.error("--py-spy: no py-spy on PATH (pip install --user py-spy)")
    load_before = os.getloadavg()[0]
    results = asyncio.run(run(args))
    results["load_average_start_end"] = f"{load_before:.2f} / {os.getloadavg()[0]:.2f}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT, check=False).stdout.strip()  # fmt: skip
    results["machine"] = f"{platform.node()} {os.cpu_count()} CPU {platform.machine()}"
    results["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results["commit"] = commit
    for key, value in results.items():
        print(f"{key:32} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
