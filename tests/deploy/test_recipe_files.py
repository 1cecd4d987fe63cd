"""docs/deployment.md shows the deploy/ files verbatim, and they say what the docs say.

The nginx config, the gateway's config and the systemd unit are real files
that tests/deploy runs; the page includes each one whole, so the recipe a
reader copies is the one that was tested.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest

from gateway.config import build_config
from tests.deploy.support import GATEWAY_TOML, NGINX_CONF, UNIT
from tests.support.gateway import ROOT

DOC = ROOT / "docs" / "deployment.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize(
    ("language", "path"), [("nginx", NGINX_CONF), ("toml", GATEWAY_TOML), ("ini", UNIT)]
)
def test_the_page_includes_each_file_verbatim(language: str, path: object) -> None:
    assert path.read_text() in blocks(language)  # type: ignore[attr-defined]


def test_the_deployed_config_is_valid_and_needs_no_allowed_origins() -> None:
    config = build_config(tomllib.loads(GATEWAY_TOML.read_text()), environ={})
    assert config.auth.allowed_origins == []
    assert config.host == "127.0.0.1"
    assert "127.0.0.1" in config.http.trusted_proxies
    assert config.storage.offset_mark is not None
    assert not config.storage.offset_mark.startswith(config.data_dir)


def test_upstream_keepalive_is_shorter_than_the_gateways_idle_timeout() -> None:
    match = re.search(r"keepalive_timeout (\d+)s;", NGINX_CONF.read_text())
    assert match
    assert int(match.group(1)) < build_config({}, environ={}).http.idle_timeout


def test_every_location_repeats_the_forwarding_headers() -> None:
    text = NGINX_CONF.read_text()
    locations = re.findall(r"location [^{]*\{(.*?)\n    \}", text, flags=re.DOTALL)
    assert len(locations) == 3
    for body in locations:
        for header in ("Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"):
            assert f"proxy_set_header {header} " in body, (header, body)


def test_the_unit_passes_systemd_analyze_verify() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(
        [tool, "verify", "--man=no", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    # Only the unit's own syntax: its paths (/opt/..., the user) are not on a test machine.
    syntax = [
        line
        for line in done.stderr.splitlines()
        if "Unknown key" in line or "Unknown section" in line or "Failed to parse" in line
    ]
    assert not syntax, done.stderr
