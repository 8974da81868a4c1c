"""torchao's Linear quantization configs, probed live, each in a process of its own (chapter 03's exercises).

Some configs fail here with a clean Python error (a CUDA-only kernel, a missing optional
package); some combinations can crash the interpreter itself (torch 2.13's int8 weight-only CPU kernel,
which compiled torchao models call, reads its input with aligned loads and dies on a misaligned one). So
`capability_table` runs the configs in a worker process: a Python error becomes a row that says why,
and a crash becomes a row that names the signal, while the caller goes on.

    python -m quantlab.lab.torchao_probe [--model mini] [--compile] [CONFIG ...]

probes the named configs of `LINEAR_CONFIGS` (all by default) on the model's transformer, against its bf16 output on
the inputs of one denoising step, and prints one line a config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "LinearConfig",
    "LINEAR_CONFIGS",
    "installed_configs",
    "capability_table",
    "probe_configs",
]


@dataclass(frozen=True)
class LinearConfig:
    """A named way to build one torchao config for Linear layers."""

    name: str
    build: Callable[[], Any]
    kind: str  # "weight-only", "dynamic activation", "static activation"
    note: str = ""


def _config(class_name: str, **kwargs) -> Callable[[], Any]:
    def build():
        import torchao.quantization as quantization

        value = {k: v() if callable(v) else v for k, v in kwargs.items()}
        return getattr(quantization, class_name)(**value)

    build.__qualname__ = f"{class_name}({', '.join(f'{k}=...' for k in kwargs)})"
    return build


def _granularity(name: str) -> Callable[[], Any]:
    def build():
        import torchao.quantization as quantization

        return getattr(quantization, name)()

    return build


def _int4_format(name: str) -> Callable[[], Any]:
    def build():
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

        return Int4PackingFormat(name)

    return build


# The configs the chapter measures, in the order of the table.
LINEAR_CONFIGS: tuple[LinearConfig, ...] = (
    LinearConfig("Int8WeightOnlyConfig()", _config("Int8WeightOnlyConfig"), "weight-only"),
    LinearConfig("Int8DynamicActivationInt8WeightConfig()", _config("Int8DynamicActivationInt8WeightConfig"),
                 "dynamic activation"),
    LinearConfig("Int4WeightOnlyConfig(group_size=128), plain", _config(
        "Int4WeightOnlyConfig", group_size=128, int4_packing_format=_int4_format("plain")), "weight-only"),
    LinearConfig("Int4WeightOnlyConfig(group_size=128), tile_packed_to_4d", _config(
        "Int4WeightOnlyConfig", group_size=128, int4_packing_format=_int4_format("tile_packed_to_4d")),
        "weight-only"),
    LinearConfig("Int4WeightOnlyConfig(group_size=128), plain_int32", _config(
        "Int4WeightOnlyConfig", group_size=128, int4_packing_format=_int4_format("plain_int32")), "weight-only"),
    LinearConfig("Int4WeightOnlyConfig(group_size=128), preshuffled", _config(
        "Int4WeightOnlyConfig", group_size=128, int4_packing_format=_int4_format("preshuffled")), "weight-only"),
    LinearConfig("Float8WeightOnlyConfig()", _config("Float8WeightOnlyConfig"), "weight-only"),
    LinearConfig("Float8DynamicActivationFloat8WeightConfig(PerTensor())", _config(
        "Float8DynamicActivationFloat8WeightConfig", granularity=_granularity("PerTensor")), "dynamic activation"),
    LinearConfig("Float8DynamicActivationFloat8WeightConfig(PerRow())", _config(
        "Float8DynamicActivationFloat8WeightConfig", granularity=_granularity("PerRow")), "dynamic activation"),
    LinearConfig("Float8DynamicActivationInt4WeightConfig()", _config("Float8DynamicActivationInt4WeightConfig"),
                 "dynamic activation"),
    LinearConfig("IntxWeightOnlyConfig()", _config("IntxWeightOnlyConfig"), "weight-only",
                 "int8 weights by default; weight_dtype=torch.int1..int7 for fewer bits"),
    LinearConfig("Int8DynamicActivationIntxWeightConfig()", _config("Int8DynamicActivationIntxWeightConfig"),
                 "dynamic activation"),
    LinearConfig("Float8StaticActivationFloat8WeightConfig()", _config("Float8StaticActivationFloat8WeightConfig"),
                 "static activation", "needs an activation scale from calibration"),
    LinearConfig("Int8StaticActivationInt8WeightConfig()", _config("Int8StaticActivationInt8WeightConfig"),
                 "static activation", "needs an activation scale from calibration"),
)

def installed_configs() -> list[str]:
    """Every config class the installed `torchao.quantization` exports (subclasses of `AOBaseConfig`)."""
    import torchao.quantization as quantization
    from torchao.core.config import AOBaseConfig

    return sorted(
        name for name in dir(quantization)
        if isinstance(getattr(quantization, name), type) and issubclass(getattr(quantization, name), AOBaseConfig)
        and getattr(quantization, name) is not AOBaseConfig
    )


# --- the worker ---------------------------------------------------------------------------------


def _probe_one(config: LinearConfig, model_path: str, device: str, inputs: dict, reference: torch.Tensor,
               compile: bool, repeats: int) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel, TorchAoConfig

    from quantlab import measure, quality

    row: dict[str, Any] = {"config": config.name, "kind": config.kind}
    started = time.perf_counter()
    model = FluxTransformer2DModel.from_pretrained(
        model_path, subfolder="transformer", quantization_config=TorchAoConfig(config.build()), dtype=torch.bfloat16,
        device_map=device,
    )
    row["load_s"] = time.perf_counter() - started
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in linears if type(m.weight) is not torch.nn.Parameter]
    row["quantized_linears"] = len(quantized)
    row["weight_type"] = type(quantized[0].weight).__name__ if quantized else "none"
    row["quantized_linear_bytes"] = sum(measure.tensor_storage_bytes(m.weight) for m in quantized)
    row["bf16_linear_bytes"] = sum(2 * m.weight.numel() for m in quantized)
    row["transformer_bytes"] = measure.weights_bytes(model)
    if compile:  # the eager output first, to check the compiled one against
        with torch.no_grad():
            eager = model(**inputs)[0]
        # inductor keeps fp32 where eager rounds to bf16 and back: FLUX.1's `guidance * 1000` is 3504 eagerly in bf16
        # and 3500 compiled, which moves every output (chapter 03); emulating the casts compiles what eager computes
        model.compile(options={"emulate_precision_casts": True})
    with torch.no_grad():
        output, row["first_call_s"], timing = measure.time_first_call(lambda: model(**inputs)[0], warmup=0,
                                                                      repeats=repeats, device=device)
    row["forward_ms"] = timing.median_s * 1e3
    row["sqnr_db"] = quality.sqnr_db(output, reference)
    if compile:
        row["compile_s"] = row["first_call_s"] - timing.median_s
        check = quality.compare_compiled(output, eager, own_error_db=quality.sqnr_db(eager, reference))
        row.update(eager_sqnr_db=check.own_error_db, compiled_vs_eager_sqnr_db=check.sqnr_db,
                   compile_disagrees=not check.agrees)
        row.update(_recompile_guard(model, inputs))
    return row


def _recompile_guard(model, inputs: dict[str, Any]) -> dict[str, Any]:
    """Run the compiled model under `fail_on_recompile`: same shapes must pass, new shapes must be caught."""
    half = inputs["hidden_states"].shape[1] // 2
    smaller = {**inputs, "hidden_states": inputs["hidden_states"][:, :half], "img_ids": inputs["img_ids"][:half]}
    result = {}
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        model(**inputs)
        result["same_shapes_recompiled"] = False  # it would have raised
        try:
            model(**smaller)
            result["new_shape_caught"] = False
        except Exception as error:  # torch._dynamo raises a RuntimeError naming the guard that failed
            result["new_shape_caught"] = True
            result["guard_message"] = str(error).strip().splitlines()[0][:200]
    return result


def _worker(job_path: str) -> None:
    """Run the configs named in the job file, one JSON line per config on stdout."""
    from safetensors.torch import load_file

    job = json.loads(Path(job_path).read_text())
    # cloned: safetensors hands out tensors at the file's own offsets, and ATen's int8 weight-only CPU kernel
    # (_weight_int8pack_mm, which inductor puts in place of torchao's matmul) loads its input with aligned vector
    # loads: an input 2, 4 or 8 bytes off a 32-byte boundary crashes it (SIGSEGV)
    tensors = {name: t.clone() for name, t in load_file(job["tensors"], device=job["device"]).items()}
    reference = tensors.pop("__reference__")
    inputs = {**tensors, **job["scalars"]}
    by_name = {c.name: c for c in LINEAR_CONFIGS}
    for name in job["configs"]:
        print(json.dumps({"config": name, "status": "started"}), flush=True)
        try:
            row = _probe_one(by_name[name], job["model_path"], job["device"], inputs, reference, job["compile"],
                             job["repeats"])
            row["status"] = "ran"
        except Exception as error:
            row = {"config": name, "kind": by_name[name].kind, "status": "failed",
                   "why": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
        print(json.dumps(row), flush=True)


def probe_configs(names: list[str], model_path: str, inputs: dict[str, Any], reference: torch.Tensor,
                  device: str = "cpu", compile: bool = False, repeats: int = 3, timeout_s: float = 900) -> list[dict]:
    """Run each named config in a worker process; a crash is reported, and the worker restarts after it."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="quantlab-torchao-") as folder:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        tensors["__reference__"] = reference.detach().to("cpu").contiguous()
        save_file(tensors, os.path.join(folder, "tensors.safetensors"))
        scalars = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
        rows: dict[str, dict] = {}
        remaining = list(names)
        while remaining:
            job = Path(folder) / "job.json"
            job.write_text(json.dumps({"configs": remaining, "model_path": model_path, "device": device,
                                       "tensors": os.path.join(folder, "tensors.safetensors"), "scalars": scalars,
                                       "compile": compile, "repeats": repeats}))
            process = subprocess.run([sys.executable, "-m", "quantlab.lab.torchao_probe", "--worker", str(job)], capture_output=True,
                                     text=True, timeout=timeout_s)
            started = None
            for line in process.stdout.splitlines():
                if not line.startswith("{"):
                    continue
                record = json.loads(line)
                if record.get("status") == "started":
                    started = record["config"]
                else:
                    rows[record["config"]] = record
                    started = None
            if process.returncode == 0:
                break
            crashed = started or remaining[0]
            how = (f"signal {-process.returncode} ({signal.Signals(-process.returncode).name})"
                   if process.returncode < 0 else f"exit code {process.returncode}")
            rows[crashed] = {"config": crashed, "status": "crashed", "why": f"the process died: {how}"}
            remaining = [n for n in remaining if n not in rows]
    return [rows[n] for n in names if n in rows]


def capability_table(model_path: str, inputs: dict[str, Any], reference: torch.Tensor, device: str = "cpu",
                     repeats: int = 3) -> list[dict]:
    """Every config of `LINEAR_CONFIGS` on this machine: ran (bytes, time, error), failed (why) or crashed."""
    return probe_configs([c.name for c in LINEAR_CONFIGS], model_path, inputs, reference, device=device,
                         repeats=repeats)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import quantlab as ql

    parser = argparse.ArgumentParser(prog="python -m quantlab.lab.torchao_probe", description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", help="names from LINEAR_CONFIGS (default: all)")
    parser.add_argument("--model", default="mini")
    parser.add_argument("--compile", action="store_true", help="compile each quantized transformer and compare")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    known = {c.name for c in LINEAR_CONFIGS}
    unknown = [name for name in args.configs if name not in known]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {sorted(known)}")
    spec, device = ql.get_model(args.model), ql.env.default_device()
    pipe = ql.load_pipeline(spec.name, "bf16", device=device)
    call = {**spec.call_kwargs(), "num_inference_steps": 2}
    inputs = ql.quality.capture_transformer_inputs(pipe, spec.prompt, call)
    with torch.no_grad():
        reference = pipe.transformer(**inputs)[0]
    path = ql.model_path(spec.name)
    for row in probe_configs(args.configs or [c.name for c in LINEAR_CONFIGS], path, inputs, reference,
                             device=device, compile=args.compile):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
