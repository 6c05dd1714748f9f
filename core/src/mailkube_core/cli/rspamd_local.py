"""A private rspamd on loopback, for `mailkube dev`, the tests and the benchmarks.

Debian's `rspamd` package (installed by `make setup`) brings the daemon and its stock
configuration in /etc/rspamd, which is read, never written: rspamd's `$LOCAL_CONFDIR`,
`$DBDIR`, `$RUNDIR` and `$LOGDIR` all point into `directory`, where `write_config` puts the
local.d overrides:

- the normal worker (POST /checkv2) on `normal_port`, the controller (learning, stats) on
  `controller_port`, the proxy (milter, for Postfix in the benchmarks) on `proxy_port` (None:
  no proxy worker); all on 127.0.0.1, the controller open without a password to loopback only
  (rspamd's secure_ip);
- rspamd's DNS lookups go to `dns` (host:port): the tests' loopback DNS server, so that
  nothing leaves the machine, or by default the system's resolver, as the gateway's do
  (a resolver that does not answer costs every message rspamd's DNS timeout);
- its Redis (Bayes learning, history) on `redis_url`, in database `redis_db`;
- http_headers on, so the gateway's SPF/DKIM/DMARC results are used instead of checked again;
- rspamd's own greylisting off (Mailkube greylists), and `hfilter` off (its host-name checks
  score every message from a machine without DNS as spam);
- test patterns beside rspamd's GTUBE (which answers reject): a message whose body holds
  ADD_HEADER_PATTERN gets the `add header` action, SOFT_REJECT_PATTERN `soft reject`.

The first start takes about ten seconds: rspamd compiles its regular expressions with
hyperscan. It keeps them in `db/` (*.hsmp, checked against the rules), so a later start in the
same directory takes under a second (`mailkube dev` keeps .run/rspamd); tests start one per
run.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..parent_death import preexec as follow_this_process

STOCK_CONFIG = Path("/etc/rspamd/rspamd.conf")
READY_TIMEOUT = 60.0
#: rspamd's GTUBE line: action reject
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
#: a body line that makes this configuration answer `add header` (score 8)
ADD_HEADER_PATTERN = "MAILKUBE-TEST-SPAM-ADD-HEADER-2C5A7F"
#: a body line that makes this configuration answer `soft reject`
SOFT_REJECT_PATTERN = "MAILKUBE-TEST-SPAM-SOFT-REJECT-9D31B0"


class RspamdError(Exception):
    pass


@dataclass
class LocalRspamd:
    directory: Path
    normal_port: int = 11333
    controller_port: int = 11334
    proxy_port: int | None = 11332
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_db: int = 1
    #: resolver (host:port) for rspamd's own lookups; None: the system's (/etc/resolv.conf)
    dns: str | None = None
    #: normal worker processes (and proxy workers, when the proxy scans by itself)
    workers: int = 1
    #: the proxy (milter) scans messages itself, as rspamd's quick start sets it up for
    #: Postfix, instead of handing them to the normal worker
    proxy_self_scan: bool = False
    #: rspamd advises greylisting doubtful messages (its `greylist` action, score 4 to 6);
    #: off, it never does (the benchmarks: their messages score 5.4, and Postfix's milter
    #: ignores the advice without rspamd's greylist module)
    greylist_action: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The normal worker's URL, the gateway's `rspamd_url`."""
        return f"http://127.0.0.1:{self.normal_port}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    @property
    def log_file(self) -> Path:
        return self.directory / "log" / "rspamd.log"

    @property
    def stderr_file(self) -> Path:
        """What rspamd writes before its log is open (configuration errors)."""
        return self.directory / "log" / "stderr.log"

    @property
    def has_compiled_rules(self) -> bool:
        """Whether an earlier start left its compiled rules (the hyperscan cache) behind."""
        return any((self.directory / "db").glob("*.hsmp"))

    def write_config(self) -> None:
        local = self.directory / "local.d"
        for sub in ("local.d", "db", "run", "log"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        redis = urlsplit(self.redis_url)
        redis_host = f"{redis.hostname or '127.0.0.1'}:{redis.port or 6379}"
        files = {
            "worker-normal.inc": f'bind_socket = "127.0.0.1:{self.normal_port}";\n'
            f"count = {self.workers};\n",
            "worker-controller.inc": f'bind_socket = "127.0.0.1:{self.controller_port}";\n',
            "worker-proxy.inc": "enabled = false;\n"
            if self.proxy_port is None
            else f'bind_socket = "127.0.0.1:{self.proxy_port}";\n'
            'upstream "local" {\n  default = yes;\n'
            f'  hosts = "127.0.0.1:{self.normal_port}";\n}}\n',
            "logging.inc": f'type = "file";\nfilename = "{self.log_file}";\nlevel = "warning";\n',
            "options.inc": "dns {\n  timeout = 1s;\n  retransmits = 1;\n"
            + (f'  nameserver = ["{self.dns}"];\n' if self.dns else "")
            + "}\n",
            "redis.conf": f'servers = "{redis_host}";\ndb = "{self.redis_db}";\n',
            "http_headers.conf": "enabled = true;\n",
            "greylist.conf": "enabled = false;\n",
            "hfilter.conf": "enabled = false;\n",
            "fuzzy_check.conf": "enabled = false;\n",
        }
        if not self.greylist_action:
            files["actions.conf"] = "greylist = null;\n"
        if redis.password:
            files["redis.conf"] += f'password = "{redis.password}";\n'
        for name, text in files.items():
            (local / name).write_text(text)
        # test patterns: plain Lua rules (rspamd.local.lua is loaded from LOCAL_CONFDIR)
        (self.directory / "rspamd.local.lua").write_text(
            "local function body_has(pattern)\n"
            "  return function(task)\n"
            "    local content = tostring(task:get_rawbody() or '')\n"
            "    return content:find(pattern, 1, true) ~= nil\n"
            "  end\n"
            "end\n"
            "rspamd_config.MAILKUBE_TEST_ADD_HEADER = {\n"
            f"  callback = body_has('{ADD_HEADER_PATTERN}'), score = 8.0,\n"
            "  description = 'Mailkube test pattern: add header', group = 'mailkube',\n"
            "}\n"
            "rspamd_config.MAILKUBE_TEST_SOFT_REJECT = {\n"
            f"  callback = body_has('{SOFT_REJECT_PATTERN}'), score = 0.0,\n"
            "  description = 'Mailkube test pattern: soft reject', group = 'mailkube',\n"
            "}\n"
        )
        (local / "force_actions.conf").write_text(
            'rules {\n  MAILKUBE_TEST_SOFT_REJECT {\n    action = "soft reject";\n'
            '    expression = "MAILKUBE_TEST_SOFT_REJECT";\n'
            '    message = "Mailkube test pattern: try again later";\n  }\n}\n'
        )

    def command(self) -> list[str]:
        binary = shutil.which("rspamd") or "/usr/sbin/rspamd"
        if not Path(binary).exists() or not STOCK_CONFIG.exists():
            raise RspamdError(
                "rspamd is not installed (`make setup`, or `make run`, installs Debian's rspamd)"
            )
        directory = self.directory.resolve()
        command = [binary, "-f", "-c", str(STOCK_CONFIG)]
        command += [f"--var={name}={directory / sub}" for name, sub in (
            ("LOCAL_CONFDIR", "."), ("DBDIR", "db"), ("RUNDIR", "run"), ("LOGDIR", "log"),
        )]  # fmt: skip
        if os.geteuid() == 0:
            # rspamd refuses to run its workers as root unless told to: this one is private,
            # listens on loopback only and reads only its own files
            command += ["-i", "-u", "root", "-g", "root"]
        return command

    def start(self, *, new_session: bool = False, stop_with_parent: bool = False) -> None:
        """new_session: signals for the caller's terminal (Ctrl-C) do not reach rspamd, which
        the caller stops; stop_with_parent: rspamd gets SIGTERM when the caller dies, however
        it dies (mailkube_core.parent_death)."""
        self.write_config()
        command = self.command()
        with self.stderr_file.open("wb") as stderr:
            self.process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=new_session,
                preexec_fn=follow_this_process() if stop_with_parent else None,
            )

    def ready(self) -> bool:
        for url in (f"{self.url}/ping", f"{self.controller_url}/ping"):
            try:
                with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310
                    if response.read().strip() != b"pong":
                        return False
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                return False
        return True

    def wait_ready(
        self,
        timeout: float = READY_TIMEOUT,
        interval: float = 0.1,
        stopping: threading.Event | None = None,
    ) -> None:
        """Until both workers answer /ping; RspamdError when rspamd exits or at the deadline.
        Returns early, not ready, once `stopping` is set."""
        deadline = time.monotonic() + timeout
        stopping = stopping or threading.Event()
        while not self.ready():
            if self.process is not None and self.process.poll() is not None:
                raise RspamdError(
                    f"rspamd exited with status {self.process.returncode}; see {self.log_file}"
                    f" and {self.stderr_file}"
                )
            if time.monotonic() > deadline:
                raise RspamdError(
                    f"rspamd was not ready within {timeout:.0f}s; see {self.log_file}"
                )
            if stopping.wait(interval):
                return

    def stop(self, timeout: float = 15) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
