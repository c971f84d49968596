"""keep_freed_memory: freed large blocks stay in the process for reuse (glibc only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (the setting is process-wide): allocate and touch 64 MiB, free it, and
# print how many bytes glibc's heap now holds free for reuse (mallinfo2().fordblks).
PROBE = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from pipelines.host_memory import keep_freed_memory
print(keep_freed_memory())
import torch
x = torch.ones(64 << 20, dtype=torch.uint8)
del x
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
print(libc.mallinfo2().fordblks)
"""


def _probe(enabled: bool) -> tuple[bool, int]:
    env = dict(os.environ, BMB_KEEP_FREED_MEMORY="1" if enabled else "0")
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_blocks_stay_for_reuse_and_the_switch_turns_it_off():
    try:
        applied, free_bytes = _probe(enabled=True)
    except (subprocess.CalledProcessError, AttributeError) as e:  # no mallinfo2 (glibc < 2.33)
        pytest.skip(f"cannot read malloc statistics here: {e}")
    assert applied and free_bytes >= 64 << 20  # the 64 MiB block was kept
    applied, free_bytes = _probe(enabled=False)
    assert not applied and free_bytes < 64 << 20  # default glibc: unmapped on free
