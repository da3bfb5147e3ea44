"""Every benchmark script runs, at a tiny size (--quick), and ends with its ratio line.
They time nothing here: the figures come from full runs on a quiet machine (README)."""

from __future__ import annotations

import importlib

import pytest

SCRIPTS = ["inference_latency", "gradcam_cost", "compare_all", "app_start", "train_input", "stats_pass", "gpu_train", "lung_cost"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_quick_and_prints_its_ratio_last(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COVIDTL_WEIGHTS", str(tmp_path / "none"))  # compare_all sets it; restored after
    module = importlib.import_module(f"benchmarks.{name}")
    args = ["--quick", "--threads", "1", "--workdir", str(tmp_path / "work"), "--weights-dir", str(tmp_path / "none")]
    result = module.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratio"), lines[-3:]
    assert result is not None
    if name in ("inference_latency", "compare_all", "gradcam_cost", "app_start"):
        assert any("untrained registry models" in line for line in lines)
    if name == "train_input":
        assert any("same labels and augmented tensors for the same seed: True" in line for line in lines)
    if name == "stats_pass":
        assert any("largest difference from the seed's values" in line for line in lines)


def test_stats_pass_fails_when_the_statistics_differ_beyond_its_tolerance(tmp_path, capsys, monkeypatch):
    from benchmarks import stats_pass

    real = stats_pass.seed_stats

    def off(*args, **kwargs):  # the seed's values, 2e-4 higher: twice the tolerance
        mean, std = real(*args, **kwargs)
        return tuple(m + 2e-4 for m in mean), std

    monkeypatch.setattr(stats_pass, "seed_stats", off)
    args = ["--quick", "--threads", "1", "--workdir", str(tmp_path / "work"), "--weights-dir", str(tmp_path / "none")]
    with pytest.raises(SystemExit) as exit_info:
        stats_pass.main(args)
    assert exit_info.value.code not in (0, None) and "tolerance" in str(exit_info.value.code)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ratio")
