"""The benchmark runner behind results/: one row per recipe, with real values in every measured field."""

from __future__ import annotations

import json

import pytest

import quantlab as ql
from quantlab import bench


def test_run_recipes_measures_each_recipe_against_the_first(tmp_path):
    runs = bench.run_recipes("tiny", ["bf16", "fp8-layerwise-e4m3"], steps=2, warmup=0, repeats=2, device="cpu")
    base, fp8 = (run.row for run in runs)
    assert (base.model, base.recipe, fp8.recipe) == ("tiny", "bf16", "fp8-layerwise-e4m3")
    assert (base.height, base.width, base.steps, base.repeats) == (128, 128, 2, 2)
    assert base.psnr_db is None and fp8.psnr_db is not None and 20 < fp8.psnr_db < 80
    assert base.mem_after_load_gib == pytest.approx(base.weights_bytes / 2**30)
    assert fp8.weights_bytes < base.weights_bytes  # the transformer's Linears went to one byte
    assert base.peak_gpu_mem_gib is None and base.peak_host_rss_gib > 0.1
    # host RAM is also measured while generating (offloading fills it then), and one CPU has no per-GPU figures
    assert base.extra["peak_host_rss_generating_gib"] > 0.1 and "peak_gpu_mem_per_device_gib" not in base.extra
    assert 0 < base.ms_per_step < base.s_per_image * 1000
    assert runs[0].pipe is None  # freed unless asked to keep it


def test_command_line_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    assert bench.main(["--model", "tiny", "--recipes", "bf16", "--steps", "2", "--repeats", "1", "--out", str(out),
                       "--notes", "unit test"]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["notes"] == "unit test" and rows[0]["steps"] == 2


def test_command_line_checks_every_recipe_name_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_recipes", lambda *a, **k: pytest.fail("loaded before checking names"))
    with pytest.raises(ValueError, match="Unknown recipe 'bnb-3bit'"):
        bench.main(["--recipes", "bf16", "bnb-3bit", "--out", str(tmp_path / "x.json")])


def test_a_failed_compile_is_recorded_and_the_eager_row_kept():
    class Transformer:
        def compile(self, **kwargs):
            raise RuntimeError("no compiler here")

    class Pipe:
        transformer = Transformer()

    row = ql.measure.new_row("tiny", "bf16", "cpu", ms_per_step=12.0, s_per_image=0.1)
    bench._compile_and_time(Pipe(), "p", {}, 0, 1, "cpu", False, False, row)
    assert row.recipe == "bf16" and row.ms_per_step == 12.0
    assert row.extra["compile_error"] == "RuntimeError: no compiler here"
    assert row.extra["eager_ms_per_step"] == 12.0


def test_a_compiled_row_carries_compiled_times_and_keeps_the_eager_ones(monkeypatch):
    pipe = ql.load_pipeline("tiny", "bf16", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(pipe.transformer, "compile", lambda **kwargs: None)  # stands in for torch.compile here
    row = ql.measure.new_row("tiny", "bf16", "cpu", ms_per_step=-1.0, s_per_image=-1.0)
    call = {**ql.get_model("tiny").call_kwargs(), "num_inference_steps": 2}
    bench._compile_and_time(pipe, "a red circle", call, 0, 2, "cpu", False, False, row)
    assert row.recipe == "bf16+compile" and "compile_error" not in row.extra
    assert row.extra["compiled_region"] == "whole transformer"
    assert row.extra["eager_ms_per_step"] == -1.0 and row.extra["eager_s_per_image"] == -1.0
    assert 0 < row.ms_per_step < row.s_per_image * 1000 and row.ms_per_step_iqr >= 0
    assert row.extra["compile_s"] == pytest.approx(row.extra["first_compiled_image_s"] - row.s_per_image)


def test_regional_compile_compiles_each_repeated_block_and_the_eager_row_is_saved_first(tmp_path, monkeypatch):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    compiled_blocks = []
    for block_class in (FluxTransformerBlock, FluxSingleTransformerBlock):
        monkeypatch.setattr(block_class, "compile", lambda self, **kwargs: compiled_blocks.append(self), raising=False)
    out = tmp_path / "rows.json"
    bench.main(["--model", "tiny", "--recipes", "bf16", "--steps", "2", "--repeats", "1", "--compile", "--regional",
                "--out", str(out)])
    pipe = ql.load_pipeline("tiny", "bf16", device="cpu")
    expected_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert len(compiled_blocks) == expected_blocks
    (compiled,) = ql.measure.load_rows(out)
    assert compiled.recipe == "bf16+compile" and compiled.extra["compiled_region"] == "repeated blocks"
    assert not (tmp_path / "rows.eager.json").exists()  # kept only while compiling, or when compiling failed


def test_a_failed_compile_keeps_the_eager_row_file_with_its_reason(tmp_path, monkeypatch):
    def refuse(self, **kwargs):
        raise RuntimeError("inductor gave up")

    from diffusers import FluxTransformer2DModel

    monkeypatch.setattr(FluxTransformer2DModel, "compile", refuse)
    out = tmp_path / "rows.json"
    bench.main(["--model", "tiny", "--recipes", "bf16", "--steps", "2", "--repeats", "1", "--compile", "--out", str(out)])
    (eager,) = ql.measure.load_rows(tmp_path / "rows.eager.json")
    (row,) = ql.measure.load_rows(out)
    assert eager.recipe == row.recipe == "bf16" and eager.ms_per_step == row.extra["eager_ms_per_step"]
    assert row.extra["compile_error"] == "RuntimeError: inductor gave up" and row.extra["compiled_region"] is None


def test_compile_options_are_checked_before_loading(tmp_path):
    out = str(tmp_path / "x.json")
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--recipes", "bf16", "--regional", "--out", out])
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--recipes", "bf16", "bnb-8bit", "--compile", "--out", out])


def test_gguf_recipes_write_their_file_once_and_record_its_size(tmp_path):
    out = tmp_path / "rows.json"
    argv = ["--model", "tiny", "--recipes", "gguf-q4_0", "--steps", "2", "--repeats", "1", "--warmup-steps", "1",
            "--gguf-dir", str(tmp_path / "files"), "--out", str(out)]
    bench.main(argv)
    written = tmp_path / "files" / "tiny-Q4_0.gguf"
    (row,) = ql.measure.load_rows(out)
    assert row.recipe == "gguf-q4_0" and row.extra["gguf_file_bytes"] == written.stat().st_size
    assert row.extra["gguf_write_params_per_s"] > 0
    modified = written.stat().st_mtime_ns
    bench.main(argv)  # the file is there: reused, not written again
    assert written.stat().st_mtime_ns == modified and "gguf_write_s" not in ql.measure.load_rows(out)[0].extra


def test_gguf_recipes_without_a_folder_are_refused_before_loading(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--recipes", "gguf-q8_0", "--out", str(tmp_path / "x.json")])


def test_a_pipeline_placed_by_a_plain_device_map_records_it(tiny_path, monkeypatch):
    # torchao recipes load with device_map="cuda", which leaves pipe.hf_device_map a string, not a dict
    from quantlab import bench, recipes

    real_load = recipes.load_pipeline

    def load_with_string_map(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        pipe.hf_device_map = "cpu"
        return pipe

    monkeypatch.setattr(recipes, "load_pipeline", load_with_string_map)
    run = bench.run_recipe("tiny", "bf16", device="cpu", warmup=0, repeats=1, steps=2)
    assert run.row.extra["hf_device_map"] == "cpu"
    assert run.row.s_per_image > 0
