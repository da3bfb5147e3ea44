"""`python -m train.audit`: redo the Grad-CAM shortcut audit of exported classifiers with
each image's own lung mask, and write it into their cards.

    python -m train.audit --weights-dir weights --data ../shared/data/covidx-plus
    python -m train.audit --weights-dir /tmp/w --data ... --models efficientnet_lite0_plus

For every classifier card in `--weights-dir` (or those named), on the card's evaluation
split of `--data`: the positive-class Grad-CAM energy share inside each image's lungs
(found by the lung model: `--lung-weights`, default the shipped one; the two-ellipse
prior where its mask is implausible, counted) and in the border frame, overall and per
source. The card's ``shortcut_audit`` is replaced (atomically); the weights are untouched.
Then regenerate weights/README.md with `python -m train.model_table`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from covidtl.audit import cam_audit
from covidtl.export import CARD_SUFFIX, CardError, atomic_write_json, list_exported
from covidtl.images import load_image
from covidtl.inference import Predictor
from covidtl.labels import parse_label_file, split_paths
from covidtl.lungs import default_lung_weights, load_lung_model, view_lung_masks
from train.cli import report_errors, setup_logging

log = logging.getLogger("train.audit")


def audit_card(path: Path, data: Path, lung_model: torch.nn.Module, batch_size: int = 16) -> dict:
    """The lung audit of the exported classifier `path` on its card's evaluation split."""
    predictor = Predictor.from_file(path)
    split = predictor.card.get("evaluated_on", "test")
    label_file, image_dir = split_paths(data, split)
    records = parse_label_file(label_file)
    paths = [image_dir / r.filename for r in records]
    inputs = [predictor.preprocess(load_image(p, grey=True)) for p in paths]
    batches = [(torch.cat(inputs[i : i + batch_size]), None) for i in range(0, len(inputs), batch_size)]
    masks = view_lung_masks(paths, lung_model, predictor.input_size, predictor.crop_fraction,
                            cropped=bool(predictor.card.get("lung_crop")))
    audit = cam_audit(predictor.model, predictor.spec.cam_layer, batches, [r.source for r in records],
                      lung_masks=masks)
    return {"split": split, **audit}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m train.audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", type=Path, default=Path("weights"))
    p.add_argument("--data", type=Path, required=True, help="the COVIDx-layout folder the cards were evaluated on")
    p.add_argument("--models", nargs="+", help="only these model names")
    p.add_argument("--lung-weights", type=Path, help="lung model (default: the shipped one)")
    args = p.parse_args(argv)

    def work() -> None:
        lung_model = load_lung_model(args.lung_weights or default_lung_weights())[0]
        for path in list_exported(args.weights_dir):
            if args.models and path.stem not in args.models:
                continue
            card_path = path.with_suffix(CARD_SUFFIX)
            card = json.loads(card_path.read_text())
            card["shortcut_audit"] = audit_card(path, args.data, lung_model)
            atomic_write_json(card_path, card)
            shares = card["shortcut_audit"]["mean_energy_share"]
            print(f"{card['name']}: lungs {shares['lungs']} border {shares['border']} "
                  f"(fallbacks {card['shortcut_audit']['lung_fallbacks']} of {card['shortcut_audit']['n']})")

    return report_errors(work, (CardError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
