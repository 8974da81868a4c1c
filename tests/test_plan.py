"""The fit planner: predicted weights and peak GPU memory against what was measured."""

from __future__ import annotations

import pytest

import quantlab as ql
from quantlab import bench, plan

# Recipes whose weights the planner predicts, loaded for real on the tiny model (CPU-capable ones).
TINY_RECIPES = ["bf16", "quanto-int8", "quanto-int4", "quanto-int2", "torchao-int8wo", "fp8-layerwise-e4m3",
                "gguf-q4_1", "gguf-q2_k"]


@pytest.mark.parametrize("recipe", TINY_RECIPES)
def test_predicted_weights_match_the_loaded_tiny_pipeline(recipe, tiny_path, tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "plan-gguf"
    gguf_type = ql.get_recipe(recipe).gguf_type
    extra = {"gguf_file": bench.write_gguf_file("tiny", gguf_type, folder)[0]} if gguf_type else {}
    pipe = ql.load_pipeline("tiny", recipe, device="cpu", **extra)
    measured = ql.measure.component_weights_bytes(pipe)
    predicted = plan.weights_bytes("tiny", recipe)
    for component, size in measured.items():
        assert predicted[component] == pytest.approx(size, rel=0.01), component


def _full_scale_rows():
    rows = {}
    for name in ("01_bitsandbytes_flux-dev-shaped", "02_gguf_flux-dev-shaped", "03_torchao_compile_flux-dev-shaped",
                 "04_quanto_flux-dev-shaped", "05_memory_flux-dev-shaped", "07_compare_flux-dev-shaped"):
        for row in ql.measure.load_rows(ql.measure.results_dir() / f"{name}.json"):
            if row.recipe in ql.recipes.RECIPES and row.weights_bytes and row.peak_gpu_mem_gib:
                rows[(name, row.recipe)] = row
    return rows


def test_predicted_weights_match_every_full_scale_run():
    rows = _full_scale_rows()
    assert len({recipe for _, recipe in rows}) >= 20
    for (source, recipe), row in rows.items():
        # sequential offload leaves accelerate's hooks holding 0.25 GiB more; everything else is within 0.1%
        tolerance = 0.01 if "sequential" in recipe else 0.001
        assert sum(plan.weights_bytes("flux-dev-shaped", recipe).values()) == pytest.approx(
            row.weights_bytes, rel=tolerance), (source, recipe)


def test_predicted_peak_gpu_memory_is_within_10_percent_of_every_full_scale_run():
    checked = 0
    for (source, recipe), row in _full_scale_rows().items():
        r = ql.get_recipe(recipe)
        if r.device_map or (r.offload or "").startswith("group") or recipe == "bnb-8bit+model-offload":
            continue  # not modelled: the planner says so (next test)
        predicted = plan.predict_peak_gpu_gib("flux-dev-shaped", recipe, row.height, row.width)
        assert predicted == pytest.approx(row.peak_gpu_mem_gib, rel=0.10), (source, recipe)
        checked += 1
    assert checked >= 15


def test_what_the_planner_does_not_model_it_refuses_to_guess():
    with pytest.raises(ValueError, match="does not model 'group-leaf-stream' offloading"):
        plan.predict_peak_gpu_gib("flux-dev-shaped", "bf16+group-leaf-stream-offload")
    with pytest.raises(ValueError, match="leaves bitsandbytes' int8 weights on the GPU"):
        plan.predict_peak_gpu_gib("flux-dev-shaped", "bnb-8bit+model-offload")
    with pytest.raises(ValueError, match="several GPUs"):
        plan.predict_peak_gpu_gib("flux-dev-shaped", "bf16+balanced")
    with pytest.raises(ValueError, match="Unknown recipe"):
        plan.weights_bytes("flux-dev-shaped", "bf17")


def test_activations_scale_with_the_pixel_count():
    at_1024 = plan.predict_peak_gpu_gib("flux-dev-shaped", "bf16+sequential-offload", 1024, 1024)
    at_512 = plan.predict_peak_gpu_gib("flux-dev-shaped", "bf16+sequential-offload", 512, 512)
    assert at_512 == pytest.approx(at_1024 / 4)
    bf16 = plan.predict_peak_gpu_gib("flux-dev-shaped", "bf16", 512, 512)
    assert bf16 == pytest.approx(31.42 + 4.86 / 4, abs=0.01)


def test_plan_for_a_t4_says_what_fits_instead():
    verdict = plan.plan("flux-dev-shaped", "bf16", gpu="T4")
    assert not verdict.fits and "does not fit" in verdict.reason
    assert verdict.weights_gib["transformer"] == pytest.approx(22.17, abs=0.01)
    assert verdict.instead and all(peak + 0.5 <= 15 for _, peak in verdict.instead)
    assert [name for name, _ in verdict.instead] == ["bnb-4bit-nf4+model-offload", "gguf-q2_k+model-offload",
                                                     "bf16+sequential-offload"]
    assert "These would fit: bnb-4bit-nf4+model-offload (7.3 GiB)" in str(verdict)
    fp8 = plan.plan("flux-dev-shaped", "torchao-float8dq-row", gpu="T4")
    assert not fp8.fits and "compute capability 8.9" in fp8.reason
    fits = plan.plan("flux-dev-shaped", "bnb-4bit-nf4+model-offload", gpu="T4")
    assert fits.fits and fits.instead == [] and "to spare" in fits.reason
    assert plan.plan("flux-dev-shaped", "bf16", gpu="H100").fits
    assert plan.plan("flux-dev-shaped", "bf16", gpu=40.0).fits is True
    with pytest.raises(ValueError, match="Known GPUs: T4"):
        plan.plan("flux-dev-shaped", "bf16", gpu="T5")


# --- the Colab recipes (quantlab.lowram): fp16 GPU memory and host RAM against the simulated T4 ------------

COLAB_RESULTS = "09_colab_t4_sim_flux-dev-shaped"


def _colab_rows():
    rows = ql.measure.load_rows(ql.measure.results_dir() / f"{COLAB_RESULTS}.json")
    return [row for row in rows if not row.extra.get("superseded")]  # a save with 2 GB shards, kept as a record


def test_the_simulated_t4_ran_every_colab_recipe_within_the_limits():
    from quantlab import lowram

    rows = _colab_rows()
    for name, recipe in lowram.COLAB_RECIPES.items():
        size = recipe.t4_size
        passed = [r for r in rows if r.recipe == name and r.height == size and r.extra["passed"]]
        assert passed, name
        if max(r.peak_gpu_mem_gib for r in passed) > 14.25:  # close to a T4's capacity: run again at 14.25 GiB
            assert 14.25 in {r.extra["vram_cap_gib"] for r in passed}, name
        for row in passed:
            assert row.extra["peak_host_anon_gib"] < 12 and row.peak_gpu_mem_gib <= row.extra["vram_cap_gib"]
            assert row.extra["error"] is None and len(row.extra["step_times_s"]) == 4 and row.ms_per_step > 100
            assert row.device.startswith("NVIDIA H100") and row.versions["bitsandbytes"] == "0.50.2"
    save = [r for r in rows if r.recipe == "nf4-prequantized:save"]
    assert len(save) == 1 and save[0].extra["peak_host_anon_gib"] < 12
    for stem, (names, _) in lowram.CHAPTER_RECIPES.items():
        assert all(any(r.recipe == n and r.extra["passed"] for r in rows) for n in names), stem


def test_colab_weights_match_the_simulated_t4():
    checked = 0
    for row in _colab_rows():
        if row.weights_bytes is None:
            continue
        name = row.recipe.split(":")[0]
        predicted = plan.colab_weights_bytes("flux-dev-shaped", name)
        if row.recipe.endswith(":save"):  # the saved folder: the NF4 transformer, config included
            assert row.weights_bytes == pytest.approx(predicted["transformer"], rel=0.001)
        elif ql.lowram.get_colab_recipe(name).encode_then_free:
            assert row.weights_bytes == pytest.approx(predicted["transformer"] + predicted["vae"], rel=0.001), name
        else:
            assert row.weights_bytes == pytest.approx(sum(predicted.values()), rel=0.001), name
        checked += 1
    assert checked >= 9


def test_colab_peak_gpu_memory_is_within_10_percent_of_every_simulated_t4_stage():
    checked = 0
    for row in _colab_rows():
        if row.recipe.endswith(":save") or row.extra["error"]:
            continue
        predicted = plan.predict_colab_peak_gpu_gib("flux-dev-shaped", row.recipe, row.height, row.width)
        assert predicted["peak"] == pytest.approx(row.extra["peak_gpu_allocated_gib"], rel=0.10), row.recipe
        for stage in ("encode", "decode"):
            if stage in predicted:
                measured = row.extra["stages"][stage]["gpu_allocated_gib"]
                assert predicted[stage] == pytest.approx(measured, rel=0.10), (row.recipe, stage)
        checked += 1
    assert checked >= 8


def test_the_colab_verdict_never_promises_what_failed():
    for row in _colab_rows():
        if row.recipe.endswith(":save"):
            continue
        verdict = plan.plan_colab("flux-dev-shaped", row.recipe, gpu_mem_gib=row.extra["vram_cap_gib"],
                                  height=row.height, width=row.width)
        assert not verdict.fits or row.extra["passed"], (row.recipe, row.height, row.extra["vram_cap_gib"])
    too_big = plan.plan_colab("flux-dev-shaped", "nf4-t5-nf4")  # a real T4: OOM at 14.25 GiB, measured
    assert not too_big.fits and "GPU memory" in too_big.reason and ("nf4-encode-then-free", 1024) in too_big.instead
    assert "These would fit: nf4-encode-then-free at 1024×1024" in str(too_big)
    small = plan.plan_colab("flux-dev-shaped", "nf4-t5-nf4", height=512, width=512)
    assert small.fits and small.instead == [] and "to spare" in small.reason


def test_host_ram_is_within_10_percent_of_every_simulated_t4_run():
    checked = 0
    for row in _colab_rows():
        name, save = row.recipe.split(":")[0], row.recipe.endswith(":save")
        if row.extra["error"]:
            continue
        anon = plan.predict_peak_host_gib("flux-dev-shaped", name, save=save)
        rss = plan.predict_peak_host_gib("flux-dev-shaped", name, save=save, rss=True)
        assert anon == pytest.approx(row.extra["peak_host_anon_gib"], rel=0.10), row.recipe
        assert rss == pytest.approx(row.peak_host_rss_gib, rel=0.10), row.recipe
        stages = plan.predict_host_stages_gib("flux-dev-shaped", name, save=save)
        for stage, (stage_anon, stage_rss) in stages.items():
            if stage in row.extra["stages"]:  # the loading stages: VmRSS is the checkpoint pages mapped at once
                assert stage_rss == pytest.approx(row.extra["stages"][stage]["host_rss_gib"], rel=0.10), (name, stage)
        checked += 1
    assert checked == 9  # every finished run, the saving step included


def test_host_ram_of_the_published_checkpoint():
    """FLUX.1-dev's transformer comes in 10 GB shards: more pages mapped at once, the same anonymous memory."""
    for name in ql.lowram.COLAB_RECIPES:
        hub = plan.predict_host_stages_gib("black-forest-labs/FLUX.1-dev", name)
        shaped = plan.predict_host_stages_gib("flux-dev-shaped", name)
        assert {s: a for s, (a, _) in hub.items()} == {s: a for s, (a, _) in shaped.items()}
        assert plan.predict_peak_host_gib("black-forest-labs/FLUX.1-dev", name) < 12
    hub = plan.predict_host_stages_gib("black-forest-labs/FLUX.1-dev", "nf4-encode-then-free")
    assert hub["load_transformer"][1] == pytest.approx(1.2 + 0.47 + 9.98e9 / 2**30)
    save = plan.predict_host_stages_gib("flux-dev-shaped", "nf4-prequantized", save=True)["save"]
    assert save[0] == pytest.approx(0.53 + 6698977408 / 2**30)  # one 6.2 GiB file, copied to host RAM to be written
    with pytest.raises(ValueError, match="saves nothing"):
        plan.predict_peak_host_gib("flux-dev-shaped", "nf4-encode-then-free", save=True)
    with pytest.raises(ValueError, match="Unknown Colab recipe 'bf16'"):
        plan.predict_peak_host_gib("flux-dev-shaped", "bf16")


def test_the_host_ram_planner_models_gpu_runs_only():
    with pytest.raises(ValueError, match="models a GPU run"):
        plan.predict_peak_host_gib("tiny", "torchao-int8wo-encode-then-free", device="cpu")
    shifted = plan.predict_peak_host_gib("flux-dev-shaped", "nf4-encode-then-free", base_anon_gib=1.53)
    assert shifted == pytest.approx(plan.predict_peak_host_gib("flux-dev-shaped", "nf4-encode-then-free") + 1)

