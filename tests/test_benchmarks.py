"""Every benchmark script runs, at a tiny size (--quick), and ends with its ratio line.
They time nothing here: the figures come from full runs on a quiet machine (docs/speed.md)."""

from __future__ import annotations

import importlib

import pytest
from PIL import Image

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


def test_a_lung_crop_model_s_own_forward_runs_its_lung_network_too():
    """inference_latency's baseline for a model trained on lung crops is both networks an upload
    runs (lung model at 192 px, then the classifier); for other models the classifier alone."""
    from types import SimpleNamespace

    import torch

    from benchmarks.inference_latency import own_forward

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            seen.append((self.name, tuple(x.shape)))
            return x

    own_forward(SimpleNamespace(model=Spy("classifier"), input_size=64, lungs=Spy("lungs")))()
    assert seen == [("lungs", (1, 3, 192, 192)), ("classifier", (1, 3, 64, 64))]
    seen.clear()
    own_forward(SimpleNamespace(model=Spy("classifier"), input_size=64, lungs=None))()
    assert seen == [("classifier", (1, 3, 64, 64))]


def test_inference_latency_times_the_lung_crop_on_its_real_films(tmp_path):
    """Each image size is timed as a drawn film, which the shipped lung model finds no lungs in
    (a lung-crop model keeps it whole), and as a real film, which it cuts to its lungs: both
    paths of an upload are timed. 16-bit films are written as 16-bit PNGs."""
    from benchmarks import common
    from benchmarks.inference_latency import IMAGES
    from covidtl.inference import load_upload
    from covidtl.lungs import crop_to_lungs, default_lung_weights, load_lung_model

    model, _ = load_lung_model(default_lung_weights())

    def sizes(writer):
        return sorted(size for *size, write in IMAGES.values() if write is writer)

    assert sizes(common.write_film) == sizes(common.write_xray) != [], "each size, drawn and real"
    for label, (width, height, bits, write) in IMAGES.items():
        path = write(tmp_path / f"{label.replace(' ', '_')}.png", width, height, bits)
        with Image.open(path) as written:
            assert written.size == (width, height) and (written.mode != "L") == (bits == 16), label
        cropped = crop_to_lungs(load_upload(path, min_side=500), model).box is not None
        assert cropped == (write is common.write_film), label


def test_the_load_test_sends_films_the_input_check_lets_through(tmp_path):
    """With real models the load test sends the shipped example films at new sizes and formats:
    the shipped input check accepts every one (it refuses the drawn patterns, which then never
    reach a model). With untrained models it sends the drawn patterns."""
    from benchmarks import load_test
    from covidtl.inference import load_upload
    from covidtl.scope import load_gate

    gate = load_gate(load_test.REPO / "weights" / "scope")
    shipped = load_test.REPO / "weights"
    (tmp_path / "real").mkdir()
    (tmp_path / "random").mkdir()
    served, models, real = load_test.serving_set(shipped, load_test.model_names(shipped), False,
                                                 tmp_path / "real", 6)
    assert served == shipped and models == load_test.model_names(shipped)
    served, models, drawn = load_test.serving_set(shipped, models, True, tmp_path / "random", 2)
    assert served == tmp_path / "random" / "weights" and len(models) == 2
    assert len(list(load_test.EXAMPLES.glob("*.jpg"))) == 4 and len({p.suffix for p in real}) == 3
    assert all(gate.check(load_upload(p)).in_scope for p in real)
    assert not any(gate.check(load_upload(p)).in_scope for p in drawn)
