"""``scripts/test-deps.sh``, which ``make test`` runs before anything else (issue 13).

On a fresh machine without Chromium, ``make test`` gave 9 errors. The script
installs what is missing as root, or says in one line how and stops. Both
paths run here for real, against a package list that points at missing files
(``TEST_DEPS_NEEDED``), with fake ``id`` and ``apt-get`` first on ``PATH``, so
nothing is installed and the machine's own user does not matter.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "test-deps.sh"


def _fake_bin(tmp_path: Path, uid: int) -> Path:
    """A directory with ``id`` (printing ``uid``) and ``apt-get`` (logging its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt-get.log"
    scripts = {
        "id": f'#!/bin/sh\n[ "$1" = "-u" ] && echo {uid} && exit 0\nexit 1\n',
        "apt-get": f'#!/bin/sh\necho "$*" >> "{log}"\n',
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _run(tmp_path: Path, uid: int, needed: str) -> subprocess.CompletedProcess[str]:
    bin_dir = _fake_bin(tmp_path, uid)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TEST_DEPS_NEEDED": needed}
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_a_user_is_told_in_one_line_what_to_install(tmp_path: Path) -> None:
    needed = f"chromium={tmp_path}/no-chromium fakepkg={tmp_path}/no-fake"
    result = _run(tmp_path, 1000, needed)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "make test needs Debian packages: run 'sudo apt-get install -y chromium fakepkg' first\n"
    )
    assert not (tmp_path / "apt-get.log").exists()  # nothing was tried


def test_root_installs_what_is_missing_with_apt_get(tmp_path: Path) -> None:
    present = tmp_path / "present"
    present.write_text("")
    needed = f"chromium={tmp_path}/no-chromium here={present}"
    result = _run(tmp_path, 0, needed)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "installing chromium (needed by the tests) ...\n"
    calls = (tmp_path / "apt-get.log").read_text().splitlines()
    assert calls == ["update -qq", "install -y -qq chromium"]  # only what is missing


@pytest.mark.parametrize("uid", [0, 1000])
def test_nothing_missing_is_silent_and_succeeds(tmp_path: Path, uid: int) -> None:
    present = tmp_path / "present"
    present.write_text("")
    result = _run(tmp_path, uid, f"chromium={present}")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not (tmp_path / "apt-get.log").exists()


def test_make_test_runs_the_script_before_anything_else() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^test: (.*)$", makefile, re.MULTILINE)
    assert rule is not None
    assert rule.group(1).split()[0] == "test-deps"
    assert re.search(r"^test-deps:\n\tscripts/test-deps\.sh$", makefile, re.MULTILINE)
