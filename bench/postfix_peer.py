"""A private Postfix instance for the benchmarks, beside Mailkube in the same run: smtpd on a
loopback port, everything under one directory (nothing in /etc/postfix or /var/spool/postfix),
chroot off, a maillog file, Postfix 3.7's defaults otherwise. Needs root (Postfix drops to its
own users)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from gateway_bench import free_ports, listening, tree
from gateway_harness import wait_until

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance under `base`, on 127.0.0.1:`port`, for mail to example.test:
    `discard`ed (discard(8)), or delivered into one `maildir` (virtual(8), which fsyncs each
    file before its rename into new/: `maildir_new`); or `relay`: mail to remote.test
    (relay_domains) sent on by smtp(8) to the SMTP server on 127.0.0.1:`relay_port` (Postfix
    defaults otherwise, as peers-bench's `postfix-relay`). With `milter_port`, every message is
    first scanned by a milter (rspamd's proxy; `milter_default_action = tempfail`, as Postfix
    defaults)."""

    def __init__(
        self,
        base: Path,
        mode: Literal["discard", "maildir", "relay"],
        *,
        milter_port: int | None = None,
        relay_port: int | None = None,
    ) -> None:
        self.base = base
        (self.port,) = free_ports(1)
        etc, queue, data = base / "etc", base / "queue", base / "data"
        for directory in (etc, queue, data):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(data, "postfix")
        main = [
            "compatibility_level = 3.6", f"queue_directory = {queue}",
            f"data_directory = {data}", "mail_owner = postfix", "setgid_group = postdrop",
            "myhostname = bench-postfix.test", "mydestination =",
            "inet_interfaces = loopback-only", "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "alias_maps =", "alias_database =", "biff = no",
            "maillog_file_prefixes = /var, /dev/stdout, /tmp",
            f"maillog_file = {base / 'maillog'}",
        ]  # fmt: skip
        if mode == "discard":
            main += ["relay_domains = example.test", "relay_transport = discard:silently"]
        elif mode == "relay":
            assert relay_port is not None, "relay mode needs relay_port"
            (etc / "transport").write_text(f"remote.test smtp:[127.0.0.1]:{relay_port}\n")
            main += ["relay_domains = remote.test", f"transport_maps = texthash:{etc}/transport"]
        else:
            vmail = base / "vmail"
            vmail.mkdir(exist_ok=True)
            os.chown(vmail, 65534, 65534)
            main += [
                "virtual_mailbox_domains = example.test", f"virtual_mailbox_base = {vmail}",
                "virtual_mailbox_maps = static:box/", "virtual_uid_maps = static:65534",
                "virtual_gid_maps = static:65534",
            ]  # fmt: skip
        self.maildir_new = base / "vmail" / "box" / "new"
        if milter_port is not None:
            main += [
                f"smtpd_milters = inet:127.0.0.1:{milter_port}",
                "milter_protocol = 6",
                "milter_default_action = tempfail",
                "milter_mail_macros = i {mail_addr} {client_addr} {client_name} {auth_authen}",
            ]
        (etc / "main.cf").write_text("\n".join(main) + "\n")
        (etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        self._postfix("start")
        wait_until(lambda: (queue / "pid" / "master.pid").exists(), 20, "postfix master")
        self.master = int((queue / "pid" / "master.pid").read_text().strip())
        wait_until(lambda: listening(self.port), 20, "postfix smtpd")

    def _postfix(self, command: str) -> None:
        done = subprocess.run(
            [POSTFIX, "-c", str(self.base / "etc"), command], capture_output=True, text=True
        )
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip()
            raise SystemExit(f"postfix {command} failed: {why}")

    @property
    def pids(self) -> list[int]:
        return tree(self.master)

    def delivered(self) -> int:
        """Files in the maildir's new/ (mode maildir)."""
        return len(os.listdir(self.maildir_new)) if self.maildir_new.exists() else 0

    def discarded(self) -> int:
        log = self.base / "maillog"
        return log.read_text(errors="replace").count("status=sent") if log.exists() else 0

    def stop(self) -> None:
        self._postfix("stop")
