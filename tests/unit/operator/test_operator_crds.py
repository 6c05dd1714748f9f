"""The CRDs in crds/: generated from the models (stale files fail), valid CRDs, structural,
and the examples/ resources validate against them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mailkube_operator import crdgen

ROOT = Path(__file__).resolve().parents[3]


def test_committed_crds_are_current() -> None:
    for name, content in crdgen.files().items():
        path = ROOT / "crds" / name
        assert path.exists(), f"crds/{name} is missing: run `make crds`"
        assert path.read_text() == content, f"crds/{name} is stale: run `make crds`"


@pytest.mark.parametrize("name", sorted(crdgen.files()))
def test_crd_validates_as_a_crd(name: str) -> None:
    crd = yaml.safe_load((ROOT / "crds" / name).read_text())
    assert kubernetes_validate.validate(crd, "1.37", strict=True) == "1.37"


def _walk(node: Any, path: str) -> list[str]:
    """Violations of the structural-schema rules Kubernetes enforces."""
    problems: list[str] = []
    if not isinstance(node, dict):
        return problems
    if "$ref" in node:
        problems.append(f"{path}: $ref")
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties with additionalProperties")
    for option in node.get("anyOf", []):
        if "type" in option and not node.get("x-kubernetes-int-or-string"):
            problems.append(f"{path}: type inside anyOf")
    for key, child in (node.get("properties") or {}).items():
        problems += _walk(child, f"{path}.{key}")
    if "items" in node:
        problems += _walk(node["items"], f"{path}[]")
    return problems


@pytest.mark.parametrize("name", sorted(crdgen.files()))
def test_crd_schema_is_structural(name: str) -> None:
    crd = yaml.safe_load((ROOT / "crds" / name).read_text())
    (version,) = crd["spec"]["versions"]
    assert _walk(version["schema"]["openAPIV3Schema"], "") == []
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["categories"] == ["mail"]


def _schema(kind: str) -> dict[str, Any]:
    for name in crdgen.files():
        crd = yaml.safe_load((ROOT / "crds" / name).read_text())
        if crd["spec"]["names"]["kind"] == kind:
            schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(kind)


def _validate(kind: str, obj: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(_schema(kind)).validate(obj)


def test_examples_validate_against_the_crds() -> None:
    seen: set[str] = set()
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if not isinstance(obj, dict) or "kind" not in obj:
                continue
            if obj["kind"] in ("MailDomain", "MailUser"):
                _validate(obj["kind"], obj)
            else:
                kubernetes_validate.validate(obj, "1.37", strict=True)
            seen.add(obj["kind"])
    assert {"MailDomain", "MailUser", "Secret"} <= seen


def test_schema_refuses_bad_values() -> None:
    bad = [
        ("MailDomain", {"spec": {"domain": "not a domain"}}),
        ("MailDomain", {"spec": {"domain": "example.org", "dkim": {"algorithm": "dsa"}}}),
        ("MailUser", {"spec": {"address": "no-at-sign"}}),
        ("MailUser", {"spec": {"address": "a@example.org", "quota": "lots"}}),
        ("MailUser", {"spec": {"address": "a@example.org", "aliases": ["x y@example.org"]}}),
    ]
    for kind, obj in bad:
        with pytest.raises(jsonschema.ValidationError):
            _validate(kind, obj)
    _validate("MailUser", {"spec": {"address": "a@example.org", "quota": 1073741824}})
    _validate("MailUser", {"spec": {"address": "a@example.org", "quota": "1Gi"}})


def test_domain_is_immutable_by_a_cel_rule() -> None:
    domain = _schema("MailDomain")["properties"]["spec"]["properties"]["domain"]
    assert {"rule": "self == oldSelf", "message": "domain is immutable"} in domain[
        "x-kubernetes-validations"
    ]


def test_printer_columns() -> None:
    crd = crdgen.maildomain_crd()
    columns = {c["name"]: c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert [c for c in columns if c != "Reason"] == [
        "Domain", "Ready", "Users", "DKIM", "Spam", "Age"]  # fmt: skip
    assert columns["Spam"]["jsonPath"] == ".status.spam.policy"  # the policy in effect
    users = crdgen.mailuser_crd()
    columns = {c["name"]: c for c in users["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["SubmissionSuspended"]["jsonPath"] == (
        '.status.conditions[?(@.type=="SubmissionSuspended")].status'
    )
    assert columns["SubmissionSuspended"]["priority"] == columns["Suspended"]["priority"] == 1


def _domain(spam: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"domain": "example.org", "spam": spam}}


@pytest.mark.parametrize(
    "spam",
    [
        {"policy": "discard"},
        {"policy": ""},
        {"rejectScore": -1},
        {"junkScore": 1001},
        {"rejectScore": "15"},
        {"rewriteSubject": "yes"},
        {"whenUnavailable": "retry"},
        {"greylisting": 1},
        {"greylist": True},  # unknown fields: pruned by the API server, refused here
    ],
)
def test_schema_refuses_bad_spam_values(spam: dict[str, Any]) -> None:
    schema = _schema("MailDomain")
    closed = _closed(schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(closed).validate(_domain(spam))


def test_schema_accepts_spam_settings() -> None:
    _validate("MailDomain", _domain({}))
    _validate("MailDomain", _domain({
        "policy": "quarantine", "rejectScore": 15, "junkScore": 6.5, "rewriteSubject": True,
        "whenUnavailable": "accept", "greylisting": False}))  # fmt: skip
    _validate("MailDomain", _domain({"policy": "off"}))


def test_junk_score_below_reject_score_by_a_cel_rule() -> None:
    """The API server checks it from Kubernetes 1.25 on (kmock and 1.20 cannot); the operator
    refuses the same specs (test_operator_plan)."""
    spam = _schema("MailDomain")["properties"]["spec"]["properties"]["spam"]
    (rule,) = spam["x-kubernetes-validations"]
    assert rule == {
        "rule": "!has(self.junkScore) || !has(self.rejectScore)"
        " || self.junkScore < self.rejectScore",
        "message": "junkScore must be below rejectScore",
    }


def test_status_shows_the_spam_policy_in_effect() -> None:
    status = _schema("MailDomain")["properties"]["status"]["properties"]["spam"]
    assert set(status["required"]) == {"policy", "rewriteSubject", "whenUnavailable", "greylisting"}
    assert set(status["properties"]) == set(
        _schema("MailDomain")["properties"]["spec"]["properties"]["spam"]["properties"]
    )


def _closed(node: Any) -> Any:
    """The schema with additionalProperties: false on every object with properties, as the API
    server's pruning (which drops unknown fields) is stricter than a plain JSON schema."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: _closed(value) for key, value in node.items()}
    if result.get("type") == "object" and "properties" in result:
        result["additionalProperties"] = False
    return result
