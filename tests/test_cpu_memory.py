"""The CPU training processes keep freed memory instead of returning it to the OS between passes (glibc)."""

import os
import subprocess
import sys
import textwrap

import pytest

from dmd_dar.utils import cpu_memory
from dmd_dar.utils.cpu_memory import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MMAP_THRESHOLD_MAX,
    retain_freed_memory,
)

glibc_only = pytest.mark.skipif(cpu_memory._glibc() is None, reason="mallopt is glibc's")


class FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls, self.result = [], result

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return self.result


def test_sets_both_thresholds():
    libc = FakeLibc()
    assert retain_freed_memory(libc, environ={}) is True
    assert libc.calls[0] == (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    assert libc.calls[1][0] == M_TRIM_THRESHOLD and libc.calls[1][1] >= 2**31 - 1


def test_a_users_malloc_settings_win_and_failures_are_reported():
    libc = FakeLibc()
    assert retain_freed_memory(libc, environ={"MALLOC_ARENA_MAX": "2"}) is False
    assert libc.calls == []
    assert retain_freed_memory(FakeLibc(result=0), environ={}) is False


# Sixteen 4 MiB blocks: above glibc's default mmap threshold (128 KiB), so by default each is mapped on its own
# and unmapped on free; with the policy they come from the heap and stay in the process.
_PROBE = textwrap.dedent("""
    import ctypes, sys
    from dmd_dar.utils.cpu_memory import _glibc, retain_freed_memory
    libc = _glibc()
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024
    blocks = [libc.malloc(4 << 20) for _ in range(16)]
    for b in blocks:
        ctypes.memset(b, 1, 4 << 20)
    before = rss()
    for b in blocks:
        libc.free(b)
    print(before - rss())
""")


@glibc_only
@pytest.mark.parametrize("mode", ["default", "retain"])
def test_freed_memory_stays_in_the_process_only_with_the_policy(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True)
    released = int(out.stdout)
    if mode == "default":
        assert released >= 48 << 20  # most of the 64 MiB went back to the OS
    else:
        assert released < 8 << 20


@glibc_only
def test_cpu_runs_apply_it(tmp_path, monkeypatch):
    from dmd_dar.training import run
    from dmd_dar.training.run import RunConfig, make_accelerator

    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    results = []
    monkeypatch.setattr(run, "retain_freed_memory", lambda: results.append(retain_freed_memory()))
    make_accelerator(RunConfig(out_dir=str(tmp_path), cpu=True, log_with="none"), "test")
    assert results == [True]
