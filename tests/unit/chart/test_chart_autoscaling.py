"""worker.autoscaling: KEDA ScaledObjects on the queue's streams and consumer group, or an HPA
on the workers' queue-depth gauge, rendered by the real Helm engine; the names they use are
the ones the code uses (stream keys, the group, the metric)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
from chart_render import NAMESPACE, RELEASE, SCENARIOS, base_values, render

from mailkube_core.queue.keys import PartitionKeys
from mailkube_core.queue.queue import GROUP
from mailkube_worker import queue_depth

FULL = f"{RELEASE}-mailkube"


def triggers(scaled: dict[str, Any]) -> list[dict[str, Any]]:
    return list(scaled["spec"]["triggers"])


def test_off_by_default() -> None:
    result = render(base_values())
    assert not result.of_kind("ScaledObject")
    assert not result.of_kind("TriggerAuthentication")
    assert not result.of_kind("HorizontalPodAutoscaler")
    for role in ("local", "remote"):
        assert "replicas" in result.get("Deployment", f"{FULL}-worker-{role}")["spec"]


def test_keda_scales_each_role_on_its_lanes_pending_entries() -> None:
    keda = {"autoscaling": {"mode": "keda"}, "mailStorage": {"storageClass": "nfs-client"}}
    result = render(base_values(worker=keda))
    auth = result.get("TriggerAuthentication", f"{FULL}-worker-redis")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": f"{FULL}-redis", "key": "password"}
    ]
    for role in ("local", "remote"):
        name = f"{FULL}-worker-{role}"
        scaled = result.get("ScaledObject", name)
        spec = scaled["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": name}  # fmt: skip
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 10)
        (trigger,) = triggers(scaled)
        assert trigger["type"] == "redis-streams"
        assert trigger["authenticationRef"] == {"name": f"{FULL}-worker-redis"}
        assert trigger["metadata"] == {
            "address": f"{FULL}-redis.{NAMESPACE}.svc:6379",
            "databaseIndex": "0",
            "enableTLS": "false",
            "stream": PartitionKeys("mailkube", 0).stream(role),  # type: ignore[arg-type]
            "consumerGroup": GROUP,
            "pendingEntriesCount": "3",
        }
        # the autoscaler owns the replica count
        assert "replicas" not in result.get("Deployment", name)["spec"]
    # a scaling local role shares the mail volume between pods
    (claim,) = result.of_kind("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # the KEDA operator may read the chart's Redis
    policy = result.get("NetworkPolicy", f"{FULL}-redis")
    rule = policy["spec"]["ingress"][1]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "keda"}}}]  # fmt: skip
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]


def test_keda_with_partitions_tls_and_stream_length() -> None:
    result = render(base_values(**SCENARIOS["keda-workers-external-redis"]))
    assert f"{FULL}-worker-local" not in result.names("ScaledObject")  # not in roles
    assert "replicas" in result.get("Deployment", f"{FULL}-worker-local")["spec"]
    remote = triggers(result.get("ScaledObject", f"{FULL}-worker-remote"))
    both = triggers(result.get("ScaledObject", f"{FULL}-worker-all"))
    assert [t["name"] for t in remote] == ["remote-q0", "remote-q1"]
    assert [t["name"] for t in both] == ["local-q0", "local-q1", "remote-q0", "remote-q1"]
    for trigger in both:
        lane, partition = trigger["name"].split("-q")
        assert trigger["metadata"] == {
            "address": "redis.example.net:6380",
            "databaseIndex": "2",
            "enableTLS": "true",
            "stream": PartitionKeys("mk", int(partition)).stream(lane),  # type: ignore[arg-type]
            "streamLength": "20",  # 40 per replica over 2 partitions
        }
    auth = result.get("TriggerAuthentication", f"{FULL}-worker-redis")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "redis-auth", "key": "secret"}
    ]


def test_keda_on_redis_cluster() -> None:
    result = render(base_values(
        redis={"enabled": False},
        externalRedis={"url": "redis://node-0.redis.example.net:7000", "cluster": True},
        rspamd={"redis": {"servers": "rspamd-redis:6379"}},
        worker={"autoscaling": {"mode": "keda", "roles": ["remote"]}},
    ))  # fmt: skip
    (trigger,) = triggers(result.get("ScaledObject", f"{FULL}-worker-remote"))
    assert trigger["type"] == "redis-cluster-streams"
    assert trigger["metadata"]["addresses"] == "node-0.redis.example.net:7000"
    assert "databaseIndex" not in trigger["metadata"]
    assert "authenticationRef" not in trigger  # no password Secret
    assert not result.of_kind("TriggerAuthentication")


def test_hpa_on_the_queue_depth_gauge() -> None:
    result = render(base_values(**SCENARIOS["hpa-workers"]))
    # the metric the workers export: the OpenTelemetry gauge in its Prometheus name
    assert "mailkube.queue.messages".replace(".", "_") == "mailkube_queue_messages"
    assert queue_depth.STATES[:2] == ("ready", "active")
    for role, lanes in (("local", ["local"]), ("remote", ["remote"])):
        name = f"{FULL}-worker-{role}"
        hpa = result.get("HorizontalPodAutoscaler", name)
        spec = hpa["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
        (metric,) = spec["metrics"]
        assert metric["type"] == "External"
        assert metric["external"]["metric"] == {
            "name": "mailkube_queue_messages",
            "selector": {"matchExpressions": [
                {"key": "lane", "operator": "In", "values": lanes},
                {"key": "state", "operator": "In", "values": ["ready", "active"]},
            ]},
        }  # fmt: skip
        assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "50"}
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
        assert "replicas" not in result.get("Deployment", name)["spec"]
    assert not result.of_kind("ScaledObject")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"worker": {"autoscaling": {"mode": "keda", "keda": {"pendingEntriesCount": 4}}}},
         r"must be below queue_workers \(4\)"),
        ({"worker": {"autoscaling": {"mode": "keda", "minReplicas": 5, "maxReplicas": 2}}},
         "minReplicas must not exceed maxReplicas"),
        ({"redis": {"enabled": False},
          "externalRedis": {"urlKey": "url", "existingSecret": "redis-auth"},
          "rspamd": {"enabled": False, "url": "http://rspamd:11333"},
          "worker": {"autoscaling": {"mode": "keda"}}},
         "KEDA cannot read externalRedis.urlKey"),
    ],
)  # fmt: skip
def test_settings_keda_cannot_work_with_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(base_values(**values))


def test_schema_refuses_a_scale_to_zero_and_unknown_modes() -> None:
    for bad in ({"minReplicas": 0}, {"mode": "vpa"}, {"keda": {"trigger": "lag"}}):
        with pytest.raises(helm.HelmValuesError):
            render(base_values(worker={"autoscaling": bad}))


def test_keda_asks_the_sentinels() -> None:
    """redis.mode sentinel: the triggers go through the sentinels to the primary, and KEDA
    may reach the sentinel port."""
    remote = {"autoscaling": {"mode": "keda", "roles": ["remote"]}}
    result = render(base_values(redis={"mode": "sentinel"}, worker=remote))
    (trigger,) = triggers(result.get("ScaledObject", f"{FULL}-worker-remote"))
    assert trigger["type"] == "redis-sentinel-streams"
    hosts = trigger["metadata"]["addresses"].split(",")
    assert hosts == [f"{FULL}-redis-{n}.{FULL}-redis-headless.{NAMESPACE}.svc:26379"
                     for n in range(3)]  # fmt: skip
    assert trigger["metadata"]["sentinelMaster"]
    assert trigger["metadata"]["stream"] == PartitionKeys("mailkube", 0).stream("remote")
    policy = result.get("NetworkPolicy", f"{FULL}-redis")
    keda = next(r for r in policy["spec"]["ingress"] if "namespaceSelector" in r["from"][0])
    assert {p["port"] for p in keda["ports"]} == {"redis", "sentinel"}

    own = render(base_values(
        redis={"enabled": False},
        externalRedis={"sentinels": ["s1.example.net:26379", "s2.example.net:26379"],
                       "sentinelMaster": "mymaster", "existingSecret": "redis-auth",
                       "sentinelPasswordKey": "sentinel-password"},
        rspamd={"redis": {"servers": "rspamd-redis:6379"}},
        worker={"autoscaling": {"mode": "keda", "roles": ["remote"]}},
    ))  # fmt: skip
    (trigger,) = triggers(own.get("ScaledObject", f"{FULL}-worker-remote"))
    assert trigger["metadata"]["addresses"] == "s1.example.net:26379,s2.example.net:26379"
    assert trigger["metadata"]["sentinelMaster"] == "mymaster"
    auth = own.get("TriggerAuthentication", f"{FULL}-worker-redis")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "redis-auth", "key": "password"},
        {"parameter": "sentinelPassword", "name": "redis-auth", "key": "sentinel-password"},
    ]
