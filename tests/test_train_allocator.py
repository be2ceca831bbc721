"""The training process's malloc settings: applied where glibc is, harmless elsewhere."""

import platform
import subprocess
import sys

import pytest

from vistra.train.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_every_setting():
    # In a child process: the settings last for the life of the process that makes them.
    code = "from vistra.train.allocator import keep_freed_memory as k; print(k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_without_glibc_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False
