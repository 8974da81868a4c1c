"""Loading FLUX.1-dev with little host RAM: the Colab recipes, their checks, the sampler, the T4 estimate and the
command line."""

from __future__ import annotations

import ast
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import quantlab as ql
from quantlab import lowram, models, plan, speed
from quantlab.recipes import UnsupportedHardwareError

CPU_RECIPE = "torchao-int8wo-encode-then-free"  # the one Colab recipe a CPU runs: torchao quantizes there too
CUDA_RECIPES = [name for name, r in lowram.COLAB_RECIPES.items() if r.needs_cuda]
ROOT = Path(__file__).resolve().parent.parent


# --- the recipes ------------------------------------------------------------------------------


def test_the_recipes_the_issue_asks_for_are_there():
    assert {"nf4-encode-then-free", "int8-encode-then-free", "nf4-t5-nf4", "nf4-prequantized",
            "torchao-int8wo-encode-then-free"} <= set(lowram.COLAB_RECIPES)
    assert CUDA_RECIPES == ["nf4-encode-then-free", "int8-encode-then-free", "nf4-t5-nf4", "nf4-prequantized"]
    assert lowram.get_colab_recipe("nf4-t5-nf4").encode_then_free is False
    assert lowram.get_colab_recipe("nf4-prequantized").prequantized


@pytest.mark.parametrize("name", list(lowram.COLAB_RECIPES))
def test_each_recipe_is_code_a_t4_runs(name):
    recipe = lowram.COLAB_RECIPES[name]
    code = recipe.code
    tree = ast.parse(code)  # valid Python, as printed
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assigned |= {elt.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Tuple) for elt in t.elts}
    assigned |= {elt.id for node in ast.walk(tree) if isinstance(node, ast.With) for item in node.items
                 if item.optional_vars is not None for elt in ast.walk(item.optional_vars) if isinstance(elt, ast.Name)}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    assert used - assigned - imported - {"print", "f"} == set()  # every name is defined in the code itself
    assert 'device, dtype = "cuda", torch.float16' in code and "bfloat16" not in code  # a T4 has no bf16
    assert "device_map=device" in code  # every component goes straight to the GPU
    assert f"height = width = {recipe.t4_size}" in code
    if recipe.transformer_weights == "nf4":
        assert 'bnb_4bit_quant_type="nf4"' in code or '"bnb_4bit_quant_type": "nf4"' in code
    if recipe.encode_then_free:
        assert "encode_prompt(" in code and "del text_pipe" in code and "torch.cuda.empty_cache()" in code
        assert "text_encoder=None, text_encoder_2=None" in code and "prompt_embeds=prompt_embeds" in code
    # the stages generate runs are the code printed, in order
    positions = [code.index(stage_code.strip()) for _, stage_code in recipe.stages]
    assert positions == sorted(positions)


def test_specific_api_calls():
    assert "BitsAndBytesConfig(load_in_8bit=True)" in lowram.COLAB_RECIPES["int8-encode-then-free"].code
    both = lowram.COLAB_RECIPES["nf4-t5-nf4"].code
    assert 'quant_backend="bitsandbytes_4bit"' in both
    assert 'components_to_quantize=["transformer", "text_encoder_2"]' in both
    pre = lowram.COLAB_RECIPES["nf4-prequantized"]
    assert "save_pretrained(" in pre.save_stage and "quantization_config" not in dict(pre.stages)["load_transformer"]
    assert "TorchAoConfig(Int8WeightOnlyConfig())" in lowram.COLAB_RECIPES[CPU_RECIPE].code


def test_chapter_recipes_cover_every_chapter_with_known_recipes():
    stems = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(lowram.CHAPTER_RECIPES) == stems
    for stem, (names, reason) in lowram.CHAPTER_RECIPES.items():
        assert names and all(name in lowram.COLAB_RECIPES for name in names), stem
        assert len(reason) > 40, stem
    assert "CPU" in lowram.CHAPTER_RECIPES["04_quanto"].reason  # why Quanto's own recipe is not run on Colab


# --- checks before loading --------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(models, "model_path", lambda *a, **k: pytest.fail("a model was resolved before the checks"))


def test_an_unknown_recipe_lists_the_valid_ones(no_loading):
    with pytest.raises(ValueError, match="Unknown Colab recipe 'nf5'. Valid Colab recipes: nf4-encode-then-free, "):
        lowram.generate("tiny", "nf5", device="cpu")


@pytest.mark.parametrize("recipe", CUDA_RECIPES)
def test_a_cuda_recipe_on_a_cpu_fails_before_loading(recipe, no_loading):
    with pytest.raises(UnsupportedHardwareError, match=f"'{recipe}' needs a CUDA GPU.*torchao-int8wo"):
        lowram.generate("tiny", recipe, device="cpu")
    with pytest.raises(UnsupportedHardwareError, match="needs a CUDA GPU"):
        lowram.save_prequantized("tiny", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_says_what_to_do(no_loading):
    with pytest.raises(UnsupportedHardwareError, match="sees no CUDA GPU.*T4 GPU"):
        lowram.generate("tiny", CPU_RECIPE)


def test_other_bad_input_fails_before_loading(no_loading):
    with pytest.raises(ValueError, match="not a compute dtype"):
        lowram.generate("tiny", CPU_RECIPE, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="vram_limit_gib caps a CUDA GPU"):
        lowram.generate("tiny", CPU_RECIPE, device="cpu", dtype=torch.float32, vram_limit_gib=15)
    with pytest.raises(UnsupportedHardwareError, match="built and run on a CUDA GPU"):
        lowram.generate("flux-dev-shaped", CPU_RECIPE, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        lowram.generate("tiny", CPU_RECIPE, device="tpu")


def test_an_unknown_model_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown model 'flux3'. Valid models: tiny"):
        lowram.generate("flux3", CPU_RECIPE, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("recipe", CUDA_RECIPES)
def test_cuda_recipe_code_runs_on_a_cpu_up_to_diffusers_bitsandbytes_check(recipe, tiny_path, tmp_path):
    """What a CPU can run of the bitsandbytes recipes: the text encoding, and every config object they build."""
    r = lowram.COLAB_RECIPES[recipe]
    call = models.get_model("tiny").call_kwargs()
    namespace = lowram._namespace(r, tiny_path, "a red circle", 128, 128, 2, 0, "cpu", torch.float32, call, tmp_path)
    stages = ([("save", r.save_stage)] if r.prequantized else []) + list(r.stages)
    with pytest.raises(RuntimeError, match="No GPU found. A GPU is needed for quantization."):
        for stage, code in stages:
            lowram._run_stage(r, stage, code, namespace)
            if stage == "encode":
                assert namespace["prompt_embeds"].shape == (1, 64, 256)
                assert namespace["pooled_prompt_embeds"].shape == (1, 256)
                assert "text_pipe" not in namespace  # freed
    if r.encode_then_free and not r.prequantized:
        assert "prompt_embeds" in namespace  # it got as far as loading the transformer


# --- generating on a CPU ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_result(tiny_path):
    return lowram.generate("tiny", CPU_RECIPE, "a small red circle at the top left on a blue background",
                           height=128, width=128, steps=3, device="cpu", dtype=torch.bfloat16)


def test_generate_measures_every_stage(tiny_result):
    r = tiny_result
    assert r.image.size == (128, 128) and np.asarray(r.image).std() > 1
    assert list(r.stages) == ["encode", "load_transformer", "warmup", "generate", "denoise", "decode"]
    assert len(r.step_times_s) == 3 and r.s_per_step == pytest.approx(sorted(r.step_times_s)[1])
    assert r.load_s == pytest.approx(r.stages["encode"].seconds + r.stages["load_transformer"].seconds)
    assert r.peak_gpu_reserved_gib is None and all(s.gpu_reserved_gib is None for s in r.stages.values())
    # the baseline is not a lower bound: memory freed after it (the allocator returning pages) lowers later samples
    assert 0.1 < r.host_anon_baseline_gib and 0.1 < r.peak_host_anon_gib < r.peak_host_rss_gib
    assert r.peak_host_anon_gib == max(s.host_anon_gib for s in r.stages.values())
    assert r.peak_host_hwm_gib >= r.peak_host_rss_gib - 0.01  # the kernel's peak misses nothing the sampler saw


def test_generate_quantized_the_transformer_as_the_planner_predicts(tiny_result):
    predicted = plan.weights_bytes("tiny", "torchao-int8wo")
    assert tiny_result.weights_bytes == pytest.approx(predicted["transformer"] + predicted["vae"], rel=0.01)
    assert tiny_result.mem_after_load_gib == pytest.approx(tiny_result.weights_bytes / 2**30)


def test_the_row_carries_device_versions_stages_and_verdict(tiny_result):
    row = tiny_result.to_row("unit test")
    assert row.device.startswith("CPU") and row.versions["diffusers"] == "0.42.1" and len(row.date) == 10
    assert row.ms_per_step == pytest.approx(tiny_result.s_per_step * 1000)
    extra = row.extra
    assert extra["host_ok"] is True and extra["vram_ok"] is None and extra["passed"] is True
    assert extra["stages"]["denoise"]["host_anon_gib"] > 0.1 and "RssAnon" in extra["host_verdict_uses"]
    tight = tiny_result.verdict(host_limit_gib=0.05)  # a limit below what the process holds fails
    assert tight["host_ok"] is False and tight["passed"] is False


def test_a_failing_stage_is_reported_with_what_was_measured(tiny_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(Exception) as caught:
        lowram.generate(str(broken), CPU_RECIPE, height=128, width=128, steps=2, device="cpu", dtype=torch.float32)
    result = caught.value.lowram_result
    assert result.failed_stage == "load_transformer" and result.error
    assert list(result.stages) == ["encode", "load_transformer"] and result.stages["encode"].host_anon_gib > 0.1
    assert result.image is None and result.s_per_step is None and not result.verdict()["passed"]


# --- the host memory sampler ------------------------------------------------------------------


def test_the_sampler_sees_an_allocation_in_its_stage():
    with lowram.HostMemorySampler(interval_s=0.01) as sampler:
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
    with lowram.HostMemorySampler() as sampler:
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
    nf4 = lowram.t4_estimate("nf4-encode-then-free", 1024, 1024)
    tflop = speed.transformer_tflop_per_step(models.meta_component("flux-dev-shaped", "transformer"))
    assert nf4.linear_tflop == pytest.approx(tflop["linear_tflop"]) and 70 < nf4.linear_tflop + nf4.attention_tflop < 80
    assert nf4.s_per_step == pytest.approx(nf4.compute_s + nf4.memory_s)
    assert nf4.compute_s == pytest.approx(nf4.linear_tflop / 26 + nf4.attention_tflop / 16.25)
    assert 50 < nf4.weight_gb_moved < 58  # 11.9 G Linear weights x 4.56 bytes, dequantized to fp16 and read again
    assert 2.5 < nf4.s_per_step < 5 and nf4.floor_s_per_step < nf4.s_per_step / 2
    assert "40%" in nf4.assumptions and "320 GB/s" in nf4.assumptions and "estimated" in str(nf4)
    small = lowram.t4_estimate("nf4-encode-then-free", 512, 512)
    assert small.s_per_step < nf4.s_per_step / 2.5
    int8 = lowram.t4_estimate("int8-encode-then-free")
    assert int8.weight_gb_moved == pytest.approx(nf4.weight_gb_moved / 4.5, rel=0.05)
    at_peak = lowram.t4_estimate(achieved={"linear": 1, "attention": 1, "bandwidth": 1})
    assert at_peak.s_per_step == pytest.approx(nf4.floor_s_per_step)


# --- the command line -------------------------------------------------------------------------

CLI = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--height", "128", "--width", "128",
       "--steps", "2"]


def test_command_line_runs_each_recipe_in_its_own_process_and_appends_rows(tiny_path, tmp_path):
    out = tmp_path / "rows.json"
    assert lowram.main(["--recipes", CPU_RECIPE, "--out", str(out), *CLI]) == 0
    assert lowram.main(["--recipes", CPU_RECIPE, "--out", str(out), *CLI, "--steps", "3"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["recipe"], r["steps"]) for r in rows] == [(CPU_RECIPE, 2), (CPU_RECIPE, 3)]
    first = rows[0]
    assert first["device"].startswith("CPU") and first["versions"]["torch"].startswith("2.")
    assert first["extra"]["passed"] is True and first["extra"]["exit_code"] == 0
    assert first["extra"]["host_limit_gib"] == 12.0 and first["extra"]["host_limit_enforced"] is False
    assert len(first["extra"]["step_times_s"]) == 2 and first["ms_per_step"] > 0
    assert first["extra"]["process_s"] > first["extra"]["load_s"] > 0
    assert first["peak_host_rss_gib"] >= first["extra"]["peak_host_anon_gib"] > 0.1
    assert ql.measure.load_rows(out)[1].steps == 3


def test_command_line_checks_every_recipe_before_running_any(tmp_path, monkeypatch):
    monkeypatch.setattr(lowram, "_run_child", lambda *a: pytest.fail("ran before checking"))
    with pytest.raises(ValueError, match="Unknown Colab recipe 'nf3'"):
        lowram.main(["--recipes", CPU_RECIPE, "nf3", "--out", str(tmp_path / "x.json"), *CLI])
    with pytest.raises(UnsupportedHardwareError, match="needs a CUDA GPU"):
        lowram.main(["--recipes", CPU_RECIPE, "nf4-t5-nf4", "--out", str(tmp_path / "x.json"), *CLI])


def test_a_process_that_dies_still_leaves_a_failed_row(tiny_path, tmp_path):
    out = tmp_path / "rows.json"
    lowram.main(["--recipes", CPU_RECIPE, "--out", str(out), *CLI, "--timeout-s", "0.5"])  # killed while importing
    (row,) = json.loads(out.read_text())
    assert row["recipe"] == CPU_RECIPE and row["extra"]["passed"] is False and row["extra"]["exit_code"] == -9
    assert "killed after 0 s" in row["extra"]["error"]
