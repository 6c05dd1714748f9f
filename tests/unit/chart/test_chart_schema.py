"""values.schema.json: unknown keys and wrong types are refused before anything reaches the
cluster (by Helm itself, through helm-python-sdk), every documented value is in it, and its
`config` sections accept exactly the settings the components read and the chart does not set."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from chart_render import (
    CHART,
    INSTALL_WIDE,
    MANAGED,
    MANAGED_COMMON,
    MODELS,
    SCHEMA,
    base_values,
    chart,
    config_keys,
    render,
    schema_with_generated_config,
)

from mailkube_core.settings import CommonSettings

SCHEMA_DATA: dict[str, Any] = json.loads(SCHEMA.read_text())
VALUES: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())


def rejected(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart().validate_schema(values)
    return str(caught.value)


def test_defaults_pass() -> None:
    chart().validate_schema(VALUES)
    chart().validate_schema(base_values())


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"gatway": {"replicas": 3}}, "gatway"),  # top level
        ({"mail": {"hostnmae": "mail.example.org"}}, "hostnmae"),
        ({"gateway": {"replica": 3}}, "replica"),  # component level
        ({"worker": {"locl": {"replicas": 2}}}, "locl"),
        ({"worker": {"local": {"replica": 2}}}, "replica"),
        ({"gateway": {"service": {"externalTraficPolicy": "Local"}}}, "externalTraficPolicy"),
        ({"gateway": {"tls": {"sorce": "certManager"}}}, "sorce"),
        ({"redis": {"persistance": {"size": "1Gi"}}}, "persistance"),
        ({"externalRedis": {"uri": "redis://r:6379"}}, "uri"),
        ({"operator": {"image": {"tags": "1.0"}}}, "tags"),
        ({"gateway": {"config": {"max_mesage_size": "10MiB"}}}, "max_mesage_size"),
        ({"config": {"log_levle": "DEBUG"}}, "log_levle"),
    ],
)
def test_typos_are_rejected(values: dict[str, Any], where: str) -> None:
    assert where in rejected(values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"gateway": {"replicas": "two"}}, "/gateway/replicas"),
        ({"gateway": {"replicas": 1.5}}, "/gateway/replicas"),
        ({"worker": {"remote": {"enabled": "yes"}}}, "/worker/remote/enabled"),
        ({"gateway": {"containerPorts": {"mx": 25}}}, "/gateway/containerPorts/mx"),
        ({"gateway": {"service": {"ports": {"mx": 70000}}}}, "/gateway/service/ports/mx"),
        ({"gateway": {"service": {"type": "Ingress"}}}, "/gateway/service/type"),
        ({"gateway": {"tls": {"source": "letsencrypt"}}}, "/gateway/tls/source"),
        ({"gateway": {"proxyProtocol": {"listeners": ["smtp"]}}}, "/gateway/proxyProtocol"),
        ({"gateway": {"proxyProtocol": {"trustedProxies": ["10.0.0.1"]}}}, "trustedProxies"),
        ({"gateway": {"proxyProtocol": {"enabled": True}}}, "/gateway/proxyProtocol"),
        ({"worker": {"mailStorage": {"accessMode": "ReadWriteSome"}}}, "accessMode"),
        ({"worker": {"mailStorage": {"size": "lots"}}}, "/worker/mailStorage/size"),
        ({"redis": {"appendfsync": "no"}}, "/redis/appendfsync"),
        ({"redis": {"aofRewriteMinSize": "1 GB"}}, "/redis/aofRewriteMinSize"),
        ({"redis": {"enabled": False}}, "externalRedis"),
        ({"mail": {"hostname": "not a host"}}, "/mail/hostname"),
        ({"commonLabels": {"team": 7}}, "/commonLabels/team"),
        ({"global": {"imagePullSecrets": ["pull"]}}, "/global/imagePullSecrets"),
        ({"extraEnv": [{"value": "x"}]}, "/extraEnv"),
        ({"gateway": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
        ({"gateway": {"config": {"require_tls": "yes"}}}, "/gateway/config/require_tls"),
        ({"gateway": {"config": {"processes": 0}}}, "/gateway/config/processes"),
        ({"config": {"log_level": "LOUD"}}, "/config/log_level"),
        ({"worker": {"config": {"queue_workers": "eight"}}}, "/worker/config/queue_workers"),
    ],
)
def test_wrong_types_are_rejected(values: dict[str, Any], where: str) -> None:
    assert where in rejected(values)


def test_helm_install_stops_on_a_typo() -> None:
    with pytest.raises(helm.HelmValuesError, match="replica"):
        render(base_values(gateway={"replica": 3}))


def test_settings_the_chart_wires_cannot_be_configured() -> None:
    """The environment wins over the settings file: a `config` key for a chart-managed setting
    would be silently ignored, so the schema refuses it."""
    for section, managed in MANAGED.items():
        for name in sorted(managed):
            assert name in rejected({section: {"config": {name: "x"}}})
    assert "key_prefix" in rejected({"worker": {"config": {"key_prefix": "other"}}})
    chart().validate_schema({"config": {"key_prefix": "other", "queue_partitions": 4}})


def test_config_sections_are_generated_from_the_settings_models() -> None:
    """A setting added to (or removed from) a model changes what `config` accepts: regenerate
    with `uv run python tests/chart_render.py schema`."""
    assert schema_with_generated_config(SCHEMA_DATA) == SCHEMA_DATA, (
        "values.schema.json is stale: uv run python tests/chart_render.py schema"
    )
    top = SCHEMA_DATA["properties"]["config"]["properties"]
    assert set(top) == config_keys("")
    assert set(top) | MANAGED_COMMON == set(CommonSettings.model_fields)
    assert not set(top) & MANAGED_COMMON
    assert set(top) >= INSTALL_WIDE
    for section, model in MODELS.items():
        accepted = set(SCHEMA_DATA["properties"][section]["properties"]["config"]["properties"])
        assert accepted == set(model.model_fields) - MANAGED[section] - INSTALL_WIDE
        assert accepted | MANAGED[section] | INSTALL_WIDE == set(model.model_fields)
        assert "log_level" in accepted


def test_model_defaults_validate_against_their_config_schema() -> None:
    """Each setting's own default, written as the settings file would hold it, is accepted by
    the schema, so the generated types are not too strict."""
    for section, model in MODELS.items():
        schema = SCHEMA_DATA["properties"][section]["properties"]["config"]
        defaults = model(hostname="mail.example.org").model_dump(mode="json")
        sample = {k: v for k, v in defaults.items() if k in schema["properties"]}
        assert sample
        jsonschema.validate(sample, schema)


def _paths(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            out.append((path, value))
            out.extend(_paths(value, path))
    return out


def _schema_at(path: str) -> dict[str, Any]:
    node: dict[str, Any] = SCHEMA_DATA
    for part in path.split("."):
        while "$ref" in node:
            node = SCHEMA_DATA["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        properties = node.get("properties")
        assert properties is not None, f"{path}: not in the schema"
        assert part in properties, f"{path}: not in the schema"
        node = properties[part]
    while "$ref" in node:
        node = SCHEMA_DATA["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


FREE_FORM = ("resources", "podSecurityContext", "securityContext", "affinity", "nodeSelector",
             "podAnnotations", "podLabels", "annotations", "labels", "commonLabels")  # fmt: skip


def test_every_value_in_values_yaml_is_in_the_schema_with_its_type() -> None:
    names = {"dict": "object", "list": "array", "str": "string", "bool": "boolean",
             "int": "integer"}  # fmt: skip
    checked = 0
    for path, value in _paths(VALUES):
        if any(part in FREE_FORM for part in path.split(".")[:-1]):
            continue  # Kubernetes objects passed through as they are
        node = _schema_at(path)
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        assert names[type(value).__name__] in kinds, (path, value, kinds)
        checked += 1
    assert checked > 150


def test_objects_are_closed_except_kubernetes_pass_throughs() -> None:
    """additionalProperties: false on every object the chart defines."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, path
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(SCHEMA_DATA, "")
    assert SCHEMA_DATA["additionalProperties"] is False
