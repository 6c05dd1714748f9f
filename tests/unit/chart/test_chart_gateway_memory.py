"""The gateway's memory limit reaches the gateway (the Downward API), which sizes the memory
that messages being received may hold from it (data_memory_limit unset)."""

from __future__ import annotations

from typing import Any

from chart_render import RELEASE, base_values, env_of, render

from mailkube_core.settings import GatewaySettings
from mailkube_gateway.data import wire_allowance
from mailkube_gateway.data_memory import data_memory_limit

FULL = f"{RELEASE}-mailkube"


def gateway_env(values: dict[str, Any]) -> dict[str, Any]:
    deployment = render(base_values(**values)).get("Deployment", f"{FULL}-gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "gateway"
    return env_of(container)


def test_the_memory_limit_reaches_the_gateway() -> None:
    env = gateway_env({})
    assert env["MAILKUBE_CONTAINER_MEMORY_LIMIT"] == {
        "resourceFieldRef": {"containerName": "gateway", "resource": "limits.memory"}
    }
    # the chart's default limit, 512Mi, as the Downward API gives it: 64Mi for DATA
    settings = GatewaySettings(hostname="mx.test", container_memory_limit=512 * 2**20)
    limit = data_memory_limit(
        settings.data_memory_limit,
        floor=wire_allowance(settings.max_message_size),
        processes=settings.processes,
        container=settings.container_memory_limit,
    )
    assert limit == 64 * 2**20


def test_no_memory_limit_no_variable() -> None:
    env = gateway_env({"gateway": {"resources": {"limits": None}}})
    assert "MAILKUBE_CONTAINER_MEMORY_LIMIT" not in env
