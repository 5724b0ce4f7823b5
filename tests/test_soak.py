"""The soak test (scripts/soak, docs/reliability.md) works at all: a one-minute
run passes and prints zero mismatches, leaked mounts and leaked processes, and
its oracle sees one changed byte. Slow: not in the default suite
(scripts/test -m slow)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import need

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "scripts" / "soak"

pytestmark = pytest.mark.slow


def soak(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    need("fio")
    need("qemu-img")
    env = dict(os.environ, SOAK_DIR=str(tmp_path))
    result = subprocess.run([str(SOAK), *args], capture_output=True, text=True,
                            timeout=900, env=env, cwd=ROOT)
    figures = dict(re.findall(r"^(\S[^:\n]*): (.*)$", result.stdout.split("soak figures:")[-1],
                              re.M))
    return result, figures


def test_a_one_minute_soak_passes_with_zeros(tmp_path):
    result, figures = soak(tmp_path, "1")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    for key in ("mismatches", "leaked mounts", "leaked processes", "errors", "hangs",
                "fio verify failures"):
        assert figures[key] == "0", (key, result.stdout[-5000:])
    assert int(figures["snapshots taken"]) > 0
    assert int(figures["kill -9 and resumes"]) == 1
    assert int(figures["bytes verified"]) > 0
    assert "soak: passed" in result.stdout
    assert os.listdir(tmp_path) == [], "the soak left its temporary directory behind"


def test_the_soak_sees_one_changed_byte(tmp_path):
    """--inject-mismatch changes one byte of the live disk between the first
    snapshot's model and the snapshot: the soak must fail on it, and still
    leave nothing mounted or running."""
    result, figures = soak(tmp_path, "0.3", "--inject-mismatch")
    assert result.returncode == 1, result.stdout[-5000:]
    assert int(figures["mismatches"]) > 0
    assert figures["leaked mounts"] == "0" and figures["leaked processes"] == "0"
    assert "soak: FAILED" in result.stdout
