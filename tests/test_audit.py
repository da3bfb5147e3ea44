"""The Grad-CAM shortcut audit: region masks, energy shares, and a run on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidtl.audit import border_mask, cam_audit, energy_shares, lung_mask
from covidtl.labels import parse_label_file
from covidtl.loaders import eval_loader
from covidtl.models import create_model, get_spec


def test_masks_cover_the_documented_regions():
    lungs, border = lung_mask(224), border_mask(224)
    assert lungs[112, int(0.30 * 224)] and lungs[112, int(0.70 * 224)]  # lung centres
    assert not lungs[5, 112] and not lungs[220, 112]  # neck and abdomen edges
    assert border[0, 100] and border[223, 223] and not border[112, 112]
    assert border.mean() == pytest.approx(1 - 0.8**2, abs=0.01)
    assert not (lungs & border).any()


def test_energy_shares():
    masks = {"lung_field": lung_mask(32), "border": border_mask(32)}
    uniform = energy_shares(np.ones((32, 32)), masks)
    assert uniform["lung_field"] == pytest.approx(masks["lung_field"].mean())
    only_border = energy_shares(masks["border"].astype(float), masks)
    assert only_border == {"lung_field": 0.0, "border": 1.0}
    assert np.isnan(energy_shares(np.zeros((32, 32)), masks)["border"])


def test_cam_audit_reports_overall_and_per_source(tiny_covidx, seeded):
    records = parse_label_file(tiny_covidx / "test.txt")
    spec = get_spec("squeezenet1_1")
    loader = eval_loader(records, tiny_covidx / "test", 64, spec.mean, spec.std, num_workers=0)
    report = cam_audit(create_model("squeezenet1_1").eval(), spec.cam_layer, loader, [r.source for r in records])
    assert report["n"] == len(records) and set(report["per_source"]) == {"srcA", "srcB"}
    for share in report["mean_energy_share"].values():
        assert share is None or 0.0 <= share <= 1.0
    with pytest.raises(ValueError, match="sources"):
        cam_audit(create_model("squeezenet1_1").eval(), spec.cam_layer, loader, ["srcA"])


def test_cam_audit_averages_the_shares_of_each_image(monkeypatch):
    """Heatmaps chosen by hand: a dot in the left lung centre, a dot in a corner, one lung
    dot weighing 1 beside a corner dot weighing 3, and an empty map (no share at all)."""
    size = 40
    lung_dot, corner_dot = np.zeros((size, size)), np.zeros((size, size))
    lung_dot[size // 2, int(0.30 * size)] = 1.0  # (y, x) of the left lung's centre
    corner_dot[0, 0] = 1.0
    maps = iter([lung_dot, corner_dot, lung_dot + 3 * corner_dot, np.zeros((size, size))])
    monkeypatch.setattr("covidtl.audit.explain", lambda *args, **kwargs: next(maps))
    loader = [(torch.zeros(2, 3, 8, 8), torch.zeros(2)), (torch.zeros(2, 3, 8, 8), torch.zeros(2))]
    report = cam_audit(torch.nn.Identity(), "layer", loader, ["a", "a", "b", "b"])
    assert report["per_source"]["a"] == {"lung_field": 0.5, "border": 0.5}
    assert report["per_source"]["b"] == {"lung_field": 0.25, "border": 0.75}  # the empty map counts for nothing
    assert report["mean_energy_share"] == {"lung_field": round(1.25 / 3, 4), "border": round(1.75 / 3, 4)}
    assert report["n"] == 4 and report["layer"] == "layer"
