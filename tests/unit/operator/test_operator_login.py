"""How the operator logs in: kube_api_server with the token of kube_token_file and the CA of
kube_ca_file; the token read again at every login and, for our own client, whenever the file
changed (bound ServiceAccount tokens are rotated in their projected file)."""

from __future__ import annotations

import logging
from pathlib import Path

import kopf
import pytest
from pydantic import ValidationError

from mailkube_core.settings import OperatorSettings
from mailkube_operator.handlers.lifecycle import login
from mailkube_operator.kube import configuration_from
from mailkube_operator.login import connection_info, follow_token_file, token_file
from mailkube_operator.state import OperatorState

SERVER = "https://127.0.0.1:6443"
log = logging.getLogger(__name__)


def settings(**values: object) -> OperatorSettings:
    return OperatorSettings.model_validate({"hostname": "op.example.test", **values})


def test_kube_api_server_logs_in_with_the_token_and_ca_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("first-token\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    ours = settings(kube_api_server=SERVER, kube_token_file=tmp_path / "token",
                    kube_ca_file=tmp_path / "ca.pem")  # fmt: skip
    info = connection_info(ours, kopf.OperatorSettings(), log)
    assert (info.server, info.scheme, info.token) == (SERVER, "Bearer", "first-token")
    assert info.ca_path == tmp_path / "ca.pem"
    assert not info.insecure
    config = configuration_from(info)
    assert config.ssl_ca_cert == str(tmp_path / "ca.pem")
    assert config.verify_ssl
    assert config.get_api_key_with_prefix("BearerToken") == "Bearer first-token"


def test_every_login_reads_the_token_file_again(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token")
    memo = kopf.Memo(state=OperatorState(settings(kube_api_server=SERVER, kube_token_file=token)))
    assert login(memo=memo, settings=kopf.OperatorSettings(), logger=log).token == "first-token"
    token.write_text("rotated-token")  # the kubelet rotated the projected token
    assert login(memo=memo, settings=kopf.OperatorSettings(), logger=log).token == "rotated-token"


def test_our_client_follows_the_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token")
    ours = settings(kube_api_server=SERVER, kube_token_file=token)
    path = token_file(ours)
    assert path == token
    config = configuration_from(connection_info(ours, kopf.OperatorSettings(), log))
    follow_token_file(config, path)
    assert config.get_api_key_with_prefix("BearerToken") == "Bearer first-token"
    token.write_text("a-rotated-token")
    assert config.get_api_key_with_prefix("BearerToken") == "Bearer a-rotated-token"
    token.unlink()  # between the kubelet's rename and link: keep the last token
    assert config.get_api_key_with_prefix("BearerToken") == "Bearer a-rotated-token"


def test_a_missing_token_or_ca_file_is_a_login_error_naming_the_setting(tmp_path: Path) -> None:
    absent = settings(kube_api_server=SERVER, kube_token_file=tmp_path / "absent")
    with pytest.raises(kopf.LoginError, match=r"kube_token_file .*absent"):
        connection_info(absent, kopf.OperatorSettings(), log)
    (tmp_path / "empty").write_text("\n")
    empty = settings(kube_api_server=SERVER, kube_token_file=tmp_path / "empty")
    with pytest.raises(kopf.LoginError, match=r"kube_token_file .*empty is empty"):
        connection_info(empty, kopf.OperatorSettings(), log)
    no_ca = settings(kube_api_server=SERVER, kube_ca_file=tmp_path / "ca.pem")
    with pytest.raises(kopf.LoginError, match=r"kube_ca_file .*ca\.pem is not a file"):
        connection_info(no_ca, kopf.OperatorSettings(), log)


def test_token_and_ca_files_need_kube_api_server(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="kube_token_file is only used with kube_api_server"):
        settings(kube_token_file=tmp_path / "token")
    with pytest.raises(ValidationError, match="kube_ca_file is only used with kube_api_server"):
        settings(kube_ca_file=tmp_path / "ca.pem")


def test_without_a_token_file_a_plain_url_needs_no_credentials() -> None:
    info = connection_info(settings(kube_api_server="http://127.0.0.1:8080"),
                           kopf.OperatorSettings(), log)  # fmt: skip
    assert (info.server, info.token, info.ca_path) == ("http://127.0.0.1:8080", None, None)
    assert token_file(settings(kube_api_server="http://127.0.0.1:8080")) is None
