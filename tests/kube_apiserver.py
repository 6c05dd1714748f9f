"""A real Kubernetes control plane on loopback, for the tests that the emulator cannot answer
(RBAC with the chart's ServiceAccount token, admission plugins, owner garbage collection,
watches that expire, restarts).

- etcd (Debian's etcd-server, `make setup`), its data on tmpfs;
- kube-apiserver and kube-controller-manager 1.20.2, built once from Debian's source package
  by tools/build-kube-apiserver.sh and cached outside the checkout (the script prints where);
- TLS from a trustme CA, an admin token (system:masters) in a static token file, and RBAC;
  OwnerReferencesPermissionEnforcement on, as on OpenShift.

Every process binds 127.0.0.1 on a free port and dies with the process that started it
(PR_SET_PDEATHSIG). Waiting is polling with a deadline: /readyz, then the controller-manager's
first ServiceAccount. What 1.20 lacks (CEL rules, policy/v1, autoscaling/v2) stays tested on
the emulator and the schema validator.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes import client
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError
from redis_servers import HOST, free_port, wait_for

from mailkube_core import parent_death

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "tools" / "build-kube-apiserver.sh"
ADMIN_TOKEN = "mailkube-test-admin-token"
START_TIMEOUT = 60.0
#: what the controller-manager runs: ServiceAccounts and their token Secrets, owner garbage
#: collection, namespace deletion
CONTROLLERS = "serviceaccount,serviceaccount-token,garbagecollector,namespace"
ADMISSION = ("OwnerReferencesPermissionEnforcement",)


class ControlPlaneError(RuntimeError):
    pass


def binaries() -> Path:
    """The directory of kube-apiserver and kube-controller-manager (built if not cached)."""
    result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ControlPlaneError(
            f"{BUILD_SCRIPT.name} failed (run `make setup`):\n{result.stderr[-3000:]}"
        )
    found = Path(result.stdout.strip().splitlines()[-1])
    for name in ("kube-apiserver", "kube-controller-manager"):
        if not (found / name).is_file():
            raise ControlPlaneError(f"{BUILD_SCRIPT.name} printed {found}, without {name}")
    return found


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Process:
    """One server process, its output in a log file, killed with the test process."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=parent_death.preexec(signal.SIGKILL),
            )  # fmt: skip

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ControlPlaneError(
                f"{self.name} exited with {self.process.returncode}; log:\n{_tail(self.log)}"
            )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager in `root` (a fresh directory)."""

    def __init__(self, root: Path, *, admission: Iterable[str] = ADMISSION) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.bin = binaries()
        self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
        self.url = f"https://{HOST}:{self.port}"
        self.ca = trustme.CA()
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        serving = self.ca.issue_cert(HOST, "localhost", "kubernetes.default.svc")
        self.cert_file, self.key_file = root / "apiserver.pem", root / "apiserver-key.pem"
        serving.cert_chain_pems[0].write_to_path(str(self.cert_file))
        serving.private_key_pem.write_to_path(str(self.key_file))
        self.sa_key = root / "service-account.key"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))  # fmt: skip
        tokens = root / "tokens.csv"
        tokens.write_text(f"{ADMIN_TOKEN},admin,admin,system:masters\n")
        self.kubeconfig = root / "kubeconfig"
        self.kubeconfig.write_text(json.dumps(self._kubeconfig()))
        # tmpfs when there is one: etcd 3.4 fsyncs every write
        shm = Path("/dev/shm")
        self.etcd_dir = Path(tempfile.mkdtemp(prefix="etcd-", dir=shm if shm.is_dir() else root))
        self.etcd = _Process("etcd", [
            "etcd", "--name", "test", "--data-dir", str(self.etcd_dir / "data"),
            "--listen-client-urls", f"http://{HOST}:{self.etcd_port}",
            "--advertise-client-urls", f"http://{HOST}:{self.etcd_port}",
            "--listen-peer-urls", f"http://{HOST}:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://{HOST}:{self.peer_port}",
            "--initial-cluster", f"test=http://{HOST}:{self.peer_port}",
            "--log-level", "warn",
        ], root / "etcd.log")  # fmt: skip
        self.apiserver = _Process("kube-apiserver", [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers=http://{HOST}:{self.etcd_port}",
            f"--bind-address={HOST}", f"--advertise-address={HOST}",
            f"--secure-port={self.port}", "--insecure-port=0",
            f"--tls-cert-file={self.cert_file}", f"--tls-private-key-file={self.key_file}",
            f"--cert-dir={root / 'certs'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.sa_key}",
            f"--service-account-signing-key-file={self.sa_key}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            f"--enable-admission-plugins={','.join(admission)}",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=0",
        ], root / "kube-apiserver.log")  # fmt: skip
        self.controller_manager = _Process("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--port=0", "--secure-port=0",
            f"--controllers={CONTROLLERS}",
            f"--service-account-private-key-file={self.sa_key}",
            f"--root-ca-file={self.ca_file}",
            "--concurrent-gc-syncs=5",
            "--profiling=false",
            "--v=0",
        ], root / "kube-controller-manager.log")  # fmt: skip

    def _kubeconfig(self) -> dict[str, Any]:
        ca = base64.b64encode(self.ca.cert_pem.bytes()).decode()
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority-data": ca}}],
            "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        }  # fmt: skip

    # -- lifecycle -------------------------------------------------------------------------

    def start(
        self, crds: Iterable[dict[str, Any]] = (), timeout: float = START_TIMEOUT
    ) -> ControlPlane:
        """Start everything; `crds` are created before the controller-manager starts, so its
        garbage collector watches their resources from the start (it looks for new resources
        only every 30 s)."""
        self.etcd.start()
        self._wait(lambda: self._http_ok(f"http://{HOST}:{self.etcd_port}/health"),
                   timeout, "etcd /health", self.etcd)  # fmt: skip
        self.start_apiserver(timeout)
        crds = list(crds)
        self.apply(crds, "default")
        for crd in crds:
            self.wait_established(crd["metadata"]["name"])
        self.controller_manager.start()
        # the first thing the controller-manager does: the namespace's default ServiceAccount
        self._wait(self._default_account, timeout, "the default ServiceAccount",
                   self.controller_manager)  # fmt: skip
        return self

    def start_apiserver(self, timeout: float = START_TIMEOUT) -> None:
        self.apiserver.start()
        self._wait(self.ready, timeout, "kube-apiserver /readyz", self.apiserver)

    def kill_apiserver(self) -> None:
        """An outage: the API server dies (SIGKILL), its clients' connections break."""
        self.apiserver.kill()

    def stop(self) -> None:
        for process in (self.controller_manager, self.apiserver, self.etcd):
            process.stop()
        shutil.rmtree(self.etcd_dir, ignore_errors=True)

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str,
              process: _Process) -> None:  # fmt: skip
        def done() -> bool:
            process.check()
            return condition()

        try:
            wait_for(done, timeout, what, interval=0.05)
        except TimeoutError as exc:
            raise ControlPlaneError(f"{exc}; {process.name} log:\n{_tail(process.log)}") from None

    def _ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return context

    def _http_ok(self, url: str, token: str | None = None) -> bool:
        request = urllib.request.Request(url)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            context = self._ssl() if url.startswith("https") else None
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def ready(self) -> bool:
        return self._http_ok(f"{self.url}/readyz", ADMIN_TOKEN)

    def _default_account(self) -> bool:
        try:
            self.core().read_namespaced_service_account("default", "default")
        except client.ApiException:
            return False
        return True

    # -- clients ---------------------------------------------------------------------------

    def configuration(self, token: str = ADMIN_TOKEN) -> client.Configuration:
        config = client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self.ca_file)
        config.api_key = {"BearerToken": f"Bearer {token}"}
        return config

    def api_client(self, token: str = ADMIN_TOKEN) -> client.ApiClient:
        return client.ApiClient(self.configuration(token))

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client())

    def apply(self, objects: Iterable[dict[str, Any]], namespace: str) -> list[str]:
        """Create each object the server knows (the others are left out: the kinds 1.20 lacks,
        like policy/v1); the `Kind/name` of those left out."""
        dynamic = DynamicClient(self.api_client())
        skipped = []
        for obj in objects:
            try:
                resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            except ResourceNotFoundError:
                skipped.append(f"{obj['kind']}/{obj['metadata']['name']}")
                continue
            ns = namespace if resource.namespaced else None
            resource.create(body=obj, namespace=ns)
        return skipped

    def wait_established(self, crd: str, timeout: float = 30.0) -> None:
        extensions = client.ApiextensionsV1Api(self.api_client())

        def established() -> bool:
            status = extensions.read_custom_resource_definition(crd).status
            return any(c.type == "Established" and c.status == "True"
                       for c in (status.conditions or []))  # fmt: skip

        wait_for(established, timeout, f"CRD {crd} established")

    def token_works(self, token: str) -> bool:
        """Whether the API server takes the token (a bad one is 401, even for /version)."""
        return self._http_ok(f"{self.url}/version", token)

    def secret_token(self, namespace: str, name: str, timeout: float = 30.0) -> str:
        """The token the controller-manager puts into a ServiceAccount token Secret."""
        core = self.core()
        found: list[str] = []

        def filled() -> bool:
            data = core.read_namespaced_secret(name, namespace).data or {}
            if data.get("token"):
                found.append(base64.b64decode(data["token"]).decode())
            return bool(found)

        wait_for(filled, timeout, f"the token in Secret {namespace}/{name}")
        return found[0]

    def service_account_token(self, namespace: str, account: str,
                              timeout: float = 30.0) -> str:  # fmt: skip
        """The token of the ServiceAccount's first token Secret (the controller-manager makes
        it, as 1.20 does for every ServiceAccount)."""
        core = self.core()
        found: list[str] = []

        def made() -> bool:
            secrets = core.list_namespaced_secret(
                namespace, field_selector="type=kubernetes.io/service-account-token"
            ).items
            for secret in secrets:
                annotations = secret.metadata.annotations or {}
                if annotations.get("kubernetes.io/service-account.name") == account and (
                    secret.data or {}
                ).get("token"):
                    found.append(base64.b64decode(secret.data["token"]).decode())
                    return True
            return False

        wait_for(made, timeout, f"the token Secret of ServiceAccount {namespace}/{account}")
        return found[0]
