"""The command line's allocator policy: large blocks freed are reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
from zeroptim_cli.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(b"x") * (48 * 2**20)   # 48 MiB, written: above any mmap threshold glibc allows
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_block()
print(min(faults_of_a_fresh_block() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_large_block_is_reused_without_page_faults():
    faults = {how: int(subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True,
                                      check=True).stdout) for how in ("default", "keep")}
    pages = 48 * 2**20 // 4096
    assert faults["default"] > pages // 2      # glibc's default: a fresh mmap, every page faulted in again
    assert faults["keep"] < pages // 20        # kept: the same heap memory, already resident
