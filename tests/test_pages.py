"""release_pages: memory-mapped slabs leave the resident set, and no data is ever lost."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scripts.io.pages import release_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux")

MIB = 2**20


def resident_file_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_written_slabs_leave_the_resident_set_and_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "out.raw"
    data = np.memmap(path, dtype=np.uint8, mode="w+", shape=(64, MIB))
    expected = (np.arange(64, dtype=np.uint8) * 3 + 1)[:, None]
    for z in range(64):
        data[z] = expected[z]
    before = resident_file_mib()
    for z in range(0, 64, 8):
        release_pages(data[z : z + 8])
    assert before - resident_file_mib() > 48  # of the 64 MiB written
    assert (np.asarray(data[:, ::4096]) == expected).all()  # read back through the same map
    del data
    on_disk = np.fromfile(path, dtype=np.uint8).reshape(64, MIB)
    assert (on_disk[:, ::4096] == expected).all()


def test_read_only_map_reads_the_same_after_release(tmp_path: Path) -> None:
    path = tmp_path / "in.raw"
    np.arange(8 * MIB // 4, dtype=np.float32).tofile(path)
    data = np.memmap(path, dtype=np.float32, mode="r", shape=(8, MIB // 4))
    first = float(data.sum(dtype=np.float64))
    release_pages(data[2:5])
    assert float(data.sum(dtype=np.float64)) == first


@pytest.mark.parametrize("make", ["anonymous", "copy_on_write"])
def test_memory_that_only_lives_in_the_process_is_never_dropped(tmp_path: Path, make: str) -> None:
    # Dropping these pages would zero them (anonymous) or lose the private changes (mode "c").
    if make == "anonymous":
        array = np.full((4, MIB), 7, dtype=np.uint8)
    else:
        np.zeros((4, MIB), dtype=np.uint8).tofile(tmp_path / "base.raw")
        array = np.memmap(tmp_path / "base.raw", dtype=np.uint8, mode="c", shape=(4, MIB))
        array[:] = 7
    release_pages(array)
    assert (array == 7).all()


# In a child process: keep_freed_memory is process-wide and lasts the whole process.
_HEAP_CHILD = r"""
import sys
import numpy as np
from scripts.io import pages

def mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024

if sys.argv[1] == "kept":
    assert pages.keep_freed_memory() and pages.heap_kept()
base = mib("RssAnon")
for _ in range(3):  # one 200 MiB array per "slice", freed afterwards
    a = np.ones(200 * 2**20 // 8)
    del a
    pages.trim_heap()  # a no-op once freed memory is kept
print(mib("RssAnon") - base, mib("VmHWM") - base)
"""


@pytest.mark.parametrize("mode", ["kept", "default"])
def test_freed_memory_stays_for_the_next_slice_only_when_kept(mode: str) -> None:
    import subprocess

    bundle = Path(__file__).resolve().parent.parent / "bundle"
    result = subprocess.run([sys.executable, "-c", _HEAP_CHILD, mode], cwd=bundle, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    held, peak = (int(v) for v in result.stdout.split())
    assert 190 < peak < 300  # three arrays one after the other: one array's worth at a time
    if mode == "kept":
        assert held > 190  # still resident: the next array reuses these pages (no page faults)
    else:
        assert held < 20  # glibc unmapped it; the next array is faulted in afresh
