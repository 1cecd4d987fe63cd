"""The deployment recipe's files, rendered for a test, and Debian's nginx running them.

The nginx config under deploy/ is the one docs/deployment.md includes; a test
changes only what must differ on a test machine: the ports (and listening on
loopback), the certificate paths, the server name and the log directory.
Each change must find its text, so an edit to the file that a test no longer
covers fails here rather than passing untested.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests.support.gateway import ROOT
from tests.support.wait import wait_until_sync

DEPLOY: Final = ROOT / "deploy"
NGINX_CONF: Final = DEPLOY / "nginx" / "iot-gateway.conf"
GATEWAY_TOML: Final = DEPLOY / "gateway.toml"
UNIT: Final = DEPLOY / "systemd" / "iot-gateway.service"
NGINX: Final = os.environ.get("IOT_GATEWAY_NGINX", "/usr/sbin/nginx")
SERVER_NAME: Final = "gw.example.test"
DOC_SERVER_NAME: Final = "gw.example.com"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (nginx takes ports from its config, not 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _replace(text: str, old: str, new: str, count: int) -> str:
    found = text.count(old)
    assert found == count, f"{NGINX_CONF.name}: expected {old!r} {count} times, found {found}"
    return text.replace(old, new)


def render_nginx(
    *, http_port: int, https_port: int, upstream_port: int, cert: Path, key: Path, logs: Path
) -> str:
    """deploy/nginx/iot-gateway.conf with the test's ports, certificate, server name and logs."""
    text = NGINX_CONF.read_text()
    text = _replace(text, "listen 80;", f"listen 127.0.0.1:{http_port};", 1)
    text = _replace(text, "listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;", 1)
    text = _replace(text, "server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};", 1)
    text = _replace(text, f"/etc/letsencrypt/live/{DOC_SERVER_NAME}/fullchain.pem", str(cert), 1)
    text = _replace(text, f"/etc/letsencrypt/live/{DOC_SERVER_NAME}/privkey.pem", str(key), 1)
    text = _replace(text, DOC_SERVER_NAME, SERVER_NAME, 2)
    return _replace(text, "/var/log/nginx/", f"{logs}/", 4)


def gateway_config(offset_mark: Path) -> dict[str, Any]:
    """deploy/gateway.toml as a config dict, on loopback and with the test's offset mark.

    The listening ports and the data dir come from the test's flags.
    """
    config = tomllib.loads(GATEWAY_TOML.read_text())
    assert config["device_host"] == "0.0.0.0"
    config["device_host"] = "127.0.0.1"  # tests listen on loopback only
    assert config["storage"]["offset_mark"].startswith("/var/backups/")
    config["storage"]["offset_mark"] = str(offset_mark)
    return config


@dataclass
class Nginx:
    """Debian's nginx in the foreground with a private prefix, running the rendered config."""

    prefix: Path
    site: str
    http_port: int
    https_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def logs(self) -> Path:
        return self.prefix / "logs"

    def access_log(self) -> str:
        return self._read("iot-gateway.access.log")

    def error_log(self) -> str:
        return self._read("iot-gateway.error.log") + self._read("error.log")

    def _read(self, name: str) -> str:
        try:
            return (self.logs / name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        temp = self.prefix / "temp"
        temp.mkdir(exist_ok=True)
        (self.prefix / "iot-gateway.conf").write_text(self.site)
        paths = "\n".join(
            f"    {kind}_temp_path {temp}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (self.prefix / "nginx.conf").write_text(
            f"worker_processes 1;\npid {self.prefix}/nginx.pid;\n"
            f"error_log {self.logs}/error.log;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n{paths}\n    include {self.prefix}/iot-gateway.conf;\n}}\n"
        )
        argv = [NGINX, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")]
        check = subprocess.run(
            [*argv, "-e", str(self.logs / "error.log"), "-t"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}"
        with (self.logs / "stderr.log").open("ab") as stderr:
            # The child keeps its own copy of the descriptor.
            self.proc = subprocess.Popen(
                [*argv, "-e", str(self.logs / "error.log"), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        wait_until_sync(self._listening, "nginx to listen", timeout=20)

    def _listening(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, (
            f"nginx exited: {self._read('stderr.log')}{self._read('error.log')}"
        )
        for port in (self.http_port, self.https_port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
