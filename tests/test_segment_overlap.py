"""Reading and writing beside the network (``overlap_io``): same outputs, writes in z order from one
thread, bounded blocks in flight, and errors or Ctrl-C that end every thread instead of hanging."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
import torch
from scripts.infer.pipeline import max_in_flight
from scripts.infer.postprocess import PostProcessing
from scripts.infer.predict import SlicePrediction, SlicePredictor
from scripts.infer.segment import segment_volume
from scripts.io.volume import VolumeError, open_volume, write_volume
from scripts.network.double_decoder import DoubleDecoderNet

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = REPO / "bundle" / "configs" / "inference.json"
HANG_S = 120  # a run that has not ended by then hangs: the test fails instead of waiting forever


def _stage_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("segment-")]


def _predictor() -> SlicePredictor:
    torch.manual_seed(0)
    return SlicePredictor(DoubleDecoderNet(width=2, outputs="label"), max_window=64)


class _Recorder:
    """A sink that keeps every block and notes where it came from (z, thread)."""

    def __init__(self, shape: tuple[int, ...], fail_at: int | None = None) -> None:
        self.array = np.zeros(shape, np.uint8)
        self.calls: list[tuple[int, str]] = []
        self.fail_at = fail_at

    def write(self, z0: int, block: np.ndarray) -> None:
        if len(self.calls) == self.fail_at:
            raise VolumeError(f"/data/out/cell_mask.mrc: no space left writing slices from z={z0}")
        self.calls.append((z0, threading.current_thread().name))
        self.array[z0 : z0 + block.shape[0]] = block

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _CountingVolume:
    """A (z, y, x) array that counts the blocks read from it."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.reads = data, data.shape, 0
        self.changed = threading.Condition()

    def __getitem__(self, key: slice) -> np.ndarray:
        with self.changed:
            self.reads += 1
            self.changed.notify_all()
        return self.data[key]


class _FastPredictor:
    """Stands in for the network where only the hand-over between threads is tested: records how
    many blocks were read and not yet written each time it runs."""

    def __init__(self, volume: _CountingVolume, sink: _Recorder) -> None:
        self.volume, self.sink, self.in_flight = volume, sink, []

    def predict(self, slices: np.ndarray, scale: object = None) -> SlicePrediction:
        self.in_flight.append(self.volume.reads - len(self.sink.calls))
        return SlicePrediction(label=torch.from_numpy(np.tanh(np.asarray(slices, np.float32))))


# ----------------------------------------------------------------------------- in process


def test_writes_run_in_the_writer_thread_in_increasing_z_and_match_the_sequential_path(tmp_path):
    data = np.random.default_rng(0).normal(size=(11, 32, 40)).astype(np.float32)
    path = tmp_path / "cell.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
    volume = open_volume(path).data  # a memory map, as the folder segmenter reads it
    predictor, post = _predictor(), PostProcessing(threshold=0.0)
    results = {}
    for overlap in (False, True):
        sinks = {"mask": [_Recorder(data.shape)], "prob": [_Recorder(data.shape)]}
        foreground = segment_volume(volume, predictor, post, sinks, (1, 10), batch_size=2, overlap_io=overlap)
        results[overlap] = (foreground, sinks)
    for kind in ("mask", "prob"):
        sequential, overlapped = results[False][1][kind][0], results[True][1][kind][0]
        assert np.array_equal(sequential.array, overlapped.array)
        starts = [z for z, _ in overlapped.calls]
        assert starts == sorted(starts) == [0, 1, 3, 5, 7, 9, 10]  # every block once, in z order
        assert {name for _, name in overlapped.calls} == {"segment-writer"}
        assert {name for _, name in sequential.calls} == {threading.current_thread().name}
    assert results[True][0] == results[False][0] == int(results[True][1]["mask"][0].array.sum()) > 0
    assert results[True][1]["prob"][0].array[1:10].max() > 1
    assert _stage_threads() == []


def test_blocks_in_flight_never_exceed_the_bound_even_when_writing_stalls():
    data = np.random.default_rng(1).normal(size=(30, 8, 8)).astype(np.float32)
    volume = _CountingVolume(data)
    bound = max_in_flight()
    seen: list[int] = []

    class StalledSink(_Recorder):
        def write(self, z0: int, block: np.ndarray) -> None:
            if not self.calls:  # the first write waits while the reader runs as far ahead as it may
                with volume.changed:
                    assert volume.changed.wait_for(lambda: volume.reads >= bound, timeout=HANG_S)
                    volume.changed.wait_for(lambda: volume.reads > bound, timeout=0.5)  # it may not
            seen.append(volume.reads - len(self.calls))
            super().write(z0, block)

    sink = StalledSink(data.shape)
    predictor = _FastPredictor(volume, sink)
    segment_volume(volume, predictor, PostProcessing(), {"mask": [sink]}, batch_size=1)

    assert len(sink.calls) == volume.reads == 30
    assert max(seen + predictor.in_flight) == bound == 7  # depth 2: reader, 2 queued, network, 2, writer
    assert np.array_equal(sink.array, (data > 0).astype(np.uint8))


@pytest.mark.parametrize("overlap", [True, False])
def test_a_sink_failing_on_the_third_block_stops_everything_with_its_error(overlap):
    data = np.random.default_rng(2).normal(size=(40, 16, 16)).astype(np.float32)
    volume = _CountingVolume(data)
    sink = _Recorder(data.shape, fail_at=2)

    with pytest.raises(VolumeError) as info:
        segment_volume(volume, _predictor(), PostProcessing(), {"mask": [sink]}, batch_size=2,
                       overlap_io=overlap)  # fmt: skip

    assert type(info.value) is VolumeError
    assert str(info.value) == "/data/out/cell_mask.mrc: no space left writing slices from z=4"
    assert [z for z, _ in sink.calls] == [0, 2]
    assert volume.reads <= 3 + max_in_flight()  # the reader stopped instead of reading all 20 blocks
    assert _stage_threads() == []


@pytest.mark.parametrize("overlap", [True, False])
def test_a_corrupt_chunk_ends_the_run_with_the_readers_volume_error(tmp_path, overlap):
    # Integer data: opening a float store scans it for NaNs, which would meet the bad chunk first.
    data = np.random.default_rng(3).integers(0, 255, size=(12, 32, 32)).astype(np.int16)
    store = write_volume(tmp_path / "cell.ome.zarr", data, (20.0, 10.0, 10.0))
    chunk = store / "0" / "7" / "0" / "0"  # slice 7 (one slice per chunk)
    chunk.write_bytes(chunk.read_bytes()[:20])
    volume = open_volume(store).data
    sink = _Recorder(data.shape)

    with pytest.raises(VolumeError) as info:
        segment_volume(volume, _predictor(), PostProcessing(), {"mask": [sink]}, batch_size=2,
                       overlap_io=overlap)  # fmt: skip

    assert type(info.value) is VolumeError
    assert str(info.value).startswith(f"{store}: cannot read slices z=6..7 ")
    assert "truncated or corrupt" in str(info.value)
    starts = [z for z, _ in sink.calls]  # the run stops at once: blocks read before may not be written
    assert starts == [0, 2, 4][: len(starts)] and (overlap or len(starts) == 3)
    assert _stage_threads() == []


CTRL_C = """
import signal, sys, threading, time
import numpy as np, torch
# As in a terminal: Ctrl-C raises KeyboardInterrupt. A child inherits an ignored SIGINT, and something
# earlier in the test session ignores it (the child then never stopped: seen in full-suite runs only).
signal.signal(signal.SIGINT, signal.default_int_handler)
from scripts.infer.postprocess import PostProcessing
from scripts.infer.predict import SlicePrediction
from scripts.infer.segment import segment_volume
from scripts.io.sinks import ArraySink

class Slow:
    calls = 0
    def predict(self, slices, scale=None):
        Slow.calls += 1
        if Slow.calls == 3:
            print("ready", flush=True)
            while True:
                time.sleep(0.05)
        return SlicePrediction(label=torch.from_numpy(np.tanh(np.asarray(slices, np.float32))))

data = np.random.default_rng(0).normal(size=(40, 8, 8)).astype(np.float32)
try:
    segment_volume(data, Slow(), PostProcessing(), {"mask": [ArraySink(np.zeros(data.shape, np.uint8))]},
                   batch_size=1, overlap_io=True)
except KeyboardInterrupt:
    left = [t.name for t in threading.enumerate() if t.name.startswith("segment-")]
    print("interrupted; stages left:", left)
    sys.exit(130)
"""


def test_ctrl_c_during_the_network_ends_every_thread(tmp_path):
    paths = [str(REPO / "bundle"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    child = subprocess.Popen([sys.executable, "-c", CTRL_C], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()[-3000:]
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=HANG_S)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 130, err[-3000:]
    assert out.strip() == "interrupted; stages left: []", out


def test_the_segmenter_parses_the_option():
    from scripts.infer.workflow import TomogramSegmenter

    make = lambda value: TomogramSegmenter(_predictor(), PostProcessing(), "out", overlap_io=value)  # noqa: E731
    assert make("false").overlap_io is False and make("true").overlap_io is True
    assert make(True).overlap_io is True
    with pytest.raises(ValueError, match="overlap_io must be true or false, got 'sometimes'"):
        make("sometimes")


# ----------------------------------------------------------------------------- the bundle runner


def _infer(tomograms: Path, out: Path, weights: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(CONFIG),
           "--dataset_dir", str(tomograms), "--output_dir", str(out), "--weights", str(weights),
           "--width", "4", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def test_the_bundle_runner_writes_identical_files_with_overlap_on_and_off(tmp_path, weights):
    tomograms = tmp_path / "tomograms"
    tomograms.mkdir()
    data = np.random.default_rng(4).normal(size=(9, 40, 56)).astype(np.float32)
    with mrcfile.new(tomograms / "cell.mrc") as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 98.0
    outputs = {}
    for overlap in ("false", "true"):
        out = tmp_path / f"overlap_{overlap}"
        result = _infer(tomograms, out, weights, "--overlap_io", overlap, "--slice_range", "[1, 8]",
                        "--probability", "uint8", "--tta", "true", "--formats", "[mrc, tif]")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[overlap] = out
    names = sorted(p.name for p in outputs["true"].iterdir() if p.suffix in (".mrc", ".tif"))
    assert names == sorted(f"cell_{kind}.{ext}" for kind in ("mask", "prob", "uncertainty")
                           for ext in ("mrc", "tif"))  # fmt: skip
    for name in names:
        read = (lambda p: mrcfile.read(p)) if name.endswith(".mrc") else tifffile.imread
        on, off = read(outputs["true"] / name), read(outputs["false"] / name)
        assert on.dtype == off.dtype and np.array_equal(on, off), name
        assert on[1:8].any() and not on[0].any() and not on[8].any(), name
    fractions = [(out / "cell_summary.json").read_text() for out in outputs.values()]
    found = [re.search(r'"foreground_fraction": ([0-9.e-]+)', text).group(1) for text in fractions]
    assert found[0] == found[1]


def test_a_bad_overlap_io_value_ends_the_run_on_one_line(tmp_path, weights):
    tomograms = tmp_path / "tomograms"
    tomograms.mkdir()
    with mrcfile.new(tomograms / "cell.mrc") as mrc:
        mrc.set_data(np.zeros((2, 16, 16), np.float32))
    result = _infer(tomograms, tmp_path / "out", weights, "--overlap_io", "sometimes")
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line.strip() for line in re.split(r"[\r\n]", result.stderr) if line.strip()]
    assert lines[-1].startswith("ERROR: ") and "overlap_io must be true or false" in lines[-1], lines[-5:]
