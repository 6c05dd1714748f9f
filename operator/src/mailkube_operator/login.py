"""How the operator reaches the API server, for kopf (its login handler) and for our own client
(kube.Kube).

- `kube_api_server` set: that URL, with the bearer token of `kube_token_file` and the CA of
  `kube_ca_file` (none: an unauthenticated connection, the system's CAs);
- otherwise the in-cluster ServiceAccount, else kubeconfig (kopf.login_via_client).

Bound ServiceAccount tokens expire and the kubelet rotates them in the projected file, so the
token is never kept from the start: each login (kopf logs in again after a 401) reads the file
again, and our client's configuration re-reads it whenever the file changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client

from mailkube_core.settings import OperatorSettings

#: where Kubernetes mounts a pod's ServiceAccount token
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def token_file(settings: OperatorSettings) -> Path | None:
    """The file the bearer token is read from (None: no token, or one kubeconfig holds)."""
    if settings.kube_api_server:
        return settings.kube_token_file
    if os.environ.get("KUBERNETES_SERVICE_HOST") and IN_CLUSTER_TOKEN.is_file():
        return IN_CLUSTER_TOKEN
    return None


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise kopf.LoginError(f"kube_token_file {path}: {exc.strerror or exc}") from None
    if not token:
        raise kopf.LoginError(f"kube_token_file {path} is empty")
    return token


def connection_info(
    settings: OperatorSettings, kopf_settings: kopf.OperatorSettings, logger: Any
) -> kopf.ConnectionInfo:
    """The credentials as they are now (called at every login)."""
    if settings.kube_api_server:
        if settings.kube_ca_file is not None and not settings.kube_ca_file.is_file():
            raise kopf.LoginError(f"kube_ca_file {settings.kube_ca_file} is not a file")
        token = read_token(settings.kube_token_file) if settings.kube_token_file else None
        return kopf.ConnectionInfo(
            server=settings.kube_api_server,
            ca_path=settings.kube_ca_file,
            scheme="Bearer" if token else None,
            token=token,
        )
    info = kopf.login_via_client(logger=logger, settings=kopf_settings)
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials (in-cluster or kubeconfig)")
    return info


def follow_token_file(config: client.Configuration, path: Path) -> None:
    """Have the client's configuration read the token from `path` before a request whenever
    the file changed (the kubernetes client calls refresh_api_key_hook before each one)."""
    seen: list[tuple[int, int, int]] = []

    def refresh(target: client.Configuration) -> None:
        try:
            stat = path.stat()
        except OSError:
            return  # keep the last token: the request says what the server thinks of it
        marker = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen == [marker]:
            return
        try:
            token = read_token(path)
        except kopf.LoginError:
            return
        target.api_key = {**target.api_key, "BearerToken": f"Bearer {token}"}
        seen[:] = [marker]

    config.refresh_api_key_hook = refresh  # type: ignore[assignment]
