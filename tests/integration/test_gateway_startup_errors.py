"""Problems found while the gateway starts end it like a bad setting: one line, status 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from redis_servers import free_port


def start_gateway(redis_url: str, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKUBE_")}
    env.update({
        "MAILKUBE_REDIS_URL": redis_url, "MAILKUBE_TELEMETRY_LISTEN": "",
        "MAILKUBE_MX_LISTEN": f"127.0.0.1:{free_port()}", "MAILKUBE_SUBMISSION_LISTEN": "",
        "MAILKUBE_HOSTNAME": "mx.test", **extra,
    })  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "mailkube_gateway"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"MAILKUBE_SUBMISSIONS_LISTEN": "127.0.0.1:{port}"},
         "invalid setting submissions_listen: implicit TLS needs tls_cert_file"),
        ({"MAILKUBE_SUBMISSIONS_LISTEN": "", "MAILKUBE_TLS_CERT_FILE": "/nonexistent/cert.pem",
          "MAILKUBE_TLS_KEY_FILE": "/nonexistent/key.pem"},
         "invalid setting tls_cert_file/tls_key_file (/nonexistent/cert.pem"),
    ],
)  # fmt: skip
def test_startup_problem_is_one_line_and_status_2(
    extra: dict[str, str], expected: str, redis_url: str
) -> None:
    extra = {k: v.format(port=free_port()) for k, v in extra.items()}
    result = start_gateway(redis_url, extra)
    assert result.returncode == 2, result.stderr
    problem = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(problem) == 1, result.stderr
    assert problem[0].startswith(f"mailkube-gateway: {expected}")
    assert "Traceback" not in result.stderr


def test_a_taken_port_is_one_line_naming_the_listener(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = start_gateway(
            redis_url,
            {"MAILKUBE_MX_LISTEN": f"127.0.0.1:{port}", "MAILKUBE_SUBMISSIONS_LISTEN": ""},
        )
    assert result.returncode == 2, result.stderr
    problem = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert problem == [
        f"mailkube-gateway: invalid setting mx_listen: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    ]
