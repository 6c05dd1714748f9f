"""All handlers in one kopf registry, built for a given settings object (so each operator
run has its own registry)."""

from __future__ import annotations

import kopf

from mailkube_core.settings import OperatorSettings

from .handlers import domains, lifecycle, secrets, users


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    for module in (lifecycle, domains, users, secrets):
        module.register(registry, settings)
    return registry
