"""Runtime settings of every Mailkube process (docs/architecture.md "Settings").

Defaults are the seed design's. Every model forbids unknown fields, so a typo in the YAML file
stops the process at start instead of being silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    field_validator,
    model_validator,
)

from ..addresses import normalize_domain
from .units import ByteSize, Duration

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?",
    re.I,
)


def _comma_list(value: Any) -> Any:
    """Environment variables carry lists as 'a,b,c'."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _host_port(value: str, *, lowest_port: int = 1) -> str:
    """'host:port', '[v6]:port' or ':port' (every address). Normalised, port checked."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not lowest_port <= int(port) < 65536:
        raise ValueError(f"not an address: {value!r} (use host:port, [ipv6]:port or :port)")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
    elif host and not _HOSTNAME.fullmatch(host):
        raise ValueError(f"not an address: {value!r}")
    return f"{host}:{int(port)}"


TlsOverride = Literal["opportunistic", "required", "dane", "sts"]


def _tls_policies(value: Any) -> Any:
    """{domain: tls}; environment variables carry it as 'domain=tls,domain=tls'. Domains are
    normalised, so that one domain cannot be listed twice under two spellings."""
    if isinstance(value, str):
        pairs = []
        for item in _comma_list(value):
            domain, sep, tls = item.partition("=")
            if not sep:
                raise ValueError(f"not domain=policy: {item!r}")
            pairs.append((domain.strip(), tls.strip()))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        return value
    policies: dict[str, Any] = {}
    for domain, tls in pairs:
        name = normalize_domain(str(domain))
        if name in policies:
            raise ValueError(f"{name} listed twice")
        policies[name] = tls
    return policies


def split_host_port(address: str) -> tuple[str | None, int]:
    """The inverse of `HostPort`: (host or None for every address, port); brackets removed."""
    host, _, port = address.rpartition(":")
    return (host.strip("[]") or None), int(port)


def _listen_address(value: str) -> str:
    """A listener's address: as `_host_port`, and port 0 asks the kernel for a free one."""
    return _host_port(value, lowest_port=0)


HostPort = Annotated[str, AfterValidator(_host_port)]
HostPortList = Annotated[list[HostPort], BeforeValidator(_comma_list)]
ListenAddress = Annotated[str, AfterValidator(_listen_address)]
ListenList = Annotated[list[ListenAddress], BeforeValidator(_comma_list)]
StrList = Annotated[list[str], BeforeValidator(_comma_list)]


def _network(value: Any) -> Any:
    """A CIDR, parsed here so that a bad one is one error, not one per IP version."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip())
        except ValueError:
            raise ValueError(f"not a network: {value!r} (use CIDR, e.g. 10.0.0.0/8)") from None
    return value


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]
NetworkList = Annotated[list[Network], BeforeValidator(_comma_list)]
DurationList = Annotated[list[Duration], BeforeValidator(_comma_list)]
PositiveInt = Annotated[int, Field(gt=0)]
SpamPolicyName = Literal["off", "tag", "quarantine", "reject"]
# zone[=filter][*weight], postscreen_dnsbl_sites syntax: the filter is a dotted address whose
# octets may be ranges/lists in brackets ([2..11], [1;3;5]); the weight an integer
_DNSBL_OCTET = r"(\d{1,3}|\[\d{1,3}(\.\.\d{1,3})?(;\d{1,3}(\.\.\d{1,3})?)*\])"
_DNSBL_ZONE = re.compile(
    r"(?=[^=*]{1,253}(=|\*|$))[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))+\.?"
    rf"(={_DNSBL_OCTET}(\.{_DNSBL_OCTET}){{3}})?(\*-?\d{{1,4}})?",
    re.I,
)

#: the seed design's retry schedule
DEFAULT_RETRY_INTERVALS: tuple[timedelta, ...] = (
    timedelta(minutes=5), timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1),
    timedelta(hours=4), timedelta(hours=8), timedelta(hours=24),
)  # fmt: skip


class _Settings(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True
    )


class CommonSettings(_Settings):
    """What every process needs: Redis, key layout, identity, logs and telemetry."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis to use: redis://, rediss:// (TLS) or unix://. Any node's URL on Cluster."""
    redis_cluster: bool = False
    """Speak the Redis Cluster protocol."""
    redis_password: SecretStr | None = None
    """Redis password (prefer redis_password_file)."""
    redis_password_file: Path | None = None
    """File holding the Redis password, e.g. a mounted Secret."""
    redis_sentinels: HostPortList = []
    """Redis Sentinel addresses (host:port). Set, the sentinels name the primary to use
    (redis_url's host and port are then ignored; its scheme, user, password and database still
    apply), and every process follows a failover without a restart."""
    redis_sentinel_master: str | None = None
    """The primary's name in the sentinels' configuration (`sentinel monitor NAME ...`)."""
    redis_sentinel_password: SecretStr | None = None
    """Password of the sentinels themselves (their requirepass), if they have one (prefer
    redis_sentinel_password_file)."""
    redis_sentinel_password_file: Path | None = None
    """File holding the sentinels' password, e.g. a mounted Secret."""
    redis_max_connections: Annotated[int, Field(ge=2, le=10000)] = 64
    """Redis connections per process (per node on Cluster); callers beyond it wait."""
    redis_timeout: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=5)
    """Longest wait for Redis to answer one request, to connect, or to free a pooled
    connection. Past it the request fails as if Redis were down (the gateway answers
    451 4.3.0, a worker stops claiming and is not ready, the operator retries after
    retry_delay), and the connection is dropped; the next request opens a new one."""
    key_prefix: str = "mailkube"
    """Prefix of every Redis key, so several installations can share one Redis."""
    queue_partitions: Annotated[int, Field(ge=1, le=1024)] = 1
    """Queue partitions (each its own Cluster hash tag). Raise it to spread the queue over
    Cluster nodes; only lower it once the queue is empty."""
    hostname: str = Field(default_factory=socket.getfqdn)
    """This host's mail name: greeting, Received:, bounces. Default: the machine's FQDN."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Least severe log level written."""
    log_format: Literal["json", "text"] = "json"
    """json: one object per line, for log collectors; text: for people."""
    event_loop: Literal["uvloop", "asyncio"] = "asyncio"
    """The event loop: uvloop (libuv; less CPU per connection and per Redis round trip) or
    Python's own asyncio loop."""
    telemetry_listen: HostPort | Literal[""] = ":9100"
    """Address of the /metrics, /healthz and /readyz HTTP server; empty turns it off."""
    routing_check_interval: Duration = timedelta(seconds=5)
    """How often readers check the routing-table version, in case a notification was lost."""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {value!r}")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_hosts(cls, value: list[str]) -> list[str]:
        for address in value:
            if address.startswith(":"):
                raise ValueError(f"a sentinel needs a host: {address!r} (use host:port)")
        return value

    @model_validator(mode="after")
    def _sentinel_or_url(self) -> CommonSettings:
        if self.redis_sentinels:
            if not self.redis_sentinel_master:
                raise ValueError(
                    "redis_sentinel_master must name the primary the redis_sentinels monitor"
                )
            if self.redis_cluster:
                raise ValueError(
                    "redis_sentinels and redis_cluster exclude each other: Sentinel watches "
                    "one primary, a Cluster fails over by itself"
                )
            if self.redis_url.startswith("unix://"):
                raise ValueError(
                    "redis_url must be redis:// or rediss:// with redis_sentinels (the "
                    "sentinels give a TCP address)"
                )
        elif self.redis_sentinel_master:
            raise ValueError("redis_sentinel_master is set but redis_sentinels is empty")
        return self

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        # the prefix goes inside Redis Cluster hash tags, so braces would break slotting
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', ':' or '-'")
        return value

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"not a hostname: {value!r}")
        return value.rstrip(".").lower()

    def redis_secret(self) -> str | None:
        """The Redis password: from redis_password_file (a mounted Secret) or redis_password."""
        if self.redis_password_file is not None:
            return self.redis_password_file.read_text().strip()
        return self.redis_password.get_secret_value() if self.redis_password else None

    def redis_sentinel_secret(self) -> str | None:
        """The sentinels' password: from redis_sentinel_password_file or
        redis_sentinel_password."""
        if self.redis_sentinel_password_file is not None:
            return self.redis_sentinel_password_file.read_text().strip()
        secret = self.redis_sentinel_password
        return secret.get_secret_value() if secret else None

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """redis_sentinels as (host, port) pairs."""
        return [(host or "", port) for host, port in map(split_host_port, self.redis_sentinels)]


class DomainSpamDefaults(_Settings):
    """The spam policy of MailDomains without their own `spec.spam` (docs/spam.md): the gateway
    applies it, the operator shows it in each MailDomain's `status.spam`. The chart gives both
    the same values."""

    spam_policy: SpamPolicyName = "reject"
    """Domains without their own: off (no scan), tag (headers only), quarantine (spam into
    Junk), reject (rspamd's reject refused with 554 5.7.1, the rest of the spam into Junk)."""
    spam_reject_score: float | None = None
    """Domains without their own: a score at or above this is rspamd's reject, whatever its
    action said. Unset: rspamd's actions decide."""
    spam_junk_score: float | None = None
    """Domains without their own: a score at or above this is spam (tagged, into Junk under
    quarantine and reject). Unset: rspamd's actions decide."""
    spam_rewrite_subject: bool = False
    """Domains without their own: prefix the Subject of spam (rspamd's subject, or
    "***SPAM*** ")."""
    spam_unavailable: Literal["accept", "defer"] = "defer"
    """Domains without their own: when rspamd is down, slow or answers garbage, accept (tagged
    X-Spam-Status: unchecked) or defer (451 4.3.0)."""
    greylisting: bool = False
    """Domains without their own: greylist mail from unknown (client /24 or /64, sender,
    recipient) triplets with 451 4.7.1."""


class GatewaySettings(CommonSettings, DomainSpamDefaults):
    """The SMTP gateway (issue #3 adds what it needs beyond the seed)."""

    mx_listen: ListenList = [":25"]
    """MX listener addresses (host:port, [v6]:port, or :port for every address; port 0 takes
    a free port, for tests, with processes 1)."""
    submission_listen: ListenList = [":587"]
    """Submission listener addresses: STARTTLS, then AUTH, required."""
    submissions_listen: ListenList = [":465"]
    """Implicit-TLS submission listener addresses (RFC 8314)."""
    mta_sts_listen: HostPort | Literal[""] = ""
    """Address of the listener serving each domain's MTA-STS policy (GET
    /.well-known/mta-sts.txt, by Host mta-sts.<domain>; RFC 8461 §3.3): HTTPS with
    mta_sts_tls_cert_file, else plain HTTP behind a TLS-terminating Ingress; empty turns it
    off (docs/dns.md)."""
    mta_sts_tls_cert_file: Path | None = None
    """PEM certificate chain valid for every mta-sts.<domain> served; reloaded when the file
    changes."""
    mta_sts_tls_key_file: Path | None = None
    """PEM private key of mta_sts_tls_cert_file."""
    tls_cert_file: Path | None = None
    """PEM certificate chain; reloaded when the file changes."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    require_tls: bool = False
    """Refuse mail on the MX listener until the client has started TLS."""
    auth_on_mx: bool = False
    """Offer AUTH on the MX listener too (after STARTTLS)."""
    proxy_protocol_listeners: StrList = []
    """Listeners that expect the PROXY protocol header: mx, submission, submissions."""
    trusted_proxies: NetworkList = []
    """Networks allowed to send a PROXY protocol header (CIDRs)."""
    max_message_size: Annotated[ByteSize, Field(gt=0)] = 26214400
    """Largest message accepted, in bytes (SIZE); e.g. 26214400 or 25MiB."""
    data_memory_limit: Annotated[ByteSize, Field(gt=0)] | None = None
    """Bytes that messages being received (in DATA) may hold in memory together, per gateway
    process; a message that would pass it gets 452 4.3.1. Unset: an eighth of
    container_memory_limit shared by the processes (256MiB without one), at least
    max_message_size."""
    container_memory_limit: Annotated[ByteSize, Field(gt=0)] | None = None
    """The container's memory limit, in bytes (the chart sets it from the gateway's
    resources.limits.memory). Unset: read from the cgroup (memory.max)."""
    max_recipients: PositiveInt = 100
    """Recipients per message; more get 452 4.5.3."""
    read_timeout: Duration = timedelta(seconds=60)
    """Longest wait for a client's next line."""
    write_timeout: Duration = timedelta(seconds=60)
    """Longest wait for a client to take a reply."""
    max_connections_per_ip: PositiveInt = 10
    """Concurrent connections from one client address."""
    max_messages_per_minute: PositiveInt = 30
    """Messages per minute from one sender (authenticated user or client address)."""
    postmaster: str | None = None
    """Mailbox that receives mail for postmaster (RFC 5321 §4.5.1)."""
    max_recipient_messages_per_minute: PositiveInt = 120
    """Messages per minute to one recipient address, across all gateways; more get 450."""
    max_connections: PositiveInt = 1000
    """Concurrent SMTP connections per gateway process; more get 421 at connect."""
    max_errors: PositiveInt = 10
    """Error replies one session may get before the gateway says 421 and hangs up."""
    max_header_size: Annotated[ByteSize, Field(gt=0)] = 262144
    """Largest header section accepted, in bytes."""
    max_received_headers: PositiveInt = 50
    """More Received: headers than this means a mail loop (554 5.4.6)."""
    auth_max_failures: PositiveInt = 5
    """Failed AUTH attempts from one client network (IPv4 address, IPv6 /64) after which it is
    refused (454 4.7.0), across gateways, for every user it has not logged in as."""
    auth_failure_window: Duration = timedelta(minutes=15)
    """Failures count for this long from the first of them; a refused network waits it out."""
    auth_max_delay: Duration = timedelta(seconds=15)
    """Longest wait before a password is checked: after a user's failures, tries from networks
    it has not logged in from wait 1s, doubling per failure, up to this; 0 turns it off."""
    auth_remember_networks: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(days=30)
    """How long a client network that logged in as a user is remembered (renewed at each
    login); from it, the user is never refused and waits only for its own failures."""
    enqueue_timeout: Duration = timedelta(seconds=10)
    """Longest wait for Redis to queue a message, all its requests together (the
    transaction, the replicas' WAIT); after it the client gets 451 4.3.0. Each request
    within it is bounded by redis_timeout too."""
    enqueue_replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas that must acknowledge a message (Redis WAITAOF where the server has it, 7.2
    and newer, else WAIT) before the gateway answers 250; fewer within
    enqueue_replicas_timeout get 451 4.3.0. With 1 or more, a failover to a replica loses
    no accepted message. Not on Redis Cluster."""
    enqueue_replicas_timeout: Annotated[Duration, Field(gt=timedelta(0))] | None = None
    """Longest wait for the enqueue_replicas acknowledgements; shorter than redis_timeout
    (the wait is one Redis request). Unset: half of redis_timeout."""
    tls_check_interval: Duration = timedelta(seconds=5)
    """How often the certificate and key files are checked for changes."""
    proxy_protocol_timeout: Duration = timedelta(seconds=5)
    """Longest wait for a trusted proxy's PROXY protocol header."""
    shutdown_grace: Duration = timedelta(seconds=25)
    """On SIGTERM, how long messages being received may finish (keep it under the pod's
    terminationGracePeriodSeconds); idle sessions get 421 at once."""
    processes: PositiveInt = 1
    """Gateway processes serving the same listening sockets (one per core): whichever is idle
    accepts the next connection."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The gateway's event loop: uvloop (libuv: 5-10% more messages per second, see
    docs/benchmarks.md) or Python's own asyncio loop."""
    inbound_auth_checks: bool = True
    """Check SPF, DKIM, ARC and DMARC on the MX listener and add Authentication-Results."""
    authserv_id: str | None = None
    """The authserv-id of Authentication-Results (RFC 8601); default: hostname."""
    dmarc_policy: Literal["enforce", "monitor"] = "enforce"
    """Domains without their own policy: enforce refuses DMARC p=reject failures (550 5.7.1)
    and files p=quarantine failures in Junk; monitor only records the result."""
    spf_fail: Literal["reject", "tag"] = "tag"
    """Domains without their own policy: an SPF fail is refused (550 5.7.23) or only recorded."""
    dns_temp_error: Literal["defer", "accept"] = "defer"
    """Domains without their own policy: a DNS temporary error during SPF/DKIM/DMARC answers
    451 4.7.x (defer) or accepts the message with the temperror recorded."""
    dns_nameservers: StrList = []
    """Resolvers for SPF, DKIM, DMARC (IP addresses); empty: those of /etc/resolv.conf."""
    dns_port: Annotated[int, Field(gt=0, lt=65536)] = 53
    """Port of dns_nameservers."""
    dns_timeout: Duration = timedelta(seconds=5)
    """Longest wait for one DNS lookup (all tries included)."""
    auth_check_threads: PositiveInt = 16
    """Threads for SPF, DKIM and ARC checks and DKIM signing (the libraries are blocking)."""

    # --- spam and abuse defence (docs/spam.md) -----------------------------------------------
    rspamd_url: HttpUrl | None = None
    """rspamd's normal worker (e.g. http://rspamd:11333); every message is scanned there
    (POST /checkv2). Unset: no content scanning."""
    rspamd_timeout: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=10)
    """Longest wait for rspamd's verdict on one message; after it, spam_unavailable applies."""
    rspamd_max_connections: PositiveInt = 32
    """Scans that may ask rspamd at once per gateway process (one connection each: rspamd
    closes it after its answer); more messages wait their turn within rspamd_timeout."""
    submission_spam_policy: Literal["off", "tag", "reject"] = "reject"
    """Mail from authenticated users: rspamd's reject is refused (550 5.7.1) and counted
    against the user (reject), only tagged (tag), or not scanned (off)."""
    submission_spam_suspend_after: Annotated[int, Field(ge=0)] = 5
    """A user with this many messages refused as spam within submission_spam_window is
    suspended for submission until an administrator lifts it; 0: never."""
    submission_spam_window: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(hours=24)
    """How long a refused message counts towards submission_spam_suspend_after."""
    dnsbl_zones: StrList = []
    """DNS block and allow lists asked about each MX client, postscreen-style:
    zone[=answer filter][*weight], e.g. zen.spamhaus.org=127.0.0.[2..11]*3,
    list.dnswl.org=127.0.[0..255].[1..3]*-2. Weight default 1; a negative one allows."""
    dnsbl_threshold: int = 1
    """A client whose weights add up to this or more is refused (554 5.7.1) after the
    greeting; a negative sum marks it allow-listed (no greylisting)."""
    dnsbl_timeout: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=3)
    """Longest wait for the DNS list answers, asked in parallel at connect; a list that has
    not answered by then counts as not listing the client."""
    greet_pause: Duration = timedelta(0)
    """MX listener: wait this long before the 220; a client that talks first (RFC 5321
    §4.3.1 says it must wait) is refused and remembered. 0: off."""
    early_talker_block: Duration = timedelta(hours=1)
    """How long a client that talked before the greeting is refused at connect, across
    gateways."""
    client_rdns: Literal["off", "record", "require"] = "record"
    """MX listener: look up the client's reverse name and check it resolves back (FCrDNS);
    record it in Received: and pass it to rspamd, or also refuse clients without one
    (450/550 4.7.25)."""
    spam_exempt_networks: NetworkList = []
    """Clients (CIDRs) exempt from DNS lists, greet pause, reverse-DNS requirement and
    greylisting: your own relays, backup MX."""
    greylist_delay: Duration = timedelta(minutes=5)
    """A triplet's retry is accepted once this long has passed since it was first seen."""
    greylist_retry_window: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(hours=24)
    """A triplet not retried within this long after first seen is forgotten."""
    greylist_expiry: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(days=35)
    """A triplet that passed is remembered this long after its last message."""
    greylist_auto_pass_after: Annotated[int, Field(ge=0)] = 5
    """A client network whose triplets passed this many times skips greylisting; 0: never."""

    @field_validator("dnsbl_zones")
    @classmethod
    def _dnsbl_zones(cls, value: list[str]) -> list[str]:
        for item in value:
            if not _DNSBL_ZONE.fullmatch(item):
                raise ValueError(
                    f"not a DNS list: {item!r} (use zone[=answer filter][*weight], e.g. "
                    "zen.spamhaus.org=127.0.0.[2..11]*3)"
                )
        return value

    @field_validator("proxy_protocol_listeners")
    @classmethod
    def _listener_names(cls, value: list[str]) -> list[str]:
        unknown = set(value) - {"mx", "submission", "submissions"}
        if unknown:
            raise ValueError(
                f"unknown listener(s) {sorted(unknown)}; use mx, submission, submissions"
            )
        return value

    @model_validator(mode="after")
    def _one_process_for_port_zero(self) -> GatewaySettings:
        if self.processes > 1:
            for name in ("mx_listen", "submission_listen", "submissions_listen"):
                if any(split_host_port(a)[1] == 0 for a in getattr(self, name)):
                    # each process would get a port of its own: the listeners would not be shared
                    raise ValueError(f"{name}: port 0 needs processes 1")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if (self.mta_sts_tls_cert_file is None) != (self.mta_sts_tls_key_file is None):
            raise ValueError("mta_sts_tls_cert_file and mta_sts_tls_key_file must be set together")
        return self

    @model_validator(mode="after")
    def _replicas_within_deadlines(self) -> GatewaySettings:
        if self.enqueue_replicas and self.redis_cluster:
            raise ValueError(
                "enqueue_replicas is not supported with redis_cluster: use a primary with "
                "replicas (redis_sentinels) for it"
            )
        wait = self.enqueue_replicas_timeout
        if wait is not None and wait >= self.redis_timeout:
            # the replicas' WAIT is one request: at redis_timeout its connection is dropped
            # before Redis could say how many acknowledged
            raise ValueError(
                "enqueue_replicas_timeout must be shorter than redis_timeout: the wait for "
                "the replicas is one Redis request"
            )
        if self.enqueue_replicas and self.replica_ack_timeout() >= self.enqueue_timeout:
            raise ValueError(
                "enqueue_replicas_timeout must be shorter than enqueue_timeout: the wait for "
                "the replicas is part of the enqueue"
            )
        return self

    def replica_ack_timeout(self) -> timedelta:
        """enqueue_replicas_timeout, or half of redis_timeout."""
        return self.enqueue_replicas_timeout or self.redis_timeout / 2

    @model_validator(mode="after")
    def _data_memory(self) -> GatewaySettings:
        if self.data_memory_limit is not None and self.data_memory_limit < self.max_message_size:
            raise ValueError(
                "data_memory_limit must be at least max_message_size: a message of that size "
                "could never be received"
            )
        return self


class SmartHostSettings(_Settings):
    """A relay for all remote mail (for clouds that block port 25)."""

    host: str
    """Relay host name."""
    port: Annotated[int, Field(gt=0, lt=65536)] = 587
    """Relay port."""
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    """How to reach it: STARTTLS, implicit TLS, or plain (trusted networks only)."""
    username: str | None = None
    """AUTH user name, if the relay wants one."""
    password_file: Path | None = None
    """File holding the AUTH password, e.g. a mounted Secret."""


class WorkerSettings(CommonSettings):
    """The delivery worker (issue #5 adds what it needs beyond the seed)."""

    role: Literal["local", "remote", "all"] = "all"
    """local: mailbox delivery (mounts the mail volume); remote: SMTP out; all: both."""
    queue_workers: PositiveInt = 4
    """Deliveries in flight at once in this process (a local batch counts as one)."""
    local_batch_size: PositiveInt = 32
    """Local lane: messages claimed in one batch and delivered together (their files
    written by one thread, each new/ fsynced once per batch, all recorded and settled in one
    Redis script, with the forwards they queue). Deliveries needing more (quotas, failures,
    success notices) go one by one."""
    batch_wait: Annotated[Duration, Field(ge=timedelta(0), le=timedelta(seconds=1))] = timedelta(
        milliseconds=20
    )
    """After a claim that did not fill a batch (local lane: local_batch_size; remote lane:
    32), wait this long before claiming again, so that under load arrivals gather into fewer,
    larger batches: fewer Redis writes (each an AOF fsync the gateway's enqueues wait behind)
    and directory fsyncs per message. A message may wait this much longer; 0 turns it off."""
    mail_root: Path = Path("/var/mail")
    """Root of the maildirs: <mail_root>/<domain>/<localpart>/."""
    retry_intervals: DurationList = list(DEFAULT_RETRY_INTERVALS)
    """Waits before each retry after a temporary failure; the last one repeats."""
    retry_jitter: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Each wait is stretched or shrunk at random by up to this fraction."""
    max_retries: Annotated[int, Field(ge=0)] = 7
    """Retries before the remaining recipients fail and bounce."""
    bounce_after: Duration = timedelta(hours=48)
    """Time in the queue after which the remaining recipients fail and bounce."""
    delay_warning_after: Duration = timedelta(hours=4)
    """Time in the queue after which a delay DSN (Action: delayed) is sent."""
    visibility_timeout: Duration = timedelta(minutes=5)
    """A claimed message not settled for this long goes to another worker (a dead pod's)."""
    smart_host: SmartHostSettings | None = None
    """Send all remote mail through this relay (for clouds that block port 25)."""
    telemetry_listen: HostPort | Literal[""] = ":9101"
    """Address of the /metrics, /healthz and /readyz HTTP server; empty turns it off."""
    queue_poll_interval: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=1)
    """How long a claim waits for new entries (shorter than redis_timeout), and how often
    deferred mail is checked."""
    queue_stats_interval: Duration = timedelta(seconds=15)
    """How often the worker reads the queue's depth for the mailkube_queue_messages gauge
    (autoscaling on it: docs/kubernetes.md); 0 turns it off."""
    shutdown_grace: Duration = timedelta(seconds=25)
    """On SIGTERM, how long deliveries in flight may finish (keep it under the pod's
    terminationGracePeriodSeconds); the rest are left for other workers."""
    smtp_port: Annotated[int, Field(gt=0, lt=65536)] = 25
    """Port of remote MX hosts (25; tests use another)."""
    smtp_connect_timeout: Duration = timedelta(seconds=30)
    """Longest wait for a TCP connection to a remote host."""
    smtp_tls_ca_file: Path | None = None
    """CA bundle (the WebPKI trust store) that verifies remote hosts where TLS is required
    or an MTA-STS policy applies, and MTA-STS policy servers; default: the system's."""
    require_tls_domains: StrList = []
    """Destination domains that get mail only over verified TLS (others: STARTTLS when
    offered)."""
    mta_sts: bool = True
    """Apply receivers' MTA-STS policies (RFC 8461): fetched over HTTPS, cached in Redis for
    their max_age; enforce mode defers mail rather than send it to a host that fails them."""
    mta_sts_port: Annotated[int, Field(gt=0, lt=65536)] = 443
    """Port of the mta-sts.<domain> HTTPS policy hosts (443; tests use another)."""
    mta_sts_fetch_timeout: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=30)
    """Longest wait for one MTA-STS policy fetch (DNS, connect, TLS and the file)."""
    tlsrpt: bool = True
    """Send the daily TLS-RPT reports (RFC 8460) of the outcomes of MTA-STS and DANE to the
    destination domains that ask for them (an _smtp._tls TXT record)."""
    tlsrpt_from: str = ""
    """From and envelope sender of the reports sent by mail; empty: tls-reports@<hostname>."""
    tlsrpt_organization: str = ""
    """organization-name in the reports; empty: hostname."""
    tlsrpt_contact: str = ""
    """contact-info in the reports; empty: tlsrpt_from."""
    tlsrpt_mailboxes: StrList = []
    """Local mailboxes (the mailto: of our _smtp._tls records) whose incoming TLS-RPT reports
    are counted into the metrics mailkube.worker.tlsrpt.* as they are delivered (role local)."""
    dns_dnssec_trusted: bool = False
    """dns_nameservers validate DNSSEC and the path to them is trusted (a resolver on the
    node or in the pod): their AD bit is believed, which turns DANE on (RFC 7672; Postfix's
    smtp_dns_support_level = dnssec). Off: no DANE."""
    mx_address_limit: PositiveInt = 5
    """Most MX host addresses tried per delivery attempt."""
    destination_concurrency: PositiveInt = 20
    """Concurrent connections per destination domain (or smart host), per worker process."""
    connection_cache_time: Duration = timedelta(seconds=5)
    """How long an idle SMTP connection is kept for the next message to the same place."""
    failed_host_ttl: Duration = timedelta(minutes=1)
    """How long a host that could not be reached is skipped when another one can be tried."""
    dns_nameservers: StrList = []
    """Resolvers for MX lookups (IP addresses); empty: those of /etc/resolv.conf."""
    dns_port: Annotated[int, Field(gt=0, lt=65536)] = 53
    """Port of dns_nameservers."""
    dns_timeout: Duration = timedelta(seconds=10)
    """Longest wait for one DNS lookup."""
    dsn_full_limit: ByteSize = 102400
    """A bounce for RET=FULL returns the whole message up to this size, else its headers."""
    events_max_length: PositiveInt = 100000
    """Entries kept (approximately) in the message.received event stream."""

    @field_validator("retry_intervals")
    @classmethod
    def _intervals(cls, value: list[timedelta]) -> list[timedelta]:
        if not value or any(v.total_seconds() <= 0 for v in value):
            raise ValueError("must be a non-empty list of positive durations")
        return value

    @model_validator(mode="after")
    def _poll_within_redis_timeout(self) -> WorkerSettings:
        # a claim waits queue_poll_interval inside one Redis request (XREADGROUP BLOCK)
        if self.queue_poll_interval >= self.redis_timeout:
            raise ValueError(
                "queue_poll_interval must be shorter than redis_timeout: a claim waits that "
                "long for new messages inside one Redis request"
            )
        return self


class OperatorSettings(CommonSettings, DomainSpamDefaults):
    """The Kubernetes operator (issue #6 adds what it needs)."""

    namespace: str = "default"
    """Namespace whose MailDomain and MailUser resources the operator serves."""
    cluster_wide: bool = False
    """Serve every namespace instead."""
    telemetry_listen: HostPort | Literal[""] = ":9102"
    """Address of the /metrics, /healthz and /readyz HTTP server; empty turns it off."""
    public_hostname: str | None = None
    """Public name of the gateway's address: the MX target in the DNS records each MailDomain's
    status lists. Default: hostname."""
    tls_policies: Annotated[dict[str, TlsOverride], BeforeValidator(_tls_policies)] = {}
    """Outbound TLS per destination domain, over what its DNS publishes: a map of domain to
    opportunistic, required, dane or sts (docs/delivery.md, per-destination overrides); the
    operator writes it into the routing table's tls_policies (as `mailkube routing apply`
    does from its file)."""
    mx_tls_secret: str | None = None
    """[namespace/]name of the gateway's TLS Secret (kubernetes.io/tls; default namespace: the
    operator's): each MailDomain's status then lists the TLSA record (3 1 1) of our MX host's
    key, and of the key cert-manager issues the next certificate with (DANE, docs/dns.md)."""
    mta_sts_host_target: str | None = None
    """Where the mta-sts.<domain> CNAMEs each MailDomain's status lists point: the name of
    the Ingress serving the MTA-STS policies (chart gateway.mtaSts.expose=ingress). Default:
    the MX host (the gateway serves them on port 443)."""
    kube_api_server: str | None = None
    """URL of the Kubernetes API. Default: the in-cluster service account, else kubeconfig."""
    kube_token_file: Path | None = None
    """With kube_api_server: file holding the bearer token (a projected ServiceAccount token,
    say); read again at every login and when it changes, so a rotated token is used."""
    kube_ca_file: Path | None = None
    """With kube_api_server: the CA bundle (PEM) the API server's certificate is checked
    against. Default: the system's CAs."""
    watch_timeout: Duration = timedelta(minutes=5)
    """Server-side timeout of each Kubernetes watch request; the watch then reconnects."""
    retry_delay: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=30)
    """Wait before retrying a step that failed for a reason outside the operator (API errors,
    Redis down): no hot retry loops."""
    initial_publish_delay: Duration = timedelta(seconds=5)
    """At start, how long to wait for the first MailDomain or MailUser before publishing the
    routing table anyway (after checking that there are none)."""
    dns_check_interval: Duration = timedelta(0)
    """How often each MailDomain's DNS records are resolved and compared (DNSVerified);
    0 turns the DNS check off."""
    dns_nameservers: StrList = []
    """Resolvers for the DNS check (IP addresses); empty: those of /etc/resolv.conf."""
    dns_port: Annotated[int, Field(gt=0, lt=65536)] = 53
    """Port of dns_nameservers."""
    dns_timeout: Duration = timedelta(seconds=5)
    """Longest wait for one DNS lookup of the DNS check."""
    suspension_check_interval: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=30)
    """How often the submission suspensions the gateway records in Redis are read (one request
    for all users) to update each MailUser's SubmissionSuspended condition."""

    @field_validator("public_hostname")
    @classmethod
    def _public_hostname(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"not a hostname: {value!r}")
        return value.rstrip(".").lower()

    @model_validator(mode="after")
    def _kube_files_need_a_server(self) -> OperatorSettings:
        for name in ("kube_token_file", "kube_ca_file"):
            if getattr(self, name) is not None and not self.kube_api_server:
                raise ValueError(f"{name} is only used with kube_api_server; set both")
        return self

    def mx_hostname(self) -> str:
        """The name MX records point at: public_hostname, else hostname."""
        return self.public_hostname or self.hostname


ALL_SETTINGS: tuple[type[CommonSettings], ...] = (GatewaySettings, WorkerSettings, OperatorSettings)
