"""The ``[tls]`` settings and flags, their errors, and the parts of devices/tls.py (docs/tls.md)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.tls import (
    REASONS,
    TlsConfigError,
    TlsFiles,
    failure_reason,
    load_deny_list,
    parse_deny_list,
    server_context,
    subject_cn,
)
from gateway.app import build_tls
from gateway.cli import EXIT_CONFIG
from gateway.config import ConfigError, build_config
from tests.support.gateway import GatewayProcess
from tests.tls.support import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def config(tls: dict[str, object]) -> object:
    return build_config({"tls": tls}, source="gateway.toml", environ={})


def test_without_tls_both_ports_stay_plain() -> None:
    assert build_tls(build_config({}, environ={})) == {}


def test_cert_and_key_serve_both_ports_and_a_listener_may_have_its_own(pki: Pki) -> None:
    c = build_config(
        {
            "tls": {
                "cert": "all.pem",
                "key": "all.key",
                "device_ca": "ca.pem",
                "http": {"cert": "web.pem", "key": "web.key"},
            }
        },
        environ={},
    )
    assert c.tls.files("http") == TlsFiles("web.pem", "web.key")
    assert c.tls.files("devices") == TlsFiles("all.pem", "all.key", "ca.pem")
    only_devices = build_config({"tls": {"devices": {"cert": "d.pem", "key": "d.key"}}}, environ={})
    assert only_devices.tls.files("http") is None
    assert only_devices.tls.files("devices") == TlsFiles("d.pem", "d.key")


def test_flags_set_the_tls_keys(pki: Pki) -> None:
    from gateway.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "serve",
            "--tls-cert",
            str(pki.cert_file),
            "--tls-key",
            str(pki.key_file),
            "--device-ca",
            str(pki.device_ca_file),
        ]
    )
    c = config_from_args(args, environ={})
    assert c.tls.files("devices") == TlsFiles(
        str(pki.cert_file), str(pki.key_file), str(pki.device_ca_file)
    )
    doors = build_tls(c)
    assert set(doors) == {"http", "devices"}
    assert doors["devices"].context.verify_mode == ssl.CERT_REQUIRED
    assert doors["http"].context.verify_mode == ssl.CERT_NONE  # browsers bring no certificate
    assert doors["devices"].context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"cert": "a.pem"}, "tls.cert and key go together: give both or neither"),
        ({"http": {"key": "a.key"}}, "http.cert and http.key go together"),
        ({"device_ca": "ca.pem"}, "device_ca needs a certificate for the device port"),
        ({"cert": "a", "key": "b", "crl": "c.crl"}, "crl revokes device certificates"),
        ({"cert": "a", "key": "b", "deny_list": "d"}, "deny_list revokes device certificates"),
        ({"handshake_timeout": 0}, "handshake_timeout must be > 0"),
        ({"sert": "a"}, "unknown key 'tls.sert'"),
    ],
)
def test_a_bad_tls_table_is_one_line_naming_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(table)
    assert message in str(e.value)
    assert "gateway.toml" in str(e.value)


def test_unusable_files_are_one_line_each(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (TlsFiles(str(tmp_path / "none.pem"), str(pki.key_file)), "does not exist"),
        (TlsFiles(str(garbage), str(pki.key_file)), "cannot be used together"),
        (TlsFiles(str(pki.cert_file), str(pki.devices["good"])), "cannot be used together"),
        (TlsFiles(str(pki.cert_file), str(pki.key_file), str(garbage)), "device CA"),
        (
            TlsFiles(str(pki.cert_file), str(pki.key_file), str(pki.device_ca_file), str(garbage)),
            "CRL",
        ),
    ]
    for files, message in cases:
        with pytest.raises(TlsConfigError) as e:
            server_context(files)
        assert message in str(e.value), (files, e.value)
        assert "\n" not in str(e.value)


async def test_a_missing_certificate_stops_the_start_with_exit_2(pki: Pki, tmp_path: Path) -> None:
    gw = GatewayProcess(
        tmp_path,
        args=["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki.key_file)],
    )
    gw.launch()
    exit = await gw.wait_exit(timeout=20)
    assert exit.code == EXIT_CONFIG, exit
    errors = [line for line in exit.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, exit.stderr
    assert f"certificate {tmp_path / 'missing.pem'} does not exist" in errors[0]
    assert "Traceback" not in exit.stderr
    assert not (gw.data_dir / "gateway.sqlite3").exists()  # nothing opened


def test_a_cert_without_its_key_is_exit_2_from_the_command_line(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, args=["--tls-cert", "a.pem"])
    gw.launch()
    exit = gw.wait_exit_sync(timeout=20)
    assert exit.code == EXIT_CONFIG, exit
    assert "tls.cert and key go together" in exit.stderr
    assert "Traceback" not in exit.stderr


# ---- the deny-list ----------------------------------------------------------------------------

fingerprints = st.binary(min_size=32, max_size=32).map(bytes.hex)


@given(st.lists(fingerprints, max_size=5), st.booleans(), st.booleans())
def test_a_deny_list_reads_fingerprints_however_openssl_spells_them(
    values: list[str], colons: bool, prefix: bool
) -> None:
    lines = ["# revoked", ""]
    for value in values:
        text = ":".join(value[i : i + 2] for i in range(0, 64, 2)) if colons else value
        text = text.upper() if colons else text
        lines.append(f"sha256 Fingerprint={text}  # a device" if prefix else text)
    assert parse_deny_list("\n".join(lines), "deny.txt") == frozenset(values)


one_line = st.text(st.characters(blacklist_categories=("Cc", "Zl", "Zp", "Cs")), min_size=1).filter(
    lambda t: "#" not in t and bool(t.strip())
)


@given(one_line)
def test_a_deny_list_line_that_is_no_fingerprint_is_refused_by_its_number(line: str) -> None:
    value = line.rsplit("=", 1)[-1].replace(":", "").strip().lower()
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return  # it is one
    with pytest.raises(TlsConfigError) as e:
        parse_deny_list(f"# first\n{line}\n", "deny.txt")
    assert "deny-list deny.txt line 2" in str(e.value)


def test_a_missing_deny_list_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="does not exist"):
        load_deny_list(str(tmp_path / "nope.txt"))
    assert load_deny_list(None) == frozenset()


# ---- reasons and names ------------------------------------------------------------------------


def test_each_failure_has_a_documented_reason() -> None:
    verify = ssl.SSLCertVerificationError()
    verify.verify_code = 10
    expired = failure_reason(verify)
    plain = ssl.SSLError(1, "wrong version")
    plain.reason = "WRONG_VERSION_NUMBER"
    no_cert = ssl.SSLError(1, "no cert")
    no_cert.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    got = [
        expired,
        failure_reason(plain),
        failure_reason(no_cert),
        failure_reason(ConnectionAbortedError("SSL handshake is taking longer")),
        failure_reason(TimeoutError()),
        failure_reason(ConnectionResetError()),
        failure_reason(ssl.SSLError(1, "other")),
        failure_reason(ValueError()),
    ]
    assert got == [
        "expired",
        "not_tls",
        "no_certificate",
        "timeout",
        "timeout",
        "closed",
        "protocol",
        "protocol",
    ]
    assert set(got) <= set(REASONS)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "tls.md").read_text()
    for reason in REASONS:
        assert f"`{reason}`" in docs, f"docs/tls.md does not explain reason {reason!r}"


def test_the_identity_is_the_subject_cn() -> None:
    cert = {
        "subject": ((("organizationName", "Acme"),), (("commonName", "meter-7"),)),
        "subjectAltName": (("DNS", "other-name"),),
    }
    assert subject_cn(cert) == "meter-7"
    assert subject_cn({}) is None
    assert subject_cn(None) is None
