"""Site-blind training (covidtl.site_blind, covidtl.findings), the balanced epoch budget, and the
site-shortcut audit (covidtl.site_audit, `python -m train.site_audit`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from covidtl.cards import card_markdown
from covidtl.config import config_from_dict
from covidtl.engine import EpochSampler
from covidtl.export import load_model
from covidtl.findings import COVID, NO_FINDING, OTHER_PNEUMONIA, UNKNOWN, finding_targets, read_metadata_findings
from covidtl.labels import Record
from covidtl.models import create_model, get_spec, list_models
from covidtl.site_audit import probe_sources, site_audit
from covidtl.site_blind import NO_SOURCE, SiteBlindHeads, feature_width, grad_reverse, source_targets, tap_features
from tests.conftest import make_covidx_folder
from tests.test_train_cli import cli_args, write_recipe
from train import site_audit as site_audit_cli
from train.run import main as train_main


def test_grad_reverse_is_identity_forward_and_negates_the_scaled_gradient_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = grad_reverse(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, -0.25 * torch.arange(4.0).expand(3, 4))


@pytest.mark.parametrize("name", list_models())
def test_tap_features_reads_the_head_input_of_every_backbone_and_lets_go(name):
    model = create_model(name, pretrained=False).eval()
    head = get_spec(name).head
    with torch.no_grad(), tap_features(model, head) as taken:
        model(torch.randn(2, 3, 64, 64))
    assert len(taken) == 1 and taken[0].shape == (2, feature_width(model, head))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(taken) == 1, "the hook outlived its block"


def _record(label: int, source: str, filename: str = "f.png") -> Record:
    return Record(patient_id=filename, filename=filename, label=label, source=source)


def test_source_targets_index_sources_within_each_class_and_skip_one_source_classes():
    records = [_record(1, "bimcv"), _record(1, "cohen"), _record(0, "rsna"), _record(1, "bimcv")]
    targets, by_class = source_targets(records)
    assert by_class == {1: ["bimcv", "cohen"]}
    assert targets.tolist() == [0, 1, NO_SOURCE, 0]


def test_findings_come_from_metadata_and_kermany_file_names(tmp_path):
    (tmp_path / "metadata.csv").write_text("split,filename,finding\ntrain,a.png,No Finding\ntrain,b.png,Pneumonia\n"
                                           "train,c.png,SARS\n")
    records = [_record(0, "nih", "a.png"), _record(0, "nih", "b.png"), _record(0, "cohen", "c.png"),
               _record(1, "bimcv", "d.png"), _record(0, "kermany", "person3_virus_16.jpeg"),
               _record(0, "kermany", "IM-0115-0001.jpeg"), _record(0, "rsna", "unknown.png")]
    assert finding_targets(records, tmp_path).tolist() == [NO_FINDING, OTHER_PNEUMONIA, OTHER_PNEUMONIA, COVID,
                                                           OTHER_PNEUMONIA, NO_FINDING, UNKNOWN]
    assert finding_targets(records, tmp_path / "absent")[[0, 3]].tolist() == [UNKNOWN, COVID]


def test_a_file_with_two_findings_is_refused_with_its_line(tmp_path):
    (tmp_path / "metadata.csv").write_text("filename,finding\na.png,No Finding\nb.png,SARS\na.png,Pneumonia\n")
    with pytest.raises(ValueError, match=r"line 4: a\.png"):
        read_metadata_findings(tmp_path)


def test_the_adversary_reverses_only_its_own_gradient_into_the_features():
    torch.manual_seed(0)
    heads = SiteBlindHeads(5, {0: ["a", "b"], 1: ["c", "d"]}, adversary=0.5, auxiliary=0.0)
    features = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    targets = torch.tensor([[0, UNKNOWN], [1, UNKNOWN], [0, UNKNOWN], [1, UNKNOWN], [NO_SOURCE, UNKNOWN],
                            [0, UNKNOWN]])
    losses = heads(features, labels, targets)
    assert set(losses) == {"adversary"}
    losses["adversary"].backward()
    reversed_grad = features.grad.clone()
    # The same loss without the reversal: the gradient the heads see, which the backbone gets negated and halved.
    features.grad = None
    plain = SiteBlindHeads(5, {0: ["a", "b"], 1: ["c", "d"]}, adversary=1.0, auxiliary=0.0)
    plain.load_state_dict(heads.state_dict())
    total = sum(nn.functional.cross_entropy(plain.source_heads[str(c)](features[keep]), targets[keep, 0], reduction="sum")
                for c in (0, 1) for keep in [(labels == c) & (targets[:, 0] != NO_SOURCE)])
    (total / 5).backward()
    assert torch.allclose(reversed_grad, -0.5 * features.grad, atol=1e-6)
    assert reversed_grad[4].abs().sum() == 0, "a film without a source target must not move the features"


def test_adversarial_training_removes_the_source_from_the_features_the_classifier_uses():
    """A small 'backbone' on inputs whose first coordinate is the label plus noise and whose
    second is the source, which agrees with the label for 90 % of the films (a shortcut):
    without the adversary the learned features keep the source within each class; with it, a
    probe tells the sources apart near chance, and the label is still learned."""
    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 2, n)
    sources = np.where(rng.random(n) < 0.9, labels, 1 - labels)
    x = np.stack([labels * 2.0 - 1 + rng.normal(0, 1.0, n), sources * 2.0 - 1, *rng.normal(size=(6, n))], axis=1)
    x, y, s = torch.tensor(x, dtype=torch.float32), torch.tensor(labels), torch.tensor(sources)
    targets = torch.stack([s, torch.full_like(s, UNKNOWN)], dim=1)

    def train(adversary: float) -> tuple[float, float]:
        torch.manual_seed(0)
        backbone, head = nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2)
        heads = SiteBlindHeads(8, {0: ["a", "b"], 1: ["a", "b"]}, adversary=adversary, auxiliary=0.0)
        optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters(), *heads.parameters()], lr=0.02)
        for _ in range(300):
            features = backbone(x)
            loss = nn.functional.cross_entropy(head(features), y)
            if adversary:
                loss = loss + heads(features, y, targets)["adversary"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            features = backbone(x)
            accuracy = float((head(features).argmax(1) == y).float().mean())
        audit = site_audit(features.numpy(), labels, np.array(["a", "b"])[sources], [str(i) for i in range(n)])
        return accuracy, audit["mean_excess"]

    plain_accuracy, plain_excess = train(0.0)
    blind_accuracy, blind_excess = train(1.0)
    assert plain_accuracy > 0.9 and blind_accuracy > 0.9
    assert plain_excess > 0.4, "without the adversary the features should carry the source"
    assert blind_excess < 0.2


def test_a_balanced_sampler_draws_samples_per_epoch_films():
    sampler = EpochSampler(10, torch.ones(10), seed=1, num_samples=25)
    assert len(sampler) == 25 and len(list(sampler)) == 25
    assert len(EpochSampler(10, torch.ones(10), seed=1, num_samples=25, rank=1, world_size=2)) == 13
    with pytest.raises(ValueError, match="num_samples needs weights"):
        EpochSampler(10, None, num_samples=5)


@pytest.mark.parametrize(("values", "message"), [
    ({"samples_per_epoch": 100, "balance": "loss"}, "balanced sampler"),
    ({"samples_per_epoch": 0, "balance": "sampler"}, "must be positive"),
    ({"adversary": -1.0}, "loss weights"),
    ({"auxiliary": 0.5, "mixup": 0.4}, "mixup"),
])
def test_site_blind_settings_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({"name": "x", "backbone": "squeezenet1_1", **values})


def test_the_probe_scores_separable_sources_high_and_random_ones_near_chance():
    rng = np.random.default_rng(0)
    sources = ["a"] * 60 + ["b"] * 60
    groups = [f"p{i // 2}" for i in range(120)]  # two films a patient
    separable = rng.normal(size=(120, 6)) + np.array([[6.0] + [0] * 5]) * (np.arange(120) >= 60)[:, None]
    assert probe_sources(separable, sources, groups)["balanced_accuracy"] > 0.95
    noise = probe_sources(rng.normal(size=(120, 6)), sources, groups)
    assert noise["chance"] == 0.5 and noise["balanced_accuracy"] < 0.7


def test_site_audit_skips_a_class_without_two_sources_of_enough_films():
    rng = np.random.default_rng(1)
    labels = [0] * 40 + [1] * 12
    sources = ["a"] * 20 + ["b"] * 20 + ["c"] * 9 + ["d"] * 3
    result = site_audit(rng.normal(size=(52, 4)), labels, sources, [str(i) for i in range(52)])
    assert set(result["per_class"]["negative"]["sources"]) == {"a", "b"}
    assert "skipped" in result["per_class"]["positive"]
    assert result["mean_excess"] == pytest.approx(
        (result["per_class"]["negative"]["balanced_accuracy"] - 0.5) / 0.5)


@pytest.fixture(scope="module")
def site_blind_run(tmp_path_factory):
    """One site-blind training run on a synthetic two-source folder with findings metadata."""
    tmp_path = tmp_path_factory.mktemp("site_blind")
    root = make_covidx_folder(tmp_path, {"train": 16, "val": 40, "test": 40}, size=48)
    rows = ["filename,finding"]
    for split in ("train", "val", "test"):
        for i, line in enumerate((root / f"{split}.txt").read_text().splitlines()):
            filename, label = line.split()[1:3]
            if label == "negative":
                rows.append(f"{filename},{'No Finding' if i % 3 else 'Pneumonia'}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    recipe = write_recipe(tmp_path, adversary=0.5, auxiliary=0.5, balance="sampler_source", samples_per_epoch=12,
                          epochs=2)
    assert train_main(cli_args(recipe, root, tmp_path)) == 0
    return root, tmp_path


def test_a_site_blind_recipe_trains_its_heads_and_exports_the_plain_classifier(site_blind_run):
    root, tmp_path = site_blind_run
    history = json.loads((tmp_path / "runs/tiny/history.json").read_text())
    assert len(history) == 2
    for row in history:
        assert row["adversary_loss"] > 0 and row["auxiliary_loss"] > 0
    model, card = load_model(tmp_path / "weights/tiny.safetensors")  # no head of the site-blind ones in it
    assert card["config"]["adversary"] == 0.5 and card["config"]["samples_per_epoch"] == 12
    audit = card["site_audit"]
    assert audit["splits"] == ["val", "test"] and audit["data"] == root.name
    for name in ("negative", "positive"):
        assert set(audit["per_class"][name]["sources"]) == {"srcA", "srcB"}
        assert 0 <= audit["per_class"][name]["balanced_accuracy"] <= 1
    assert "Does it know the hospital?" in card_markdown(card)


def test_the_site_audit_command_rewrites_the_card_with_the_same_result(site_blind_run):
    root, tmp_path = site_blind_run
    card_path = tmp_path / "weights/tiny.json"
    card = json.loads(card_path.read_text())
    trained = card.pop("site_audit")
    card_path.write_text(json.dumps(card))
    assert site_audit_cli.main(["--weights-dir", str(tmp_path / "weights"), "--data", str(root), "--no-progress",
                                "--cache-dir", str(tmp_path / "cache")]) == 0
    rewritten = json.loads(card_path.read_text())["site_audit"]
    for name in ("negative", "positive"):
        assert rewritten["per_class"][name]["balanced_accuracy"] == pytest.approx(
            trained["per_class"][name]["balanced_accuracy"], abs=0.05)


def test_the_site_audit_command_names_an_unknown_model(site_blind_run, capsys):
    root, tmp_path = site_blind_run
    assert site_audit_cli.main(["--weights-dir", str(tmp_path / "weights"), "--data", str(root),
                                "--models", "nope", "--no-progress"]) == 2
    assert "no classifier ['nope']" in capsys.readouterr().err


def test_the_site_audit_command_frames_a_lung_crop_card_with_its_own_lung_model_only(tiny_covidx, tmp_path,
                                                                                     monkeypatch, capsys):
    """The command frames films by the card (covidtl.cache.card_cache): a lung model whose sha256 is
    not the card's is refused; the card's own is used to cut the films (and the audit written)."""
    from covidtl import lungs
    from covidtl.export import sha256_file
    from tests.synthetic_inputs import FakeLungs, export_tiny_model

    monkeypatch.setattr(lungs, "load_lung_model", lambda path: (FakeLungs(), {"name": "fake", "weights_sha256": "f"}))
    lung_file, other = tmp_path / "fake.safetensors", tmp_path / "other.safetensors"
    lung_file.write_bytes(b"fake lung model")
    other.write_bytes(b"another lung model")
    path = export_tiny_model(tmp_path / "w", "tiny", "resnet18", input_size=32, crop_fraction=0.9, seed=1,
                             lung_crop={"lung_model": "fake", "lung_model_sha256": sha256_file(lung_file),
                                        "margin": lungs.CROP_MARGIN})
    args = ["--weights-dir", str(tmp_path / "w"), "--data", str(tiny_covidx), "--no-progress", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache")]
    assert site_audit_cli.main([*args, "--lung-weights", str(other)]) == 2
    assert "trained with lung model 'fake'" in capsys.readouterr().err
    assert "site_audit" not in json.loads(path.with_suffix(".json").read_text())
    assert site_audit_cli.main([*args, "--lung-weights", str(lung_file)]) == 0
    assert list((tmp_path / "cache").iterdir()) and all("lungs" in p.name for p in (tmp_path / "cache").iterdir())
    assert "site_audit" in json.loads(path.with_suffix(".json").read_text())


def test_the_probe_keeps_a_patients_films_in_one_fold():
    """Two near-identical films a patient, features that say nothing of the source: grouped folds
    leave the probe at chance; folds that split a patient would let it recognise the twin."""
    rng = np.random.default_rng(0)
    patients = rng.normal(size=(60, 300))
    features = np.repeat(patients, 2, axis=0) + rng.normal(0, 0.05, (120, 300))
    sources = [("a" if i % 2 else "b") for i in range(60) for _ in range(2)]
    groups = [f"p{i}" for i in range(60) for _ in range(2)]
    assert probe_sources(features, sources, groups)["balanced_accuracy"] < 0.7


def test_train_one_epoch_trains_the_site_blind_heads_with_the_model(seeded):
    from covidtl.engine import train_one_epoch

    model = create_model("squeezenet1_1", pretrained=False)
    head = get_spec("squeezenet1_1").head
    heads = SiteBlindHeads(feature_width(model, head), {0: ["a", "b"], 1: ["a", "b"]}, adversary=1.0, auxiliary=1.0)
    images, labels = torch.randn(8, 3, 48, 48), torch.tensor([0, 1] * 4)
    targets = torch.tensor([[0, 0], [1, 2], [1, 1], [0, 2]] * 2)
    loader = torch.utils.data.DataLoader(list(zip(images, labels, targets)), batch_size=4)
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    optimizer = torch.optim.Adam([*model.parameters(), *heads.parameters()], lr=1e-2)
    row = train_one_epoch(model, loader, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"), site_blind=heads,
                          head=head)
    assert set(row) == {"train_loss", "adversary_loss", "auxiliary_loss"}
    for key, value in heads.state_dict().items():
        assert not torch.equal(value, before[key]), f"{key} did not train"


def test_the_training_loader_draws_the_recipes_samples_per_epoch(tiny_covidx):
    from covidtl.labels import parse_label_file, split_paths
    from covidtl.loaders import train_loader

    label_file, image_dir = split_paths(tiny_covidx, "train")
    records = parse_label_file(label_file)
    config = config_from_dict({"name": "x", "backbone": "squeezenet1_1", "balance": "sampler_source",
                               "samples_per_epoch": 30, "batch_size": 5, "num_workers": 0})
    targets = np.zeros((len(records), 2), dtype=np.int64)
    loader, sampler = train_loader(records, image_dir, config, 32, (0.5,) * 3, (0.5,) * 3, targets=targets)
    assert len(sampler) == 30 and len(loader) == 6
    images, labels, batch_targets = next(iter(loader))
    assert images.shape == (5, 3, 32, 32) and batch_targets.shape == (5, 2)
