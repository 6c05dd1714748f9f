"""What the inbound checks' results do to a message, under the recipient domains' policy."""

from __future__ import annotations

import pytest

from mailkube_core.routing import Domain, DomainPolicy
from mailkube_core.settings import GatewaySettings
from mailkube_gateway.mailauth.dkim_verify import DkimResult
from mailkube_gateway.mailauth.dmarc_check import DmarcResult
from mailkube_gateway.mailauth.spf_check import SpfResult
from mailkube_gateway.mailauth.stages import Policy, decide, effective_policy
from mailkube_gateway.pipeline import Action

ENFORCE = Policy(dmarc="enforce", spf_fail="tag", dns_temp_error="defer")
SETTINGS = GatewaySettings(redis_url="redis://127.0.0.1:1", hostname="mx.test")


def spf(result: str = "pass") -> SpfResult:
    return SpfResult(result, "mailfrom", "sender.example")


def dmarc(result: str = "pass", disposition: str = "none") -> DmarcResult:
    return DmarcResult(result, "sender.example", "reject", disposition)


def run(policy: Policy, spf_result: SpfResult, dmarc_result: DmarcResult,
        dkim: list[DkimResult] | None = None) -> tuple[Action, str | None]:  # fmt: skip
    verdict = decide(policy, spf_result, dkim or [], dmarc_result, "192.0.2.1", ("X: y",))
    assert verdict.headers == ("X: y",)  # the header goes with every verdict
    return verdict.action, verdict.reply


def test_dmarc_reject_is_refused_when_enforced_and_tagged_when_monitored() -> None:
    action, reply = run(ENFORCE, spf("fail"), dmarc("fail", "reject"))
    assert action is Action.REJECT
    assert reply is not None
    assert reply.startswith("550 5.7.1 ")
    monitor = Policy("monitor", "tag", "defer")
    assert run(monitor, spf("fail"), dmarc("fail", "reject"))[0] is Action.ACCEPT


def test_dmarc_quarantine_goes_to_junk() -> None:
    assert run(ENFORCE, spf("fail"), dmarc("fail", "quarantine"))[0] is Action.QUARANTINE
    assert run(ENFORCE, spf("fail"), dmarc("fail", "none"))[0] is Action.ACCEPT


def test_spf_fail_is_refused_only_when_the_policy_says_so_and_dmarc_did_not_pass() -> None:
    reject_spf = Policy("enforce", "reject", "defer")
    action, reply = run(reject_spf, spf("fail"), dmarc("none"))
    assert action is Action.REJECT
    assert reply is not None
    assert reply.startswith("550 5.7.23 ")
    assert run(ENFORCE, spf("fail"), dmarc("none"))[0] is Action.ACCEPT
    # RFC 7489 §10.1: an aligned DKIM pass makes DMARC pass, so the SPF fail is not decisive
    assert run(reject_spf, spf("fail"), dmarc("pass"))[0] is Action.ACCEPT
    assert run(reject_spf, spf("softfail"), dmarc("none"))[0] is Action.ACCEPT


@pytest.mark.parametrize(
    ("spf_result", "dkim", "dmarc_result", "code"),
    [
        ("temperror", [], "none", "451 4.7.24 "),
        ("pass", [DkimResult("temperror", "d.example", "s", "rsa-sha256", "", "dns")], "fail",
         "451 4.7.5 "),
        ("pass", [], "temperror", "451 4.7.1 "),
    ],
)  # fmt: skip
def test_dns_temporary_errors_defer_or_are_accepted(
    spf_result: str, dkim: list[DkimResult], dmarc_result: str, code: str
) -> None:
    action, reply = run(ENFORCE, spf(spf_result), dmarc(dmarc_result), dkim)
    assert action is Action.DEFER
    assert reply is not None
    assert reply.startswith(code)
    accept = Policy("enforce", "tag", "accept")
    assert run(accept, spf(spf_result), dmarc(dmarc_result), dkim)[0] is Action.ACCEPT


def test_a_temporary_error_does_not_matter_once_dmarc_passed() -> None:
    assert run(ENFORCE, spf("temperror"), dmarc("pass"))[0] is Action.ACCEPT


def test_domain_policy_overrides_the_settings_and_the_stricter_wins() -> None:
    lax = Domain(name="lax.test", policy=DomainPolicy(dmarc="monitor", dns_temp_error="accept"))
    strict = Domain(name="strict.test", policy=DomainPolicy(spf_fail="reject"))
    plain = Domain(name="plain.test")
    assert effective_policy(SETTINGS, [lax]) == Policy("monitor", "tag", "accept")
    assert effective_policy(SETTINGS, [plain]) == Policy("enforce", "tag", "defer")
    assert effective_policy(SETTINGS, [lax, strict]) == Policy("enforce", "reject", "defer")
    monitor = SETTINGS.model_copy(update={"dmarc_policy": "monitor"})
    assert effective_policy(monitor, [plain, None]) == Policy("monitor", "tag", "defer")
    assert effective_policy(monitor, []) == Policy("monitor", "tag", "defer")
