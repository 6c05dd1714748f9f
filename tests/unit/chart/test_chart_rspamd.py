"""rspamd in the chart and the spam settings it passes on: the rspamd Deployment, Service,
Secret and ConfigMap (its local.d read by the real rspamd's `rspamadm configdump`), the gateway
pointed at it, at an rspamd of one's own, or at none, the same spam defaults for the gateway and
the operator, and the network policies around rspamd."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
from chart_render import (
    CHART,
    NAMESPACE,
    SCENARIOS,
    Rendered,
    base_values,
    chart,
    env_of,
    render,
)
from test_chart_drift import load_container_settings, mailkube_containers, model_of

from mailkube_core.settings import DomainSpamDefaults, GatewaySettings

FULL = "mail-mailkube"
RSPAMD = f"{FULL}-rspamd"
STOCK_CONFIG = Path("/etc/rspamd/rspamd.conf")


def scenario(name: str) -> Rendered:
    return render(base_values(**SCENARIOS[name]))


def pod_spec(result: Rendered, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = result.get("Deployment", name)["spec"]["template"]["spec"]
    return spec


def gateway_env(result: Rendered) -> dict[str, Any]:
    return env_of(pod_spec(result, f"{FULL}-gateway")["containers"][0])


def rspamd_objects(result: Rendered) -> list[str]:
    return [f"{m['kind']}/{m['metadata']['name']}" for m in result.manifests
            if m["metadata"]["labels"]["app.kubernetes.io/component"] == "rspamd"]  # fmt: skip


# -- the rspamd the chart runs ------------------------------------------------------------------


def test_rspamd_runs_the_pinned_upstream_image_unprivileged() -> None:
    result = scenario("defaults")
    deployment = result.get("Deployment", RSPAMD)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = pod_spec(result, RSPAMD)
    (container,) = pod["containers"]
    repository, tag = container["image"].rsplit(":", 1)
    assert repository == "docker.io/rspamd/rspamd"
    version = [int(part) for part in tag.split(".")]  # a release, not "latest"
    assert len(version) == 3
    assert version[0] == 3
    # the upstream image's _rspamd user; its root filesystem read-only, so what rspamd writes
    # ($DBDIR, $RUNDIR, /tmp) is on emptyDirs
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 11333
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/rspamd/local.d"]]["configMap"]["name"] == RSPAMD
    for path in ("/var/lib/rspamd", "/run/rspamd", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]], path
    assert pod["automountServiceAccountToken"] is False
    # the probes ask the normal worker's /ping (rspamd answers "pong")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"normal": 11333, "controller": 11334}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "normal"}, probe
    assert container["resources"]["limits"]["memory"]
    assert result.get("PodDisruptionBudget", RSPAMD)["spec"]["maxUnavailable"] == 1


def test_the_gateway_asks_the_rspamd_service() -> None:
    result = scenario("defaults")
    service = result.get("Service", RSPAMD)
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("normal", 11333, "normal"), ("controller", 11334, "controller"),
    }  # fmt: skip
    url = gateway_env(result)["MAILKUBE_RSPAMD_URL"]
    assert url == f"http://{RSPAMD}.{NAMESPACE}.svc:11333"
    settings = GatewaySettings(hostname="mail.example.org", rspamd_url=url)
    assert settings.rspamd_url is not None
    assert settings.rspamd_url.host == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    assert settings.rspamd_url.port == 11333


def test_controller_and_redis_passwords_come_from_secrets() -> None:
    result = scenario("defaults")
    env = env_of(pod_spec(result, RSPAMD)["containers"][0])
    assert env["RSPAMD_CONTROLLER_PASSWORD"] == {
        "secretKeyRef": {"name": RSPAMD, "key": "password"}}  # fmt: skip
    assert env["RSPAMD_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": f"{FULL}-redis", "key": "password"}}  # fmt: skip
    secret = result.get("Secret", RSPAMD)
    assert len(secret["data"]["password"]) > 40  # base64 of 32 random characters
    # generated once: the template reuses the Secret it finds in the cluster
    template = (CHART / "templates" / "rspamd.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in template

    own = render(base_values(rspamd={"controller": {"existingSecret": "my-rspamd"}}))
    assert RSPAMD not in own.names("Secret")
    own_env = env_of(pod_spec(own, RSPAMD)["containers"][0])
    assert own_env["RSPAMD_CONTROLLER_PASSWORD"]["secretKeyRef"]["name"] == "my-rspamd"
    # nothing secret in the ConfigMap: only rspamd's template references
    for text in result.get("ConfigMap", RSPAMD)["data"].values():
        assert "password" not in text or "{= env." in text


def test_config_map_holds_the_local_d_overrides() -> None:
    data = scenario("defaults").get("ConfigMap", RSPAMD)["data"]
    assert set(data) == {
        "worker-normal.inc", "worker-controller.inc", "worker-proxy.inc", "redis.conf",
        "http_headers.conf", "greylist.conf", "logging.inc",
    }  # fmt: skip
    assert 'bind_socket = "*:11333";' in data["worker-normal.inc"]
    assert "count = 2;" in data["worker-normal.inc"]
    assert 'bind_socket = "*:11334";' in data["worker-controller.inc"]
    assert 'password = "{= env.CONTROLLER_PASSWORD =}";' in data["worker-controller.inc"]
    assert f'servers = "{FULL}-redis:6379";' in data["redis.conf"]
    assert 'db = "1";' in data["redis.conf"]
    assert 'password = "{= env.REDIS_PASSWORD =}";' in data["redis.conf"]
    assert "enabled = true;" in data["http_headers.conf"]
    assert "enabled = false;" in data["greylist.conf"]
    assert 'type = "console";' in data["logging.inc"]

    tuned = scenario("single-node-rwo").get("ConfigMap", RSPAMD)["data"]
    assert tuned["actions.conf"] == "reject = 20;\nadd_header = 8;\n"
    assert 'nameserver = ["192.0.2.53:53"];' in tuned["options.inc"]
    assert 'db = "3";' in tuned["redis.conf"]
    with pytest.raises(helm.HelmError, match=r"rspamd\.localConfig: redis\.conf"):
        render(base_values(rspamd={"localConfig": {"redis.conf": "servers = x;"}}))
    # the pods roll when the configuration changes
    annotations = {
        render(base_values(rspamd={"workers": n})).get("Deployment", RSPAMD)["spec"]["template"][
            "metadata"]["annotations"]["checksum/config"]
        for n in (2, 4)
    }  # fmt: skip
    assert len(annotations) == 2


def _dump(local_d: dict[str, str], tmp_path: Path, section: str) -> list[Any]:
    """`rspamadm configdump -j SECTION` of Debian's stock configuration with `local_d` as its
    local.d, the Secrets in RSPAMD_* variables as the pod has them: the JSON objects printed."""
    (tmp_path / "local.d").mkdir(exist_ok=True)
    (tmp_path / "override.d").mkdir(exist_ok=True)
    for name, text in local_d.items():
        (tmp_path / "local.d" / name).write_text(text)
    # the fuzzy module resolves rspamd.com's servers as it loads: not here (loopback only)
    (tmp_path / "override.d" / "fuzzy_check.conf").write_text("enabled = false;\n")
    env = {**os.environ, "RSPAMD_CONTROLLER_PASSWORD": "controller-pw",
           "RSPAMD_REDIS_PASSWORD": "redis-pw"}  # fmt: skip
    done = subprocess.run(
        ["rspamadm", f"--var=LOCAL_CONFDIR={tmp_path}", "configdump", "-c", str(STOCK_CONFIG),
         "-j", section],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "address resolution" not in done.stderr  # no name was looked up
    decoder, text, found = json.JSONDecoder(), done.stdout.strip(), []
    while text:
        value, end = decoder.raw_decode(text)
        found.append(value)
        text = text[end:].strip()
    return found


def test_the_real_rspamd_reads_the_config_map_as_intended(tmp_path: Path) -> None:
    """Debian's rspamd (3.4; the image's rspamd.conf includes local.d the same way) parses the
    chart's local.d. An external Redis by address, so that nothing is looked up in DNS."""
    assert shutil.which("rspamadm"), "rspamd is installed by `make setup`"
    result = render(base_values(
        redis={"enabled": False},
        externalRedis={"url": "redis://127.0.0.1:6390/0", "existingSecret": "redis-auth"},
        rspamd={"workers": 3, "redisDb": 5},
    ))  # fmt: skip
    data = result.get("ConfigMap", RSPAMD)["data"]
    workers = {name: body for dump in _dump(data, tmp_path, "worker")
               for name, body in dump.items()}  # fmt: skip
    assert workers["normal"]["bind_socket"] == "*:11333"
    assert workers["normal"]["count"] == 3
    assert workers["controller"]["bind_socket"] == "*:11334"
    assert workers["controller"]["password"] == "controller-pw"  # from the Secret's variable
    assert workers["rspamd_proxy"]["enabled"] is False
    (redis,) = _dump(data, tmp_path, "redis")
    assert redis == {"servers": "127.0.0.1:6390", "db": "5", "password": "redis-pw"}
    assert _dump(data, tmp_path, "http_headers")[0]["enabled"] is True
    assert _dump(data, tmp_path, "greylist")[0]["enabled"] is False
    (logging,) = _dump(data, tmp_path, "logging")
    assert (logging["type"], logging["level"]) == ("console", "notice")
    # the password env variable of the chart's Deployment is the one the config reads
    env = env_of(pod_spec(result, RSPAMD)["containers"][0])
    assert set(env) == {"RSPAMD_CONTROLLER_PASSWORD", "RSPAMD_REDIS_PASSWORD"}
    assert env["RSPAMD_REDIS_PASSWORD"]["secretKeyRef"] == {"name": "redis-auth", "key": "password"}


# -- rspamd's Redis ---------------------------------------------------------------------------


def test_rspamd_redis_from_external_redis() -> None:
    plain = render(base_values(redis={"enabled": False},
                               externalRedis={"url": "redis://redis.example.net/2"}))  # fmt: skip
    redis_conf = plain.get("ConfigMap", RSPAMD)["data"]["redis.conf"]
    assert 'servers = "redis.example.net:6379";' in redis_conf
    assert "password" not in redis_conf  # externalRedis has no password Secret
    assert "RSPAMD_REDIS_PASSWORD" not in env_of(pod_spec(plain, RSPAMD)["containers"][0])

    own = scenario("external-redis")
    redis_conf = own.get("ConfigMap", RSPAMD)["data"]["redis.conf"]
    assert 'servers = "rspamd-redis.example.net:6379";' in redis_conf
    env = env_of(pod_spec(own, RSPAMD)["containers"][0])
    assert env["RSPAMD_REDIS_PASSWORD"]["secretKeyRef"] == {"name": "rspamd-redis",
                                                           "key": "password"}  # fmt: skip
    egress = own.get("NetworkPolicy", RSPAMD)["spec"]["egress"]
    assert {"ports": [{"port": 6379, "protocol": "TCP"}]} in egress

    external = {"redis": {"enabled": False}}
    for url_values, match in (
        ({"url": "rediss://redis.example.net:6380/0"}, "cannot reach rediss://"),
        ({"url": "redis://redis.example.net/0", "cluster": True}, "Cluster protocol"),
        ({"urlKey": "url", "existingSecret": "redis-auth"}, "urlKey"),
        ({"url": "redis://:pw@redis.example.net/0"}, "credentials"),
        ({"url": "redis://redis.example.net/1"}, "database Mailkube uses"),
    ):
        with pytest.raises(helm.HelmError, match=match):
            render(base_values(**external, externalRedis=url_values))
    with pytest.raises(helm.HelmError, match="must not be 0"):
        render(base_values(rspamd={"redisDb": 0}))


# -- enabled, disabled, an rspamd of one's own --------------------------------------------------


def test_no_rspamd_and_an_rspamd_of_ones_own() -> None:
    off = scenario("no-rspamd")
    assert rspamd_objects(off) == []
    assert "MAILKUBE_RSPAMD_URL" not in gateway_env(off)
    assert "rspamd" not in str(off.get("NetworkPolicy", f"{FULL}-redis")["spec"])

    own = scenario("external-redis-cluster-url-in-secret")
    assert rspamd_objects(own) == []
    assert gateway_env(own)["MAILKUBE_RSPAMD_URL"] == "http://rspamd.spam.svc:11333"

    with pytest.raises(helm.HelmError, match=r"rspamd\.enabled=false"):
        render(base_values(rspamd={"url": "http://rspamd.spam.svc:11333"}))


# -- the spam settings ------------------------------------------------------------------------


def _spam_defaults(result: Rendered, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """component -> the spam defaults its process starts with (gateway and operator)."""
    found = {}
    for owner, pod, container in mailkube_containers(result):
        component = owner["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in ("gateway", "operator"):
            settings = load_container_settings(result, pod, container, model_of(owner), tmp_path)
            found[component] = {n: getattr(settings, n) for n in DomainSpamDefaults.model_fields}
    return found


def test_gateway_and_operator_get_the_same_spam_defaults(tmp_path: Path) -> None:
    defaults = _spam_defaults(scenario("defaults"), tmp_path)
    built_in = DomainSpamDefaults().model_dump()
    assert defaults == {"gateway": built_in, "operator": built_in}  # values.yaml = the models

    tuned = _spam_defaults(scenario("single-node-rwo"), tmp_path)
    assert tuned["gateway"] == tuned["operator"] == {
        "spam_policy": "quarantine", "spam_reject_score": 15.0, "spam_junk_score": 6.5,
        "spam_rewrite_subject": True, "spam_unavailable": "accept", "greylisting": True,
    }  # fmt: skip


def test_dns_lists_greet_pause_and_reverse_dns_reach_the_gateway(tmp_path: Path) -> None:
    settings = _gateway(scenario("single-node-rwo"), tmp_path)
    assert settings.dnsbl_zones == [
        "zen.spamhaus.org=127.0.0.[2..11]*3",
        "list.dnswl.org=127.0.[0..255].[1..3]*-2",
    ]
    assert settings.dnsbl_threshold == 2
    assert settings.greet_pause.total_seconds() == 3
    assert settings.client_rdns == "require"
    assert [str(n) for n in settings.spam_exempt_networks] == ["192.0.2.0/24", "2001:db8::/32"]
    defaults: Any = _gateway(scenario("defaults"), tmp_path)
    built_in = GatewaySettings(hostname="mail.example.org")
    for name in ("dnsbl_zones", "dnsbl_threshold", "greet_pause", "client_rdns",
                 "spam_exempt_networks"):  # fmt: skip
        assert getattr(defaults, name) == getattr(built_in, name), name


def _gateway(result: Rendered, tmp_path: Path) -> Any:
    ((_, pod, container),) = [
        c for c in mailkube_containers(result) if model_of(c[0]) is GatewaySettings
    ]
    return load_container_settings(result, pod, container, GatewaySettings, tmp_path)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"spam": {"policy": "drop"}}, "/spam/policy"),
        ({"spam": {"rejectScore": "high"}}, "/spam/rejectScore"),
        ({"spam": {"junkScore": -1}}, "/spam/junkScore"),
        ({"spam": {"unavailable": "retry"}}, "/spam/unavailable"),
        ({"spam": {"greylist": True}}, "greylist"),
        ({"gateway": {"clientRdns": "maybe"}}, "/gateway/clientRdns"),
        ({"gateway": {"dnsblZones": ["not a zone"]}}, "/gateway/dnsblZones"),
        ({"gateway": {"spamExemptNetworks": ["10.0.0.1"]}}, "/gateway/spamExemptNetworks"),
        ({"gateway": {"config": {"rspamd_url": "http://x:11333"}}}, "rspamd_url"),
        ({"gateway": {"config": {"spam_policy": "tag"}}}, "spam_policy"),
        ({"rspamd": {"workers": 0}}, "/rspamd/workers"),
        ({"rspamd": {"url": "rspamd:11333"}}, "/rspamd/url"),
        ({"rspamd": {"redis": {"servers": "no-port"}}}, "/rspamd/redis/servers"),
        ({"rspamd": {"logLevel": "loud"}}, "/rspamd/logLevel"),
        ({"rspamd": {"localConfig": {"../escape.conf": "x"}}}, "invalid propertyName"),
        ({"rspamd": {"replica": 2}}, "replica"),
    ],
)
def test_schema_refuses_bad_spam_and_rspamd_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart().validate_schema(values)
    assert where in str(caught.value)


# -- network policies, notes ------------------------------------------------------------------


def test_network_policy_around_rspamd() -> None:
    result = scenario("defaults")
    policy = result.get("NetworkPolicy", RSPAMD)["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    normal, controller = policy["ingress"]
    assert normal["ports"] == [{"port": "normal", "protocol": "TCP"}]
    (peer,) = normal["from"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert "role" not in str(peer)  # the internal gateway's pods too
    assert controller["ports"] == [{"port": "controller", "protocol": "TCP"}]
    assert "from" not in controller  # controllerFrom empty: any source (it has a password)
    redis, dns, internet = policy["egress"]
    assert redis["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert redis["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert {(p["port"], p["protocol"]) for p in internet["ports"]} == {(443, "TCP"),
                                                                       (11335, "UDP")}  # fmt: skip
    # the named ports exist on the rspamd pods
    ports = {p["name"] for p in pod_spec(result, RSPAMD)["containers"][0]["ports"]}
    assert {"normal", "controller"} <= ports

    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mail"}}}]
    closed = render(base_values(networkPolicy={"rspamd": {"controllerFrom": peers,
                                                          "extraEgress": []}}))  # fmt: skip
    spec = closed.get("NetworkPolicy", RSPAMD)["spec"]
    assert spec["ingress"][1]["from"] == peers
    assert len(spec["egress"]) == 2  # Redis and DNS only


def test_notes_mention_rspamd() -> None:
    assert f"{RSPAMD}.{NAMESPACE}.svc" in scenario("defaults").notes
    assert "rspamd.spam.svc" in scenario("external-redis-cluster-url-in-secret").notes
    assert "no content scanning" in scenario("no-rspamd").notes
