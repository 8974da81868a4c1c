"""The simulated Colab T4: `python -m quantlab.lab.t4`, how results/09_colab_t4_sim_flux-dev-shaped.json is made.

A free Colab runtime has a T4 (15 GiB, compute capability 7.5: fp16, no bf16, no fp8) and 12.7 GB (11.8 GiB)
of host RAM. Each low-RAM recipe's whole script (`Recipe.code`: the learner's code, the same the Colab copies
show as cells) runs in a fresh process on a bigger GPU capped to the T4's memory
(`torch.cuda.set_per_process_memory_fraction`), in fp16, part by part. For each part the child records its
seconds, its peak GPU memory (reserved and allocated) and its peak host memory: VmRSS and RssAnon of
/proc/self/status sampled every 20 ms. safetensors files are memory-mapped, so VmRSS also counts file pages the
kernel can drop at any time; RssAnon counts what it cannot drop, which is what runs a Colab runtime out of
memory, so the host verdict uses RssAnon. Where the machine delegates a cgroup v2 memory controller, the
host limit is enforced too (`--enforce-host-limit`).

    python -m quantlab.lab.t4 --model flux-dev-shaped --recipes nf4-encode-then-free quanto-int8-encode-then-free \\
        --vram-gib 15 --steps 4 --gguf-dir /tmp/gguf --out results/09_colab_t4_sim_flux-dev-shaped.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .. import env, gguf, measure, models, recipes
from . import t4_plan
from ..env import GIB
from .runner import Scenario, failure_row, run_scenarios

__all__ = ["HostMemorySampler", "run_script", "simulate", "main"]

HOST_LIMIT_GIB = 12.0  # the verdict's bound: a free runtime's 11.8 GiB, rounded up as the committed runs used it


class HostMemorySampler:
    """Peak host memory of this process, per stage: VmRSS and RssAnon read every `interval_s` by a thread.

    Use as a context manager and set `stage` as the work moves on; `peaks_gib(stage)` gives (VmRSS,
    RssAnon) maxima. `hwm_gib` is the kernel's own exact VmRSS peak (VmHWM) at exit, which a sampler cannot
    miss; there is no such counter for RssAnon. Works where /proc/self/status exists (Linux).
    """

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.stage = "start"
        self._peaks: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hwm_gib: float | None = None
        self.samples = 0

    @property
    def available(self) -> bool:
        """Whether this system reports VmRSS and RssAnon."""
        return len(measure.read_status_kib("VmRSS", "RssAnon")) == 2

    def sample(self) -> tuple[int, int] | None:
        """Read VmRSS and RssAnon now (KiB) and fold them into the current stage's peaks."""
        values = measure.read_status_kib("VmRSS", "RssAnon")
        if len(values) < 2:
            return None
        rss, anon = values["VmRSS"], values["RssAnon"]
        peak = self._peaks.setdefault(self.stage, [0, 0])
        peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
        self.samples += 1
        return rss, anon

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> HostMemorySampler:
        if not self.available:
            raise RuntimeError("HostMemorySampler reads /proc/self/status (VmRSS, RssAnon), which this system lacks.")
        measure.reset_peak_host_rss()  # restart VmHWM, so that it covers this block only
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="host-memory-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        hwm = measure.read_status_kib("VmHWM").get("VmHWM")
        self.hwm_gib = None if hwm is None else hwm * 1024 / GIB

    def peaks_gib(self, stage: str | None = None) -> tuple[float, float]:
        """(VmRSS, RssAnon) peak in GiB, of one stage or (`stage=None`) of all of them."""
        if stage is not None and stage not in self._peaks:
            raise KeyError(f"No samples for stage {stage!r}. Stages: {', '.join(self._peaks)}.")
        peaks = [self._peaks[stage]] if stage is not None else list(self._peaks.values())
        return max(p[0] for p in peaks) * 1024 / GIB, max(p[1] for p in peaks) * 1024 / GIB


def _step_timer(step_ends: list[float], cuda: bool):
    """A FluxPipeline.__call__ that records the end of every denoising step (the script's own call, unchanged)."""
    from diffusers import FluxPipeline

    original = FluxPipeline.__call__

    @functools.wraps(original)
    def call(self, *args, **kwargs):
        def on_step_end(_pipe, _step, _timestep, callback_kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())
            return callback_kwargs

        kwargs.setdefault("callback_on_step_end", on_step_end)
        return original(self, *args, **kwargs)

    return original, call


def run_script(recipe: recipes.Recipe, settings: dict[str, Any], *, prepare: bool = False) -> dict[str, Any]:
    """Run `recipe`'s whole script part by part in one namespace (as notebook cells run), measuring each part.

    With `prepare`, the recipe's `low_ram.prepare` parts run instead (writing its pre-quantized checkpoint).
    Returns each part's seconds and peaks, the step times, and the error and the part it stopped in, if any.
    """
    from diffusers import FluxPipeline

    cuda = settings["DEVICE"].startswith("cuda")
    parts = recipe.low_ram.prepare if prepare else recipe.script
    namespace: dict[str, Any] = {"torch": torch, **settings}
    result: dict[str, Any] = {"stages": {}, "step_times_s": [], "error": None, "failed_stage": None}
    step_ends: list[float] = []
    original, timed = _step_timer(step_ends, cuda)
    FluxPipeline.__call__ = timed
    try:
        with HostMemorySampler() as sampler:
            result["host_anon_baseline_gib"] = sampler.peaks_gib("start")[1]
            for part in parts:
                sampler.stage = part
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                try:
                    source = (recipes.SCRIPTS_DIR / part).read_text()
                    exec(compile(source, str(recipes.SCRIPTS_DIR / part), "exec"), namespace)  # noqa: S102
                    if cuda:
                        torch.cuda.synchronize()
                except Exception as error:  # out of GPU memory, say: what was measured until then is kept
                    result.update(error=f"{type(error).__name__}: {error}"[:1500], failed_stage=part)
                sampler.sample()
                rss, anon = sampler.peaks_gib(part)
                result["stages"][part] = {
                    "seconds": time.perf_counter() - started, "host_rss_gib": rss, "host_anon_gib": anon,
                    "gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
                    "gpu_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None}
                if result["error"]:
                    break
        result["peak_host_hwm_gib"] = sampler.hwm_gib
    finally:
        FluxPipeline.__call__ = original
    step_times = [b - a for a, b in zip(step_ends, step_ends[1:])]
    result["step_times_s"] = step_times
    result["image"] = namespace.get("image")
    result["pipe"] = namespace.get("pipe")
    return result


def _child(args: argparse.Namespace) -> int:
    """One recipe in this process; its row goes to `args.row_out`."""
    recipe = recipes.get_recipe(args.one)
    if args.vram_gib and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(args.vram_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    settings = {**recipes.SCRIPT_SETTINGS, **dict(recipe.script_settings), "MODEL_ID": models.model_path(args.model),
                "HEIGHT": args.height, "WIDTH": args.width, "STEPS": args.steps, "DEVICE": args.device,
                "MAX_SEQUENCE_LENGTH": models.get_model(args.model).max_sequence_length,
                "DTYPE": getattr(torch, args.dtype), **json.loads(args.settings)}
    if recipe.low_ram.prequantized and not Path(settings["NF4_CHECKPOINT"], "transformer").is_dir():
        prepared = run_script(recipe, settings, prepare=True)
        if prepared["error"]:
            raise RuntimeError(f"writing the pre-quantized checkpoint failed in {prepared['failed_stage']}: "
                               f"{prepared['error']}")
        torch.cuda.empty_cache()
    result = run_script(recipe, settings)
    stages = result["stages"]
    reserved = [s["gpu_reserved_gib"] for s in stages.values() if s["gpu_reserved_gib"] is not None]
    steps = result["step_times_s"]
    row = measure.new_row(
        args.model, recipe.name, args.device, height=args.height, width=args.width, steps=args.steps,
        peak_gpu_mem_gib=max(reserved, default=None),
        peak_host_rss_gib=max(s["host_rss_gib"] for s in stages.values()),
        ms_per_step=statistics.median(steps) * 1e3 if steps else None, repeats=1,
        notes=f"{args.model}, {args.height}x{args.width}, {args.steps} steps, {args.dtype}, GPU capped at "
              f"{args.vram_gib} GiB; the recipe's whole script, part by part")
    anon = max(s["host_anon_gib"] for s in stages.values())
    vram_ok = (row.peak_gpu_mem_gib is not None and row.peak_gpu_mem_gib <= (args.vram_gib or env.COLAB_T4_GPU_GIB)
               if args.device.startswith("cuda") else None)  # a CPU run (the tests') has no GPU memory to judge
    weights = measure.component_weights_bytes(result["pipe"]) if result.get("pipe") is not None else {}
    row.weights_bytes = sum(weights.values()) or None
    row.extra.update(
        dtype=args.dtype, step_times_s=steps, stages=stages, error=result["error"], failed_stage=result["failed_stage"],
        peak_gpu_allocated_gib=max((s["gpu_allocated_gib"] or 0) for s in stages.values()),
        peak_host_anon_gib=anon, peak_host_hwm_gib=result["peak_host_hwm_gib"],
        host_anon_baseline_gib=result["host_anon_baseline_gib"], vram_cap_gib=args.vram_gib,
        host_limit_gib=args.host_limit_gib, host_ok=anon <= args.host_limit_gib, vram_ok=vram_ok,
        passed=anon <= args.host_limit_gib and vram_ok is not False and result["error"] is None,
        host_verdict_uses="RssAnon (file-backed pages of memory-mapped safetensors can be dropped)",
        peak_host_rss_method="VmRSS and RssAnon from /proc/self/status every 20 ms; VmHWM at the end",
        t4_estimate_s_per_step=t4_plan.t4_estimate(recipe, args.height, args.width).s_per_step)
    measure.save_rows([row], args.row_out)
    return 0


def _memory_cgroup(limit_gib: float) -> tuple[Path | None, str]:
    """A cgroup v2 child of this process's cgroup with memory.max = `limit_gib`, if the memory controller is
    already delegated to children here; else None and why. Nothing else is moved or changed."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = [line for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")]
        if not lines:
            return None, "this machine has cgroup v1, not v2"
        parent = root / lines[0].removeprefix("0::").lstrip("/")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            return None, f"the memory controller is not enabled for children of {parent}"
        child = parent / f"quantlab-host-limit-{os.getpid()}"
        child.mkdir(exist_ok=True)
        (child / "memory.max").write_text(str(int(limit_gib * GIB)))
        if (child / "memory.swap.max").exists():
            (child / "memory.swap.max").write_text("0")
        return child, f"memory.max = {limit_gib} GiB (cgroup v2 {child}), swap 0"
    except OSError as error:
        return None, f"no writable cgroup v2 memory controller ({type(error).__name__}: {error})"


def simulate(args: argparse.Namespace, name: str, cgroup: Path | None, how: str) -> measure.Measurement:
    """Run recipe `name` in a fresh child process (in `cgroup`, if any) and return its row, or a failure row."""
    settings = {}
    recipe = recipes.get_recipe(name)
    if recipe.gguf_type:  # a local file stands for the Hub's, written from the same model
        settings["GGUF_FILE"] = str(gguf.write_model_file(args.model, recipe.gguf_type, args.gguf_dir)[0])
    if recipe.low_ram.prequantized:
        settings["NF4_CHECKPOINT"] = args.nf4_dir
    argv = ["--one", name, "--model", args.model, "--height", str(args.height), "--width", str(args.width),
            "--steps", str(args.steps), "--host-limit-gib", str(args.host_limit_gib), "--settings", json.dumps(settings),
            "--device", args.device, "--dtype", args.dtype]
    argv += ["--vram-gib", str(args.vram_gib)] if args.vram_gib else []
    with tempfile.TemporaryDirectory() as tmp:
        row_out = Path(tmp) / "row.json"
        started = time.perf_counter()
        join = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
        try:
            done = subprocess.run([sys.executable, "-m", "quantlab.lab.t4", *argv, "--row-out", str(row_out)],
                                  capture_output=True, text=True, timeout=args.timeout_s, preexec_fn=join)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired:
            code, output = -9, f"killed after {args.timeout_s:.0f} s"
        if row_out.exists():
            row = measure.load_rows(row_out)[0]
        else:
            lines = [line for line in output.splitlines() if line.strip()]
            row = failure_row(args.model, name, args.device, RuntimeError(f"exit code {code}: " + " | ".join(lines[-3:])))
            row.extra.update(passed=False, host_limit_gib=args.host_limit_gib, vram_limit_gib=args.vram_gib)
    row.extra.update(process_s=time.perf_counter() - started, exit_code=code, host_limit_enforced=cgroup is not None,
                     host_limit_how=how)
    return row


def main(argv: list[str] | None = None) -> int:
    """Command line: run low-RAM recipes, each in a fresh process, one row each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-dev-shaped", help=f"one of: {', '.join(models.MODELS)}")
    parser.add_argument("--recipes", nargs="+", help="low-RAM recipes: "
                        + ", ".join(n for n, r in recipes.RECIPES.items() if r.low_ram))
    parser.add_argument("--out", help="a .json file of rows; rows of other names already in it stay")
    parser.add_argument("--vram-gib", type=float, default=env.COLAB_T4_GPU_GIB, help="GPU memory PyTorch may take")
    parser.add_argument("--host-limit-gib", type=float, default=HOST_LIMIT_GIB, help="the host RAM verdict (RssAnon)")
    parser.add_argument("--enforce-host-limit", action="store_true",
                        help="run each recipe in a cgroup with memory.max = --host-limit-gib, where possible")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--gguf-dir", default=tempfile.gettempdir(), help="where GGUF recipes' files are written")
    parser.add_argument("--nf4-dir", default=os.path.join(tempfile.gettempdir(), "flux-nf4"),
                        help="where nf4-prequantized saves and reads its NF4 transformer")
    parser.add_argument("--timeout-s", type=float, default=900, help="per recipe process")
    parser.add_argument("--device", default="cuda", help="'cpu' runs the CPU-capable scripts here (the tests do)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # inside a child process: run this recipe
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return _child(args)
    if not args.recipes or not args.out:
        parser.error("--recipes and --out are needed")
    for name in args.recipes:  # every check before any load
        recipe = recipes.get_recipe(name)
        if recipe.low_ram is None:
            parser.error(f"{name!r} is not a low-RAM recipe")
        if args.device.startswith("cuda"):
            recipe.check(env.device_info(args.device), getattr(torch, args.dtype))
        else:  # a CPU runs the scripts whose backend runs there
            env.check_hardware(name, recipe.backend_needs, env.device_info(args.device))
    cgroup, how = _memory_cgroup(args.host_limit_gib) if args.enforce_host_limit else (None, "not asked for")
    scenarios = [Scenario(name, functools.partial(simulate, args, name, cgroup, how)) for name in args.recipes]
    run_scenarios(scenarios, args.out, model=args.model)
    if cgroup is not None:
        try:
            cgroup.rmdir()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
