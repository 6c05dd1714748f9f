"""DKIM keys, their DNS records, the other DNS records and conditions."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pydantic import ValidationError

from mailkube_operator import dkim
from mailkube_operator.conditions import set_condition
from mailkube_operator.dnsrecords import dns_records, mta_sts_id, mta_sts_policy
from mailkube_operator.models import MailDomainSpec, MtaStsSpec
from mailkube_worker.tlspolicy.mta_sts import StsPolicy, parse_policy, parse_record


def test_rsa_key_is_pem_and_its_record_holds_the_public_key() -> None:
    private = dkim.generate("rsa-sha256")
    key = serialization.load_pem_private_key(private.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    record = dkim.public_record("rsa-sha256", private)
    assert record.startswith("v=DKIM1; k=rsa; p=")
    der = base64.b64decode(record.split("p=", 1)[1])
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.public_numbers() == key.public_key().public_numbers()


def test_ed25519_key_is_a_base64_seed_and_its_record_the_raw_public_key() -> None:
    private = dkim.generate("ed25519-sha256")
    seed = base64.b64decode(private)
    assert len(seed) == 32
    record = dkim.public_record("ed25519-sha256", private)
    assert record.startswith("v=DKIM1; k=ed25519; p=")
    raw = base64.b64decode(record.split("p=", 1)[1])
    expected = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
    assert raw == expected.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_both_uses_two_selectors() -> None:
    wanted = dkim.wanted_keys("s1", "both")
    assert [w.data_key for w in wanted] == ["s1.rsa-sha256", "s1-ed25519.ed25519-sha256"]


def test_existing_keys_are_never_regenerated() -> None:
    wanted = dkim.wanted_keys("s1", "rsa-2048")
    data = {"s1.rsa-sha256": "existing"}
    assert dkim.missing_keys(data, wanted) == {}
    new = dkim.missing_keys(data, dkim.wanted_keys("s2", "ed25519"))
    assert list(new) == ["s2.ed25519-sha256"]


def test_rotation_keeps_the_old_key_published_but_not_signing() -> None:
    data = {"old.ed25519-sha256": dkim.generate("ed25519-sha256"),
            "new.ed25519-sha256": dkim.generate("ed25519-sha256")}  # fmt: skip
    keys = dkim.keys_from_secret(data, dkim.wanted_keys("new", "ed25519"))
    assert [(k.key.selector, k.key.signing) for k in keys] == [("new", True), ("old", False)]


def test_secret_body_is_owned_by_the_maildomain() -> None:
    body = dkim.secret_body(namespace="mail", domain_name="example", domain_uid="u-1",
                            data={"s.ed25519-sha256": "c2VlZA=="})  # fmt: skip
    assert body["metadata"]["name"] == "example-dkim"
    (owner,) = body["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "mailkube.io/v1alpha1", "kind": "MailDomain",
                     "name": "example", "uid": "u-1", "controller": True,
                     "blockOwnerDeletion": True}  # fmt: skip
    assert dkim.decode_data(body["data"]) == {"s.ed25519-sha256": "c2VlZA=="}


def test_dns_records_have_exact_names_and_values() -> None:
    private = dkim.generate("ed25519-sha256")
    keys = dkim.keys_from_secret({"mk.ed25519-sha256": private}, dkim.wanted_keys("mk", "ed25519"))
    spec = MailDomainSpec.model_validate({"domain": "example.org"})
    records = {r.purpose: r for r in dns_records("example.org", spec, "mail.example.org", keys)}
    assert (records["mx"].type, records["mx"].name, records["mx"].value) == (
        "MX", "example.org.", "10 mail.example.org.")  # fmt: skip
    assert records["spf"].value == "v=spf1 mx -all"
    assert records["dkim"].name == "mk._domainkey.example.org."
    assert records["dkim"].value == dkim.public_record("ed25519-sha256", private)
    assert records["dmarc"].name == "_dmarc.example.org."
    assert records["dmarc"].value == "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"


def test_mta_sts_and_tls_rpt_records() -> None:
    """RFC 8461 §3.1 and RFC 8460 §3: the records listed when spec.mtaSts and spec.tlsRpt are
    set; the policy's id follows the policy, and the policy parses as senders parse it."""
    spec = MailDomainSpec.model_validate({
        "domain": "example.org", "mtaSts": {"mode": "enforce", "maxAge": 86400},
        "tlsRpt": {"rua": ["mailto:tls@example.org", "https://r.example.net/v1"]},
    })  # fmt: skip
    records = {r.purpose: r for r in dns_records("example.org", spec, "mail.example.org", [])}
    policy = mta_sts_policy(spec.mta_sts, "mail.example.org").text()  # type: ignore[arg-type]
    assert parse_policy(policy) == StsPolicy("enforce", 86400, ("mail.example.org",))
    assert records["mta-sts"].name == "_mta-sts.example.org."
    assert records["mta-sts"].value == f"v=STSv1; id={mta_sts_id(policy)};"
    assert parse_record([records["mta-sts"].value]).id == mta_sts_id(policy)
    assert mta_sts_id(policy) != mta_sts_id(
        mta_sts_policy(MtaStsSpec(mode="testing", max_age=86400), "Mail.Example.org.").text()
    )
    assert (records["mta-sts-host"].type, records["mta-sts-host"].name,
            records["mta-sts-host"].value) == ("CNAME", "mta-sts.example.org.",
                                               "mail.example.org.")  # fmt: skip
    behind_ingress = dns_records("example.org", spec, "mail.example.org", [],
                                 mta_sts_host_target="ingress.example.net")  # fmt: skip
    assert [r.value for r in behind_ingress if r.purpose == "mta-sts-host"] == [
        "ingress.example.net."
    ]
    assert records["tls-rpt"].name == "_smtp._tls.example.org."
    assert records["tls-rpt"].value == \
        "v=TLSRPTv1; rua=mailto:tls@example.org,https://r.example.net/v1"  # fmt: skip
    plain = MailDomainSpec.model_validate({"domain": "example.org"})
    assert not {"mta-sts", "mta-sts-host", "tls-rpt"} & {
        r.purpose for r in dns_records("example.org", plain, "mail.example.org", [])
    }
    with pytest.raises(ValidationError):
        MailDomainSpec.model_validate({"domain": "example.org", "tlsRpt": {"rua": ["ftp://x"]}})


def test_condition_keeps_its_transition_time_while_status_holds() -> None:
    first = set_condition([], "Ready", "False", "X", "x", 1, at="2025-01-01T00:00:00Z")
    same = set_condition(first, "Ready", "False", "Y", "y", 2, at="2025-02-01T00:00:00Z")
    assert same[0]["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    assert same[0]["observedGeneration"] == 2
    assert same[0]["reason"] == "Y"
    flipped = set_condition(same, "Ready", "True", "Z", "z", 2, at="2025-03-01T00:00:00Z")
    assert flipped[0]["lastTransitionTime"] == "2025-03-01T00:00:00Z"


def test_the_fast_record_is_the_checked_one() -> None:
    """record_of skips OpenSSL's RSA consistency check (~55 ms a key) but derives the same
    record; a PEM that is no RSA key is still refused."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mailkube_core.routing.dkim_keys import generate

    private = generate("rsa-sha256")
    assert dkim.record_of("rsa-sha256", private) == dkim.public_record("rsa-sha256", private)
    seed = generate("ed25519-sha256")
    assert dkim.record_of("ed25519-sha256", seed) == dkim.public_record("ed25519-sha256", seed)
    not_rsa = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()  # fmt: skip
    with pytest.raises(ValueError, match="not an RSA private key"):
        dkim.record_of("rsa-sha256", not_rsa)
