"""Training on the CPU hands freed tensors back to the OS (glibc's fixed mmap threshold)."""

from __future__ import annotations

import sys

import pytest
import torch

from wsi_anomaly.runtime import return_freed_tensors_to_the_os


def _rss_mib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_leave_the_process():
    if not return_freed_tensors_to_the_os():
        pytest.skip("this C library has no mallopt")
    # blocks of the sizes a training step frees and allocates again (1-8 MiB): without the
    # fixed threshold glibc keeps the freed ones in the heap and the RSS stays up
    for _ in range(3):
        before = _rss_mib()
        blocks = [torch.ones(256 * 1024 * (1 + i % 8)) for i in range(96)]  # ~430 MiB
        held = _rss_mib()
        del blocks
        after = _rss_mib()
        assert held - before > 300
        assert after - before < 50, (before, held, after)
