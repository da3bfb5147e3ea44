"""Fit the app's input check (`covidtl.scope`) and measure what it refuses.

    python -m train.scope fit --data ../shared/data/covidx-plus            # -> weights/scope/
    python -m train.scope lungs --data ../shared/data/covidx-large --data ../shared/data/covidx-plus \
        --laterals ../shared/data/covidx-mini            # -> weights/scope/lung_fields.json

Fits the feature distance on the train split, sets the cutoff at `--margin` x the
`--percentile` of the validation films' distances, then measures and records in the card
(weights/scope/scope.json): the share of test films refused (in scope: should be near 0),
of the app's examples refused (must be 0), and of the non-chest-X-ray development images
(`train.nonxray`) refused, the tune half and the measure half apart. With `--margin auto`
the margin is the largest of 1.0 ... `--max-margin` (steps of 0.05) at which the tune half
is still refused in full (at least `--tune-refusal`); the measure half only reports.

`lungs` measures the lung-field check (`covidtl.scope.lung_field_reason`: does the shipped
lung model find two lung fields?) and writes its refusal counts: per data set, split and
source for frontal films (should be near 0), the lateral views of covidx-mini (all refused)
as they are and flipped, rotated and cropped (`--augment` each), the app's examples (none),
and non-chest images: the development set above and parts of the examples cut to one lung
or none (refused, save for what the other checks catch).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from covidtl.images import load_image
from covidtl.labels import parse_label_file, split_paths
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


# --------------------------------------------------------------------------- lungs

# covidx-mini's lateral views: the 7 covidx-mini files that covidx-plus left out are these
# 4 laterals and 3 duplicate pictures (the laterals found by eye).
LATERAL_VIEWS = (
    "train/44C8E3D6-20DA-42E9-B33B-96FA6D6DE12F.jpeg",
    "train/35AF5C3B-D04D-4B4B-92B7-CB1F67D83085.jpeg",
    "val/4C4DEFD8-F55D-4588-AAD6-C59017F55966.jpeg",
    "val/D5ACAA93-C779-4E22-ADFA-6A220489F840.jpeg",
)


def _film_records(root: Path, splits: list[str]) -> list[tuple[str, str, Path]]:
    """(split, source, path) of each film of `splits` listed in a COVIDx-layout folder."""
    out = []
    for split in splits:
        label_file, image_dir = split_paths(root, split)
        out += [(split, r.source, image_dir / r.filename) for r in parse_label_file(label_file)]
    return out


def augmented(image: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """`image` mirrored, then `count` variants: mirrored or not, rotated +-12 deg, cut to
    75-100 % of each side, at times padded to a wider aspect, and gamma 0.7-1.4."""
    from PIL import ImageOps

    grey = image.convert("L")
    out = [ImageOps.mirror(grey)]
    for k in range(count):
        a = grey if k % 2 == 0 else ImageOps.mirror(grey)
        a = a.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, fillcolor=0)
        w, h = a.size
        cw, ch = int(w * rng.uniform(0.75, 1.0)), int(h * rng.uniform(0.75, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        a = a.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            wide = Image.new("L", (int(cw * rng.uniform(1.0, 1.4)), ch))
            wide.paste(a, ((wide.width - cw) // 2, 0))
            a = wide
        gamma = rng.uniform(0.7, 1.4)
        out.append(a.point([round(255 * (v / 255) ** gamma) for v in range(256)]))
    return out


def chest_parts(image: Image.Image) -> dict[str, Image.Image]:
    """Parts of a frontal film that are not a frontal chest X-ray: each half (one lung)
    and the lowest third (upper abdomen)."""
    w, h = image.size
    return {
        "left-half": image.crop((0, 0, w // 2, h)),
        "right-half": image.crop((w // 2, 0, w, h)),
        "lowest-third": image.crop((0, 2 * h // 3, w, h)),
    }


def _tally(rows: list[tuple[str, str | None]]) -> dict:
    """{refused, n, share, refused_files: {name: reason}} of (name, reason) rows."""
    refused = {name: reason for name, reason in rows if reason is not None}
    return {"refused": len(refused), "n": len(rows), "share": len(refused) / len(rows) if rows else None,
            "refused_files": refused}  # fmt: skip


def lung_fields(args: argparse.Namespace) -> dict:
    """Run the lung-field check on every set (see the module docstring); the record."""
    from covidtl import scope
    from covidtl.lungs import LUNG_MODEL_NAME, load_lung_model, locate_lungs
    from train.nonxray import split_halves

    torch.set_num_threads(args.threads)
    model, lung_card = load_lung_model(args.lung_model)

    def reason(image: Image.Image) -> str | None:
        return scope.lung_field_reason(locate_lungs(image.convert("L"), model))

    record: dict = {"frontal": {}}
    for root in args.data:
        films = _film_records(root, args.splits)
        log.info("%s: %d films", root.name, len(films))
        rows = []
        for k, (split, source, path) in enumerate(films, 1):
            rows.append((split, source, f"{split}/{path.name}", reason(load_image(path, grey=True))))
            if k % 500 == 0:
                log.info("  %d/%d", k, len(films))
        by_split = {}
        for split in args.splits:
            mine = [r for r in rows if r[0] == split]
            by_split[split] = _tally([(name, why) for _, _, name, why in mine])
            by_split[split]["by_source"] = {
                source: {k: v for k, v in _tally([(n, w) for _, s, n, w in mine if s == source]).items() if k != "refused_files"}
                for source in sorted({s for _, s, _, _ in mine})
            }
        held = [(name, why) for split, _, name, why in rows if split in ("val", "test")]
        if held:
            by_split["val+test"] = {k: v for k, v in _tally(held).items() if k != "refused_files"}
        record["frontal"][root.name] = by_split
    if args.lung_masks:
        names = sorted((args.lung_masks / "images").glob("*.jpg"))
        log.info("%s: %d films", args.lung_masks.name, len(names))
        record["frontal"][args.lung_masks.name] = {
            "all": _tally([(f"images/{p.name}", reason(load_image(p, grey=True))) for p in names])
        }
    if args.laterals:
        lateral = set(LATERAL_VIEWS)
        others = [(f"{split}/{p.name}", p) for split, _, p in _film_records(args.laterals, ["train", "val", "test"])]
        rng = np.random.default_rng(args.seed)
        views, variants = [], []
        for name in LATERAL_VIEWS:
            image = load_image(args.laterals / name, grey=True)
            views.append((name, reason(image)))
            variants += [(f"{name} variant {k}", reason(a)) for k, a in enumerate(augmented(image, args.augment, rng))]
        log.info("%s: %d lateral views, %d variants, %d other films", args.laterals.name, len(views), len(variants), len(others))
        record["laterals"] = {
            "data": args.laterals.name,
            "views": _tally(views),
            "variants": {**_tally(variants), "what": f"each view mirrored and {args.augment} random variants (seed {args.seed})"},
        }
        record["frontal"][args.laterals.name] = {
            "all but the laterals": _tally([(n, reason(load_image(p, grey=True))) for n, p in others if n not in lateral])
        }
    examples = sorted(p for p in args.examples.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    record["examples"] = _tally([(p.name, reason(load_image(p, grey=True))) for p in examples])

    gate = scope.gate_for(args.gate) if args.gate else None
    non_chest = [(f"{kind}/{name}", kind, Image.fromarray(image)) for half in split_halves(args.seed).values()
                 for kind, name, image in half]  # fmt: skip
    for p in examples:
        non_chest += [(f"example-part/{p.stem}-{part}", "example-part", im) for part, im in chest_parts(load_image(p, grey=True)).items()]
    log.info("non-chest images: %d", len(non_chest))
    rows = [(name, kind, reason(image), gate.check(image).in_scope if gate else None) for name, kind, image in non_chest]
    record["non_chest"] = {
        "what": "python -m train.nonxray (seed %d) and each example's halves and lowest third" % args.seed,
        "all": {k: v for k, v in _tally([(n, w) for n, _, w, _ in rows]).items() if k != "refused_files"},
        "by_kind": {kind: {k: v for k, v in _tally([(n, w) for n, c, w, _ in rows if c == kind]).items() if k != "refused_files"}
                    for kind in sorted({c for _, c, _, _ in rows})},  # fmt: skip
        "kept": [n for n, _, w, _ in rows if w is None],
    }
    if gate is not None and gate.fitted:
        record["non_chest"]["kept_by_both_checks"] = [n for n, _, w, ok in rows if w is None and ok]
    return {
        "what": "lung-field check: refused when the lung model finds no two lung fields (covidtl.scope.lung_field_reason)",
        "rule": {name: getattr(scope, name) for name in (
            "FIELD_MIN_FRACTION", "FIELD_MIN_RATIO", "FIELD_MAX_X_OVERLAP", "FIELD_MIN_Y_OVERLAP",
            "SPLIT_LOGITS", "SPLIT_MIN_RATIO", "SPLIT_MAX_AREA")},  # fmt: skip
        "lung_model": {"name": LUNG_MODEL_NAME, "weights_sha256": lung_card["weights_sha256"]},
        **record,
        "command": " ".join(
            ["python -m train.scope lungs"]
            + [f"--data {root.name}" for root in args.data]
            + [f"--splits {' '.join(args.splits)}"]
            + ([f"--lung-masks {args.lung_masks.name}"] if args.lung_masks else [])
            + ([f"--laterals {args.laterals.name} --augment {args.augment}"] if args.laterals else [])
            + [f"--seed {args.seed}"]
        ),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def _print_lung_fields(record: dict) -> None:
    def line(label: str, tally: dict) -> None:
        print(f"{label}: refused {tally['refused']}/{tally['n']}")

    for data, splits in record["frontal"].items():
        for split, tally in splits.items():
            line(f"{data} {split}", tally)
            for source, t in tally.get("by_source", {}).items():
                line(f"    {source}", t)
            for name, why in tally.get("refused_files", {}).items():
                print(f"    refused {name}: {why}")
    if "laterals" in record:
        line(f"{record['laterals']['data']} lateral views", record["laterals"]["views"])
        line(f"{record['laterals']['data']} lateral variants", record["laterals"]["variants"])
    line("examples", record["examples"])
    line("non-chest images", record["non_chest"]["all"])
    for kind, tally in record["non_chest"]["by_kind"].items():
        line(f"    {kind}", tally)
    if "kept_by_both_checks" in record["non_chest"]:
        kept = record["non_chest"]["kept_by_both_checks"]
        print(f"non-chest images kept by the lung-field check and the fitted input check: {len(kept)} {kept}")


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
    g = sub.add_parser("lungs", help="measure the lung-field check (two lung fields?) and record its refusals")
    g.add_argument("--data", type=Path, action="append", required=True,
                   help="folder in the COVIDx layout of frontal films (repeat for more)")  # fmt: skip
    g.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    g.add_argument("--laterals", type=Path, help="the covidx-mini folder, whose lateral views are LATERAL_VIEWS")
    g.add_argument("--augment", type=int, default=16, help="random variants of each lateral view")
    g.add_argument("--lung-masks", type=Path, help="a lung-masks folder (frontal films in images/)")
    g.add_argument("--examples", type=Path, default=EXAMPLES_DIR, help="the app's example films (none refused)")
    g.add_argument("--gate", type=Path, default=Path("weights"),
                   help="weights folder whose scope/ input check is also run on the non-chest images")  # fmt: skip
    g.add_argument("--lung-model", type=Path, default=None, help="lung model weights (default: the shipped one)")
    g.add_argument("--out", type=Path, default=Path("weights/scope/lung_fields.json"))
    g.add_argument("--seed", type=int, default=0, help="seed of the lateral variants and the development set")
    g.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "lungs":
        from covidtl.lungs import default_lung_weights

        args.lung_model = args.lung_model or default_lung_weights()
        record = lung_fields(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        _print_lung_fields(record)
        print(f"saved in {args.out}")
        return 0
    card = fit(args)
    for key, value in card["refusals"].items():
        print(f"{key}: refused {value['refused']}/{value['n']}")
    for source, value in card["refusals_source_held_out"].items():
        print(f"{source} films, gate fitted without them: refused {value['refused']}/{value['n']}")
    print(f"cutoff {card['cutoff']:.1f} ({card['cutoff_rule']}); saved in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
