"""The Helm chart (charts/mailkube) for tests: rendered by the real Helm engine, which the
helm-python-sdk package bundles (libhelm_c, Helm v4's Go SDK behind a C ABI; no helm binary),
plus what ties the chart to the code: which settings the chart sets itself, and the `config`
sections of values.schema.json, generated from the settings models.

    uv run python tests/chart_render.py schema   # rewrite the config sections of the schema
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from pydantic import BaseModel

from mailkube_core.settings import (
    CommonSettings,
    DomainSpamDefaults,
    GatewaySettings,
    OperatorSettings,
    WorkerSettings,
)
from mailkube_core.settings.units import parse_size

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "mailkube"
SCHEMA = CHART / "values.schema.json"
#: the oldest Kubernetes the chart supports (Chart.yaml kubeVersion, docs/kubernetes.md)
OLDEST_KUBERNETES = "1.29"
RELEASE = "mail"
NAMESPACE = "mail"
HOSTNAME = "mail.example.org"

#: component label -> the settings model its containers read
MODELS: dict[str, type[CommonSettings]] = {
    "gateway": GatewaySettings,
    "worker": WorkerSettings,
    "operator": OperatorSettings,
}

# Settings the chart sets itself (MAILKUBE_* variables): never in a `config` section, where
# the environment would silently override them.
MANAGED_COMMON = frozenset(
    {"redis_url", "redis_cluster", "redis_password", "redis_password_file", "redis_sentinels",
     "redis_sentinel_master", "redis_sentinel_password", "redis_sentinel_password_file",
     "hostname", "telemetry_listen"}
)  # fmt: skip
MANAGED: dict[str, frozenset[str]] = {
    "gateway": MANAGED_COMMON
    | {
        "mx_listen",
        "mta_sts_listen",
        "mta_sts_tls_cert_file",
        "mta_sts_tls_key_file",
        "submission_listen",
        "submissions_listen",
        "tls_cert_file",
        "tls_key_file",
        "proxy_protocol_listeners",
        "trusted_proxies",
        "shutdown_grace",
        # from resources.limits.memory (the Downward API)
        "container_memory_limit",
        # rspamd and spam: rspamd.*, gateway.dnsblZones & co.
        "rspamd_url",
        "dnsbl_zones",
        "dnsbl_threshold",
        "greet_pause",
        "client_rdns",
        "spam_exempt_networks",
    }
    | frozenset(DomainSpamDefaults.model_fields),
    "worker": MANAGED_COMMON | {"role", "mail_root", "smart_host", "shutdown_grace"},
    "operator": MANAGED_COMMON
    | {
        "namespace",
        "cluster_wide",
        "public_hostname",
        "kube_api_server",
        "kube_token_file",
        "kube_ca_file",
    }
    # the spam defaults come from the values' `spam` section, for the gateway and the operator
    | frozenset(DomainSpamDefaults.model_fields),
}
#: settings that must be the same in every component: only in the top-level `config`
INSTALL_WIDE = frozenset({"key_prefix", "queue_partitions"})


def config_keys(section: str) -> set[str]:
    """The settings a `config` section of the values accepts: "" for the top-level one."""
    if section == "":
        return set(CommonSettings.model_fields) - MANAGED_COMMON
    return set(MODELS[section].model_fields) - MANAGED[section] - INSTALL_WIDE


#: the values sets every chart test renders: the defaults and one per production shape
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-redis": {
        "redis": {"enabled": False},
        "externalRedis": {
            "url": "rediss://redis.example.net:6380/0",
            "existingSecret": "redis-auth",
            "passwordKey": "secret",
        },
        # rspamd speaks neither TLS nor Cluster to Redis: a Redis of its own
        "rspamd": {
            "redis": {"servers": "rspamd-redis.example.net:6379", "existingSecret": "rspamd-redis"}
        },
    },
    "external-redis-cluster-url-in-secret": {
        "redis": {"enabled": False},
        "externalRedis": {"urlKey": "url", "existingSecret": "redis-auth", "cluster": True},
        # an rspamd of one's own
        "rspamd": {"enabled": False, "url": "http://rspamd.spam.svc:11333"},
    },
    "redis-sentinel": {
        "redis": {"mode": "sentinel", "sentinel": {"antiAffinity": "hard"}},
        "gateway": {"config": {"enqueue_replicas": 1}},
    },
    "external-sentinels": {
        "redis": {"enabled": False},
        "externalRedis": {
            "url": "rediss://unused.example.net/2",
            "sentinels": [
                "sentinel-0.redis.example.net:26379",
                "sentinel-1.redis.example.net:26379",
            ],
            "sentinelMaster": "mail",
            "existingSecret": "redis-auth",
            "sentinelPasswordKey": "sentinel-password",
        },
        "rspamd": {"enabled": False},
    },
    "no-rspamd": {"rspamd": {"enabled": False}},
    "cert-manager-and-metrics": {
        "gateway": {
            "tls": {
                "source": "certManager",
                "certManager": {
                    "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"},
                    "dnsNames": [HOSTNAME, "smtp.example.org"],
                    "renewBefore": "720h",
                },
            },
            "mtaSts": {
                "enabled": True,
                "expose": "ingress",
                "domains": ["example.org", "Example.NET"],
                "ingress": {"className": "nginx"},
            },
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "networkPolicy": {
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ]
        },
    },
    "proxy-protocol": {
        "gateway": {
            "proxyProtocol": {
                "enabled": True,
                "listeners": ["mx", "submissions"],
                "trustedProxies": ["10.0.0.0/8", "fd00::/8"],
            },
            "internal": {"replicas": 2},
            "service": {
                "externalTrafficPolicy": "Cluster",
                "annotations": {"service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"},
            },
        },
    },
    "single-node-rwo": {
        "gateway": {
            "replicas": 1,
            "podDisruptionBudget": {"enabled": False},
            "tls": {"source": "existingSecret", "existingSecret": "mail-tls"},
            "dnsblZones": [
                "zen.spamhaus.org=127.0.0.[2..11]*3",
                "list.dnswl.org=127.0.[0..255].[1..3]*-2",
            ],
            "dnsblThreshold": 2,
            "greetPause": "3s",
            "clientRdns": "require",
            "spamExemptNetworks": ["192.0.2.0/24", "2001:db8::/32"],
        },
        "worker": {
            "local": {"enabled": False},
            "remote": {"enabled": False},
            "all": {"enabled": True, "replicas": 1},
            "mailStorage": {"storageClass": "local-path", "size": "5Gi"},
        },
        "redis": {"persistence": {"storageClass": "local-path"}, "appendfsync": "everysec"},
        # spam defence turned up, one rspamd
        "spam": {
            "policy": "quarantine",
            "rejectScore": 15,
            "junkScore": 6.5,
            "rewriteSubject": True,
            "unavailable": "accept",
            "greylisting": True,
        },
        "rspamd": {
            "replicas": 1,
            "workers": 1,
            "podDisruptionBudget": {"enabled": False},
            "nameservers": ["192.0.2.53:53"],
            "redisDb": 3,
            "localConfig": {"actions.conf": "reject = 20;\nadd_header = 8;"},
        },
    },
    "several-worker-roles-rwx": {
        "worker": {
            "local": {"replicas": 3, "nodeSelector": {"mail/storage": "nfs"}},
            "remote": {
                "replicas": 4,
                "nodeSelector": {"mail/egress": "clean"},
                "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}},
            },
            "all": {"enabled": True, "replicas": 1},
            "mailStorage": {"storageClass": "nfs-client"},
            "smartHost": {
                "host": "smtp.relay.example",
                "port": 587,
                "username": "mailkube",
                "existingSecret": "relay-auth",
            },
            "config": {"queue_workers": 8, "retry_intervals": "5m,30m,2h"},
        },
        "config": {"log_level": "DEBUG", "queue_partitions": 4},
        "extraEnv": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel:4318"}],
    },
    "keda-workers-external-redis": {
        "redis": {"enabled": False},
        "externalRedis": {
            "url": "rediss://redis.example.net:6380/2",
            "existingSecret": "redis-auth",
            "passwordKey": "secret",
        },
        "rspamd": {"redis": {"servers": "rspamd-redis.example.net:6379"}},
        "worker": {
            "all": {"enabled": True},
            "mailStorage": {"storageClass": "nfs-client"},
            "autoscaling": {
                "mode": "keda",
                "roles": ["remote", "all"],
                "maxReplicas": 20,
                "keda": {"trigger": "streamLength", "streamLength": 40},
            },
        },
        "config": {"key_prefix": "mk", "queue_partitions": 2},
    },
    "hpa-workers": {
        "worker": {
            "autoscaling": {"mode": "hpa", "minReplicas": 2, "hpa": {"averageValue": 50}},
            "mailStorage": {"storageClass": "nfs-client"},
        },
    },
    "hpa-cluster-wide": {
        "gateway": {
            "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
            "config": {"max_message_size": "50MiB", "require_tls": True, "processes": 2},
            "mtaSts": {
                "enabled": True,
                "domains": ["example.org"],
                "certManager": {"issuerRef": {"name": "dns01"}},
            },
        },
        "operator": {"clusterWide": True, "config": {"dns_check_interval": "10m"}},
        "networkPolicy": {"enabled": False},
        "global": {"imageRegistry": "mirror.example.net", "imagePullSecrets": [{"name": "pull"}]},
        "commonLabels": {"team": "platform"},
    },
}


# -- the config sections of values.schema.json ------------------------------------------------


def _field_schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    """A JSON schema for one setting as the settings file may spell it: durations as text
    or seconds, sizes as text or bytes, lists as lists or comma-separated text."""
    field = model.model_fields[name]
    generated = model.model_json_schema(mode="validation")["properties"][name]
    schema = _loosen(generated)
    if any(getattr(meta, "func", None) is parse_size for meta in field.metadata):
        schema = {"type": ["string", "integer"]}
    if field.description:
        schema["description"] = " ".join(field.description.split())
    return schema


def _loosen(node: dict[str, Any]) -> dict[str, Any]:
    options = node.get("anyOf")
    if options:
        merged: dict[str, Any] = {}
        types: list[str] = []
        for option in options:
            loose = _loosen(option)
            kind = loose.pop("type", None)
            for one in kind if isinstance(kind, list) else [kind]:
                if one and one not in types:
                    types.append(one)
            merged.update(loose)
        if "array" in types:  # items of several kinds: keep them loose
            merged["items"] = {"type": ["string", "number"]}
        return {**merged, "type": types}
    kind = node.get("type")
    out: dict[str, Any] = {}
    if "enum" in node:
        out["enum"] = node["enum"]
    if kind == "string" and node.get("format") == "duration":
        return {"type": ["string", "number"]}
    if kind == "array":
        items = _loosen(node.get("items", {}))
        return {"type": ["array", "string"], "items": {"type": items.get("type", "string")}}
    if kind == "integer":
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in node:
                out[key] = node[key]
    if kind == "number":
        for key in ("minimum", "maximum"):
            if key in node:
                out[key] = node[key]
    if kind == "object":
        out["type"] = "object"  # nested settings (smart_host) are chart-managed
        return out
    if kind:
        out["type"] = kind
    return out


def config_schema(section: str) -> dict[str, Any]:
    model: type[BaseModel] = CommonSettings if section == "" else MODELS[section]
    where = "every component" if section == "" else f"the {section}"
    return {
        "type": "object",
        "description": f"Mailkube settings for {where} (docs/configuration.md)",
        "additionalProperties": False,
        "properties": {name: _field_schema(model, name) for name in sorted(config_keys(section))},
    }


def schema_with_generated_config(schema: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schema["properties"]["config"] = config_schema("")
    for section in MODELS:
        schema["properties"][section]["properties"]["config"] = config_schema(section)
    return schema


def write_schema() -> None:
    schema = schema_with_generated_config(json.loads(SCHEMA.read_text()))
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")


# -- rendering ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """One `helm template`: every manifest (hooks included), and NOTES.txt."""

    manifests: tuple[dict[str, Any], ...]
    sources: tuple[str, ...]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [m for m in self.of_kind(kind) if m["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {m["metadata"]["name"] for m in self.of_kind(kind)}

    def workloads(self) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] in ("Deployment", "StatefulSet")]

    def pod_specs(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(object, pod spec) of every workload and bare pod."""
        for manifest in self.manifests:
            if manifest["kind"] in ("Deployment", "StatefulSet"):
                yield manifest, manifest["spec"]["template"]["spec"]
            elif manifest["kind"] == "Pod":
                yield manifest, manifest["spec"]


def chart() -> helm.Chart:
    return _chart()


@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def base_values(**overrides: Any) -> dict[str, Any]:
    """The values every render needs (mail.hostname), deep-merged with `overrides`."""
    values: dict[str, Any] = {"mail": {"hostname": HOSTNAME}}
    return _merge(values, overrides)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(
    values: dict[str, Any], *, release: str = RELEASE, namespace: str = NAMESPACE
) -> Rendered:
    """The chart rendered with `values` (cached: tests must not change what they get)."""
    return _render(json.dumps(values, sort_keys=True), release, namespace)


@functools.cache
def _render(values_json: str, release: str, namespace: str) -> Rendered:
    files = chart().render(
        json.loads(values_json), name=release, namespace=namespace, is_install=True
    )
    manifests: list[dict[str, Any]] = []
    sources: list[str] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for document in yaml.safe_load_all(text):
            if document:
                manifests.append(document)
                sources.append(path)
    return Rendered(tuple(manifests), tuple(sources), notes)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value (str) or valueFrom (dict) of a container's environment."""
    env: dict[str, Any] = {}
    for item in container.get("env", []):
        assert item["name"] not in env, f"{item['name']} set twice"
        env[item["name"]] = item["value"] if "value" in item else item["valueFrom"]
    return env


if __name__ == "__main__":
    if sys.argv[1:] == ["schema"]:
        write_schema()
        print(f"wrote {SCHEMA.relative_to(ROOT)}")
    else:
        sys.exit("usage: python tests/chart_render.py schema")
