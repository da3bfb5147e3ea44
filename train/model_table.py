"""Regenerate weights/README.md from the model cards beside the weights, and the table of
shipped models in the top-level README.md (between its `README_START` and `README_END` lines).

    python -m train.model_table --weights-dir weights

Every number in the tables is read from a card or a leave-one-source-out result, and each
was written by the command that is named in it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from covidtl.cards import HELD_OUT_SUFFIX, read_held_out
from covidtl.classes import CLASSES, DISPLAY_NAMES
from covidtl.config import load_recipe
from covidtl.export import list_exported, read_card
from covidtl.resolution_audit import VARIANTS

METRIC_COLUMNS = ("auc", "sensitivity", "specificity", "ppv", "npv")
# The recipe the ingredient comparison changes one thing at a time (train/recipes/ablation/).
INGREDIENT_REFERENCE = "efficientnet_lite0_plus"
# The first row of the site-blind comparison on covidx-large: the default recipe from 2026-11-30 to
# 2026-12-03 (plus/efficientnet_lite0_lungs) with the covidx-large epoch budget (train/recipes/large/).
SITE_BLIND_REFERENCE = "efficientnet_lite0_lungs_large"
README_START = "<!-- shipped models: python -m train.model_table writes this table -->"
README_END = "<!-- end of the shipped models -->"


def fmt(metric: dict | None) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    if metric.get("ci_low") is None:
        return f"{metric['value']:.3f}"
    return f"{metric['value']:.3f} ({metric['ci_low']:.2f}–{metric['ci_high']:.2f})"


def model_label(card: dict) -> str:
    marks = [mark for mark in ("default", "baseline") if card.get(mark)]
    return f"`{card['name']}`" + (f" ({', '.join(marks)})" if marks else "")


def model_rows(cards: list[dict]) -> list[str]:
    head = ["model", "backbone", "init", *METRIC_COLUMNS, "threshold", "MB"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for card in cards:
        overall = card["metrics"][card.get("evaluated_on", "test")]["overall"]
        init = "scratch" if card["initialisation"].startswith("none") else "ImageNet"
        rows.append("| " + " | ".join([
            model_label(card), card["architecture"], init, *(fmt(overall.get(m)) for m in METRIC_COLUMNS),
            f"{card['threshold']:.3f}", f"{card['_size_mb']:.1f}",
        ]) + " |")
    return rows


def own_lungs(card: dict) -> bool:
    """Was the card's Grad-CAM audit made with each image's own lung mask (not the prior)?"""
    return "lungs" in card.get("shortcut_audit", {}).get("regions", {})


def source_rows(cards: list[dict]) -> list[str]:
    lung_column = "lung CAM energy" if any(own_lungs(card) for card in cards) else "lung-field CAM energy"
    rows = [f"| model | source | n (positive) | AUC | sensitivity | specificity | {lung_column} | border CAM energy |",
            "|---|---|---|---|---|---|---|---|"]
    for card in cards:
        report = card["metrics"][card.get("evaluated_on", "test")]
        audit = card.get("shortcut_audit", {}).get("per_source", {})
        for source, entry in report["per_source"].items():
            shares = audit.get(source, {})
            rows.append(
                f"| `{card['name']}` | {source} | {entry['n']} ({entry['n_positive']}) | "
                f"{fmt(entry['metrics'].get('auc'))} | "
                f"{fmt(entry['metrics']['sensitivity'])} | {fmt(entry['metrics']['specificity'])} | "
                f"{shares.get('lungs', shares.get('lung_field', 'n/a'))} | {shares.get('border', 'n/a')} |"
            )
        pooled = report.get("adult_pooled")
        if pooled:
            rows.append(
                f"| `{card['name']}` | **adult pooled** ({' + '.join(pooled['sources'])}) | "
                f"{pooled['n']} ({pooled['n_positive']}) | {fmt(pooled['overall'].get('auc'))} | "
                f"{fmt(pooled['overall']['sensitivity'])} | {fmt(pooled['overall']['specificity'])} | | |"
            )
    return rows


def lung_model_rows(weights_dir: Path) -> list[str]:
    """The lung segmentation model(s), apart from the classifiers."""

    paths = list_exported(weights_dir, task="lung_segmentation")
    if not paths:
        return []
    rows = ["", "## Lung segmentation model", "",
            "Finds the lungs for the lung crop (`crop = \"lungs\"`) and the Grad-CAM audit; not a classifier. "
            "Dice at each image's own size on lung-masks (V7 Labs masks of Cohen-collection films); "
            "implausible: predicted masks `covidtl.lungs.check_mask` rejects.", "",
            "| model | input | parameters | val Dice (mean) | test Dice (mean / median / min) | implausible (test) | MB |",
            "|---|---|---|---|---|---|---|"]
    for path in paths:
        card = json.loads(path.with_suffix(".json").read_text())
        val, test = card["metrics"]["val"], card["metrics"]["test"]
        rows.append(f"| `{card['name']}` | {card['input_size']} px | {card['parameters']:,} | {val['dice_mean']:.4f} | "
                    f"{test['dice_mean']:.4f} / {test['dice_median']:.4f} / {test['dice_min']:.4f} | "
                    f"{test['implausible']} of {test['images']} | {path.stat().st_size / 2**20:.1f} |")
    return rows


def calibration_rows(cards: list[dict]) -> list[str]:
    rows = ["| model | temperature T | val ECE before → after | test ECE before → after | val NLL before → after |",
            "|---|---|---|---|---|"]
    for card in cards:
        block = card.get("calibration")
        if not block:
            rows.append(f"| `{card['name']}` | 1 (not calibrated) | n/a | n/a | n/a |")
            continue
        cells = [f"{block[s]['ece_before']:.3f} → {block[s]['ece_after']:.3f}" if s in block else "n/a"
                 for s in ("val", "test")]
        val = block.get("val", {})
        nll = f"{val['nll_before']:.3f} → {val['nll_after']:.3f}" if val else "n/a"
        rows.append(f"| `{card['name']}` | {block['temperature']:.3f} | {cells[0]} | {cells[1]} | {nll} |")
    return rows


def loso_rows(results: list[dict]) -> list[str]:
    """Leave-one-source-out table: one row per fold of each `python -m train.loso` JSON."""
    rows = ["| recipe | held-out source | n (positive) | AUC | sensitivity | specificity | threshold (T) | epochs |",
            "|---|---|---|---|---|---|---|---|"]
    for result in results:
        for fold in result["folds"]:
            overall = fold["overall"]
            rows.append(
                f"| `{result['recipe']}` | {fold['held_out']} | {fold['n']} ({fold['n_positive']}) | "
                f"{fmt(overall.get('auc'))} | {fmt(overall.get('sensitivity'))} | {fmt(overall.get('specificity'))} | "
                f"{fold['threshold']:.3f} ({fold['temperature']:.2f}) | {fold['epochs_run']} |"
            )
    return rows


def read_loso(weights_dir: Path) -> list[dict]:
    """The `python -m train.loso` results in `weights_dir` (`*.loso.json`), by file name."""
    return [json.loads(path.read_text()) for path in sorted(Path(weights_dir).glob(f"*{HELD_OUT_SUFFIX}"))]


def recipe_of(result: dict, root: Path) -> dict:
    """The settings of the recipe a `python -m train.loso` result names in its command
    (path relative to `root`, the repository), with the epochs and seed its folds ran."""
    words = result["command"].split()
    config = load_recipe(root / words[words.index("--recipe") + 1]).to_dict()
    return config | {"epochs": result["epochs"], "seed": result.get("seed", config["seed"])}


def recipe_changes(config: dict, reference: dict) -> str:
    """What `config` sets differently from `reference` ("key value, ..."), marks left out."""
    def text(value) -> str:  # as a recipe writes it
        if isinstance(value, bool):
            return str(value).lower()
        return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, (list, tuple)) else str(value)

    changed = [f"{key} {text(value)}" for key, value in config.items()
               if key not in ("name", "default") and value != reference.get(key)]
    return ", ".join(changed) or "none (the reference)"


LOSO_CELLS = (("auc", "AUC"), ("sensitivity", "sens"), ("specificity", "spec"))


def fold_figures(overall: dict) -> list[tuple[str, str]]:
    """(name, short name) of each `LOSO_CELLS` figure a held-out source's classes allow, in order."""
    return [(name, short) for name, short in LOSO_CELLS if (overall.get(name) or {}).get("value") is not None]


def fold_cell(fold: dict | None) -> str:
    """"AUC a (95 % interval), sens b, spec c" of a held-out source (what its classes allow)."""
    if fold is None:
        return "not run"
    overall = fold["overall"]
    cells = [f"{short} {fmt(overall[name]) if name == 'auc' else format(overall[name]['value'], '.3f')}"
             for name, short in fold_figures(overall)]
    if fold.get("auc_against_validation") is not None:  # a one-class source, ranked against validation
        cells.append(f"AUC against validation {fold['auc_against_validation']:.3f}")
    return ", ".join(cells)


def audit_cell(audits: list[dict]) -> str:
    """Mean over `audits` (site_audit results) of each class's probe balanced accuracy, with chance."""
    cells = []
    for name in CLASSES:
        probes = [a["per_class"][name] for a in audits if "balanced_accuracy" in a.get("per_class", {}).get(name, {})]
        if probes:
            mean = sum(p["balanced_accuracy"] for p in probes) / len(probes)
            chance = sum(p["chance"] for p in probes) / len(probes)
            cells.append(f"{DISPLAY_NAMES[name]} {mean:.2f} ({chance:.2f})")
    return ", ".join(cells) or "n/a"


def ingredient_rows(reference: dict, results: list[dict], root: Path, audit: bool = False) -> list[str]:
    """One row per recipe: what it changes from `reference` (a `train.loso` result) and
    each held-out source's AUC, sensitivity and specificity; with `audit`, the folds' mean
    site-audit balanced accuracy per class (chance in brackets). The runs of one recipe
    (other seeds) follow each other, the reference's right after it."""
    sources = sorted({fold["held_out"] for result in [reference, *results] for fold in result["folds"]})
    base = recipe_of(reference, root)
    extra = ["site audit: source probe balanced accuracy (chance)"] if audit else []
    rows = ["| recipe | change from the reference | " + " | ".join([f"{s} held out" for s in sources] + extra) + " |",
            "|---|---|" + "---|" * (len(sources) + len(extra))]
    order = {reference["recipe"]: 0}  # each recipe's runs together, its seeds in order
    for result in results:
        order.setdefault(result["recipe"], len(order))
    results = sorted(results, key=lambda r: (order[r["recipe"]], r.get("seed") or 0))
    for result in [reference, *results]:
        folds = {fold["held_out"]: fold for fold in result["folds"]}
        cells = [fold_cell(folds.get(source)) for source in sources]
        if audit:
            cells.append(audit_cell([f["site_audit"] for f in result["folds"] if "site_audit" in f]))
        rows.append(f"| `{result['recipe']}` | {recipe_changes(recipe_of(result, root), base)} | " + " | ".join(cells) + " |")
    return rows


def site_blind_reference(results: list[dict]) -> dict | None:
    """The `SITE_BLIND_REFERENCE` run the site-blind comparison is read against: the one through
    the most folds, of those its lowest seed (not a one-fold longer run, nor another seed)."""
    return min((r for r in results if r["recipe"] == SITE_BLIND_REFERENCE),
               key=lambda r: (-len(r["folds"]), r.get("seed") or 0), default=None)


def site_audit_rows(cards: list[dict]) -> list[str]:
    """Each card's site audit (covidtl.site_audit): per class, the probe's balanced accuracy and chance."""
    rows = ["| model | data (splits) | " + " | ".join(f"{DISPLAY_NAMES[c]}: sources (films) | balanced accuracy (chance)"
                                                    for c in CLASSES) + " |", "|---|---|" + "---|---|" * len(CLASSES)]
    for card in cards:
        audit = card.get("site_audit")
        if not audit:
            rows.append(f"| `{card['name']}` | not audited | " + " | ".join("n/a | n/a" for _ in CLASSES) + " |")
            continue
        cells = []
        for name in CLASSES:
            probe = audit["per_class"][name]
            if "skipped" in probe:
                cells += [probe["skipped"], "n/a"]
            else:
                cells += [", ".join(f"{s} {n}" for s, n in probe["sources"].items()),
                          f"{probe['balanced_accuracy']:.3f} ({probe['chance']:.3f})"]
        rows.append(f"| `{card['name']}` | {audit['data']} ({', '.join(audit['splits'])}) | " + " | ".join(cells) + " |")
    return rows


def resolution_audit_rows(cards: list[dict]) -> list[str]:
    """Each card's resolution audit (covidtl.resolution_audit): per variant, the share of decisions
    changed and the specificity and sensitivity there, beside the films as stored."""
    names = list(VARIANTS)
    rows = ["| model | films (COVID-19) | as stored: spec / sens | "
            + " | ".join(f"{name}: changed, spec / sens" for name in names) + " |",
            "|---|---|---|" + "---|" * len(names)]
    for card in cards:
        audit = card.get("resolution_audit")
        if not audit:
            rows.append(f"| `{card['name']}` | not audited | n/a | " + " | ".join("n/a" for _ in names) + " |")
            continue
        cells = [f"{100 * audit['variants'][name]['flipped']:.1f} %, {_spec_sens(audit['variants'][name])}"
                 if name in audit["variants"] else "not audited" for name in names]
        rows.append(f"| `{card['name']}` | {audit['n']} ({audit['n_positive']}) | {_spec_sens(audit['as_is'])} | "
                    + " | ".join(cells) + " |")
    return rows


def _spec_sens(rates: dict) -> str:
    return " / ".join("n/a" if rates.get(k) is None else f"{rates[k]:.3f}" for k in ("specificity", "sensitivity"))


def render(weights_dir: Path) -> str:
    cards = []
    for path in list_exported(weights_dir):
        card = read_card(path.with_suffix(".json"))
        card["_size_mb"] = path.stat().st_size / 2**20
        cards.append(card)
    lines = [
        "# Shipped weights",
        "",
        "Generated by `python -m train.model_table` from the model cards (`<name>.json`); do not edit by hand.",
        "Research demonstration models, **not medical devices**. Metrics are on the card's evaluation split",
        "with 95 % bootstrap intervals; the threshold is each model's operating point, chosen on validation.",
        "",
    ]
    if not cards:
        return "\n".join(lines + ["No exported models yet: train one with `python -m train --recipe ...`.", ""])
    lines += model_rows(cards)
    if any(own_lungs(card) for card in cards):
        note = ["Lung and border columns: mean share of Grad-CAM energy (positive class) inside each image's own",
                "lungs (lung model; the two-ellipse prior where its mask is implausible, and for cards audited",
                "before the lung model: `python -m train.audit` redoes them) and in the outer 10 % frame; see",
                "`covidtl/audit.py`. Area shares (mean over images, first card): "]
    else:
        note = ["Lung-field and border columns: mean share of Grad-CAM energy (positive class) in the two-ellipse",
                "lung-field prior and in the outer 10 % frame; see `covidtl/audit.py`. Area shares: "]
    areas = cards[0].get("shortcut_audit", {}).get("area_share", {})
    note[-1] += ", ".join(f"{k} {v:.0%}" for k, v in areas.items() if v is not None) + "."
    lines += ["", "## Per source, and where Grad-CAM looks", "", *note, ""]
    lines += source_rows(cards)
    lines += ["", "## Calibration", "",
              "Temperature scaling fitted on validation (NLL); every shown or thresholded probability is",
              "softmax(logits / T). Expected calibration error of P(COVID-19), 10 equal-width bins, before (T = 1)",
              "and after; each card lists its reliability plot.", ""]
    lines += calibration_rows(cards)
    loso = read_loso(weights_dir)
    if loso:
        lines += ["", "## Leave-one-source-out", "",
                  "Each fold trains the recipe without one source (the epoch, if the recipe chooses one, temperature",
                  "and threshold on the validation split without it) and scores every image of that source from all",
                  "splits: the estimate of performance at a hospital never seen. A source of one class has no AUC",
                  "and only that class's rate.",
                  "Commands: " + "; ".join(f"`{r['command']}`" for r in loso)]
        unshipped = [r["recipe"] for r in loso if r["recipe"] not in {card["name"] for card in cards}]
        if unshipped:
            lines += ["Recipes whose model is not shipped (the ingredient comparison's reference, below): "
                      + ", ".join(f"`{name}`" for name in unshipped) + "."]
        lines += [""] + loso_rows(loso)
    if any(card.get("site_audit") for card in cards):
        lines += ["", "## Does a model know the hospital? (site-shortcut audit)", "",
                  "`python -m train.site_audit`: a linear probe on each model's penultimate features, cross-validated",
                  "by patient, predicts each film's source within one class, on films the model did not train on",
                  "(`covidtl/site_audit.py`). Balanced accuracy near chance: the features carry little of the",
                  "hospital; far above it: the model can tell the hospitals apart, and may be flagging the site.",
                  ""]
        lines += site_audit_rows(cards)
    if any(card.get("resolution_audit") for card in cards):
        audit = next(card["resolution_audit"] for card in cards if card.get("resolution_audit"))
        lines += ["", "## Does the answer depend on the film's size? (resolution audit)", "",
                  "`python -m train.resolution_audit`: each film scored again through the app's path in each",
                  "variant below, at the model's threshold",
                  f"({audit['data']}, {audit['split']} split, films spread over its sources;",
                  "`covidtl/resolution_audit.py`). A decision that changes with how a site exports its films is",
                  "one a new site cannot rely on.", "",
                  *(f"- {name}: {description}" for name, (description, _) in VARIANTS.items()), ""]
        lines += resolution_audit_rows(cards)
    ablation = read_loso(Path(weights_dir) / "ablation")
    large_reference = site_blind_reference([*loso, *ablation])
    if large_reference:
        others = [r for r in [*loso, *ablation] if r["data"] == large_reference["data"] and r is not large_reference]
        lines += ["", "## Site-blind comparison (covidx-large)", "",
                  f"Each recipe of `train/recipes/large/` through the same folds of {large_reference['data']}",
                  f"(`python -m train.loso`, each result's command in its JSON), against `{SITE_BLIND_REFERENCE}`, the",
                  "recipe of `efficientnet_lite0_lungs` (the covidx-plus default until 2026-12-03) with the same",
                  "epoch budget (first row). AUC where the held-out source",
                  "has both classes; otherwise the one rate it allows, at the fold's own threshold (chosen on the",
                  "validation split without that source), and, in runs made since 2026-12-03, the threshold-free AUC",
                  "of its films against the fold's validation films of the other class (the sources it trained on).",
                  "Last column: each fold's site audit on the validation and",
                  "test films of the sources it trained on, averaged over folds (chance in brackets).", ""]
        lines += ingredient_rows(large_reference, others, Path(weights_dir).resolve().parent, audit=True)
    reference = next((r for r in loso if r["recipe"] == INGREDIENT_REFERENCE), None)
    ablation = [r for r in ablation if reference and r["data"] == reference["data"]]
    if reference and ablation:
        shipped = [r for r in loso if r["recipe"] != INGREDIENT_REFERENCE and r["data"] == reference["data"]]
        lines += ["", "## Ingredient comparison", "",
                  "What makes a model hold up at a new site, decided by leave-one-source-out validation: each recipe",
                  "in `train/recipes/ablation/`, and each shipped one above, is the reference recipe",
                  f"(`{INGREDIENT_REFERENCE}`, above) with the change named, run through the same folds",
                  "(`weights/ablation/*.loso.json` and `weights/*.loso.json`, each with its command; 2 epochs",
                  "unless the change names another number). AUC is threshold-free; sensitivity and specificity are",
                  "at the fold's own threshold, chosen on validation without the held-out source. Decided by the",
                  "cohen held-out AUC (the one held-out source with many of both classes), then the nih held-out",
                  "specificity (adult negatives from a site never seen); fig1 has 5 negatives, kermany is children.",
                  ""]
        lines += ingredient_rows(reference, shipped + ablation, Path(weights_dir).resolve().parent)
    lines += lung_model_rows(weights_dir)
    lines += ["", "## How each model was made", ""]
    for card in cards:
        data = card["data"]
        splits = ", ".join(f"{s} {v['n']} ({v['n_positive']} positive)" for s, v in data["splits"].items())
        lines += [
            f"### `{card['name']}`",
            "",
            f"- Command: `{card['command']}`"
            + (f" ({card['wall_seconds'] / 60:.1f} min on {card.get('hardware', 'an unrecorded machine')})"
               if card.get("wall_seconds") is not None else ""),
            f"- Initialisation: {card['initialisation']}",
            f"- Data: {data['name']} — {splits}",
            "- Sources: " + "; ".join(f"{s}: {v['description']} ({v['population']}; license {v['license']})"
                                       for s, v in data["sources"].items()),
            f"- Threshold {card['threshold']:.4f}: {card['threshold_rule']}",
            *([f"- Lung crop: lung model `{card['lung_crop']['lung_model']}`, margin {card['lung_crop']['margin']}; "
               "kept whole (implausible mask): " + ", ".join(f"{s} {n}/{card['lung_crop']['images'][s]}"
                                                              for s, n in card['lung_crop']['kept_whole'].items())]
              if card.get("lung_crop") else []),
            *([f"- Calibration: temperature {card['temperature']:.4f} (see the calibration table)"]
              if "temperature" in card else []),
            f"- Intended use: {card['intended_use']}",
            "- Limitations:",
            *(f"  - {text}" for text in card["limitations"]),
            "",
        ]
    return "\n".join(lines)


def held_out_cell(result: dict | None) -> str:
    """Each held-out source's one figure: AUC where it has both classes, else its one rate."""
    if result is None:
        return "not run"
    cells = []
    for fold in result["folds"]:
        overall = fold["overall"]
        name, short = fold_figures(overall)[0]
        cells.append(f"{fold['held_out']} {short} {overall[name]['value']:.3f}")
    return ", ".join(cells)


def summary_rows(weights_dir: Path) -> list[str]:
    """The README's table: one row per shipped model, with its data, test AUC, test
    sensitivity and specificity at its threshold, what its recipe did at each source it never
    saw, and its site audit (probe balanced accuracy within each class, chance in brackets)."""
    rows = ["| model | trained on (films) | test AUC (95 % CI) | test sensitivity / specificity | "
            "held out: each source never seen | site audit: negatives / COVID-19 (chance) |",
            "|---|---|---|---|---|---|"]
    for path in list_exported(weights_dir):
        card = read_card(path.with_suffix(".json"))
        overall = card["metrics"][card.get("evaluated_on", "test")]["overall"]
        held = read_held_out(weights_dir, card)  # the run of this model's own recipe, epochs and seed
        audit = card.get("site_audit", {}).get("per_class", {})
        probes = [audit[name] for name in CLASSES if "balanced_accuracy" in audit.get(name, {})]
        rows.append("| " + " | ".join([
            model_label(card), f"{card['data']['name']} ({card['data']['splits']['train']['n']})",
            fmt(overall.get("auc")),
            f"{overall['sensitivity']['value']:.3f} / {overall['specificity']['value']:.3f}",
            held_out_cell(held.run if held else None),
            " / ".join(f"{p['balanced_accuracy']:.2f} ({p['chance']:.2f})" for p in probes) or "not audited",
        ]) + " |")
    return rows


def with_summary(readme: str, rows: list[str]) -> str:
    """`readme` with the lines between `README_START` and `README_END` replaced by `rows`."""
    head, start, rest = readme.partition(README_START + "\n")
    table, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(f"README.md needs the lines {README_START!r} and {README_END!r} around its model table")
    return head + start + "\n".join(rows) + "\n" + end + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.model_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", type=Path, default=Path("weights"))
    p.add_argument("--check", action="store_true", help="exit 1 if the README is not up to date")
    args = p.parse_args(argv)
    outputs = {args.weights_dir / "README.md": render(args.weights_dir)}
    readme = args.weights_dir.resolve().parent / "README.md"  # the project's, when weights/ is in it
    current = readme.read_text() if readme.is_file() else ""
    if README_START in current:
        outputs[readme] = with_summary(current, summary_rows(args.weights_dir))
    for target, text in outputs.items():
        if args.check:
            if (target.read_text() if target.is_file() else "") != text:
                print(f"{target} is out of date: run python -m train.model_table --weights-dir {args.weights_dir}")
                return 1
            continue
        target.write_text(text)
        print(f"wrote {target} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
