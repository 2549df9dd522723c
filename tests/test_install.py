"""install.py, the webui's install hook: quick, idempotent, installs only an old or missing safetensors or regex.

Where it would install, the webui's ``launch`` module is replaced by a recorder (the webui is not
installable here); where it must not, it runs for real in a subprocess that has no ``launch`` at all.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "install.py"


def test_with_a_recent_safetensors_it_does_nothing_and_needs_no_webui():
    done = subprocess.run([sys.executable, str(INSTALL)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr  # importing the webui's launch would fail here
    assert done.stdout == "" and done.stderr == ""


@pytest.mark.parametrize("found", [None, (0, 3, 3)])
def test_missing_or_old_packages_are_installed_through_the_webuis_pip(monkeypatch, found):
    calls = []
    launch = type(sys)("launch")
    launch.run_pip = lambda command, desc=None: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    hook = runpy.run_path(str(INSTALL))
    monkeypatch.setitem(hook["main"].__globals__, "installed_version", lambda package: found)
    hook["main"]()
    assert calls == ['install "safetensors>=0.4" "regex>=2019.3.12"']


def test_versions_are_read_as_numbers():
    hook = runpy.run_path(str(INSTALL))
    assert hook["installed_version"]("safetensors") >= (0, 4)
    assert hook["installed_version"]("surely-not-an-installed-package") is None
