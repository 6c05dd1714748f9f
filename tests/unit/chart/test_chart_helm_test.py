"""The chart's `helm test` pod, run here for real: its script (from the rendered manifest)
against a real gateway on loopback. It must pass against a working gateway and fail when the
gateway does not greet with the expected name."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from chart_render import base_values, render
from gateway_harness import running_gateway


def helm_test_command() -> list[str]:
    (pod,) = render(base_values()).of_kind("Pod")
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    script, *arguments = container["args"]
    assert len(arguments) == 5  # host, mail name, the three ports
    return [sys.executable, "-c", script]


async def run(command: list[str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_helm_test_script_passes_against_a_real_gateway(
    redis_url: str, tmp_path: Path
) -> None:
    command = helm_test_command()
    async with running_gateway(redis_url, tmp_path) as gateway:
        ports = [str(gateway.mx), str(gateway.submission), str(gateway.submissions)]
        status, output = await run([*command, "127.0.0.1", "MX.test.", *ports])
        assert status == 0, output
        assert output.count("greeting, EHLO and TLS ok") == 3, output

        status, output = await run([*command, "127.0.0.1", "mail.example.org", *ports])
        assert status != 0
        assert "greeting names" in output
