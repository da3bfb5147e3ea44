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
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from covidtl.images import load_image
from covidtl.labels import parse_label_file, split_paths
from PIL import Image

from covidtl.scope import (
    ENCODER,
    INPUT_SIZE,
    Encoder,
    Mahalanobis,
    ScopeGate,
    cheap_checks,
    features_of,
    save_gate,
    small_rgb,
)

log = logging.getLogger("train.scope")
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"


def _split(root: Path, split: str) -> tuple[list[str], list[str], list[np.ndarray]]:
    """File names, sources and `small_rgb` pixels of one split."""
    label_file, image_dir = split_paths(root, split)
    records = parse_label_file(label_file)
    pixels = [small_rgb(load_image(image_dir / r.filename, min_side=INPUT_SIZE)) for r in records]
    return [r.filename for r in records], [r.source for r in records], pixels


def refusals(gate: ScopeGate, cheap: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Which images the gate refuses (bool [N]): `cheap` (bool [N]) marks those the cheap
    checks refuse, `distances` are their feature distances."""
    return cheap | (distances > gate.cutoff)


def _share(refused: np.ndarray) -> dict:
    return {"refused": int(refused.sum()), "n": len(refused), "share": float(refused.mean()) if len(refused) else None}


def collect(args: argparse.Namespace, encoder: Encoder) -> dict[str, dict]:
    """Per set (train, val, test, examples, tune, measure): names, kinds (the source of a
    film, the kind of a development image), whether the cheap checks refuse each image,
    and encoder features [N, 304]. Cached in `args.features_cache` when given."""
    from train.nonxray import split_halves

    if args.features_cache and args.features_cache.is_file():
        with np.load(args.features_cache, allow_pickle=False) as cached:
            sets = {key.split("/")[0] for key in cached.files}
            return {s: {f: cached[f"{s}/{f}"] for f in ("names", "kinds", "cheap", "features")} for s in sets}
    raw: dict[str, tuple[list[str], list[str], list[np.ndarray]]] = {}
    for split in ("train", "val", "test"):
        log.info("reading %s/%s", args.data, split)
        raw[split] = _split(args.data, split)
    examples = sorted(p for p in args.examples.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    raw["examples"] = (
        [p.name for p in examples],
        ["example"] * len(examples),
        [small_rgb(load_image(p)) for p in examples],
    )
    for half, items in split_halves(args.seed).items():
        pixels = [small_rgb(Image.fromarray(image)) for _, _, image in items]
        raw[half] = ([name for _, name, _ in items], [kind for kind, _, _ in items], pixels)
    out = {}
    for key, (names, kinds, pixels) in raw.items():
        log.info("features of %s (%d images)", key, len(pixels))
        cheap = [not cheap_checks(p).in_scope for p in pixels]
        out[key] = {
            "names": np.array(names),
            "kinds": np.array(kinds),
            "cheap": np.array(cheap, dtype=bool),
            "features": features_of(encoder, pixels),
        }
    if args.features_cache:
        args.features_cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.features_cache, **{f"{s}/{f}": v for s, d in out.items() for f, v in d.items()})
    return out


def _margin(
    gate: ScopeGate, base: float, tune: dict, distances: np.ndarray, args: argparse.Namespace
) -> tuple[float, str]:
    """The cutoff's margin over `base` (see the module docstring) and the rule in words."""
    if args.margin != "auto":
        margin = float(args.margin)
        return margin, f"{margin:g} x the {args.percentile:g}th percentile of validation distances"
    margin = 1.0
    for candidate in np.arange(1.0, args.max_margin + 1e-9, 0.05):
        gate.cutoff = float(candidate * base)
        if refusals(gate, tune["cheap"], distances).mean() >= args.tune_refusal:
            margin = float(candidate)
    return margin, (
        f"largest margin in 1.0-{args.max_margin:g} at which at least {args.tune_refusal:.0%} of the tune half "
        f"of the development set is refused: {margin:.2f} x the {args.percentile:g}th percentile of validation "
        "distances"
    )


def held_out_sources(sets: dict[str, dict], percentile: float, margin: float) -> dict[str, dict]:
    """Films of each source refused by a gate fitted and cut off without that source (a
    stand-in for films from another hospital)."""
    out = {}
    for source in sorted(set(sets["train"]["kinds"])):
        keep = {s: sets[s]["kinds"] != source for s in ("train", "val")}
        if keep["train"].sum() < 2 or keep["val"].sum() < 2:
            continue
        distance = Mahalanobis.fit(sets["train"]["features"][keep["train"]])
        cutoff = margin * np.percentile(distance(sets["val"]["features"][keep["val"]]), percentile)
        films = np.concatenate([sets[s]["features"][sets[s]["kinds"] == source] for s in ("train", "val", "test")])
        cheap = np.concatenate([sets[s]["cheap"][sets[s]["kinds"] == source] for s in ("train", "val", "test")])
        out[source] = _share(cheap | (distance(films) > cutoff))
    return out


def fit(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    encoder = Encoder()
    sets = collect(args, encoder)
    train, val = sets["train"], sets["val"]
    log.info("fitting on %d train films, cutoff from %d validation films", len(train["names"]), len(val["names"]))
    distance = Mahalanobis.fit(train["features"])
    gate = ScopeGate(distance, encoder=encoder)
    dist = {key: distance(value["features"]) for key, value in sets.items()}
    base = float(np.percentile(dist["val"], args.percentile))
    margin, rule = _margin(gate, base, sets["tune"], dist["tune"], args)
    gate.cutoff = float(margin * base)

    measured = {}
    for key in ("val", "test", "examples", "tune", "measure"):
        refused = refusals(gate, sets[key]["cheap"], dist[key])
        measured[key] = _share(refused)
        names, kinds = sets[key]["names"].tolist(), sets[key]["kinds"].tolist()
        if key in ("tune", "measure"):
            measured[key]["kept_by_kind"] = dict(Counter(k for k, r in zip(kinds, refused) if not r))
            measured[key]["kept"] = [n for n, r in zip(names, refused) if not r]
            measured[key]["closest"] = sorted(zip(dist[key].round(1).tolist(), names))[:5]
        else:
            measured[key]["refused_files"] = [n for n, r in zip(names, refused) if r]
    gate.card.update(
        {
            "name": "scope",
            "what": "input check: is this a frontal chest X-ray like the training films?",
            "cutoff": gate.cutoff,
            "cutoff_rule": rule,
            "margin": margin,
            "percentile": args.percentile,
            "validation_percentile_distance": base,
            "data": {
                "name": args.data.name,
                "fit_split": "train",
                "cutoff_split": "val",
                **{f"n_{key}": len(sets[key]["names"]) for key in ("train", "val", "test")},
            },
            "distances": {
                key: {"median": float(np.median(d)), "min": float(d.min()), "max": float(d.max())}
                for key, d in dist.items()
                if len(d)
            },
            "refusals": measured,
            "refusals_source_held_out": held_out_sources(sets, args.percentile, margin),
            "development_set": "python -m train.nonxray (scikit-image samples, documents, charts, drawings, noise, "
            "gradients, checkerboards, CT/MRI/ultrasound-like renderings); the tune half chooses the margin, "
            "the measure half is only reported",
            "encoder_weights": f"{ENCODER} ImageNet (covidtl.models registry), not stored here",
            "command": (  # what decides the result; no machine paths (output, cache)
                f"python -m train.scope fit --data {args.data.name} --percentile {args.percentile:g} "
                f"--margin {args.margin} --max-margin {args.max_margin:g} --tune-refusal {args.tune_refusal:g} "
                f"--seed {args.seed}"
            ),
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        }
    )
    save_gate(gate, args.out)
    return gate.card


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
    f.add_argument("--max-margin", type=float, default=2.5, help="largest margin 'auto' may choose")
    f.add_argument("--tune-refusal", type=float, default=1.0, help="share of the tune half 'auto' keeps refused")
    f.add_argument("--seed", type=int, default=0, help="seed of the development set")
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--features-cache", type=Path, help="npz of every image's features: made once, then reused")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    card = fit(args)
    for key, value in card["refusals"].items():
        print(f"{key}: refused {value['refused']}/{value['n']}")
    for source, value in card["refusals_source_held_out"].items():
        print(f"{source} films, gate fitted without them: refused {value['refused']}/{value['n']}")
    print(f"cutoff {card['cutoff']:.1f} ({card['cutoff_rule']}); saved in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
