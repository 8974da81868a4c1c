"""quantlab.files: a write completes or leaves the old file, and stale partials of dead writers are cleared."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from quantlab import files


def test_a_completed_write_replaces_the_target(tmp_path):
    target = tmp_path / "rows.json"
    target.write_text("old")
    with files.atomic_output(target) as partial:
        assert partial == tmp_path / f".rows.json.partial-{os.getpid()}" and not partial.exists()
        partial.write_text("new")
        assert target.read_text() == "old"  # not yet
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


def test_a_failed_write_keeps_the_old_target_and_leaves_no_partial(tmp_path):
    target = tmp_path / "rows.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_output(target) as partial:
            partial.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


def test_a_folder_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    (target / "old").mkdir(parents=True)
    with files.atomic_output(target) as partial:
        (partial / "new").mkdir(parents=True)
    assert [p.name for p in target.iterdir()] == ["new"]


def test_only_the_partials_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = files.partial_path(tmp_path / "a.gguf", dead_pid)
    stale.write_text("debris")
    stale_folder = files.partial_path(tmp_path / "model", dead_pid)
    stale_folder.mkdir()
    mine = files.partial_path(tmp_path / "b.gguf")  # this process is alive: its partial stays
    mine.write_text("in progress")
    other = tmp_path / "notes.partial-x"  # not a partial of quantlab's
    other.write_text("kept")
    assert files.remove_stale_partials(tmp_path, "b.gguf") == []
    assert sorted(files.remove_stale_partials(tmp_path)) == sorted([stale, stale_folder])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])
    assert files.remove_stale_partials(tmp_path / "nowhere") == []
