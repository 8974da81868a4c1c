"""The pipeline lab (python -m quantlab.lab.bench) and the one runner loop behind every lab tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import quantlab as ql
from quantlab.lab import bench, runner


def test_command_line_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    assert bench.main(["--model", "tiny", "--recipes", "bf16", "--steps", "2", "--repeats", "1", "--out", str(out),
                       "--notes", "unit test"]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["notes"] == "unit test" and rows[0]["steps"] == 2


def test_command_line_checks_every_recipe_name_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_scenarios", lambda *a, **k: pytest.fail("loaded before checking names"))
    with pytest.raises(ValueError, match="Unknown recipe 'bnb-3bit'"):
        bench.main(["--recipes", "bf16", "bnb-3bit", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="Unknown recipe 'bf16\\+compile-fast'"):  # no name is parsed
        bench.main(["--recipes", "bf16+compile-fast", "--out", str(tmp_path / "x.json")])


def test_a_failed_compile_keeps_the_eager_row_file_with_its_reason(tmp_path, monkeypatch):
    def refuse(self, **kwargs):
        raise RuntimeError("inductor gave up")

    from diffusers import FluxTransformer2DModel

    monkeypatch.setattr(FluxTransformer2DModel, "compile", refuse)
    out = tmp_path / "rows.json"
    bench.main(["--model", "tiny", "--recipes", "bf16+compile", "--steps", "2", "--repeats", "1", "--out", str(out)])
    (eager,) = ql.measure.load_rows(tmp_path / "rows.eager.json")
    (row,) = ql.measure.load_rows(out)
    assert eager.recipe == row.recipe == "bf16+compile" and eager.ms_per_step == row.extra["eager_ms_per_step"]
    assert row.extra["compile_error"] == "RuntimeError: inductor gave up"


def test_a_compiled_row_leaves_no_eager_file(tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    monkeypatch.setattr(FluxTransformer2DModel, "compile", lambda self, **kwargs: None)
    out = tmp_path / "rows.json"
    bench.main(["--model", "tiny", "--recipes", "bf16+compile", "--steps", "2", "--repeats", "1", "--out", str(out)])
    assert not (tmp_path / "rows.eager.json").exists()  # kept only while compiling, or when compiling failed
    assert "compile_error" not in ql.measure.load_rows(out)[0].extra


def test_gguf_recipes_write_their_file_once_and_record_its_size(tmp_path):
    out = tmp_path / "rows.json"
    argv = ["--model", "tiny", "--recipes", "gguf-q4_0", "--steps", "2", "--repeats", "1", "--warmup-steps", "1",
            "--gguf-dir", str(tmp_path / "files"), "--out", str(out)]
    bench.main(argv)
    # named after the model's build folder, so a rebuilt tiny model never reuses a stale file
    written = tmp_path / "files" / f"{Path(ql.models.model_path('tiny')).name}-Q4_0.gguf"
    (row,) = ql.measure.load_rows(out)
    assert row.recipe == "gguf-q4_0" and row.extra["gguf_file_bytes"] == written.stat().st_size
    assert row.extra["gguf_write_params_per_s"] > 0
    modified = written.stat().st_mtime_ns
    bench.main(argv)  # the file is there: reused, not written again
    assert written.stat().st_mtime_ns == modified and "gguf_write_s" not in ql.measure.load_rows(out)[0].extra


def test_gguf_recipes_without_a_folder_are_refused_before_loading(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--recipes", "gguf-q8_0", "--out", str(tmp_path / "x.json")])


def test_the_runner_records_a_failure_and_goes_on_keeping_earlier_rows(tmp_path):
    out = tmp_path / "rows.json"
    ql.measure.save_rows([ql.measure.new_row("tiny", "kept", "cpu", ms_per_step=1.0)], out)

    def nan():
        raise ql.quality.NonFiniteError("The transformer (in torch.float16) produced NaN or infinite values. Use bf16.")

    rows = runner.run_scenarios([runner.Scenario("first", nan),
                                 runner.Scenario("second", lambda: ql.measure.new_row("tiny", "second", "cpu",
                                                                                      ms_per_step=2.0))],
                                out, model="tiny", device="cpu")
    assert [r.recipe for r in rows] == ["first", "second"]
    assert rows[0].extra["error"].startswith("NonFiniteError: The transformer") and rows[0].ms_per_step is None
    saved = {r.recipe: r for r in ql.measure.load_rows(out)}
    assert set(saved) == {"kept", "first", "second"} and saved["second"].ms_per_step == 2.0
    assert "failed: NonFiniteError" in runner.describe(rows[0])


def test_the_runner_refuses_two_scenarios_of_one_name(tmp_path):
    with pytest.raises(ValueError, match="share a name"):
        runner.run_scenarios([runner.Scenario("a", lambda: None)] * 2, tmp_path / "x.json", model="tiny")


def test_quantize_and_compare_orders_the_types_by_error(tiny_path):
    # chapter 04's GPU check (results/04_quanto_gpu_checks.json): Quanto's quantize()+freeze(), one row per type
    int8, int4 = (bench.quantize_and_compare("tiny", weights, device="cpu", height=64, width=64, text_tokens=8,
                                             repeats=1) for weights in ("int8", "int4"))
    assert (int8.recipe, int4.recipe) == ("quanto-int8 direct quantize+freeze", "quanto-int4 direct quantize+freeze")
    assert int8.extra["transformer_sqnr_db"] > int4.extra["transformer_sqnr_db"] > 5
    assert int8.extra["output_finite"] and int4.weights_bytes < int8.weights_bytes
    assert int8.extra["weight_tensor_types"] == {"WeightQBytesTensor qint8": 62}
