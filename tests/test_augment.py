"""Training-only intensity augmentation (covidtl.augment) inside build_transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from covidtl.augment import RandomGamma, RandomNoise, RandomRecode, intensity_steps
from covidtl.config import TrainConfig
from covidtl.loaders import train_loader
from covidtl.transforms import build_transform


def test_gamma_and_noise_stay_in_range_and_vary_the_image(seeded):
    x = torch.linspace(0, 1, 3 * 16 * 16).reshape(3, 16, 16)
    g = RandomGamma(1.0)(x)
    assert g.min() >= 0 and g.max() <= 1 and g[0, 0, 0] == 0 and g[-1, -1, -1] == 1  # gamma keeps 0 and 1
    assert not torch.equal(g, x)
    n = RandomNoise(0.2)(x)
    assert n.min() >= 0 and n.max() <= 1 and not torch.equal(n, x)
    assert RandomNoise(0.0)(x).equal(x)
    with pytest.raises(ValueError, match="probability"):
        intensity_steps(blur=1.5)


def test_intensity_steps_are_left_out_when_zero_and_never_used_at_eval():
    assert intensity_steps() == []
    assert len(intensity_steps(gamma=0.3, blur=0.5, noise=0.02)) == 3
    image = Image.fromarray((np.random.default_rng(0).random((80, 70, 3)) * 255).astype(np.uint8))
    steps = intensity_steps(gamma=0.5, noise=0.1)
    plain = build_transform(64, [0.5] * 3, [0.25] * 3, train=False)(image)
    with_aug = build_transform(64, [0.5] * 3, [0.25] * 3, train=False, intensity=steps)(image)
    assert torch.equal(plain, with_aug)


def test_the_recipe_turns_them_on_in_the_training_loader(tiny_covidx, seeded):
    from covidtl.labels import parse_label_file

    records = parse_label_file(tiny_covidx / "train.txt")
    config = TrainConfig(name="t", backbone="squeezenet1_1", pretrained=False, num_workers=0, batch_size=4,
                         gamma=0.5, blur=0.5, noise=0.05, hflip=False, rotation=0.0, color_jitter=0.0)
    loader, _ = train_loader(records, tiny_covidx / "train", config, 32, [0.5] * 3, [0.25] * 3)
    names = [type(step).__name__ for step in loader.dataset.transform.transforms]
    assert names.index("RandomGamma") > names.index("ToDtype") and names[-1] == "Normalize"
    assert {"RandomGamma", "RandomApply", "RandomNoise"} <= set(names)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(name="t", backbone="squeezenet1_1", label_smoothing=1.0)


@pytest.mark.parametrize("equalize", [False, True])
def test_the_recipe_equalizes_training_films_as_it_does_evaluation_ones(tmp_path, equalize):
    """A dim film (grey levels 40-116) reaches the model spread over the whole range when
    the recipe equalizes, in training as at evaluation; untouched otherwise."""
    from covidtl.labels import Record
    from covidtl.loaders import eval_loader

    ramp = np.tile(np.linspace(40, 116, 96), (96, 1)).round().astype(np.uint8)
    Image.fromarray(ramp, mode="L").save(tmp_path / "dim.png")
    records = [Record("p0", "dim.png", 1, "srcA")]
    config = TrainConfig(name="t", backbone="squeezenet1_1", pretrained=False, num_workers=0, batch_size=1,
                         hflip=False, rotation=0.0, color_jitter=0.0, crop_fraction=1.0, equalize=equalize)
    trained = next(iter(train_loader(records, tmp_path, config, 64, [0.0] * 3, [1.0] * 3)[0]))[0][0]
    evaluated = next(iter(eval_loader(records, tmp_path, 64, [0.0] * 3, [1.0] * 3, crop_fraction=1.0,
                                      num_workers=0, equalize=equalize)))[0][0]
    for x in (trained, evaluated):
        if equalize:
            assert x.min() <= 0.03 and x.max() == 1.0
        else:
            assert 39 / 255 <= x.min() and x.max() <= 117 / 255
    torch.testing.assert_close(trained, evaluated)


def test_recode_keeps_size_and_mode_and_changes_the_texture_only(seeded):
    """A recoded film is the same film (close grey levels) with other fine texture; p = 0 leaves it."""
    rng = np.random.default_rng(0)
    smooth = np.tile(np.linspace(30, 220, 90), (96, 1)) + rng.normal(0, 12, (96, 90))
    image = Image.fromarray(smooth.clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    assert RandomRecode(0.0)(image) is image
    recoded = [RandomRecode(1.0)(image) for _ in range(8)]
    pixels = np.asarray(image, dtype=float)
    for out in recoded:
        assert out.size == image.size and out.mode == image.mode
        change = np.abs(np.asarray(out, dtype=float) - pixels)
        assert 0 < change.mean() < 15
    assert len({np.asarray(out).tobytes() for out in recoded}) == len(recoded)  # a new copy each draw
    with pytest.raises(ValueError, match="probability"):
        RandomRecode(1.5)
    with pytest.raises(ValueError, match="recode"):
        TrainConfig(name="t", backbone="squeezenet1_1", recode=-0.1)


def test_the_recipe_recodes_training_films_before_the_framing_and_never_at_eval(tiny_covidx, seeded):
    from covidtl.labels import parse_label_file

    records = parse_label_file(tiny_covidx / "train.txt")
    config = TrainConfig(name="t", backbone="squeezenet1_1", pretrained=False, num_workers=0, batch_size=4, recode=0.5)
    loader, _ = train_loader(records, tiny_covidx / "train", config, 32, [0.5] * 3, [0.25] * 3)
    steps = loader.dataset.transform.transforms
    assert isinstance(steps[0], RandomRecode) and steps[0].p == 0.5
    plain = TrainConfig(name="t", backbone="squeezenet1_1", pretrained=False, num_workers=0, batch_size=4)
    names = [type(step).__name__ for step in train_loader(records, tiny_covidx / "train", plain, 32, [0.5] * 3,
                                                          [0.25] * 3)[0].dataset.transform.transforms]
    assert "RandomRecode" not in names
    image = Image.fromarray((np.random.default_rng(1).random((80, 70, 3)) * 255).astype(np.uint8))
    evaluated = build_transform(32, [0.5] * 3, [0.25] * 3, train=False, recode=RandomRecode(1.0))
    assert torch.equal(evaluated(image), build_transform(32, [0.5] * 3, [0.25] * 3, train=False)(image))
