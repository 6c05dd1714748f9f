"""Greylisting (RFC 6647): a message from an unknown (client network, sender, recipient)
triplet is deferred (451 4.7.1); a sender that retries after greylist_delay, and within
greylist_retry_window of its first try, passes, and its triplet is remembered for
greylist_expiry after its last message. Real MTAs retry; most spam software does not.

It applies on the MX listener to sessions without AUTH, when the spam policy of the
recipients' domains has greylisting on (spam/policy.py: the gateway's `greylisting` unless a
domain says otherwise, on if any says so), after email authentication, whose SPF result it
reads. These pass without a look at their triplets:

- clients in spam_exempt_networks;
- clients on a DNS allow list (ClientFacts.dnsbl_score < 0, screening/dnsbl.py);
- client networks whose mail passed greylisting greylist_auto_pass_after times (0: never);
- SPF-authorised senders (spf=pass) of a domain whose mail passed greylisting before.

A triplet is the client's /24 (IPv4) or /64 (IPv6) network, the MAIL FROM address and one
recipient, both lower-cased; a message defers when any of its recipients' triplets does.

Keys: every key of a client network shares its hash tag, so one script per message, on one
Redis Cluster slot, asks about all its triplets (one round trip); time is Redis's (TIME).

    {P:grey:<network>}:t:<hash>   a triplet (hashed): its first try (ms), or "p" once passed
    {P:grey:<network>}:passes     messages of the network that passed by retrying
    {P:greydom:<domain>}          the sender domain's mail passed greylisting before

What goes to the append-only file: a pass, the network's counter and the domain's mark do.
After a Redis restart from the AOF, senders that retried once stay known; greylisting everyone
again would hold up all mail for a delay. A first try does not (redis.set_repl
REPL_REPLICA, as the rate limits): spam software sends far more of those than anyone retries,
and with `appendfsync always` each would cost an fsync; a restart forgets them, and a sender
caught between its first try and its retry is deferred once more. The renewal of a known
triplet on each message is kept out too (one fsync per message otherwise): the AOF keeps the
expiry of its pass, which a rewrite of the file brings up to date.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry import metrics
from redis.exceptions import RedisError

from mailkube_core.redis_client import RedisClient
from mailkube_core.routing import RoutingReader
from mailkube_core.settings import GatewaySettings
from mailkube_core.telemetry import Tally

from .. import replies
from ..pipeline import Action, Message, Verdict
from ..ratelimit import Script
from .policy import effective_spam_policy

log = logging.getLogger(__name__)
_verdicts = Tally(
    metrics.get_meter("mailkube.gateway"), "mailkube.gateway.greylisting",
    unit="{message}", description="Greylisting decisions, by reason",
)  # fmt: skip
_REDIS_ERRORS = (RedisError, TimeoutError, OSError)

# what the script says about each triplet
NEW, EARLY, PASSED, KNOWN = 0, 1, 2, 3

# KEYS[1] the network's pass counter, KEYS[2..] the triplets. ARGV: delay, retry window,
# expiry (ms), auto-pass threshold (0: never). Returns {1} when the network passes on its
# record, else {0, wait ms, code of each triplet}.
_GREYLIST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay, window, expiry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local auto = tonumber(ARGV[4])
if auto > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= auto then return {1} end
local result = {0, 0}
local deferred, fresh = false, 0
for i = 2, #KEYS do
  local state = redis.call('GET', KEYS[i])
  local first = state and tonumber(state)
  local code
  if state == 'p' then
    redis.set_repl(redis.REPL_REPLICA)
    redis.call('PEXPIRE', KEYS[i], expiry)
    code = 3
  elseif not first or now - first >= window then
    redis.set_repl(redis.REPL_REPLICA)
    redis.call('SET', KEYS[i], now, 'PX', window)
    code = 0
    deferred = true
    result[2] = math.max(result[2], delay)
  elseif now - first < delay then
    code = 1
    deferred = true
    result[2] = math.max(result[2], delay - (now - first))
  else
    redis.set_repl(redis.REPL_ALL)
    redis.call('SET', KEYS[i], 'p', 'PX', expiry)
    code = 2
    fresh = fresh + 1
  end
  result[i + 1] = code
end
if not deferred and fresh > 0 then
  redis.set_repl(redis.REPL_ALL)
  redis.call('INCR', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], expiry)
end
return result
"""
# KEYS[1] a sender domain's mark. ARGV[1] expiry ms.
_MARK = "redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])\nreturn 1\n"
_KNOWN = "return redis.call('EXISTS', KEYS[1])\n"


@dataclass(frozen=True)
class Decision:
    passed: bool
    #: for metrics and logs: new, early_retry (deferred); passed, known, auto_pass_network,
    #: auto_pass_domain, exempt_network, dnswl (passed)
    reason: str
    #: deferred: seconds until a retry may pass
    wait: int = 0
    #: whether a triplet passed now (a retry): the sender domain is marked
    retried: bool = False


def client_network(ip: str) -> str:
    """The client's /24 (IPv4) or /64 (IPv6): senders retry from another address of a pool.
    An address that is none ("unknown": a PROXY LOCAL connection) is a network of its own."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def triplet_hash(network: str, sender: str, recipient: str) -> str:
    text = f"{network}\0{sender.lower()}\0{recipient.lower()}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def decide(reply: Sequence[int], *, domain_known: bool) -> Decision:
    """The message's fate from the script's reply and whether the sender is an SPF-authorised
    sender of a domain that passed before."""
    if reply[0] == 1:
        return Decision(True, "auto_pass_network")
    codes = reply[2:]
    retried = PASSED in codes
    if domain_known:
        return Decision(True, "auto_pass_domain", retried=retried)
    if NEW in codes or EARLY in codes:
        wait = max(1, math.ceil(int(reply[1]) / 1000))
        return Decision(False, "new" if NEW in codes else "early_retry", wait)
    return Decision(True, "passed" if retried else "known", retried=retried)


class Greylisting:
    name = "greylist"

    def __init__(
        self, settings: GatewaySettings, routing: RoutingReader, redis: RedisClient
    ) -> None:
        self.settings = settings
        self.routing = routing
        self.prefix = settings.key_prefix
        self.exempt = tuple(settings.spam_exempt_networks)
        self.args = [
            _ms(settings.greylist_delay.total_seconds()),
            _ms(settings.greylist_retry_window.total_seconds()),
            _ms(settings.greylist_expiry.total_seconds()),
            settings.greylist_auto_pass_after,
        ]
        self.timeout = settings.redis_timeout.total_seconds()
        self._greylist = Script(redis, _GREYLIST)
        self._mark = Script(redis, _MARK)
        self._known = Script(redis, _KNOWN)
        #: domain marks on their way (nobody waits for them)
        self._marking: set[asyncio.Task[None]] = set()

    def _applies(self, message: Message) -> bool:
        if message.listener != "mx" or message.auth_user is not None:
            return False
        snapshot = self.routing.snapshot
        default = self.settings.greylisting
        if snapshot.greylisting_values <= {default}:  # no domain says otherwise
            return default
        domains = snapshot.recipient_domains(message.recipients)
        return effective_spam_policy(self.settings, domains).greylisting

    async def check(self, message: Message) -> Verdict:
        if not self._applies(message):
            return Verdict()
        return await self.greylist(message)

    async def greylist(self, message: Message) -> Verdict:
        """Greylist this message, whatever its domains' setting: deferred (451 4.7.1) unless
        its triplets passed before or the client or sender passes without (see above). The
        rspamd stage asks this when rspamd advises greylisting."""
        decision = self._exempt(message)
        if decision is None:
            try:
                async with asyncio.timeout(self.timeout):
                    decision = await self._ask(message)
            except _REDIS_ERRORS as error:
                log.warning("greylisting unavailable", extra={"client_ip": message.client_ip,
                                                              "error": repr(error)})  # fmt: skip
                _verdicts.add(1, {"reason": "unavailable"})
                # never accept what could not be checked: the sender retries
                return Verdict(Action.DEFER, reply=replies.TEMP_FAILURE, reason="redis down")
        _verdicts.add(1, {"reason": decision.reason})
        if decision.retried and message.mail_from:
            self._mark_domain(message.mail_from)
        if decision.passed:
            return Verdict()
        log.info(
            "greylisted",
            extra={"client_ip": message.client_ip, "from": message.mail_from,
                   "reason": decision.reason, "wait": decision.wait},
        )  # fmt: skip
        reply = replies.GREYLISTED.format(seconds=decision.wait)
        return Verdict(Action.DEFER, reply=reply, reason=f"greylisted: {decision.reason}")

    def _exempt(self, message: Message) -> Decision | None:
        try:
            address = ipaddress.ip_address(message.client_ip)
        except ValueError:
            return None
        if any(address in network for network in self.exempt):
            return Decision(True, "exempt_network")
        if message.client.dnsbl_score < 0:
            return Decision(True, "dnswl")
        return None

    async def _ask(self, message: Message) -> Decision:
        network = client_network(message.client_ip)
        tag = f"{{{self.prefix}:grey:{network}}}"
        triplets = dict.fromkeys(
            f"{tag}:t:{triplet_hash(network, message.mail_from, rcpt)}"
            for rcpt in message.recipients
        )
        asks = [self._greylist(keys=[f"{tag}:passes", *triplets], args=self.args)]
        domain = _spf_authorised_domain(message)
        if domain is not None:  # in the same round trip
            asks.append(self._known(keys=[self._domain_key(domain)], args=[]))
        answers = await asyncio.gather(*asks)
        return decide(
            [int(code) for code in answers[0]], domain_known=len(answers) > 1 and bool(answers[1])
        )

    def _domain_key(self, domain: str) -> str:
        return f"{{{self.prefix}:greydom:{domain}}}"

    def _mark_domain(self, mail_from: str) -> None:
        domain = mail_from.rpartition("@")[2].lower()
        task = asyncio.get_running_loop().create_task(self._mark_later(domain))
        self._marking.add(task)
        task.add_done_callback(self._marking.discard)

    async def _mark_later(self, domain: str) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                # goes with the next command that is waited for (the enqueue)
                await self._mark(keys=[self._domain_key(domain)], args=[self.args[2]], urgent=False)
        except _REDIS_ERRORS as error:
            log.info("sender domain not marked", extra={"domain": domain, "error": repr(error)})


def _spf_authorised_domain(message: Message) -> str | None:
    """The MAIL FROM domain when SPF authorised the client to send its mail."""
    auth = message.auth
    if auth is None or auth.spf != "pass" or not message.mail_from:
        return None
    domain = message.mail_from.rpartition("@")[2].lower()
    return domain if domain == auth.spf_domain.lower() else None


def _ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))
