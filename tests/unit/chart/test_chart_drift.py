"""No drift between the chart and the code: every MAILKUBE_* variable the chart sets is a
setting (the loader ignores unknown ones, so nothing else would notice), each container's
environment and settings file load with the component's own settings model, container ports
and probe paths are those the processes really open, files land where the settings say, the
CRDs are those in crds/, and the operator's RBAC covers what it calls."""

from __future__ import annotations

import ast
import asyncio
import posixpath
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_render import (
    CHART,
    HOSTNAME,
    MODELS,
    NAMESPACE,
    RELEASE,
    ROOT,
    SCENARIOS,
    Rendered,
    base_values,
    env_of,
    render,
)
from pydantic import BaseModel

from mailkube_core.settings import CommonSettings, load_settings, split_host_port
from mailkube_core.settings.loader import CONFIG_ENV
from mailkube_core.telemetry import HealthServer
from mailkube_gateway.listeners import listener_specs
from mailkube_operator.registry import build_registry

FULL = f"{RELEASE}-mailkube"
#: what an env var read from a Secret (or the Downward API) stands for when the settings are
#: loaded here
SECRET_PLACEHOLDERS = {
    "MAILKUBE_REDIS_URL": "redis://redis.from-secret.example:6379/0",
    "MAILKUBE_CONTAINER_MEMORY_LIMIT": "536870912",
}


def scenario(name: str) -> Rendered:
    return render(base_values(**SCENARIOS[name]))


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return scenario(request.param)


def mailkube_containers(
    result: Rendered,
) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) of every Mailkube process in the release."""
    found = []
    for owner, pod in result.pod_specs():
        component = owner["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in MODELS:
            found.extend((owner, pod, container) for container in pod["containers"])
    return found


def model_of(owner: dict[str, Any]) -> type[CommonSettings]:
    return MODELS[owner["metadata"]["labels"]["app.kubernetes.io/component"]]


def _nested_model(model: type[BaseModel], field: str) -> type[BaseModel] | None:
    annotation = model.model_fields[field].annotation
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def load_container_settings(
    result: Rendered, pod: dict[str, Any], container: dict[str, Any], model: type[CommonSettings],
    tmp_path: Path,
) -> CommonSettings:  # fmt: skip
    """The settings the container's process would start with: its environment (Secret
    references replaced by placeholders), its arguments, and the settings file from its
    ConfigMap, through the real loader."""
    env = env_of(container)
    environ: dict[str, str] = {}
    for name, value in env.items():
        if isinstance(value, str):
            environ[name] = value
        else:
            assert name in SECRET_PLACEHOLDERS, f"{name} from {value}: no placeholder"
            environ[name] = SECRET_PLACEHOLDERS[name]
    args = container.get("args", [])
    if args:
        assert args[0] == "--role", args  # mailkube-worker's only option
        assert len(args) == 2, args
        environ["MAILKUBE_ROLE"] = args[1]
    # the settings file: MAILKUBE_CONFIG must name the key of the mounted ConfigMap
    config_path = environ.pop(CONFIG_ENV)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "settings")
    assert posixpath.dirname(config_path) == mount["mountPath"]
    volume = next(v for v in pod["volumes"] if v["name"] == "settings")
    config_map = result.get("ConfigMap", volume["configMap"]["name"])
    settings_file = tmp_path / "mailkube.yaml"
    settings_file.write_text(config_map["data"][posixpath.basename(config_path)])
    return load_settings(model, config_file=settings_file, environ=environ)


# -- settings ------------------------------------------------------------------------------


def test_every_mailkube_variable_is_a_setting(rendered: Rendered) -> None:
    containers = mailkube_containers(rendered)
    assert containers
    for owner, _, container in containers:
        model = model_of(owner)
        names = [n for n in env_of(container) if n.startswith("MAILKUBE_") and n != CONFIG_ENV]
        assert names
        for name in names:
            path = name.removeprefix("MAILKUBE_").lower().split("__")
            assert path[0] in model.model_fields, f"{name} is no {model.__name__} setting"
            if len(path) > 1:
                nested = _nested_model(model, path[0])
                assert nested is not None, f"{name}: {path[0]} has no fields"
                assert len(path) == 2, name
                assert path[1] in nested.model_fields, name


def test_every_container_starts_with_valid_settings(rendered: Rendered, tmp_path: Path) -> None:
    for owner, pod, container in mailkube_containers(rendered):
        model = model_of(owner)
        settings = load_container_settings(rendered, pod, container, model, tmp_path)
        assert settings.hostname == HOSTNAME
        assert type(settings) is model


def test_config_values_reach_the_settings(tmp_path: Path) -> None:
    result = scenario("several-worker-roles-rwx")
    workers = [
        c for c in mailkube_containers(result) if model_of(c[0]).__name__ == "WorkerSettings"
    ]
    assert len(workers) == 3
    for owner, pod, container in workers:
        settings: Any = load_container_settings(result, pod, container, model_of(owner), tmp_path)
        assert settings.queue_workers == 8
        assert settings.log_level == "DEBUG"
        assert settings.queue_partitions == 4
        assert [d.total_seconds() for d in settings.retry_intervals] == [300, 1800, 7200]
        role = owner["metadata"]["labels"]["mailkube.io/role"]
        assert settings.role == role
        if role == "local":
            assert settings.smart_host is None
        else:
            assert settings.smart_host.host == "smtp.relay.example"
            assert settings.smart_host.username == "mailkube"
    wide = scenario("hpa-cluster-wide")
    gateway = next(c for c in mailkube_containers(wide)
                   if c[0]["metadata"]["name"] == f"{FULL}-gateway")  # fmt: skip
    settings = load_container_settings(wide, *gateway[1:], model_of(gateway[0]), tmp_path)
    assert settings.max_message_size == 50 * 1024 * 1024  # type: ignore[attr-defined]
    assert settings.processes == 2  # type: ignore[attr-defined]


def test_settings_files_are_where_the_settings_say(rendered: Rendered, tmp_path: Path) -> None:
    """Every file or directory a setting names is inside a mounted volume; a Secret volume
    holds that very file."""
    for owner, pod, container in mailkube_containers(rendered):
        settings: Any = load_container_settings(rendered, pod, container, model_of(owner), tmp_path)
        paths = [settings.redis_password_file]
        if hasattr(settings, "tls_cert_file"):
            paths += [settings.tls_cert_file, settings.tls_key_file]
            assert settings.tls_cert_file is not None  # the gateway always has TLS
        if hasattr(settings, "mail_root") and settings.role != "remote":
            paths.append(settings.mail_root)
        if getattr(settings, "smart_host", None) is not None:
            paths.append(settings.smart_host.password_file)
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in (str(p) for p in paths if p is not None):
            mount = next(
                (m for m in container["volumeMounts"]
                 if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")),
                None,
            )  # fmt: skip
            assert mount is not None, f"{owner['metadata']['name']}: {path} is not mounted"
            volume = volumes[mount["name"]]
            if "secret" in volume:
                items = {item["path"] for item in volume["secret"]["items"]}
                assert posixpath.relpath(path, mount["mountPath"]) in items, path
            if path == str(getattr(settings, "mail_root", "")):
                assert "persistentVolumeClaim" in volume


def test_shutdown_grace_fits_in_the_termination_grace_period(
    rendered: Rendered, tmp_path: Path
) -> None:
    for owner, pod, container in mailkube_containers(rendered):
        settings: Any = load_container_settings(rendered, pod, container, model_of(owner), tmp_path)
        if not hasattr(settings, "shutdown_grace"):
            continue
        budget = pod["terminationGracePeriodSeconds"]
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        if pre_stop:
            assert pre_stop["command"][0] == "sleep"
            budget -= int(pre_stop["command"][1])
        assert 0 < settings.shutdown_grace.total_seconds() < budget


def test_operator_serves_the_namespace_its_role_covers(tmp_path: Path) -> None:
    for name, expect_namespace, expect_wide in (
        ("defaults", NAMESPACE, False), ("hpa-cluster-wide", NAMESPACE, True),
    ):  # fmt: skip
        result = scenario(name)
        ((owner, pod, container),) = [
            c for c in mailkube_containers(result) if model_of(c[0]).__name__ == "OperatorSettings"
        ]
        settings: Any = load_container_settings(result, pod, container, model_of(owner), tmp_path)
        assert settings.cluster_wide is expect_wide
        assert settings.public_hostname == HOSTNAME
        if not expect_wide:
            assert settings.namespace == expect_namespace
            assert result.get("Role", f"{FULL}-operator")["metadata"]["namespace"] == (
                settings.namespace
            )


# -- ports and probes ------------------------------------------------------------------------


def test_container_ports_are_the_ports_the_processes_open(
    rendered: Rendered, tmp_path: Path
) -> None:
    for owner, pod, container in mailkube_containers(rendered):
        settings: Any = load_container_settings(rendered, pod, container, model_of(owner), tmp_path)
        declared = {p["name"]: p["containerPort"] for p in container["ports"]}
        opened = {"telemetry": split_host_port(settings.telemetry_listen)[1]}
        if model_of(owner).__name__ == "GatewaySettings":
            specs = listener_specs(settings)
            assert {spec.host for spec in specs} == {None}  # every address of the pod
            opened.update({spec.name: spec.port for spec in specs})
            assert len(specs) == 3
            if settings.mta_sts_listen:
                opened["mta-sts"] = split_host_port(settings.mta_sts_listen)[1]
        assert declared == opened, owner["metadata"]["name"]


def test_proxy_protocol_settings_reach_the_listeners(tmp_path: Path) -> None:
    result = scenario("proxy-protocol")
    proxied = {}
    for owner, pod, container in mailkube_containers(result):
        if model_of(owner).__name__ != "GatewaySettings":
            continue
        settings: Any = load_container_settings(result, pod, container, model_of(owner), tmp_path)
        proxied[owner["metadata"]["name"]] = {s.name for s in listener_specs(settings) if s.proxy}
        if owner["metadata"]["name"] == f"{FULL}-gateway":
            assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "fd00::/8"]
    assert proxied == {f"{FULL}-gateway": {"mx", "submissions"}, f"{FULL}-gateway-internal": set()}


def test_probe_paths_are_served_by_the_health_server(rendered: Rendered) -> None:
    """Each httpGet probe path, asked of a real HealthServer with no failing check: 200 (an
    unknown path would be 404), on the port named by the container's telemetry port."""
    probes: set[str] = set()
    for owner, _, container in mailkube_containers(rendered):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for kind in ("livenessProbe", "readinessProbe"):
            probe = container[kind]["httpGet"]
            assert probe["port"] in ("telemetry", ports["telemetry"]), owner["metadata"]["name"]
            probes.add(f"{kind}:{probe['path']}")
    assert {p.split(":")[0] for p in probes} == {"livenessProbe", "readinessProbe"}
    statuses = asyncio.run(_statuses([p.split(":", 1)[1] for p in sorted(probes)] + ["/nope"]))
    assert statuses.pop("/nope") == 404
    assert statuses
    assert set(statuses.values()) == {200}, statuses


async def _statuses(paths: list[str]) -> dict[str, int]:
    async with HealthServer() as server:
        await server.start("127.0.0.1", 0)
        result = {}
        for path in paths:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
            await writer.drain()
            async with asyncio.timeout(5):
                status_line = await reader.readline()
            result[path] = int(status_line.split()[1])
            writer.close()
            await writer.wait_closed()
        return result


def test_services_target_named_ports_of_the_pods_they_select(rendered: Rendered) -> None:
    for service in rendered.of_kind("Service"):
        selector = service["spec"]["selector"]
        selected = [
            pod for owner, pod in rendered.pod_specs()
            if owner["kind"] != "Pod" and all(
                owner["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in selector.items()
            )
        ]  # fmt: skip
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            for pod in selected:
                names = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names, (service["metadata"]["name"], port)


def test_workloads_select_their_own_pods_only(rendered: Rendered) -> None:
    workloads = rendered.workloads()
    for workload in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        matching = [
            w["metadata"]["name"] for w in workloads
            if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v
                   for k, v in selector.items())
        ]  # fmt: skip
        assert matching == [workload["metadata"]["name"]]


# -- CRDs -------------------------------------------------------------------------------------


def test_chart_ships_the_crds_of_crds_dir() -> None:
    shipped = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    source = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert shipped == source
    for name in source:
        shipped_bytes = (CHART / "files" / "crds" / name).read_bytes()
        assert shipped_bytes == (ROOT / "crds" / name).read_bytes(), (
            f"charts/mailkube/files/crds/{name} differs from crds/{name}: "
            f"cp crds/*.yaml charts/mailkube/files/crds/"
        )  # fmt: skip


def test_rendered_crds_are_those_of_crds_dir_with_the_chart_metadata() -> None:
    result = scenario("defaults")
    rendered = {crd["metadata"]["name"]: crd for crd in result.of_kind("CustomResourceDefinition")}
    source = {}
    for path in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        source[crd["metadata"]["name"]] = crd
    assert rendered.keys() == source.keys()
    for name, crd in rendered.items():
        original = source[name]
        assert crd["spec"] == original["spec"], name
        metadata = dict(crd["metadata"])
        assert metadata.pop("annotations") == {"helm.sh/resource-policy": "keep"}
        labels = metadata.pop("labels")
        assert original["metadata"]["labels"].items() <= labels.items()
        assert labels["helm.sh/chart"] == "mailkube-0.1.0"
        expected = {k: v for k, v in original["metadata"].items() if k != "labels"}
        assert metadata == expected
        assert {k: v for k, v in crd.items() if k not in ("metadata", "spec")} == {
            k: v for k, v in original.items() if k not in ("metadata", "spec")
        }


# -- the operator's RBAC --------------------------------------------------------------------

# kubernetes client methods the operator's Kube class may call: (resource, verb); "{plural}" is
# the mailkube.io resource the call names.
CLIENT_CALLS = {
    "read_namespaced_secret": ("secrets", "get"),
    "create_namespaced_secret": ("secrets", "create"),
    "patch_namespaced_secret": ("secrets", "patch"),
    "patch_namespaced_custom_object_status": ("{plural}/status", "patch"),
    "patch_namespaced_custom_object": ("{plural}", "patch"),
    "list_namespaced_custom_object": ("{plural}", "list"),
    "list_cluster_custom_object": ("{plural}", "list"),
    "list_namespaced_secret": ("secrets", "list"),
    "list_secret_for_all_namespaces": ("secrets", "list"),
    "create_namespaced_event": ("events", "create"),
}


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _operator_needs() -> set[tuple[str, str, str]]:
    """(api group, resource, verb) for everything the operator does: kopf's watches, indexes,
    timers and handlers (list, watch; patch where kopf stores progress or finalizers), plus
    each kubernetes-client call in kube.py."""
    from mailkube_core.settings import OperatorSettings

    needs: set[tuple[str, str, str]] = set()
    registry = build_registry(OperatorSettings(hostname=HOSTNAME, dns_check_interval="10m"))
    for attr, verbs in (
        ("_indexing", ("list", "watch")), ("_watching", ("list", "watch")),
        ("_changing", ("list", "watch", "patch")), ("_spawning", ("list", "watch", "patch")),
    ):  # fmt: skip
        for handler in getattr(registry, attr).get_all_handlers():
            selector = handler.selector
            for verb in verbs:
                needs.add((selector.group or "", selector.any_name, verb))
    needs.add(("", "events", "create"))  # kopf posts events about the objects it handles
    tree = ast.parse((ROOT / "operator/src/mailkube_operator/kube.py").read_text())
    called = {
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
        and node.value.attr in ("_core", "_custom")
    }  # fmt: skip
    assert called, "kube.py no longer calls the kubernetes client through _core/_custom"
    unknown = called - CLIENT_CALLS.keys()
    assert not unknown, f"kube.py calls {unknown}: add the RBAC they need to the chart and here"
    for method in called:
        resource, verb = CLIENT_CALLS[method]
        if "{plural}" in resource:
            for plural in ("maildomains", "mailusers"):
                needs.add(("mailkube.io", resource.format(plural=plural), verb))
        else:
            needs.add(("", resource, verb))
    if "create_namespaced_secret" in called:
        # the DKIM Secret's ownerReference to its MailDomain sets blockOwnerDeletion: where
        # OwnerReferencesPermissionEnforcement is on (OpenShift's default), that takes update on
        # the owner's finalizers subresource (tests/integration/test_operator_apiserver.py)
        needs.add(("mailkube.io", "maildomains/finalizers", "update"))
    return needs


def test_operator_rbac_covers_what_the_operator_does_and_no_more() -> None:
    needs = _operator_needs()
    assert ("mailkube.io", "maildomains", "watch") in needs
    role = scenario("defaults").get("Role", f"{FULL}-operator")
    granted = _granted(role["rules"])
    assert needs - granted == set(), "the operator's Role lacks these"
    # least privilege: beyond the needs, only reading, and kopf's metadata patches (finalizers,
    # progress annotations) on the two kinds it handles
    extra = granted - needs
    kopf_metadata = {("mailkube.io", plural, "patch") for plural in ("maildomains", "mailusers")}
    assert {entry for entry in extra if entry[2] != "get"} <= kopf_metadata, extra
    assert not any(
        resource == "secrets" and verb in ("delete", "update") for _, resource, verb in granted
    )

    cluster_role = scenario("hpa-cluster-wide").get("ClusterRole", f"{FULL}-operator")
    wide = _granted(cluster_role["rules"])
    assert needs <= wide
    assert wide - granted == {
        ("", "namespaces", "list"), ("", "namespaces", "watch"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }  # fmt: skip
