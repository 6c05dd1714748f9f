"""The Helm chart rendered by the real Helm engine (helm-python-sdk) with its defaults and one
values set per production shape: helm lint, the Kubernetes schemas of the oldest supported
version, and what each shape must produce."""

from __future__ import annotations

import base64
import subprocess
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_render import (
    CHART,
    HOSTNAME,
    NAMESPACE,
    OLDEST_KUBERNETES,
    RELEASE,
    SCENARIOS,
    Rendered,
    base_values,
    env_of,
    render,
)

FULL = f"{RELEASE}-mailkube"

# The custom resources the chart may create have no schema in kubernetes-validate: these are
# the parts of cert-manager's, the Prometheus Operator's and KEDA's CRD schemas the chart
# uses, closed (additionalProperties: false) so that a misspelt field fails.
_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS},
    "additionalProperties": False,
}
CUSTOM_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("cert-manager.io/v1", "Certificate"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": _STR,
            "kind": _STR,
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["secretName", "issuerRef"],
                "additionalProperties": False,
                "properties": {
                    "secretName": _STR,
                    "secretTemplate": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"labels": _LABELS, "annotations": _LABELS},
                    },
                    "dnsNames": {"type": "array", "items": _STR, "minItems": 1},
                    "issuerRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {"name": _STR, "kind": _STR, "group": _STR},
                    },
                    "duration": _STR,
                    "renewBefore": _STR,
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                    },
                },
            },
        },
        "additionalProperties": False,
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": _STR,
            "kind": _STR,
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": _STR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchNames": {"type": "array", "items": _STR}},
                    },
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": _LABELS},
                    },
                    "endpoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": _STR,
                                "path": _STR,
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
        "additionalProperties": False,
    },
    # KEDA's, the parts the chart uses (keda.sh/v1alpha1): trigger metadata is a map of strings
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": _STR,
            "kind": _STR,
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {"apiVersion": _STR, "kind": _STR, "name": _STR},
                    },
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "behavior": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "scaleDown": {
                                                "type": "object",
                                                "additionalProperties": False,
                                                "properties": {
                                                    "stabilizationWindowSeconds": {
                                                        "type": "integer",
                                                        "minimum": 0,
                                                        "maximum": 3600,
                                                    }
                                                },
                                            }
                                        },
                                    }
                                },
                            }
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {
                                    "enum": [
                                        "redis-streams",
                                        "redis-cluster-streams",
                                        "redis-sentinel-streams",
                                    ]
                                },
                                "name": _STR,
                                "metadata": _LABELS,
                                "authenticationRef": {
                                    "type": "object",
                                    "required": ["name"],
                                    "additionalProperties": False,
                                    "properties": {"name": _STR, "kind": _STR},
                                },
                            },
                        },
                    },
                },
            },
        },
        "additionalProperties": False,
    },
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": _STR,
            "kind": _STR,
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "additionalProperties": False,
                            "properties": {"parameter": _STR, "name": _STR, "key": _STR},
                        },
                    }
                },
            },
        },
        "additionalProperties": False,
    },
}


def scenario(name: str) -> Rendered:
    return render(base_values(**SCENARIOS[name]))


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return scenario(request.param)


# -- every values set --------------------------------------------------------------------------


def test_helm_lint_is_clean() -> None:
    """`helm lint --strict` with the oldest supported Kubernetes, defaults and every shape:
    informational messages only (the chart has no icon)."""
    for name, values in sorted(SCENARIOS.items()):
        report = helm.lint(
            CHART,
            base_values(**values),
            strict=True,
            namespace=NAMESPACE,
            kube_version=f"v{OLDEST_KUBERNETES}.0",
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [], (name, report["errors"])
        assert problems == [], (name, problems)


def test_every_manifest_validates_against_the_oldest_supported_kubernetes(
    rendered: Rendered,
) -> None:
    assert rendered.manifests
    for manifest, source in zip(rendered.manifests, rendered.sources, strict=True):
        key = (manifest["apiVersion"], manifest["kind"])
        if key in CUSTOM_SCHEMAS:
            jsonschema.validate(manifest, CUSTOM_SCHEMAS[key])
            continue
        try:
            kubernetes_validate.validate(manifest, OLDEST_KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{source}: {manifest['kind']}/{manifest['metadata']['name']}: "
                        f"{path}: {error.message}")  # fmt: skip


def test_chart_declares_the_oldest_supported_kubernetes() -> None:
    metadata = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert metadata["apiVersion"] == "v2"
    assert metadata["kubeVersion"] == f">={OLDEST_KUBERNETES}.0-0"
    assert (
        f"Kubernetes {OLDEST_KUBERNETES}" in (CHART.parents[1] / "docs/kubernetes.md").read_text()
    )


def test_names_are_unique_and_namespaced(rendered: Rendered) -> None:
    seen: set[tuple[str, str]] = set()
    for manifest in rendered.manifests:
        meta = manifest["metadata"]
        key = (manifest["kind"], meta["name"])
        assert key not in seen, key
        seen.add(key)
        assert len(meta["name"]) <= 63
        cluster_scoped = manifest["kind"] in (
            "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
        )  # fmt: skip
        assert ("namespace" in meta) != cluster_scoped, key
        if not cluster_scoped:
            assert meta["namespace"] == NAMESPACE, key


def test_standard_labels_everywhere(rendered: Rendered) -> None:
    for manifest in rendered.manifests:
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "mailkube"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "mailkube"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/component"]
        assert labels["helm.sh/chart"] == "mailkube-0.1.0"


def test_common_labels_reach_every_object() -> None:
    result = scenario("hpa-cluster-wide")
    for manifest in result.manifests:
        assert manifest["metadata"]["labels"]["team"] == "platform", manifest["kind"]


def test_pods_are_locked_down(rendered: Rendered) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities, no
    service links (they would inject MAILKUBE_REDIS_PORT & co.), a token only for the
    operator."""
    pods = list(rendered.pod_specs())
    assert len(pods) >= 5
    for owner, pod in pods:
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        assert pod["enableServiceLinks"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        component = owner["metadata"]["labels"]["app.kubernetes.io/component"]
        assert pod["automountServiceAccountToken"] is (component == "operator"), where
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert container["resources"], where


def test_mailkube_containers_have_probes_and_writable_tmp(rendered: Rendered) -> None:
    for owner, pod in rendered.pod_specs():
        if owner["kind"] == "Pod":
            continue
        for container in pod["containers"]:
            assert "livenessProbe" in container, owner["metadata"]["name"]
            assert "readinessProbe" in container, owner["metadata"]["name"]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts


def test_images(rendered: Rendered) -> None:
    for _, pod in rendered.pod_specs():
        for container in pod["containers"]:
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, image
            assert not image.endswith(":latest"), image


# -- the defaults -------------------------------------------------------------------------------


def test_defaults_render_a_production_shape() -> None:
    result = scenario("defaults")
    assert result.names("Deployment") == {
        f"{FULL}-operator", f"{FULL}-gateway", f"{FULL}-worker-local", f"{FULL}-worker-remote",
        f"{FULL}-rspamd",
    }  # fmt: skip
    assert result.names("StatefulSet") == {f"{FULL}-redis"}
    assert result.names("CustomResourceDefinition") == {
        "maildomains.mailkube.io", "mailusers.mailkube.io",
    }  # fmt: skip
    for crd in result.of_kind("CustomResourceDefinition"):
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    operator = result.get("Deployment", f"{FULL}-operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}

    service = result.get("Service", f"{FULL}-gateway")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    ports = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert ports == {25: "mx", 587: "submission", 465: "submissions"}
    gateway = result.get("Deployment", f"{FULL}-gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert all(port >= 1024 for port in container_ports.values()), container_ports
    assert result.get("PodDisruptionBudget", f"{FULL}-gateway")["spec"]["maxUnavailable"] == 1
    assert not result.of_kind("HorizontalPodAutoscaler")
    assert not result.of_kind("ServiceMonitor")

    # the mail volume: one pod mounts it, so ReadWriteOnce, a Recreate rollout, kept on uninstall
    claim = result.get("PersistentVolumeClaim", f"{FULL}-mail")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    local = result.get("Deployment", f"{FULL}-worker-local")
    assert local["spec"]["strategy"] == {"type": "Recreate"}
    remote = result.get("Deployment", f"{FULL}-worker-remote")
    assert "mail" not in {v["name"] for v in remote["spec"]["template"]["spec"]["volumes"]}
    for worker in (local, remote):
        assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60

    # a self-signed certificate for mail.hostname
    secret = result.get("Secret", f"{FULL}-gateway-tls")
    assert secret["type"] == "kubernetes.io/tls"
    pem = base64.b64decode(secret["data"]["tls.crt"])
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert base64.b64decode(secret["data"]["tls.key"]).startswith(b"-----BEGIN")


def test_hostname_is_required() -> None:
    with pytest.raises(helm.HelmError, match=r"mail\.hostname is required"):
        render({})


def test_redis_is_durable_and_its_password_is_kept_across_upgrades() -> None:
    result = scenario("defaults")
    config = result.get("ConfigMap", f"{FULL}-redis")["data"]["redis.conf"]
    lines = {line.split(" ", 1)[0]: line for line in config.splitlines() if line and line[0] != "#"}
    assert lines["appendonly"] == "appendonly yes"
    assert lines["appendfsync"] == "appendfsync always"
    assert lines["maxmemory-policy"] == "maxmemory-policy noeviction"
    assert lines["dir"] == "dir /data"
    assert lines["maxmemory"] == "maxmemory 768mb"  # below the container's 1Gi limit
    # the queue churns: no rewrite (a fork and a new file) every 64 MB of bodies
    assert lines["auto-aof-rewrite-min-size"] == "auto-aof-rewrite-min-size 1gb"
    statefulset = result.get("StatefulSet", f"{FULL}-redis")
    assert statefulset["spec"]["replicas"] == 1
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "docker.io/library/redis:7.4.6-alpine"
    assert "$(REDIS_PASSWORD)" in container["command"]
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    secret = result.get("Secret", f"{FULL}-redis")
    assert len(base64.b64decode(secret["data"]["password"])) == 40
    # generated once: the template reuses the Secret it finds in the cluster
    template = (CHART / "templates" / "redis.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in template
    # a Secret of one's own (helm template, Argo CD: no lookup, no stable generated password)
    own = render(base_values(redis={"existingSecret": "my-redis"}))
    assert f"{FULL}-redis" not in own.names("Secret")
    redis_env = own.get("StatefulSet", f"{FULL}-redis")["spec"]["template"]["spec"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in redis_env["containers"][0]["env"]} == {
        "my-redis"
    }
    for _, pod in own.pod_specs():
        for volume in pod.get("volumes", []):
            if volume["name"] == "redis-password":
                assert volume["secret"]["secretName"] == "my-redis"
    relaxed = scenario("single-node-rwo").get("ConfigMap", f"{FULL}-redis")["data"]["redis.conf"]
    assert "\nappendfsync everysec\n" in relaxed


def test_network_policies_keep_redis_to_mailkube_pods() -> None:
    result = scenario("defaults")
    policy = result.get("NetworkPolicy", f"{FULL}-redis")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert "namespaceSelector" not in peer  # the release's namespace only

    def admitted(labels: dict[str, str]) -> bool:
        selector = peer["podSelector"]
        if any(labels.get(k) != v for k, v in selector["matchLabels"].items()):
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector["matchExpressions"])

    redis_selector = policy["spec"]["podSelector"]["matchLabels"]
    clients = set()
    for owner, _ in result.pod_specs():
        labels = (owner["spec"].get("template") or owner)["metadata"]["labels"]
        if all(labels.get(k) == v for k, v in redis_selector.items()):
            continue
        if admitted(labels):
            clients.add(labels["app.kubernetes.io/component"])
        else:
            clients.add(f"not {labels['app.kubernetes.io/component']}")
    assert clients == {"gateway", "worker", "operator", "rspamd", "not test"}
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]

    gateway = result.get("NetworkPolicy", f"{FULL}-gateway")
    smtp, telemetry = gateway["spec"]["ingress"]
    assert "from" not in smtp
    assert {p["port"] for p in smtp["ports"]} == {
        "mx", "submission", "submissions",
    }  # fmt: skip
    assert "from" not in telemetry  # metricsFrom empty: any source
    restricted = scenario("cert-manager-and-metrics").get("NetworkPolicy", f"{FULL}-worker")
    assert restricted["spec"]["ingress"][0]["from"][0]["namespaceSelector"]
    assert not scenario("hpa-cluster-wide").of_kind("NetworkPolicy")


def test_helm_test_hook_checks_the_internal_service() -> None:
    result = scenario("defaults")
    (pod,) = result.of_kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["args"][1:] == [
        f"{FULL}-gateway-internal.{NAMESPACE}.svc", HOSTNAME, "25", "587", "465",
    ]  # fmt: skip
    internal = result.get("Service", f"{FULL}-gateway-internal")
    assert {p["port"] for p in internal["spec"]["ports"]} == {25, 587, 465}


def test_notes_explain_address_dns_records_and_client_ips() -> None:
    notes = scenario("defaults").notes
    assert f"kubectl get service -n {NAMESPACE} {FULL}-gateway" in notes
    assert ".status.loadBalancer.ingress[0].ip" in notes
    assert "kubectl get maildomain -n mail example-org -o yaml" in notes
    assert ".status.dnsRecords" in notes
    assert "relay denied" in notes
    assert "client_ip" in notes
    assert f"helm test -n {NAMESPACE} {RELEASE}" in notes
    assert "self-signed" in notes
    assert "self-signed" not in scenario("cert-manager-and-metrics").notes
    assert "PROXY protocol on at the load balancer" not in scenario("proxy-protocol").notes


# -- the production shapes ----------------------------------------------------------------------


def test_external_redis() -> None:
    result = scenario("external-redis")
    assert not result.of_kind("StatefulSet")
    assert f"{FULL}-redis" not in result.names("Secret")
    assert f"{FULL}-redis" not in result.names("NetworkPolicy")
    for _, pod in result.pod_specs():
        for container in pod["containers"]:
            env = env_of(container)
            if "MAILKUBE_REDIS_URL" not in env:
                continue
            assert env["MAILKUBE_REDIS_URL"] == "rediss://redis.example.net:6380/0"
            assert env["MAILKUBE_REDIS_CLUSTER"] == "false"
            volume = next(v for v in pod["volumes"] if v["name"] == "redis-password")
            assert volume["secret"] == {
                "secretName": "redis-auth", "items": [{"key": "secret", "path": "password"}],
            }  # fmt: skip

    clustered = scenario("external-redis-cluster-url-in-secret")
    for _, pod in clustered.pod_specs():
        for container in pod["containers"]:
            env = env_of(container)
            if "MAILKUBE_REDIS_URL" in env:
                assert env["MAILKUBE_REDIS_URL"] == {
                    "secretKeyRef": {"name": "redis-auth", "key": "url"}
                }
                assert env["MAILKUBE_REDIS_CLUSTER"] == "true"


def test_redis_sentinel_mode_runs_three_pods_with_sentinels_that_mailkube_follows() -> None:
    result = scenario("redis-sentinel")
    config = result.get("ConfigMap", f"{FULL}-redis")["data"]
    assert "\nappendfsync always\n" in config["redis.conf"]  # a 250 is on the primary's disk
    for script in ("start-redis.sh", "start-sentinel.sh"):
        checked = subprocess.run(["sh", "-n"], input=config[script], text=True, check=False)
        assert checked.returncode == 0, script
    statefulset = result.get("StatefulSet", f"{FULL}-redis")
    spec = statefulset["spec"]
    assert (spec["replicas"], spec["podManagementPolicy"]) == (3, "Parallel")
    pod = spec["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["redis", "sentinel"]
    assert pod["containers"][0]["command"] == ["sh", "/etc/redis/start-redis.sh"]
    assert {"containerPort": 26379, "name": "sentinel", "protocol": "TCP"} in pod["containers"][1][
        "ports"
    ]
    # one Redis pod per node (antiAffinity: hard in this scenario)
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    soft = render(base_values(redis={"mode": "sentinel"})).get("StatefulSet", f"{FULL}-redis")
    assert (
        "preferredDuringSchedulingIgnoredDuringExecution"
        in (soft["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"])
    )
    budget = result.get("PodDisruptionBudget", f"{FULL}-redis")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    headless = result.get("Service", f"{FULL}-redis-headless")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    hosts = [f"{FULL}-redis-{i}.{FULL}-redis-headless.{NAMESPACE}.svc" for i in range(3)]
    sentinels = ",".join(f"{host}:26379" for host in hosts)
    components = set()
    for owner, pod_spec in result.pod_specs():
        for container in pod_spec["containers"]:
            env = env_of(container)
            if "MAILKUBE_REDIS_URL" not in env:
                continue
            components.add(owner["metadata"]["labels"]["app.kubernetes.io/component"])
            assert env["MAILKUBE_REDIS_SENTINELS"] == sentinels
            assert env["MAILKUBE_REDIS_SENTINEL_MASTER"] == "mailkube"
            assert env["MAILKUBE_REDIS_CLUSTER"] == "false"
            assert "MAILKUBE_REDIS_SENTINEL_PASSWORD_FILE" not in env
    assert components == {"gateway", "worker", "operator"}
    # the sentinels are reachable by Mailkube's pods, and the Redis pods by each other
    policy = result.get("NetworkPolicy", f"{FULL}-redis")
    clients, peers = policy["spec"]["ingress"]
    assert {p["port"] for p in clients["ports"]} == {"redis", "sentinel"}
    assert peers["from"][0]["podSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    # rspamd asks the sentinels too
    rspamd = result.get("ConfigMap", f"{FULL}-rspamd")["data"]["redis.conf"]
    assert f'sentinels = "{sentinels}";' in rspamd
    assert f'servers = "{hosts[0]}:6379";' in rspamd
    # standalone keeps one pod and no sentinel
    standalone = scenario("defaults")
    assert f"{FULL}-redis" not in standalone.names("PodDisruptionBudget")
    assert len(standalone.get("StatefulSet", f"{FULL}-redis")["spec"]["template"]["spec"][
        "containers"]) == 1  # fmt: skip


def test_external_sentinels() -> None:
    result = scenario("external-sentinels")
    assert not result.of_kind("StatefulSet")
    seen = 0
    for _, pod in result.pod_specs():
        for container in pod["containers"]:
            env = env_of(container)
            if "MAILKUBE_REDIS_URL" not in env:
                continue
            seen += 1
            assert env["MAILKUBE_REDIS_URL"] == "rediss://unused.example.net/2"
            assert env["MAILKUBE_REDIS_SENTINELS"] == (
                "sentinel-0.redis.example.net:26379,sentinel-1.redis.example.net:26379"
            )
            assert env["MAILKUBE_REDIS_SENTINEL_MASTER"] == "mail"
            assert env["MAILKUBE_REDIS_SENTINEL_PASSWORD_FILE"].endswith("/sentinel-password")
            volume = next(v for v in pod["volumes"] if v["name"] == "redis-password")
            assert volume["secret"]["items"] == [
                {"key": "password", "path": "password"},
                {"key": "sentinel-password", "path": "sentinel-password"},
            ]
    assert seen >= 3
    with pytest.raises(helm.HelmError, match=r"externalRedis\.sentinelMaster"):
        render(base_values(redis={"enabled": False},
                           externalRedis={"sentinels": ["s:26379"]},
                           rspamd={"enabled": False}))  # fmt: skip
    with pytest.raises(helm.HelmError, match="exclude each other"):
        render(base_values(redis={"enabled": False},
                           externalRedis={"sentinels": ["s:26379"], "sentinelMaster": "m",
                                          "cluster": True},
                           rspamd={"enabled": False}))  # fmt: skip


def test_external_redis_needs_an_address() -> None:
    with pytest.raises(helm.HelmError, match="externalRedis"):
        render(base_values(redis={"enabled": False}))


def test_cert_manager_certificate_feeds_the_gateway() -> None:
    result = scenario("cert-manager-and-metrics")
    certificate = result.get("Certificate", f"{FULL}-gateway-tls")
    assert certificate["spec"]["issuerRef"] == {
        "name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io",
    }  # fmt: skip
    assert certificate["spec"]["dnsNames"] == [HOSTNAME, "smtp.example.org"]
    assert f"{FULL}-gateway-tls" not in result.names("Secret")
    assert certificate["spec"]["privateKey"]["rotationPolicy"] == "Always"
    kept = render(base_values(gateway={"tls": {"source": "certManager", "certManager": {
        "issuerRef": {"name": "dns01"}, "privateKey": {"rotationPolicy": "Never"}}}}))  # fmt: skip
    kept_key = kept.get("Certificate", f"{FULL}-gateway-tls")["spec"]["privateKey"]
    assert kept_key["rotationPolicy"] == "Never"  # for DANE: the TLSA record stays valid
    gateway = result.get("Deployment", f"{FULL}-gateway")
    tls = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == certificate["spec"]["secretName"]
    with pytest.raises(helm.HelmError, match="issuerRef"):
        render(base_values(gateway={"tls": {"source": "certManager"}}))


def test_mta_sts_policy_hosts_behind_an_ingress_with_one_certificate() -> None:
    """RFC 8461 §3.3: https://mta-sts.<domain>/.well-known/mta-sts.txt with a WebPKI
    certificate: the Ingress terminates TLS for every host, the gateway answers plain HTTP."""
    result = scenario("cert-manager-and-metrics")
    hosts = ["mta-sts.example.org", "mta-sts.example.net"]
    certificate = result.get("Certificate", f"{FULL}-mta-sts")
    assert certificate["spec"]["dnsNames"] == hosts
    assert certificate["spec"]["issuerRef"]["name"] == "letsencrypt"  # the gateway's issuer
    ingress = result.get("Ingress", f"{FULL}-mta-sts")["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"hosts": hosts, "secretName": certificate["spec"]["secretName"]}]
    assert [rule["host"] for rule in ingress["rules"]] == hosts
    backend = ingress["rules"][0]["http"]["paths"][0]
    assert (backend["path"], backend["pathType"]) == ("/.well-known/mta-sts.txt", "Exact")
    service = result.get("Service", f"{FULL}-mta-sts")
    assert backend["backend"]["service"] == {"name": f"{FULL}-mta-sts", "port": {"name": "http"}}
    assert service["spec"]["ports"][0]["targetPort"] == "mta-sts"
    gateway = result.get("Deployment", f"{FULL}-gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    port = next(p for p in container["ports"] if p["name"] == "mta-sts")["containerPort"]
    assert env_of(container)["MAILKUBE_MTA_STS_LISTEN"] == f":{port}"
    policy = result.get("NetworkPolicy", f"{FULL}-gateway")
    assert {"port": "mta-sts", "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]
    # off by default; on, it needs the domains and a certificate
    defaults = scenario("defaults")
    assert f"{FULL}-mta-sts" not in defaults.names("Ingress")
    (plain,) = defaults.get("Deployment", f"{FULL}-gateway")["spec"]["template"]["spec"][
        "containers"
    ]
    assert "MAILKUBE_MTA_STS_LISTEN" not in env_of(plain)
    with pytest.raises(helm.HelmError, match="domains is required"):
        render(base_values(gateway={"mtaSts": {"enabled": True}}))
    with pytest.raises(helm.HelmError, match="needs a certificate"):
        render(base_values(gateway={"mtaSts": {"enabled": True, "domains": ["example.org"]}}))
    own = render(base_values(gateway={"mtaSts": {"enabled": True, "domains": ["example.org"],
                                                  "expose": "ingress",
                                                  "existingSecret": "sts-tls"}}))  # fmt: skip
    assert own.of_kind("Certificate") == []
    assert own.get("Ingress", f"{FULL}-mta-sts")["spec"]["tls"][0]["secretName"] == "sts-tls"


def test_mta_sts_on_the_gateway_service_port_443_with_the_gateway_terminating_tls() -> None:
    """expose=service (the default): where the mta-sts.<domain> CNAMEs to the MX host lead."""
    result = scenario("hpa-cluster-wide")
    certificate = result.get("Certificate", f"{FULL}-mta-sts")
    assert certificate["spec"]["dnsNames"] == ["mta-sts.example.org"]
    assert certificate["spec"]["issuerRef"]["name"] == "dns01"
    assert result.of_kind("Ingress") == []
    service = result.get("Service", f"{FULL}-gateway")
    assert {"name": "mta-sts", "port": 443, "targetPort": "mta-sts", "protocol": "TCP"} in (
        service["spec"]["ports"]
    )
    pod = result.get("Deployment", f"{FULL}-gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "mta-sts-tls")
    assert env["MAILKUBE_MTA_STS_TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert env["MAILKUBE_MTA_STS_TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    volume = next(v for v in pod["volumes"] if v["name"] == "mta-sts-tls")
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]


def test_service_monitor_finds_a_metrics_service_per_component() -> None:
    result = scenario("cert-manager-and-metrics")
    (monitor,) = result.of_kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["endpoints"][0]["port"]
    found = set()
    for service in result.of_kind("Service"):
        labels = service["metadata"]["labels"]
        if all(labels.get(k) == v for k, v in selector.items()):
            assert port in {p["name"] for p in service["spec"]["ports"]}
            found.add(labels["app.kubernetes.io/component"])
    assert found == {"gateway", "worker", "operator"}


def test_proxy_protocol_with_an_internal_gateway() -> None:
    result = scenario("proxy-protocol")
    public = result.get("Deployment", f"{FULL}-gateway")
    internal = result.get("Deployment", f"{FULL}-gateway-internal")
    public_env = env_of(public["spec"]["template"]["spec"]["containers"][0])
    internal_env = env_of(internal["spec"]["template"]["spec"]["containers"][0])
    assert public_env["MAILKUBE_PROXY_PROTOCOL_LISTENERS"] == "mx,submissions"
    assert public_env["MAILKUBE_TRUSTED_PROXIES"] == "10.0.0.0/8,fd00::/8"
    assert "MAILKUBE_PROXY_PROTOCOL_LISTENERS" not in internal_env
    assert "MAILKUBE_TRUSTED_PROXIES" not in internal_env
    assert internal["spec"]["replicas"] == 2
    # the load balancer reaches only public pods, in-cluster clients only internal ones
    service = result.get("Service", f"{FULL}-gateway")
    assert service["spec"]["selector"]["mailkube.io/role"] == "public"
    assert service["spec"]["externalTrafficPolicy"] == "Cluster"
    internal_service = result.get("Service", f"{FULL}-gateway-internal")
    assert internal_service["spec"]["selector"]["mailkube.io/role"] == "internal"
    assert internal_service["spec"]["type"] == "ClusterIP"
    assert result.names("PodDisruptionBudget") == {
        f"{FULL}-gateway", f"{FULL}-gateway-internal", f"{FULL}-rspamd",
    }  # fmt: skip
    # without PROXY protocol the internal Service selects the public pods
    default = scenario("defaults").get("Service", f"{FULL}-gateway-internal")
    assert default["spec"]["selector"]["mailkube.io/role"] == "public"
    with pytest.raises(helm.HelmError, match="trustedProxies"):
        render(base_values(gateway={"proxyProtocol": {"enabled": True}}))


def test_single_node_with_one_worker_for_both_lanes() -> None:
    result = scenario("single-node-rwo")
    assert result.names("Deployment") == {
        f"{FULL}-operator", f"{FULL}-gateway", f"{FULL}-worker-all", f"{FULL}-rspamd",
    }  # fmt: skip
    worker = result.get("Deployment", f"{FULL}-worker-all")
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"] == ["--role", "all"]
    assert worker["spec"]["strategy"] == {"type": "Recreate"}
    claim = result.get("PersistentVolumeClaim", f"{FULL}-mail")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["storageClassName"] == "local-path"
    assert not result.of_kind("PodDisruptionBudget")
    gateway = result.get("Deployment", f"{FULL}-gateway")
    tls = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "mail-tls"
    assert f"{FULL}-gateway-tls" not in result.names("Secret")


def test_every_lane_needs_a_worker() -> None:
    with pytest.raises(helm.HelmError, match=r"worker\.remote or worker\.all"):
        render(base_values(worker={"remote": {"enabled": False}}))
    with pytest.raises(helm.HelmError, match=r"worker\.local or worker\.all"):
        render(base_values(worker={"local": {"enabled": False}}))


def test_several_worker_roles_share_a_read_write_many_volume() -> None:
    result = scenario("several-worker-roles-rwx")
    claim = result.get("PersistentVolumeClaim", f"{FULL}-mail")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "nfs-client"
    roles = {}
    for role in ("local", "remote", "all"):
        deployment = result.get("Deployment", f"{FULL}-worker-{role}")
        spec = deployment["spec"]["template"]["spec"]
        roles[role] = deployment["spec"]["replicas"]
        assert spec["containers"][0]["args"] == ["--role", role]
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        volumes = {v["name"]: v for v in spec["volumes"]}
        env = env_of(spec["containers"][0])
        assert ("mail" in volumes) is (role != "remote")
        # the relay's password only where mail goes out
        assert ("smarthost" in volumes) is (role != "local")
        assert ("MAILKUBE_SMART_HOST__HOST" in env) is (role != "local")
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4318"
    assert roles == {"local": 3, "remote": 4, "all": 1}
    remote = result.get("Deployment", f"{FULL}-worker-remote")["spec"]["template"]["spec"]
    assert remote["nodeSelector"] == {"mail/egress": "clean"}
    assert remote["containers"][0]["resources"] == {"requests": {"cpu": "200m", "memory": "256Mi"}}
    local = result.get("Deployment", f"{FULL}-worker-local")["spec"]["template"]["spec"]
    assert local["nodeSelector"] == {"mail/storage": "nfs"}
    assert local["containers"][0]["resources"]["limits"]["memory"] == "512Mi"  # worker-wide
    # a ReadWriteOnce volume for many pods is allowed (one node) but warned about
    pinned = render(base_values(worker={"local": {"replicas": 2}, "mailStorage": {
        "accessMode": "ReadWriteOnce"}}))  # fmt: skip
    assert "ReadWriteOnce mail volume" in pinned.notes


def test_hpa_replaces_the_replica_count() -> None:
    result = scenario("hpa-cluster-wide")
    (hpa,) = result.of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULL}-gateway",
    }  # fmt: skip
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert "replicas" not in result.get("Deployment", f"{FULL}-gateway")["spec"]


def test_global_registry_and_pull_secrets() -> None:
    result = scenario("hpa-cluster-wide")
    images = set()
    for _, pod in result.pod_specs():
        assert pod["imagePullSecrets"] == [{"name": "pull"}]
        images.update(c["image"] for c in pod["containers"])
    assert images == {
        "mirror.example.net/mailkube/mailkube-operator:0.1.0",
        "mirror.example.net/mailkube/mailkube-gateway:0.1.0",
        "mirror.example.net/mailkube/mailkube-worker:0.1.0",
        "mirror.example.net/library/redis:7.4.6-alpine",
        "mirror.example.net/rspamd/rspamd:3.12.1",
    }
    digest = "sha256:" + "ab" * 32
    pinned = render(base_values(gateway={"image": {"digest": digest}}))
    gateway = pinned.get("Deployment", f"{FULL}-gateway")
    assert gateway["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"ghcr.io/mailkube/mailkube-gateway@{digest}"
    )


def test_operator_rbac_is_namespaced_unless_cluster_wide() -> None:
    namespaced = scenario("defaults")
    assert not namespaced.of_kind("ClusterRole")
    (role,) = namespaced.of_kind("Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    (binding,) = namespaced.of_kind("RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (account,) = namespaced.of_kind("ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    operator = namespaced.get("Deployment", f"{FULL}-operator")
    assert operator["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]

    with pytest.raises(helm.HelmError, match=r"serviceAccount\.name is required"):
        render(base_values(operator={"serviceAccount": {"create": False}}))
    other = render(base_values(operator={"watchNamespace": "mailboxes"}))
    assert other.get("Role", f"{FULL}-operator")["metadata"]["namespace"] == "mailboxes"

    wide = scenario("hpa-cluster-wide")
    assert not wide.of_kind("Role")
    (cluster_role,) = wide.of_kind("ClusterRole")
    (cluster_binding,) = wide.of_kind("ClusterRoleBinding")
    assert cluster_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
        "name": cluster_role["metadata"]["name"],
    }  # fmt: skip
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert {"namespaces", "customresourcedefinitions"} <= resources


def test_crds_can_be_left_out_or_deletable() -> None:
    assert not render(base_values(crds={"install": False})).of_kind("CustomResourceDefinition")
    for crd in render(base_values(crds={"keep": False})).of_kind("CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})
