"""One MX connection's checks, started at connect and asked when their answer is needed.

At connect (Policy.admit, beside the connection lease), on the MX listener only:

- the early-talker memory is asked (Redis; the command leaves in the same write as the
  lease's), when greet_pause is on;
- the DNS lists are asked, each under dnsbl_timeout, when dnsbl_zones is set;
- the reverse name is looked up under dns_timeout, unless the resolver's cache holds the
  answers already, when client_rdns is not off.

None of this holds up the greeting. The command gate (`refusal`) waits for the checks that
may refuse the client before its first command other than EHLO, HELO, NOOP, RSET and QUIT
(MAIL at the latest); the message (`facts`) waits for the rest before the filter pipeline
runs. Clients in spam_exempt_networks are not refused, not paused, not looked up in the
lists (their reverse name is still recorded).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import TypeVar

from opentelemetry import metrics
from redis.exceptions import RedisError

from mailkube_core.redis_client import RedisClient
from mailkube_core.settings import GatewaySettings, SettingsError
from mailkube_core.telemetry import Tally

from .. import replies
from ..mailauth.resolver import DnsResolver
from ..pipeline import ClientFacts
from .dnsbl import DnsblResult, ask_lists, parse_lists, score
from .early_talkers import EarlyTalkers
from .rdns import TIMED_OUT, IPAddress, ReverseDns, cached_reverse_dns, check_reverse_dns

log = logging.getLogger(__name__)
_checks = Tally(
    metrics.get_meter("mailkube.gateway"), "mailkube.gateway.connection_checks",
    unit="{connection}", description="Connection-level checks of MX clients, by check and verdict",
)  # fmt: skip
#: commands a screened client may always use: a refused client still greets and says goodbye
UNGATED = frozenset({"EHLO", "HELO", "NOOP", "RSET", "QUIT"})
_REDIS_ERRORS = (RedisError, TimeoutError, OSError)
#: clients whose reverse-DNS result a process keeps (emptied of expired ones when full)
NAMES_KEPT = 50_000
T = TypeVar("T")


class Screening:
    """What the connection-level checks of a gateway process share."""

    def __init__(
        self, settings: GatewaySettings, resolver: DnsResolver, redis: RedisClient
    ) -> None:
        try:
            self.lists = parse_lists(settings.dnsbl_zones)
        except ValueError as error:
            raise SettingsError(f"invalid setting dnsbl_zones: {error}") from None
        self.resolver = resolver
        self.rdns = settings.client_rdns
        self.greet_pause = settings.greet_pause.total_seconds()
        self.early_talkers = (
            EarlyTalkers(redis, settings.key_prefix, settings.early_talker_block)
            if self.greet_pause > 0
            else None
        )
        self.exempt = tuple(settings.spam_exempt_networks)
        self.threshold = settings.dnsbl_threshold
        self.dnsbl_timeout = settings.dnsbl_timeout.total_seconds()
        self.dns_timeout = settings.dns_timeout.total_seconds()
        self.redis_timeout = settings.redis_timeout.total_seconds()
        #: client address -> (its reverse-DNS result, valid until time.monotonic())
        self._names: dict[str, tuple[ReverseDns, float]] = {}
        #: without checks that refuse: client address -> (its finished screen, valid until)
        self._screens: dict[str, tuple[ClientScreen, float]] = {}
        #: a check that may refuse or pause a client (which exempt networks escape)
        self.refusing = bool(self.lists) or self.early_talkers is not None or self.rdns == "require"
        self.active = self.refusing or self.rdns != "off"

    def start(self, listener: str, ip: str) -> ClientScreen | None:
        """The checks of a new connection; None when none apply."""
        if listener != "mx" or not self.active:
            return None
        if not self.refusing:
            # only the reverse name is recorded: a client that comes back within its
            # answers' TTLs gets the finished screen of its last connection (nothing in it
            # changes: no task, no verdict to wait for)
            known = self._screens.get(ip)
            if known is not None and known[1] > time.monotonic():
                _checks.add(1, {"check": "rdns", "verdict": known[0].rdns_result})
                return known[0]
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:  # "unknown" (a PROXY health check's LOCAL): nothing to ask about
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        screen = ClientScreen(self, address, exempt=self.refusing and self.is_exempt(address))
        until = self._names.get(screen.ip, (None, 0.0))[1]
        if not self.refusing and screen.rdns is not None and until > time.monotonic():
            _keep(self._screens, ip, (screen, until))
        return screen

    def known_name(self, ip: str, address: IPAddress) -> ReverseDns | None:
        """The client's reverse-DNS result while the answers it came from are cached, or
        None. Kept per address until the first of those answers expires: a client that
        comes back (a sending server: most of them) costs no lookup and no new work."""
        now = time.monotonic()
        known = self._names.get(ip)
        if known is not None and known[1] > now:
            return known[0]
        found = cached_reverse_dns(self.resolver, address)
        if found is None:
            return None
        _keep(self._names, ip, found)
        return found[0]

    def is_exempt(self, address: IPAddress) -> bool:
        return any(address in network for network in self.exempt)


def _keep(memo: dict[str, tuple[T, float]], key: str, entry: tuple[T, float]) -> None:
    """memo[key] = entry (value, valid until time.monotonic()); a full memo drops what has
    expired first, then everything."""
    if len(memo) >= NAMES_KEPT:
        now = time.monotonic()
        for stale in [k for k, (_, until) in memo.items() if until <= now]:
            del memo[stale]
        if len(memo) >= NAMES_KEPT:
            memo.clear()
    memo[key] = entry


class ClientScreen:
    def __init__(self, screening: Screening, address: IPAddress, *, exempt: bool) -> None:
        self.screening = screening
        self.address = address
        self.ip = str(address)
        loop = asyncio.get_running_loop()
        #: seconds to wait before the greeting (0: greet at once)
        self.greet_pause = 0.0
        self._early: asyncio.Task[bool] | None = None
        self._dnsbl: asyncio.Task[DnsblResult] | None = None
        self._rdns: asyncio.Task[ReverseDns] | None = None
        self.require_rdns = False
        if not exempt:
            if screening.early_talkers is not None:
                self.greet_pause = screening.greet_pause
                self._early = loop.create_task(self._recall(screening.early_talkers))
            if screening.lists:
                self._dnsbl = loop.create_task(self._ask_lists())
            self.require_rdns = screening.rdns == "require"
        self.dnsbl: DnsblResult | None = None
        self.rdns: ReverseDns | None = None
        if screening.rdns != "off":
            self.rdns = screening.known_name(self.ip, address)
            if self.rdns is None:
                self._rdns = loop.create_task(self._look_up_name())
            else:
                _checks.add(1, {"check": "rdns", "verdict": self.rdns.result})
        #: whether commands wait for the checks' verdict (`refusal`)
        self.gating = self._early is not None or self._dnsbl is not None or self.require_rdns
        self._decided = False
        self._refusal: str | None = None
        self._facts: ClientFacts | None = None

    # --- the checks -------------------------------------------------------------------------

    async def _recall(self, early_talkers: EarlyTalkers) -> bool:
        try:
            async with asyncio.timeout(self.screening.redis_timeout):
                remembered = await early_talkers.remembered(self.ip)
        except _REDIS_ERRORS as error:
            # fail open, as the connection lease does: without Redis nothing is queued anyway
            log.warning("early-talker memory unavailable", extra={"error": repr(error)})
            return False
        if remembered:
            _checks.add(1, {"check": "early_talker", "verdict": "remembered"})
        return remembered

    async def _ask_lists(self) -> DnsblResult:
        screening = self.screening
        try:
            answers = await ask_lists(
                screening.resolver, screening.lists, self.address, screening.dnsbl_timeout
            )
            result = score(screening.lists, answers, screening.threshold)
        except Exception:  # a bug must not refuse mail
            log.exception("DNS list check failed", extra={"client_ip": self.ip})
            return DnsblResult()
        if result.blocked_by:
            verdict = "blocked"
        elif result.allow_listed:
            verdict = "allow_listed"
        else:
            verdict = "listed" if result.hits else "clean"
        _checks.add(1, {"check": "dnsbl", "verdict": verdict})
        if result.hits or result.unanswered:
            log.info(
                "DNS lists",
                extra={"client_ip": self.ip, "score": result.score, "hits": list(result.hits),
                       "blocked_by": result.blocked_by, "unanswered": list(result.unanswered)},
            )  # fmt: skip
        return result

    async def _look_up_name(self) -> ReverseDns:
        try:
            async with asyncio.timeout(self.screening.dns_timeout):
                result = await check_reverse_dns(self.screening.resolver, self.address)
        except TimeoutError:
            result = TIMED_OUT
        except Exception:
            log.exception("reverse DNS check failed", extra={"client_ip": self.ip})
            result = TIMED_OUT
        _checks.add(1, {"check": "rdns", "verdict": result.result})
        return result

    # --- what the session asks ----------------------------------------------------------------

    async def refusal(self) -> str | None:
        """The reply to the client's commands (but UNGATED), or None to let it go on. Waits
        for the checks that decide it, each within its deadline."""
        if not self._decided:
            self._refusal = await self._decide()
            self._decided = True
            if self._refusal is not None:
                log.info("client refused", extra={"client_ip": self.ip, "reply": self._refusal})
        return self._refusal

    async def _decide(self) -> str | None:
        if self._early is not None and await self._early:
            return replies.EARLY_TALKER.format(ip=self.ip)
        if self._dnsbl is not None:
            self.dnsbl = await self._dnsbl
            if self.dnsbl.blocked_by is not None:
                return replies.DNSBL_BLOCKED.format(ip=self.ip, zone=self.dnsbl.blocked_by)
        if self.require_rdns:
            rdns = await self.reverse()
            if rdns.result == "temperror":
                _checks.add(1, {"check": "rdns", "verdict": "refused_temporarily"})
                return replies.RDNS_TEMP.format(ip=self.ip)
            if not rdns.verified:
                _checks.add(1, {"check": "rdns", "verdict": "refused"})
                return replies.RDNS_REJECTED.format(ip=self.ip)
        return None

    async def reverse(self) -> ReverseDns:
        if self.rdns is None:
            assert self._rdns is not None
            self.rdns = await self._rdns
        return self.rdns

    async def facts(self) -> ClientFacts:
        """What the checks learnt, for the filter pipeline (waits for them: within dns_timeout
        of the connection, at the latest). The same for every message of the connection."""
        if self._facts is None:
            self._facts = await self._gather_facts()
        return self._facts

    async def _gather_facts(self) -> ClientFacts:
        if self._dnsbl is not None and self.dnsbl is None:
            self.dnsbl = await self._dnsbl
        rdns = None if self.screening.rdns == "off" else await self.reverse()
        dnsbl = self.dnsbl or DnsblResult()
        return ClientFacts(
            reverse_name=rdns.name if rdns is not None else None,
            reverse_verified=rdns is not None and rdns.verified,
            dnsbl_score=dnsbl.score,
            dnsbl_hits=dnsbl.hits,
            iprev=rdns.result if rdns is not None else None,
        )

    def trace_field(self) -> str | None:
        """X-Mailkube-DNSBL, when the lists were asked (after `facts`)."""
        return self.dnsbl.trace_field() if self.dnsbl is not None else None

    @property
    def rdns_result(self) -> str:
        return self.rdns.result if self.rdns is not None else "pending"

    def received_name(self) -> str | None:
        """The name for the Received field's TCP-info (Postfix's "name [ip]" or "unknown
        [ip]"); None when not looked up (after `facts`)."""
        if self.rdns is None:
            return None
        return self.rdns.name if self.rdns.verified and self.rdns.name else "unknown"

    # --- the greet pause ----------------------------------------------------------------------

    def waited(self) -> None:
        _checks.add(1, {"check": "early_talker", "verdict": "polite"})

    def talked_early(self) -> asyncio.Task[None]:
        """The client talked before the greeting: counted, logged, and remembered (the task,
        which the caller keeps until it is done)."""
        _checks.add(1, {"check": "early_talker", "verdict": "talked_early"})
        log.info("client talked before the greeting", extra={"client_ip": self.ip})
        early_talkers = self.screening.early_talkers
        assert early_talkers is not None
        return asyncio.get_running_loop().create_task(self._remember(early_talkers))

    async def _remember(self, early_talkers: EarlyTalkers) -> None:
        try:
            async with asyncio.timeout(self.screening.redis_timeout):
                await early_talkers.remember(self.ip)
        except _REDIS_ERRORS as error:
            log.warning("early talker not remembered", extra={"client_ip": self.ip,
                                                              "error": repr(error)})  # fmt: skip

    def close(self) -> None:
        """The connection is gone: lookups still running are of no use."""
        for task in (self._early, self._dnsbl, self._rdns):
            if task is not None:
                task.cancel()
