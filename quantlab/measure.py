"""Measuring memory and time the same way on a CPU and on a CUDA GPU, and keeping the rows (every chapter).

Every measurement is a `Measurement` row that records the model, recipe, device, package
versions and date, with units in the field names. Rows become a pandas DataFrame, and are
saved to JSON or CSV; results from GPU runs live in `results/` in this form and load with
`load_results`. Error figures (PSNR, SSIM, SQNR, prompt accuracy) are in `quantlab.quality`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import env
from .env import GIB
from .files import atomic_output
from .quality import finite_outputs

__all__ = [
    "GIB",

    "Measurement",
    "TimingStats",
    "GenerationTiming",
    "PeakHostRSS",
    "new_row",
    "memory_after_load_gib",
    "reset_peak_gpu_memory",
    "peak_gpu_memory_gib",
    "track_peak_host_rss",
    "tensor_storage_bytes",
    "weights_bytes",
    "component_weights_bytes",
    "folder_bytes",
    "synchronize",
    "time_callable",
    "time_first_call",
    "time_generation",
    "to_frame",
    "save_rows",
    "json_default",
    "load_rows",
    "results_dir",
    "load_results",
    "peak_gpu_memory_per_device_gib",
    "projected_s_per_image",
    "require_columns",
    "record",
    "read_status_kib",
    "reset_peak_host_rss",
]

@dataclass
class Measurement:
    """One row of measurements. `None` means not measured (for example GPU memory on a CPU). Every chapter."""

    model: str
    recipe: str
    device: str
    versions: dict[str, str]
    date: str
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    mem_after_load_gib: float | None = None
    peak_gpu_mem_gib: float | None = None
    peak_host_rss_gib: float | None = None
    weights_bytes: int | None = None
    ms_per_step: float | None = None
    ms_per_step_iqr: float | None = None
    s_per_image: float | None = None
    s_per_image_iqr: float | None = None
    repeats: int | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    prompt_accuracy: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def new_row(model: str, recipe: str, device: str | env.DeviceInfo | None = None, **values: Any) -> Measurement:
    """A `Measurement` stamped with the device, package versions and today's date (UTC). Every chapter."""
    info = device if isinstance(device, env.DeviceInfo) else env.device_info(device)
    return Measurement(
        model=model,
        recipe=recipe,
        device=info.label,
        versions=env.package_versions(),
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        **values,
    )


# --- memory -----------------------------------------------------------------------------------


def _plain_tensors(tensor: torch.Tensor):
    """The plain tensors that hold `tensor`'s data: itself, or the inner tensors of a quantized subclass."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        for name in tensor.__tensor_flatten__()[0]:
            yield from _plain_tensors(getattr(tensor, name))
    else:
        yield tensor


def _beside_bytes(tensor: torch.Tensor) -> int:
    """Bytes that bitsandbytes keeps beside a plain tensor's elements: `quant_state` (4-bit) or `SCB` (8-bit)."""
    total = 0
    state = getattr(tensor, "quant_state", None)
    if state is not None:  # bitsandbytes 4-bit: absmax, the code table and, nested, their own state
        total += _bnb_state_bytes(state)
    scb = getattr(tensor, "SCB", None)
    if isinstance(scb, torch.Tensor):  # bitsandbytes 8-bit: one fp32 scale per row
        total += scb.numel() * scb.element_size()
    return total


def tensor_storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really stores, looking inside quantized tensor subclasses.

    torchao and quanto tensors are wrapper subclasses whose `numel() * element_size()` is the
    logical (unquantized) size; their inner tensors hold the packed data and scales.
    bitsandbytes keeps its scales beside the packed weight, in `quant_state` (4-bit) or `SCB`
    (8-bit). Chapters 01, 03.
    """
    return sum(plain.numel() * plain.element_size() + _beside_bytes(plain) for plain in _plain_tensors(tensor))


def _bnb_state_bytes(state) -> int:
    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _bnb_state_bytes(nested)
    return total


def _memory_span(plain: torch.Tensor) -> tuple[int, int, int]:
    """(storage, first byte, end byte) of the memory a plain tensor reaches."""
    size = plain.element_size()
    if plain.device.type == "meta" or plain.numel() == 0:  # no memory to share: a span of its own
        return id(plain), 0, plain.numel() * size
    start = plain.storage_offset() * size
    reach = sum((length - 1) * stride for length, stride in zip(plain.shape, plain.stride())) + 1
    return plain.untyped_storage().data_ptr(), start, start + reach * size


def weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers as stored, counting quantized storage.

    Memory is counted once however many tensors view it: `parameters()` and `buffers()` yield a
    shared (tied) tensor once, and a buffer that views a weight's memory (as chapter 06's kernels
    keep them, `speed._keep_fp8_operands`) adds nothing.
    """
    plains = [plain for tensor in [*module.parameters(), *module.buffers()] for plain in _plain_tensors(tensor)]
    spans = {}
    for storage, start, end in map(_memory_span, plains):
        spans.setdefault(storage, []).append((start, end))
    total = 0
    for ranges in spans.values():  # the union of each storage's byte ranges
        reached = 0
        for start, end in sorted(ranges):
            total += max(0, end - max(start, reached))
            reached = max(reached, end)
    # bitsandbytes 8-bit: after the first forward pass the row scales move from `weight.SCB` to the layer's `state`
    moved = [m.state.SCB for m in module.modules() if isinstance(getattr(getattr(m, "state", None), "SCB", None),
                                                                  torch.Tensor) and getattr(m.weight, "SCB", None) is None]
    return total + sum(map(_beside_bytes, plains)) + sum(scb.numel() * scb.element_size() for scb in moved)


def component_weights_bytes(pipe) -> dict[str, int]:
    """`weights_bytes` of every `nn.Module` component of a pipeline. Chapters 00, 01, 02, 07, 08."""
    return {name: weights_bytes(c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def folder_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under `path`, in bytes: a checkpoint's size on disk. Chapters 01, 03, 04, 08."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _device_type(device: str | torch.device | None) -> str:
    return torch.device(device or env.default_device()).type


def memory_after_load_gib(pipe=None, device: str | None = None) -> float:
    """Memory held after loading, in GiB.

    On CUDA: `torch.cuda.memory_allocated()`, everything PyTorch holds on the GPU. On a CPU
    there is no separate device memory, so it is the bytes of the pipeline's weights in RAM. Chapters 00, 02, 07, 08.
    """
    if _device_type(device) == "cuda":
        synchronize(device)
        return torch.cuda.memory_allocated() / GIB
    if pipe is None:
        raise ValueError("On a CPU, memory_after_load_gib needs the pipeline: memory_after_load_gib(pipe).")
    return sum(component_weights_bytes(pipe).values()) / GIB


def reset_peak_gpu_memory(device: str | None = None) -> None:
    """Free cached blocks and restart the peak counter (no-op on a CPU). Chapters 00, 02, 05, 07, 08."""
    gc.collect()
    if _device_type(device) == "cuda":
        torch.cuda.empty_cache()
        for index in range(torch.cuda.device_count()):  # every GPU, for pipelines spread over several
            torch.cuda.reset_peak_memory_stats(index)


def peak_gpu_memory_gib(device: str | None = None, reserved: bool = True) -> float | None:
    """Peak GPU memory since the last reset, in GiB; None on a CPU.

    `reserved=True` (the default) counts what PyTorch's caching allocator took from the GPU,
    fragmentation included: what must fit on the card, and what the HF blog reports.
    `reserved=False` counts only the bytes held by live tensors. Chapters 00, 02, 05, 07, 08.
    """
    if _device_type(device) != "cuda":
        return None
    synchronize(device)
    peak = torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()
    return peak / GIB


def peak_gpu_memory_per_device_gib(device: str | None = None, reserved: bool = True) -> list[float] | None:
    """Peak memory of every visible GPU since the last reset, in GiB, GPU 0 first; None on a CPU.
    Chapters 02, 05, 07, 08."""
    if _device_type(device) != "cuda":
        return None
    peaks = []
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)
        peaks.append((torch.cuda.max_memory_reserved(index) if reserved else torch.cuda.max_memory_allocated(index)) / GIB)
    return peaks


@dataclass
class PeakHostRSS:
    """The result of `track_peak_host_rss`: peak resident memory of this process inside the block.
    Chapters 00, 02, 07, 08."""

    gib: float | None = None
    method: str = ""


def read_status_kib(*keys: str) -> dict[str, int]:
    """The named fields of /proc/self/status (VmRSS, RssAnon, VmHWM, ...) in KiB; those it lacks are left out.
    Chapters 00, 02, 07, 08."""
    values = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values


def reset_peak_host_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS; False where the system cannot.
    Chapters 00, 02, 07, 08."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return "VmHWM" in read_status_kib("VmHWM")


@contextlib.contextmanager
def track_peak_host_rss(sample_interval_s: float = 0.005) -> Iterator[PeakHostRSS]:
    """Measure the peak host RSS (resident memory) of this process while the block runs.

    On Linux the kernel tracks the peak itself (VmHWM), and writing 5 to /proc/self/clear_refs
    resets it, so the figure is exact. Elsewhere a thread samples RSS every few milliseconds. Chapters 00, 02, 07, 08.
    """
    result = PeakHostRSS()
    gc.collect()
    if reset_peak_host_rss():
        yield result
        result.gib = read_status_kib("VmHWM")["VmHWM"] * 1024 / GIB
        result.method = "VmHWM (kernel peak, reset by /proc/self/clear_refs)"
        return

    import psutil  # only needed where /proc/self/clear_refs is missing (macOS, Windows)

    process, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(sample_interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        result.gib = peak[0] / GIB
        result.method = f"psutil RSS sampled every {sample_interval_s * 1000:.0f} ms"


# --- time -------------------------------------------------------------------------------------


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued GPU work to finish, so that a timer reads the real end (no-op on a CPU). Every chapter."""
    if _device_type(device) == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class TimingStats:
    """Median and interquartile range of repeated timings, in seconds. Every chapter."""

    median_s: float
    iqr_s: float
    min_s: float
    max_s: float
    repeats: int

    @classmethod
    def of(cls, samples_s: Iterable[float]) -> TimingStats:
        """Summarize a list of timings in seconds."""
        samples = sorted(samples_s)
        if not samples:
            raise ValueError("TimingStats needs at least one sample.")
        if len(samples) >= 2:
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        else:
            q1 = q3 = samples[0]
        return cls(statistics.median(samples), q3 - q1, samples[0], samples[-1], len(samples))


def time_callable(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3,
                  device: str | None = None) -> TimingStats:
    """Time `fn()`: `warmup` untimed calls, then `repeats` timed ones, synchronizing around each.
    Chapters 01, 02, 03, 04, 05, 06, 08."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return TimingStats.of(samples)


def time_first_call(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3,
                    device: str | None = None) -> tuple[Any, float, TimingStats]:
    """`fn()`'s first result and seconds (which include any compiling), then its steady timing.

    The first call is timed alone, because for a compiled model it is compile time plus one run. Chapters 03, 06.
    """
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    first_call_s = time.perf_counter() - start
    return result, first_call_s, time_callable(fn, warmup=warmup, repeats=repeats, device=device)


@dataclass
class GenerationTiming:
    """Time per image and per denoising step, with the images generated (one per timed repeat).
    Chapters 00, 02, 05, 07, 08."""

    per_image: TimingStats
    per_step: TimingStats
    images: list

    @property
    def image(self):
        """The last image generated."""
        return self.images[-1]


def time_generation(pipe, prompt: str | Sequence[str], call_kwargs: dict[str, Any], seed: int = 0, warmup: int = 1,
                    repeats: int = 3, device: str | None = None) -> GenerationTiming:
    """Generate `warmup + repeats` images from the same seed and time them.

    `prompt` may be a list: timed image i then uses `prompt[i % len(prompt)]`, so `repeats=len(prompt)`
    generates one image per prompt (the warm-up images use the first). A non-finite output of the transformer,
    T5 or the VAE raises `NonFiniteError` (`finite_outputs`). Per-step times come from a
    `callback_on_step_end` that synchronizes and reads the clock after every denoising step; the first
    step of each image is left out, since it includes the prompt encoding that precedes it. Chapters 00, 02, 05, 07, 08.
    """
    device = device or str(getattr(pipe, "_execution_device", None) or env.default_device())
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("time_generation needs a prompt, or a list of at least one.")
    step_ends: list[float] = []

    def on_step_end(_pipe, _step, _timestep, callback_kwargs):
        synchronize(device)
        step_ends.append(time.perf_counter())
        return callback_kwargs

    def generate(text: str):
        step_ends.clear()
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(text, generator=generator, callback_on_step_end=on_step_end, **call_kwargs).images[0]

    per_image, per_step, images = [], [], []
    with finite_outputs(pipe):
        for _ in range(warmup):
            generate(prompts[0])
        for index in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            images.append(generate(prompts[index % len(prompts)]))
            synchronize(device)
            per_image.append(time.perf_counter() - start)
            per_step += list(np.diff(step_ends))
    if not per_step:  # a single step per image: fall back to whole-image time
        per_step = per_image
    return GenerationTiming(TimingStats.of(per_image), TimingStats.of(per_step), images)


# --- results ----------------------------------------------------------------------------------


def to_frame(rows: Iterable[Measurement | dict]):
    """A pandas DataFrame with one row per measurement. Every chapter."""
    import pandas as pd

    return pd.DataFrame([asdict(r) if isinstance(r, Measurement) else dict(r) for r in rows])


def require_columns(frame, *columns: str) -> None:
    """Raise `ValueError` naming the first of `columns` that `frame` lacks, and the columns it has. Every chapter."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"No column {missing[0]!r}. Columns: {', '.join(frame.columns)}.")


def save_rows(rows: Iterable[Measurement | dict], path: str | os.PathLike) -> Path:
    """Save rows to `path`: JSON (a list of objects) or CSV, by the file suffix. Every chapter."""
    path = Path(path)
    if path.suffix not in (".json", ".csv"):
        raise ValueError(f"Cannot save rows to {path.name}: use a .json or .csv file.")
    records = [asdict(r) if isinstance(r, Measurement) else dict(r) for r in rows]
    with atomic_output(path) as partial:  # a killed run leaves the previous file, not half of a new one
        if path.suffix == ".json":
            partial.write_text(json.dumps(records, indent=2, default=json_default) + "\n")
        else:
            to_frame(records).to_csv(partial, index=False)
    return path


def json_default(value):
    """`json.dumps(default=...)` for what rows hold besides plain values: numpy numbers, dtypes, paths.
    Every chapter."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def load_rows(path: str | os.PathLike) -> list[Measurement]:
    """Read rows saved by `save_rows` (JSON) back into `Measurement` objects. Every chapter."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}). Re-run the benchmark that wrote it.") from error
    known = {f.name for f in fields(Measurement)}
    return [Measurement(**{k: v for k, v in r.items() if k in known}) for r in records]


def projected_s_per_image(row: Measurement | dict, steps: int = 50) -> float | None:
    """Seconds per image at `steps` denoising steps, from a row measured at fewer or more steps.

    The row's own seconds per image, plus (or minus) its median ms per step for each step it lacks:
    an estimate, used to put slow recipes measured with few steps beside 50-step figures. Chapters 05, 07.
    """
    get = row.get if isinstance(row, dict) else lambda name: getattr(row, name)
    s_per_image, ms_per_step, row_steps = get("s_per_image"), get("ms_per_step"), get("steps")
    if s_per_image is None or ms_per_step is None or row_steps is None:
        return None
    return s_per_image + (steps - row_steps) * ms_per_step / 1000


def results_dir() -> Path:
    """The repository's `results/` folder, where GPU measurements are committed. Every chapter."""
    return Path(os.environ.get("QUANTLAB_RESULTS") or Path(__file__).resolve().parent.parent / "results")


def load_results(name: str):
    """The committed GPU results `results/<name>.json` as a DataFrame. Chapters 00, 01, 02, 03, 04, 05, 08."""
    path = results_dir() / f"{name}.json"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in results_dir().glob("*.json"))) or "none"
        raise FileNotFoundError(f"No committed results named {name!r} in {results_dir()}. Available: {available}.")
    return to_frame(load_rows(path))


def record(rows: Iterable[Measurement], chapter: str):
    """Return the rows as a DataFrame, and when `$QUANTLAB_RUN_DIR` is set, also save them there.

    `make course` sets that variable, then gathers every chapter's rows into one summary.
    """
    rows = list(rows)
    run_dir = os.environ.get("QUANTLAB_RUN_DIR")
    if run_dir:
        save_rows(rows, Path(run_dir) / "measurements" / f"{chapter}.json")
    return to_frame(rows)

