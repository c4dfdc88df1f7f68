"""Inference speed, memory and seam figures for the double-decoder network (prints a report; not a test).

    python bench/bench_inference.py                       # everything but --big (long: width 64 is slow)
    python bench/bench_inference.py --widths 8 --size 512x512 --repeats 2 --memory-slices 20,40 --no-seams
    python bench/bench_inference.py --only memory --big   # + the 400 x 1324 x 1284 tomogram (2.7 GB)
    python bench/bench_inference.py --device cuda         # GPU: bench/bench_gpu.py (precisions, end to end)

Sections: (a) the machine's float32 matrix-multiply peak (torch.mm, all threads, measured in this run);
(b) slices/s and achieved GFLOP/s per width and optimisation level (FLOPs of the *original* network from
FlopCounterMode, so fused levels that do fewer multiply-adds show as a higher effective rate), with the
max |diff| and the mask (tanh > 0) mismatches against eager NCHW; (c) peak resident memory of the real
``monai.bundle run inference`` command against the number of slices; (d) masks of tiled windows against
whole slices; (e) optional big tomogram. Figures on a shared machine are noisy: levels are interleaved and
the minimum of the repeats is reported, with the load average.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundle"
sys.path[:0] = [str(BUNDLE), str(REPO)]  # the bundle's scripts, the simulator

from scripts.infer.predict import SlicePredictor  # noqa: E402
from scripts.network.double_decoder import DoubleDecoderNet  # noqa: E402
from scripts.network.fusion import fuse_for_inference  # noqa: E402

TRAINED = BUNDLE / "models" / "model.pt"
LEVELS = ("eager", "channels_last", "fusion", "fused", "reuse", "compile", "onnxruntime")
LEVEL_NAMES = {
    "eager": "eager NCHW",
    "channels_last": "channels_last",
    "fusion": "+fusion (BN fold, merges)",
    "fused": "+oneDNN conv+ReLU",
    "reuse": "+reused buffers (default)",
    "compile": "+torch.compile",
    "onnxruntime": "onnxruntime",
}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def header(title: str) -> None:
    print(f"\n== {title} [{load()}]", flush=True)


# --------------------------------------------------------------------------------------------- (a) peak
def matmul_peak(size: int, repeats: int) -> float:
    """Best float32 GFLOP/s of ``torch.mm`` on two ``size`` x ``size`` matrices."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


# ---------------------------------------------------------------------------------------- (b) throughput
def network(width: int, outputs: str = "label") -> DoubleDecoderNet:
    torch.manual_seed(0)
    net = DoubleDecoderNet(width=width, outputs=outputs)
    if width == 8 and TRAINED.is_file():
        from scripts.network.weights import load_weights

        load_weights(net, TRAINED)
    return net.eval()


def count_flops(net: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass, counted on the meta device (no compute)."""
    meta = copy.deepcopy(net).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.zeros(shape, device="meta"))
    return counter.get_total_flops()


Runner = Callable[[torch.Tensor], torch.Tensor]


def float64_reference(net: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The eager network in float64 on the benchmark input: which float32 masks are right."""
    x = torch.from_numpy(np.random.default_rng(0).normal(size=shape))
    with torch.inference_mode():
        return copy.deepcopy(net).double()(x).float()


def onnx_runner(net: nn.Module, shape: tuple[int, ...], threads: int) -> Runner:
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp(prefix="bench_onnx_")) / "net.onnx"
    with torch.no_grad():
        torch.onnx.export(
            net, (torch.zeros(shape),), str(path), input_names=["x"], output_names=["y"], opset_version=17,
            dynamo=False,
        )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Wide networks: ORT's arena would keep its peak (~10 GB at width 64) while the other levels run.
    options.enable_cpu_mem_arena = net.width < 32
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def build_level(level: str, net: DoubleDecoderNet, shape: tuple[int, ...]) -> tuple[Runner, torch.Tensor, float]:
    """(callable, input, seconds to build) for one optimisation level."""
    x = torch.from_numpy(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    cl = x.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    if level == "eager":
        model, inp = net, x
    elif level == "channels_last":
        model, inp = copy.deepcopy(net).to(memory_format=torch.channels_last), cl
    elif level == "fusion":
        model, inp = fuse_for_inference(net, onednn=False), cl
    elif level == "fused":
        model, inp = fuse_for_inference(net), cl
    elif level == "reuse":
        model, inp = fuse_for_inference(net, reuse_buffers=True), cl
    elif level == "compile":
        model = torch.compile(fuse_for_inference(net), dynamic=False, options={"freezing": True})
        inp = cl
        with torch.inference_mode():
            model(inp)  # compiles
    elif level == "onnxruntime":
        model, inp = onnx_runner(net, shape, torch.get_num_threads()), x
    else:
        raise ValueError(level)
    return model, inp, time.perf_counter() - start


def bench_width(width: int, shape: tuple[int, ...], levels: list[str], repeats: int, peak: float) -> None:
    net = network(width)
    flops = count_flops(net, shape)
    weights = "trained" if width == 8 and TRAINED.is_file() else "random init"
    header(f"width {width}, slice {shape[2]} x {shape[3]}, batch {shape[0]}: {flops / 1e9:.1f} GFLOP; {weights}")
    built, reference = {}, None
    exact = float64_reference(net, shape) if width <= 16 else None
    for level in levels:
        try:
            model, inp, seconds = build_level(level, net, shape)
        except Exception as err:  # an optional backend missing or failing must not stop the report
            print(f"  {LEVEL_NAMES[level]}: unavailable ({type(err).__name__}: {str(err)[:120]})")
            continue
        with torch.inference_mode():
            out = model(inp)  # warm-up (oneDNN primitive caches, first-touch of buffers)
        if reference is None:
            reference = out
        diff = (out - reference).abs().max().item()
        flips = int(((out > 0) != (reference > 0)).sum())
        built[level] = (model, inp, seconds, diff, flips)
        note = f" (build {seconds:.1f} s)" if seconds > 1 else ""
        versus = ""
        if exact is not None:
            wrong = int(((out > 0) != (exact > 0)).sum())
            versus = f"; float64: {(out - exact).abs().max().item():.1e}, {wrong}"
        name = LEVEL_NAMES[level] + note
        print(f"  built {name}: max |diff|, mask mismatches vs eager: {diff:.1e}, {flips}{versus}")
    times: dict[str, list[float]] = {level: [] for level in built}
    with torch.inference_mode():
        for _ in range(repeats):
            for level, (model, inp, *_rest) in built.items():
                start = time.perf_counter()
                model(inp)
                times[level].append(time.perf_counter() - start)
    print(f"  {'level':28s} {'s/slice':>8s} {'median':>8s} {'slices/s':>8s} {'GFLOP/s':>8s} {'% peak':>7s}")
    for level, values in times.items():
        best = min(values) / shape[0]
        rate = flops / shape[0] / best / 1e9
        print(
            f"  {LEVEL_NAMES[level]:28s} {best:8.3f} {statistics.median(values) / shape[0]:8.3f} "
            f"{1 / best:8.3f} {rate:8.1f} {100 * rate / peak:6.1f}%"
        )
    print(f"  ({repeats} interleaved repeats; GFLOP/s = original network FLOPs / best time; {load()})")


def bench_bf16(width: int, shape: tuple[int, ...], repeats: int) -> None:
    """bfloat16 autocast against float32 through the predictor: speed and mask agreement."""
    header(f"bfloat16 autocast, width {width}, slice {shape[2]} x {shape[3]}")
    net = network(width)
    slices = realistic_slices(shape[2], shape[3], count=shape[0])
    runs = {"float32": SlicePredictor(net), "bfloat16": SlicePredictor(net, amp=True)}
    labels, times = {}, {k: [] for k in runs}
    for _ in range(repeats):
        for name, predictor in runs.items():
            start = time.perf_counter()
            labels[name] = predictor.predict(slices).label
            times[name].append(time.perf_counter() - start)
    agree = ((labels["bfloat16"] > 0) == (labels["float32"] > 0)).double().mean().item()
    for name in runs:
        print(f"  {name:9s} {min(times[name]) / shape[0]:.3f} s/slice")
    print(f"  masks agree on {100 * agree:.3f}% of pixels (max |diff| of tanh "
          f"{(labels['bfloat16'] - labels['float32']).abs().max().item():.3f})")  # fmt: skip


def bench_predictor(width: int, shape: tuple[int, ...], repeats: int) -> None:
    """The whole SlicePredictor (standardisation, inferer, crop) old defaults against the new ones."""
    header(f"SlicePredictor end to end, width {width}, {shape[0]} slices of {shape[2]} x {shape[3]}")
    net = network(width)
    slices = realistic_slices(shape[2], shape[3], count=shape[0])
    runs = {
        "eager NCHW (previous)": SlicePredictor(net, channels_last=False, fuse=False),
        "fused channels_last (default)": SlicePredictor(net),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    labels = {}
    for _ in range(repeats):
        for name, predictor in runs.items():
            start = time.perf_counter()
            labels[name] = predictor.predict(slices).label
            times[name].append(time.perf_counter() - start)
    first, second = list(labels.values())
    for name in runs:
        print(f"  {name:30s} {min(times[name]) / shape[0]:.3f} s/slice")
    print(f"  mask mismatches {int(((first > 0) != (second > 0)).sum())}, "
          f"max |diff| {(first - second).abs().max().item():.1e}")  # fmt: skip


def bench_layers(width: int, shape: tuple[int, ...]) -> None:
    """Where the fused network's time goes: convs and upsampling per resolution level, and the rest."""
    from scripts.network.fusion import FusedConv, FusedUp

    header(f"time per resolution level, fused width {width}, slice {shape[2]} x {shape[3]}")
    fused = fuse_for_inference(network(width), reuse_buffers=True)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    seconds: dict[tuple[str, int], float] = {}
    flops: dict[tuple[str, int], float] = {}

    def before(module: nn.Module, _inputs: tuple) -> None:
        module.started = time.perf_counter()

    def after(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        level = round(np.log2(shape[2] / out.shape[2]))
        pixels = out.shape[0] * out.shape[2] * out.shape[3]
        if isinstance(module, FusedUp):  # 9 taps over 4 output phases: 9 / 4 MACs per output pixel
            kind, work = "up", 2 * inputs[0].shape[1] * module.out_channels * 9 * pixels / 4
        else:
            kind, work = "conv", 2 * module.macs * pixels
        key = (kind, level)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - module.started
        flops[key] = flops.get(key, 0.0) + work

    with torch.inference_mode():
        fused(x)  # warm-up, before the hooks
        timed = [m for m in fused.modules() if isinstance(m, (FusedConv, FusedUp))]
        hooks = [m.register_forward_pre_hook(before) for m in timed]
        hooks += [m.register_forward_hook(after) for m in timed]
        start = time.perf_counter()
        fused(x)
        total = time.perf_counter() - start
        for hook in hooks:
            hook.remove()
    print(f"  whole forward {total:.2f} s, of which")
    columns = ("part", "level", "size", "seconds", "% time", "GFLOP", "GFLOP/s")
    print("  " + " ".join(f"{c:>{n}s}" for c, n in zip(columns, (5, 5, 11, 7, 6, 6, 7), strict=True)))
    for kind, level in sorted(seconds):
        key = (kind, level)
        size = f"{shape[2] >> level}x{shape[3] >> level}"
        rate = flops[key] / seconds[key] / 1e9
        print(f"  {kind:>5s} {level:5d} {size:>11s} {seconds[key]:7.2f} {100 * seconds[key] / total:5.1f}% "
              f"{flops[key] / 1e9:6.1f} {rate:7.1f}")  # fmt: skip
    rest = total - sum(seconds.values())
    print(f"  the rest (concatenation copies, affine + ReLU of block inputs, pooling, padding, tanh): "
          f"{rest:.2f} s ({100 * rest / total:.1f}%)")  # fmt: skip
    print(f"  (conv GFLOP: the fused convs' own work; up: upsampling incl. copying into the skip buffer; "
          f"{load()})")  # fmt: skip


def bench_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Best copy rate in GB/s (bytes read + written) of a large float32 tensor, all threads."""
    a = torch.randn(megabytes * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(repeats))
    return 2 * a.numel() * 4 / best / 1e9


def _timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ slices to use
_SLICE_CACHE = Path(tempfile.gettempdir()) / "cryosxt_bench_slice.npy"


def realistic_slices(height: int, width: int, count: int = 1) -> np.ndarray:
    """Middle slices of a simulated cryo-SXT tomogram (cryosxt_sim), else a smooth random texture."""
    cache = _SLICE_CACHE.with_name(f"{_SLICE_CACHE.stem}_{height}x{width}.npy")
    if cache.is_file():
        stack = np.load(cache)
    else:
        try:
            from cryosxt_sim.simulate import simulate_tomogram

            print(f"  (simulating an 8 x {height} x {width} tomogram for realistic slices, cached: {cache})")
            stack = simulate_tomogram((8, height, width), "bessy", seed=0).image[2:6]
        except Exception as err:  # the simulator is optional here
            print(f"  (simulator unavailable: {type(err).__name__}; using a smooth random texture)")
            rng = np.random.default_rng(0)
            noise = rng.normal(size=(4, height // 8 + 1, width // 8 + 1)).astype(np.float32)
            stack = np.repeat(np.repeat(noise, 8, axis=1), 8, axis=2)[:, :height, :width]
            stack = stack + 0.3 * rng.normal(size=stack.shape).astype(np.float32)
        np.save(cache, stack)
    return np.ascontiguousarray(stack[np.arange(count) % len(stack)])


# ------------------------------------------------------------------------------------------- (d) seams
def bench_seams(height: int, width: int, window: int, overlap: float) -> None:
    from monai.inferers import SlidingWindowInferer

    trained = TRAINED.is_file()
    header(f"seams: {window} px windows (overlap {overlap}, gaussian) vs the whole {height} x {width} slice")
    print(f"  weights: {'bundle/models/model.pt' if trained else 'random init (no trained weights found)'}")
    net = network(8)
    slices = realistic_slices(height, width, count=1)
    whole = SlicePredictor(net, max_window=2048).predict(slices).label
    inferer = SlidingWindowInferer(roi_size=(-1, -1), sw_batch_size=1, overlap=overlap, mode="gaussian")
    tiled = SlicePredictor(net, inferer=inferer, max_window=window).predict(slices).label
    # A random network's tanh may be < 0 everywhere: then also threshold at the whole slice's median.
    thresholds = [0.0] if trained else [0.0, float(whole.median())]
    for threshold in thresholds:
        differ = (whole > threshold) != (tiled > threshold)
        fg_whole = float((whole > threshold).float().mean())
        fg_tiled = float((tiled > threshold).float().mean())
        print(f"  threshold {threshold:+.4f}: foreground whole {fg_whole:.4f}, "
              f"tiled {fg_tiled:.4f}; mask differs on {int(differ.sum())} "
              f"of {differ.numel()} voxels ({100 * differ.float().mean():.3f}%)")  # fmt: skip
    print(f"  max |tanh difference| {(whole - tiled).abs().max().item():.3f}, "
          f"mean {(whole - tiled).abs().mean().item():.4f}")  # fmt: skip


# ------------------------------------------------------------------------------------- (c, e) memory
def write_mrc(path: Path, shape: tuple[int, int, int], slices: np.ndarray) -> None:
    """A float32 MRC written slice by slice through a memory map (never the whole volume in memory)."""
    import mrcfile

    with mrcfile.new_mmap(str(path), shape=shape, mrc_mode=2, overwrite=True) as mrc:
        for z in range(shape[0]):
            mrc.data[z] = slices[z % len(slices)][: shape[1], : shape[2]]
        mrc.voxel_size = 10.0


def run_inference(data: Path, out: Path, weights: Path, width: int, *extra: str) -> tuple[float, dict, int]:
    """(seconds, peak memory figures in MiB, return code) of the real bundle command.

    Peaks: ``rss`` (kernel's high-water mark of the whole resident set), ``anon`` (anonymous memory:
    what the process really holds) and ``file`` (pages of memory-mapped files, which the kernel can drop
    at any time), the last two sampled from /proc every 50 ms.
    """
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "inference",
        "--config_file", str(BUNDLE / "configs" / "inference.json"), "--dataset_dir", str(data),
        "--output_dir", str(out), "--weights", str(weights), "--width", str(width), *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        peaks = {"rss": 0.0, "anon": 0.0, "file": 0.0}
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            except (OSError, ValueError):
                break
            for key, name in (("rss", "VmHWM"), ("anon", "RssAnon"), ("file", "RssFile")):
                if name in fields:
                    peaks[key] = max(peaks[key], int(fields[name].split()[0]) / 1024)
            time.sleep(0.05)
        code = proc.wait()
        seconds = time.perf_counter() - start
        if code != 0:
            stderr.seek(0)
            print(stderr.read().decode(errors="replace")[-2000:])
    return seconds, peaks, code


def weights_file(folder: Path, width: int) -> Path:
    if width == 8 and TRAINED.is_file():
        return TRAINED
    path = folder / f"random_w{width}.pt"
    torch.save(network(width).state_dict(), path)
    return path


def bench_memory(counts: list[int], side: int, width: int) -> None:
    header(f"peak RSS of `monai.bundle run inference` vs depth ({side} x {side} float32 MRC, width {width})")
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp:
        tmp = Path(tmp)
        weights = weights_file(tmp, width)
        slices = realistic_slices(side, side, count=4)
        print(f"  {'slices':>6s} {'input MiB':>9s} {'seconds':>8s} {'slices/s':>8s} {'peak RSS':>8s} "
              f"{'anon':>6s} {'file':>6s}  (MiB)")  # fmt: skip
        peaks = []
        for count in counts:
            data, out = tmp / f"in_{count}", tmp / f"out_{count}"
            data.mkdir()
            write_mrc(data / "tomo.mrc", (count, side, side), slices)
            seconds, peak, code = run_inference(data, out, weights, width)
            size = count * side * side * 4 / 2**20
            peaks.append(peak["rss"])
            status = "" if code == 0 else f"  FAILED (exit {code})"
            print(f"  {count:6d} {size:9.1f} {seconds:8.1f} {count / seconds:8.2f} {peak['rss']:8.0f} "
                  f"{peak['anon']:6.0f} {peak['file']:6.0f}{status}")  # fmt: skip
        print(f"  peak RSS spread: {max(peaks) - min(peaks):.0f} MiB over a {counts[-1] / counts[0]:.0f}x "
              f"deeper input ({load()})")  # fmt: skip


def bench_big(depth: int, height: int, width_px: int, z_range: tuple[int, int] | None, width: int) -> None:
    nbytes = depth * height * width_px * 4
    header(f"big tomogram {depth} x {height} x {width_px} float32 ({nbytes / 2**30:.2f} GiB)")
    with tempfile.TemporaryDirectory(prefix="bench_big_") as tmp:
        tmp = Path(tmp)
        weights = weights_file(tmp, width)
        data = tmp / "in"
        data.mkdir()
        start = time.perf_counter()
        write_mrc(data / "big.mrc", (depth, height, width_px), realistic_slices(height, width_px, count=4))
        print(f"  written slice by slice in {time.perf_counter() - start:.0f} s")
        extra = ["--slice_range", f"[{z_range[0]},{z_range[1]}]"] if z_range else []
        seconds, peak, code = run_inference(data, tmp / "out", weights, width, *extra)
        done = (z_range[1] - z_range[0]) if z_range else depth
        print(f"  segmented {done} of {depth} slices in {seconds:.0f} s "
              f"({seconds / done:.2f} s/slice with start-up), exit {code}")  # fmt: skip
        if z_range:
            print(f"  whole tomogram estimate: {seconds / done * depth / 60:.0f} min")
        print(f"  peak RSS {peak['rss']:.0f} MiB (anonymous {peak['anon']:.0f}, "
              f"mapped files {peak['file']:.0f}) for a {nbytes / 2**20:.0f} MiB input "
              f"({load()})")  # fmt: skip


# ------------------------------------------------------------------------------------- (f) settings
SETTINGS = {
    "defaults": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    "both": {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"},
    "both, 1 thread": {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1", "OMP_NUM_THREADS": "1"},
}


def child_time(width: int, shape: tuple[int, ...], repeats: int) -> None:
    """Run in a fresh process (these settings are read at start-up): best fused forward time."""
    net = fuse_for_inference(network(width), reuse_buffers=True)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        net(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - start)
    print(f"CHILD {best}")


def bench_settings(width: int, size: tuple[int, int], rounds: int) -> None:
    """Process-level settings that can only be given at start-up, each in fresh processes, interleaved."""
    header(f"process settings, fused width {width}, {size[0]} x {size[1]} (fresh process each)")
    best: dict[str, float] = {}
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")}
    base.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, __file__, "--child", str(width), "--size", f"{size[0]}x{size[1]}"]
    for _ in range(rounds):
        for name, env in SETTINGS.items():
            result = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("CHILD")]
            if lines:
                best[name] = min(best.get(name, float("inf")), float(lines[0].split()[1]))
    for name, seconds in best.items():
        print(f"  {name:28s} {seconds:.3f} s/slice")
    print(f"  ({rounds} interleaved rounds, best of 2 forwards each; {load()})")


# ------------------------------------------------------------------------------------------------- main
def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--only",
        choices=["speed", "layers", "memory", "seams", "big"],
        action="append",
        help="run only these sections (repeatable); default: all but big",
    )
    parser.add_argument("--size", type=parse_size, default=(1328, 1296), help="slice HxW for speed")
    parser.add_argument("--widths", default="8,16,64", help="network widths for speed")
    parser.add_argument("--levels", default=",".join(LEVELS), help=f"optimisation levels among {LEVELS}")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per level (interleaved)")
    parser.add_argument("--wide-repeats", type=int, default=1, help="repeats for widths >= 32 (slow)")
    parser.add_argument("--wide-levels", default=None, help="levels for widths >= 32 (default: --levels)")
    parser.add_argument("--peak-size", type=int, default=4096, help="matrix side for the matmul peak")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-extras", action="store_true", help="skip the bf16 and predictor rows")
    parser.add_argument("--memory-slices", default="50,200,400", help="depths for the memory section")
    parser.add_argument("--memory-side", type=int, default=256, help="slice side for the memory section")
    parser.add_argument("--no-seams", action="store_true", help="skip the seam section")
    parser.add_argument("--seam-size", type=parse_size, default=(1328, 1296))
    parser.add_argument("--big", action="store_true", help="also the 400 x 1324 x 1284 tomogram")
    parser.add_argument("--big-shape", default="400,1324,1284")
    parser.add_argument("--big-range", default=None, help="z0,z1: segment only these slices of the big file")
    parser.add_argument("--settings-rounds", type=int, default=2, help="rounds of the process-settings A/B")
    parser.add_argument("--device", default="cpu", help="cuda: the GPU figures of bench/bench_gpu.py instead")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        import bench_gpu

        sys.argv = [sys.argv[0]]  # bench_gpu's own defaults: width 64, 350 x 1324 x 1284
        bench_gpu.main()
        return
    if args.child is not None:
        child_time(args.child, (1, 1, *args.size), repeats=2)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.only or ["speed", "layers", "memory", "seams"]) | ({"big"} if args.big else set())
    if args.no_seams:
        sections.discard("seams")
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; {load()}")  # fmt: skip

    if "speed" in sections:
        header(f"(a) float32 matmul peak: torch.mm {args.peak_size}^2, {torch.get_num_threads()} threads")
        peak = matmul_peak(args.peak_size, repeats=5)
        print(f"  peak {peak:.1f} GFLOP/s")
        height, width_px = args.size
        for width in (int(w) for w in args.widths.split(",")):
            wide = width >= 32
            levels = (args.wide_levels if wide and args.wide_levels else args.levels).split(",")
            repeats = args.wide_repeats if wide else args.repeats
            bench_width(width, (1, 1, height, width_px), levels, repeats, peak)
            again = matmul_peak(args.peak_size, repeats=3)
            print(f"  matmul peak re-measured: {again:.1f} GFLOP/s")
            peak = max(peak, again)
        print(f"  (percentages use the best peak seen so far: {peak:.1f} GFLOP/s)")
        if not args.no_extras:
            bench_bf16(8, (1, 1, height, width_px), repeats=2)
            bench_predictor(8, (2, 1, height, width_px), repeats=2)
            bench_settings(8, args.size, args.settings_rounds)
    if "layers" in sections:
        print(f"  memory copy bandwidth {bench_bandwidth():.1f} GB/s (read + write)")
        for width in (int(w) for w in args.widths.split(",")):
            bench_layers(width, (1, 1, *args.size))
    if "memory" in sections:
        bench_memory([int(c) for c in args.memory_slices.split(",")], args.memory_side, 8)
    if "seams" in sections:
        bench_seams(*args.seam_size, window=512, overlap=0.25)
    if "big" in sections:
        z_range = tuple(int(v) for v in args.big_range.split(",")) if args.big_range else None
        bench_big(*(int(v) for v in args.big_shape.split(",")), z_range, 8)


if __name__ == "__main__":
    main()
