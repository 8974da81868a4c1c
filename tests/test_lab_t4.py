"""The low-RAM recipes' whole scripts, and the simulated T4 that runs them part by part (python -m quantlab.lab.t4)."""

from __future__ import annotations

import ast
import json
import time

import numpy as np
import pytest
import torch

import quantlab as ql
from quantlab import models, plan, recipes, speed
from quantlab.lab import t4, t4_plan

LOW_RAM = {name: r for name, r in recipes.RECIPES.items() if r.low_ram}
CPU_RECIPE = "torchao-int8wo-encode-then-free"  # the one low-RAM script a CPU runs: torchao quantizes there too
BNB_RECIPES = [name for name, r in LOW_RAM.items() if r.backend == "bitsandbytes"]


# --- the recipes ------------------------------------------------------------------------------


def test_the_recipes_the_issues_ask_for_are_there():
    assert {"nf4-encode-then-free", "int8-encode-then-free", "nf4-t5-nf4", "nf4-prequantized",
            "torchao-int8wo-encode-then-free", "gguf-q4_k-encode-then-free",
            "quanto-int8-encode-then-free"} <= set(LOW_RAM)
    assert BNB_RECIPES == ["nf4-encode-then-free", "int8-encode-then-free", "nf4-t5-nf4", "nf4-prequantized"]
    assert LOW_RAM["nf4-t5-nf4"].low_ram.encode_then_free is False
    assert LOW_RAM["nf4-prequantized"].low_ram.prequantized and LOW_RAM["nf4-prequantized"].low_ram.prepare


def _names(tree):
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    assigned |= {elt.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Tuple) for elt in t.elts}
    assigned |= {elt.id for node in ast.walk(tree) if isinstance(node, ast.With) for item in node.items
                 if item.optional_vars is not None for elt in ast.walk(item.optional_vars) if isinstance(elt, ast.Name)}
    imported = {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return used - assigned - imported - {"print", "f", "sum"}


@pytest.mark.parametrize("name", list(LOW_RAM))
def test_each_recipe_is_a_whole_script_a_t4_runs(name):
    recipe = LOW_RAM[name]
    code = recipe.code()
    assert _names(ast.parse(code)) == set()  # every name is defined in the script itself, settings included
    assert "DTYPE = torch.float16" in code and "bfloat16" not in code  # a T4 has no bf16
    assert "device_map=DEVICE" in code  # every component goes straight to the GPU
    assert "HEIGHT = 1024" in code and "MODEL_ID = 'black-forest-labs/FLUX.1-dev'" in code
    if recipe.storage[0] == "nf4" and not recipe.low_ram.prequantized:  # a pre-quantized one carries its config
        assert 'bnb_4bit_quant_type="nf4"' in code or '"bnb_4bit_quant_type": "nf4"' in code
    if recipe.low_ram.encode_then_free:
        assert "encode_prompt(" in code and "del text_pipe" in code and "torch.cuda.empty_cache()" in code
        assert "text_encoder=None, text_encoder_2=None" in code and "prompt_embeds=prompt_embeds" in code
    # the script is its settings, then its parts (imports merged at the top), and each part exists
    body = recipe.script_body()
    assert code.endswith(body) and all((recipes.SCRIPTS_DIR / part).is_file() for part in recipe.script)
    assert "peak GPU memory" in code and "ql." not in code and "quantlab" not in code


def test_specific_api_calls():
    assert "from_single_file(" in LOW_RAM["gguf-q4_k-encode-then-free"].code()
    assert "GGUF_FILE = 'https://huggingface.co/city96/FLUX.1-dev-gguf/" in LOW_RAM["gguf-q4_k-encode-then-free"].code()
    assert "QuantoConfig(weights_dtype=\"int8\")" in LOW_RAM["quanto-int8-encode-then-free"].code()
    assert "NF4_CHECKPOINT = 'diffusers/FLUX.1-dev-bnb-4bit'" in LOW_RAM["nf4-prequantized"].code()
    assert "TorchAoConfig(Int8WeightOnlyConfig())" in LOW_RAM[CPU_RECIPE].code()
    assert "PipelineQuantizationConfig(" in LOW_RAM["nf4-t5-nf4"].code()


# --- running a script part by part --------------------------------------------------------------


def _settings(tiny_path, **changes):
    return {**recipes.SCRIPT_SETTINGS, "MODEL_ID": tiny_path, "PROMPT": "a small red circle on a blue background",
            "HEIGHT": 128, "WIDTH": 128, "STEPS": 3, "DEVICE": "cpu", "DTYPE": torch.bfloat16, **changes}


@pytest.fixture(scope="module")
def tiny_result(tiny_path):
    return t4.run_script(ql.get_recipe(CPU_RECIPE), _settings(tiny_path))


def test_a_script_runs_part_by_part_and_each_part_is_measured(tiny_result):
    r = tiny_result
    assert r["error"] is None and r["image"].size == (128, 128) and np.asarray(r["image"]).std() > 1
    assert list(r["stages"]) == list(ql.get_recipe(CPU_RECIPE).script)
    assert len(r["step_times_s"]) == 2  # three steps: two gaps between their ends
    assert all(stage["gpu_reserved_gib"] is None for stage in r["stages"].values())  # a CPU
    anon = max(stage["host_anon_gib"] for stage in r["stages"].values())
    rss = max(stage["host_rss_gib"] for stage in r["stages"].values())
    assert 0.1 < r["host_anon_baseline_gib"] and 0.1 < anon < rss
    assert r["peak_host_hwm_gib"] >= rss - 0.01  # the kernel's peak misses nothing the sampler saw


def test_the_script_quantized_the_transformer_as_the_planner_predicts(tiny_result):
    predicted = plan.weights_bytes("tiny", "torchao-int8wo")
    measured = ql.measure.component_weights_bytes(tiny_result["pipe"])
    assert sum(measured.values()) == pytest.approx(predicted["transformer"] + predicted["vae"], rel=0.01)


@pytest.mark.parametrize("recipe", [n for n in BNB_RECIPES if not LOW_RAM[n].low_ram.prequantized])
def test_a_bitsandbytes_script_on_a_cpu_stops_at_diffusers_own_refusal(recipe, tiny_path):
    result = t4.run_script(ql.get_recipe(recipe), _settings(tiny_path, DTYPE=torch.float32))
    assert result["error"].startswith("RuntimeError: No GPU found. A GPU is needed for quantization.")
    assert result["failed_stage"] in ("load_transformer_then_pipeline.py", "load_nf4_t5_nf4.py")
    if LOW_RAM[recipe].low_ram.encode_then_free:
        assert result["stages"]["encode_then_free.py"]["host_anon_gib"] > 0.1  # the text encoding ran


def test_a_truncated_checkpoint_is_reported_with_what_was_measured(tiny_path, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    result = t4.run_script(ql.get_recipe(CPU_RECIPE), _settings(tiny_path, MODEL_ID=str(broken)))
    assert result["failed_stage"] == "load_transformer_then_pipeline.py" and result["error"]
    assert list(result["stages"])[-1] == "load_transformer_then_pipeline.py" and result["image"] is None


# --- the host memory sampler ------------------------------------------------------------------


def test_the_sampler_sees_an_allocation_in_its_stage():
    with t4.HostMemorySampler(interval_s=0.01) as sampler:
        sampler.stage = "allocate"
        block = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, written, so resident and anonymous
        time.sleep(0.1)
        del block
        sampler.stage = "after"
        time.sleep(0.05)
    start_rss, start_anon = sampler.peaks_gib("start")
    rss, anon = sampler.peaks_gib("allocate")
    assert anon - start_anon == pytest.approx(300 / 1024, abs=0.03)
    assert rss >= anon and sampler.peaks_gib("after")[1] < anon - 0.25
    assert sampler.peaks_gib() == (max(rss, start_rss, sampler.peaks_gib("after")[0]), anon)
    assert sampler.samples >= 10 and sampler.hwm_gib >= rss - 0.01
    with pytest.raises(KeyError, match="No samples for stage 'decode'"):
        sampler.peaks_gib("decode")


def test_memory_mapped_weights_are_resident_but_not_anonymous(tmp_path):
    """Why the verdict uses RssAnon: a safetensors file read through its memory map counts in VmRSS only."""
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.ones(64 * 2**20, dtype=torch.int8)}, tmp_path / "w.safetensors")
    with t4.HostMemorySampler() as sampler:
        sampler.stage = "read"
        tensors = load_file(tmp_path / "w.safetensors")
        assert all(int(chunk.max()) == 1 for chunk in tensors["w"].split(2**20))  # touches every page, copies none
        sampler.sample()
        del tensors
    rss0, anon0 = sampler.peaks_gib("start")
    rss, anon = sampler.peaks_gib("read")
    assert rss - rss0 > 0.055 and anon - anon0 < 0.02


# --- the T4 estimate --------------------------------------------------------------------------


def test_t4_estimate_adds_compute_and_weight_traffic():
    nf4 = t4_plan.t4_estimate("nf4-encode-then-free", 1024, 1024)
    tflop = speed.transformer_tflop_per_step(models.meta_component("flux-dev-shaped", "transformer"))
    assert nf4.linear_tflop == pytest.approx(tflop["linear_tflop"]) and 70 < nf4.linear_tflop + nf4.attention_tflop < 80
    assert nf4.s_per_step == pytest.approx(nf4.compute_s + nf4.memory_s)
    assert nf4.compute_s == pytest.approx(nf4.linear_tflop / 26 + nf4.attention_tflop / 16.25)
    assert 50 < nf4.weight_gb_moved < 58  # 11.9 G Linear weights x 4.56 bytes, dequantized to fp16 and read again
    assert 2.5 < nf4.s_per_step < 5 and nf4.floor_s_per_step < nf4.s_per_step / 2
    assert "40%" in nf4.assumptions and "320 GB/s" in nf4.assumptions and "estimated" in str(nf4)
    small = t4_plan.t4_estimate("nf4-encode-then-free", 512, 512)
    assert small.s_per_step < nf4.s_per_step / 2.5
    int8 = t4_plan.t4_estimate("int8-encode-then-free")
    assert int8.weight_gb_moved == pytest.approx(nf4.weight_gb_moved / 4.5, rel=0.05)
    at_peak = t4_plan.t4_estimate(achieved={"linear": 1, "attention": 1, "bandwidth": 1})
    assert at_peak.s_per_step == pytest.approx(nf4.floor_s_per_step)


# --- the command line -------------------------------------------------------------------------

CLI = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--height", "128", "--width", "128", "--steps", "2"]


def test_command_line_runs_each_recipe_in_its_own_process(tiny_path, tmp_path):
    out = tmp_path / "rows.json"
    assert t4.main(["--recipes", CPU_RECIPE, "--out", str(out), *CLI]) == 0
    (row,) = json.loads(out.read_text())
    assert row["recipe"] == CPU_RECIPE and row["steps"] == 2
    assert row["device"].startswith("CPU") and row["versions"]["torch"].startswith("2.")
    extra = row["extra"]
    assert extra["passed"] is True and extra["exit_code"] == 0 and extra["vram_ok"] is None
    assert extra["host_limit_gib"] == 12.0 and extra["host_limit_enforced"] is False
    assert len(extra["step_times_s"]) == 1 and row["ms_per_step"] > 0 and row["weights_bytes"] > 0
    assert row["peak_host_rss_gib"] >= extra["peak_host_anon_gib"] > 0.1 and extra["process_s"] > 1
    assert extra["t4_estimate_s_per_step"] > 0


def test_command_line_checks_every_recipe_before_running_any(tmp_path, monkeypatch):
    monkeypatch.setattr(t4, "run_scenarios", lambda *a, **k: pytest.fail("ran before checking"))
    with pytest.raises(ValueError, match="Unknown recipe 'nf3'"):
        t4.main(["--recipes", CPU_RECIPE, "nf3", "--out", str(tmp_path / "x.json"), *CLI])
    with pytest.raises(ql.UnsupportedHardwareError, match="needs a CUDA GPU"):
        t4.main(["--recipes", CPU_RECIPE, "nf4-t5-nf4", "--out", str(tmp_path / "x.json"), *CLI])
    with pytest.raises(SystemExit):
        t4.main(["--recipes", "bf16", "--out", str(tmp_path / "x.json"), *CLI])


def test_a_process_that_dies_still_leaves_a_failed_row(tiny_path, tmp_path):
    out = tmp_path / "rows.json"
    t4.main(["--recipes", CPU_RECIPE, "--out", str(out), *CLI, "--timeout-s", "0.5"])  # killed while importing
    (row,) = json.loads(out.read_text())
    assert row["recipe"] == CPU_RECIPE and row["extra"]["passed"] is False and row["extra"]["exit_code"] == -9
    assert "killed after 0 s" in row["extra"]["error"]
