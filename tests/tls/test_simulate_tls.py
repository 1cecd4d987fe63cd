"""``iot-gateway simulate --tls-ca/--tls-cert/--tls-key`` against a TLS gateway (docs/tls.md)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import pytest

from simulators import cli
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until
from tests.tls.support import Pki, failures, https_json, tls_metrics


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    # One certificate per simulated device, named by its client_id.
    for n in (1, 2):
        leaf = pki.device_ca.issue_cert(f"tsim-{n}.devices.invalid", common_name=f"tsim-{n}")
        pki.write(f"tsim-{n}.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        pki.write(f"tsim-{n}.key", leaf.private_key_pem.bytes())
    return pki


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GatewayProcess]:
    config = {"tls": pki.tls_table(handshake_timeout=2.0)}
    gw = GatewayProcess(tmp_path_factory.mktemp("gw"), config, token="operator")
    gw.start_sync()
    yield gw
    assert gw.stop_sync().code == 0


def online(gw: GatewayProcess, pki: Pki) -> set[str]:
    devices = https_json(gw, pki, "/api/devices")["devices"]
    return {d["device"] for d in devices if d["online"]}


async def test_simulated_devices_connect_with_their_own_certificates(
    gateway: GatewayProcess, pki: Pki
) -> None:
    host, port = gateway.device_address
    args = cli.parse_args(
        [
            "--gateway",
            f"{host}:{port}",
            "--devices",
            "2",
            "--rate",
            "20",
            "--prefix",
            "tsim",
            "--tls-ca",
            str(pki.server_ca_file),
            "--tls-cert",
            str(pki.root / "{client_id}.pem"),
            "--tls-key",
            str(pki.root / "{client_id}.key"),
        ]
    )
    out = io.StringIO()
    stop = asyncio.Event()
    run = asyncio.create_task(cli.simulate(args, out=out, stop=stop, handle_signals=False))
    try:
        await wait_until(
            lambda: {"tsim-1", "tsim-2"} <= online(gateway, pki), "both devices online"
        )

        def data_in() -> bool:
            return tls_metrics(gateway, pki).value("iot_frames_in_total") > 10

        await wait_until(data_in, "their DATA through TLS")
    finally:
        stop.set()
        assert await asyncio.wait_for(run, 10) == 0
    assert "(TLS)" in out.getvalue()


async def test_without_a_certificate_the_simulator_is_refused_and_counted(
    gateway: GatewayProcess, pki: Pki
) -> None:
    host, port = gateway.device_address
    before = failures(tls_metrics(gateway, pki), "devices", "no_certificate")
    args = cli.parse_args(
        [
            *("--gateway", f"{host}:{port}", "--prefix", "tnocert", "--duration", "1.5"),
            *("--tls-ca", str(pki.server_ca_file)),
        ]
    )
    assert (
        await asyncio.wait_for(cli.simulate(args, out=io.StringIO(), handle_signals=False), 10) == 0
    )
    assert failures(tls_metrics(gateway, pki), "devices", "no_certificate") > before
    assert "tnocert-1" not in online(gateway, pki)


def test_a_certificate_that_cannot_be_used_is_exit_2(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = pki.root / "missing.pem"
    code = cli.main(["--gateway", "127.0.0.1:1", "--tls-cert", str(missing), "--duration", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(missing) in err


def test_tls_flags_are_for_tcp_devices(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--serial", "--tls-ca", "ca.pem"]) == 2
    assert "apply to TCP devices" in capsys.readouterr().err
    assert cli.main(["--gateway", "127.0.0.1:1", "--tls-key", "k.pem"]) == 2
    assert "--tls-key needs --tls-cert" in capsys.readouterr().err
