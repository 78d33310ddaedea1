"""The allocator setting: freed large tensors are reused instead of faulted in anew."""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from resflow.allocator import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # four 100 MB tensors (above glibc's default mmap threshold), like a pass
    a = torch.ones(25_000_000); b = a * 2; c = b + a; d = c * b
    return float(d[0])
step()
before = faults()
for _ in range(4):
    step()
print(applied, faults() - before)
"""


def _probe(keep: str) -> tuple[bool, int]:
    env = {**os.environ, "RESFLOW_KEEP_MEMORY": keep, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_large_tensors_are_reused_instead_of_faulted_in_again():
    applied, kept = _probe("1")
    opted_out, fresh = _probe("0")
    assert applied and not opted_out
    if fresh < 100_000:  # 16 tensors of 24,414 small pages each would fault in
        pytest.skip("huge pages: page-fault counts do not show the reuse here")
    assert kept < fresh / 3
