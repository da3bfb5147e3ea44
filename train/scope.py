"""Fit the app's input check (`covidtl.scope`) and measure what it refuses.

    python -m train.scope fit --data ../shared/data/covidx-plus            # -> weights/scope/

Fits the feature distance on the train split, sets the cutoff at `--margin` x the
`--percentile` of the validation films' distances, then measures and records in the card
(weights/scope/scope.json): the share of test films refused (in scope: should be near 0),
of the app's examples refused (must be 0), and of the non-chest-X-ray development images
(`train.nonxray`) refused, the tune half and the measure half apart. With `--margin auto`
the margin is the largest of 1.0 ... `--max-margin` (steps of 0.05) at which the tune half
is still refused in full (at least `--tune-refusal`); the measure half only reports.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from covidtl.data import load_image, parse_label_file, split_paths
from covidtl.scope import ENCODER, INPUT_SIZE, ScopeGate, cheap_checks, fit_gate, save_gate, small_rgb

log = logging.getLogger("train.scope")
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"


def _split_pixels(root: Path, split: str) -> tuple[list[str], list[np.ndarray]]:
    label_file, image_dir = split_paths(root, split)
    names = [record.filename for record in parse_label_file(label_file)]
    return names, [small_rgb(load_image(image_dir / name, min_side=INPUT_SIZE)) for name in names]


def refusals(gate: ScopeGate, pixels: list[np.ndarray], distances: np.ndarray) -> np.ndarray:
    """Which images the gate refuses (bool [N]), given their feature distances."""
    cheap = np.array([not cheap_checks(p, gate.max_colour_share, gate.min_spread).in_scope for p in pixels])
    return cheap | (distances > gate.cutoff)


def _share(refused: np.ndarray) -> dict:
    return {"refused": int(refused.sum()), "n": len(refused), "share": float(refused.mean()) if len(refused) else None}


def fit(args: argparse.Namespace) -> dict:
    from train.nonxray import split_halves

    torch.set_num_threads(args.threads)
    log.info("reading %s", args.data)
    _, train = _split_pixels(args.data, "train")
    _, val = _split_pixels(args.data, "val")
    test_names, test = _split_pixels(args.data, "test")
    examples = sorted(p for p in args.examples.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    example_pixels = [small_rgb(load_image(p)) for p in examples]
    halves = split_halves(args.seed)

    log.info("fitting on %d train films, cutoff from %d validation films", len(train), len(val))
    gate, val_d = fit_gate(train, val, args.percentile, 1.0)
    base = gate.cutoff  # the percentile itself (margin 1.0)
    dist = {
        "test": gate.distances(test),
        "examples": gate.distances(example_pixels) if example_pixels else np.zeros(0),
        **{half: gate.distances([small_rgb_array(im) for _, _, im in items]) for half, items in halves.items()},
    }
    pix = {"test": test, "examples": example_pixels}
    pix.update({half: [small_rgb_array(im) for _, _, im in items] for half, items in halves.items()})

    if args.margin == "auto":
        margin = 1.0
        for candidate in np.arange(1.0, args.max_margin + 1e-9, 0.05):
            gate.cutoff = float(candidate * base)
            if refusals(gate, pix["tune"], dist["tune"]).mean() >= args.tune_refusal:
                margin = float(candidate)
        rule = (
            f"largest margin in 1.0-{args.max_margin:g} at which the tune half of the development set is "
            f"still refused (>= {args.tune_refusal:.0%}): {margin:.2f} x the {args.percentile:g}th percentile "
            "of validation distances"
        )
    else:
        margin = float(args.margin)
        rule = f"{margin:g} x the {args.percentile:g}th percentile of validation distances"
    gate.cutoff = float(margin * base)

    measured = {}
    for key in ("test", "examples", "tune", "measure"):
        refused = refusals(gate, pix[key], dist[key])
        measured[key] = _share(refused)
        if key in ("tune", "measure"):
            kinds = [kind for kind, _, _ in halves[key]]
            measured[key]["kept_by_kind"] = dict(Counter(k for k, r in zip(kinds, refused) if not r))
            measured[key]["kept"] = [n for (_, n, _), r in zip(halves[key], refused) if not r]
        elif key == "test":
            measured[key]["refused_files"] = [n for n, r in zip(test_names, refused) if r]
        else:
            measured[key]["refused_files"] = [p.name for p, r in zip(examples, refused) if r]
    gate.card.update(
        {
            "name": "scope",
            "what": "input check: is this a frontal chest X-ray like the training films?",
            "cutoff": gate.cutoff,
            "cutoff_rule": rule,
            "margin": margin,
            "percentile": args.percentile,
            "validation_percentile_distance": base,
            "data": {"name": args.data.name, "fit_split": "train", "cutoff_split": "val", "n_train": len(train),
                     "n_val": len(val), "n_test": len(test)},  # fmt: skip
            "distances": {
                key: {"median": float(np.median(d)), "min": float(d.min()), "max": float(d.max())}
                for key, d in {"val": val_d, **dist}.items()
                if len(d)
            },
            "refusals": measured,
            "development_set": "python -m train.nonxray (scikit-image samples, documents, charts, drawings, noise, "
            "gradients, checkerboards, CT/MRI/ultrasound-like renderings); tune half chooses the margin, "
            "measure half is only reported",
            "encoder_weights": f"{ENCODER} ImageNet (covidtl.models registry), not stored here",
            "command": "python -m train.scope " + " ".join(sys.argv[1:]),
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        }
    )
    save_gate(gate, args.out)
    return gate.card


def small_rgb_array(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    return small_rgb(Image.fromarray(image))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.scope", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit the input check on a COVIDx-layout folder and measure it")
    f.add_argument("--data", type=Path, required=True, help="folder in the COVIDx layout (train/val/test)")
    f.add_argument("--out", type=Path, default=Path("weights/scope"), help="folder for scope.safetensors + .json")
    f.add_argument("--examples", type=Path, default=EXAMPLES_DIR, help="the app's example films (none refused)")
    f.add_argument("--percentile", type=float, default=99.0)
    f.add_argument("--margin", default="auto", help="cutoff = margin x percentile; a number or 'auto'")
    f.add_argument("--max-margin", type=float, default=1.5, help="largest margin 'auto' may choose")
    f.add_argument("--tune-refusal", type=float, default=1.0, help="share of the tune half 'auto' keeps refused")
    f.add_argument("--seed", type=int, default=0, help="seed of the development set")
    f.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    card = fit(args)
    for key, value in card["refusals"].items():
        print(f"{key}: refused {value['refused']}/{value['n']}")
    print(f"cutoff {card['cutoff']:.1f} ({card['cutoff_rule']}); saved in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
