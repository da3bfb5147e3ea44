"""Model cards for people: one card as markdown, with its plots (the app's Models tab).

A card (``<name>.json`` beside the weights, written by ``python -m train``) may come from
an older or hand-made export: every part it lacks is skipped, every value is escaped for
a markdown table.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from covidtl.classes import DISPLAY_NAMES, POSITIVE_NAME

log = logging.getLogger(__name__)

# `python -m train.loso` writes a recipe's leave-one-source-out result as <recipe name> + this.
HELD_OUT_SUFFIX = ".loso.json"

METRIC_NAMES = {
    "auc": "ROC AUC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "accuracy": "Accuracy",
    "f1": "F1",
}


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return text.replace("|", "\\|").replace("\n", " ")


def _metric_cell(metric: dict | None) -> str:
    if not isinstance(metric, dict):
        return "n/a"
    low, high = metric.get("ci_low"), metric.get("ci_high")
    interval = f" ({_num(low)} to {_num(high)})" if low is not None and high is not None else ""
    return f"{_num(metric.get('value'))}{interval}"


def _report_markdown(split: str, report: dict) -> list[str]:
    overall = report.get("overall") or {}
    lines = [
        f"#### {split} split: {report.get('n', '?')} images, {report.get('n_positive', '?')} {POSITIVE_NAME}",
        "| metric | value (95 % interval) |",
        "|---|---|",
    ]
    lines += [
        f"| {label} | {_metric_cell(overall.get(key))} |" for key, label in METRIC_NAMES.items() if key in overall
    ]
    confusion = report.get("confusion")
    if isinstance(confusion, dict):
        lines.append(
            "\nAt the threshold: " + ", ".join(f"{k.upper()} {confusion.get(k, '?')}" for k in ("tp", "fp", "tn", "fn"))
        )
    per_source = report.get("per_source") or {}
    if per_source:
        keys = [
            k
            for k in ("sensitivity", "specificity", "auc")
            if any(k in (s.get("metrics") or {}) for s in per_source.values())
        ]
        lines += [
            "\nPer source (a model that scores well on one source only may have learned the source):\n",
            "| source | images | positive | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |",
            "|---|---|---|" + "---|" * len(keys),
        ]
        for source, entry in per_source.items():
            metrics = entry.get("metrics") or {}
            cells = [_metric_cell(metrics.get(k)) for k in keys]
            lines.append(
                f"| {_cell(source)} | {entry.get('n', '?')} | {entry.get('n_positive', '?')} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def _data_markdown(data: dict) -> list[str]:
    lines = ["#### Training data"]
    for key in ("name", "root", "kaggle_handle", "kaggle_version"):
        if data.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: `{_cell(data[key])}`")
    splits = data.get("splits") or {}
    if splits:
        lines += ["\n| split | images | positive | per source |", "|---|---|---|---|"]
        for split, summary in splits.items():
            per_source = summary.get("per_source") or {}
            sources = "; ".join(
                f"{_cell(s)}: " + ", ".join(f"{n} {_cell(label)}" for label, n in counts.items())
                for s, counts in per_source.items()
            )
            lines.append(f"| {_cell(split)} | {summary.get('n', '?')} | {summary.get('n_positive', '?')} | {sources} |")
    sources = data.get("sources") or {}
    if sources:
        columns = sorted({k for info in sources.values() if isinstance(info, dict) for k in info})
        lines += [
            "\n| source | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for source, info in sources.items():
            info = info if isinstance(info, dict) else {}
            lines.append(f"| {_cell(source)} | " + " | ".join(_cell(info.get(c)) for c in columns) + " |")
    return lines


def _audit_markdown(audit: dict) -> list[str]:
    """Where the positive-class Grad-CAM energy falls: lungs (own masks or prior) and border."""
    shares = audit.get("mean_energy_share") or {}
    if not shares:
        return []
    lung_key = "lungs" if "lungs" in shares else "lung_field"
    lung_label = "inside its lungs" if lung_key == "lungs" else "in the two-ellipse lung prior"
    area = audit.get("area_share") or {}
    lines = [
        f"#### Where Grad-CAM looks ({_cell(audit.get('split', '?'))} split, {audit.get('n', '?')} images)",
        f"Mean share of each image's positive-class Grad-CAM energy {lung_label}: {_num(shares.get(lung_key))} "
        f"(area {_num(area.get(lung_key))}); in the outer border: {_num(shares.get('border'))} "
        f"(area {_num(area.get('border'))}).",
    ]
    if "lung_fallbacks" in audit:
        lines.append(f"Images without a plausible lung mask (ellipse prior used): {audit['lung_fallbacks']}.")
    per_source = audit.get("per_source") or {}
    if per_source:
        lines += ["\n| source | lungs | border |", "|---|---|---|"]
        lines += [f"| {_cell(s)} | {_num(v.get(lung_key))} | {_num(v.get('border'))} |" for s, v in per_source.items()]
    return lines


def site_audit_markdown(audit: dict) -> list[str]:
    """How well the penultimate features tell the sources apart within each class
    (covidtl.site_audit): balanced accuracy beside chance, per class."""
    per_class = audit.get("per_class") or {}
    if not per_class:
        return []
    splits = " and ".join(_cell(s) for s in audit.get("splits") or [])
    lines = [
        f"#### Does it know the hospital? ({_cell(audit.get('data', '?'))}, {splits} films)",
        "A linear probe on the model's penultimate features, cross-validated by patient, predicts each film's "
        "source within one class. Near chance: the features carry little of the hospital; far above it: the "
        "model could be flagging the site rather than the disease.",
        "\n| class | sources (films) | balanced accuracy | chance |",
        "|---|---|---|---|",
    ]
    for name, probe in per_class.items():
        shown = DISPLAY_NAMES.get(name, name)
        if "skipped" in probe:
            lines.append(f"| {_cell(shown)} | {_cell(probe['skipped'])} | – | – |")
            continue
        sources = ", ".join(f"{_cell(s)} {n}" for s, n in probe["sources"].items())
        lines.append(f"| {_cell(shown)} | {sources} | {_num(probe['balanced_accuracy'])} | {_num(probe['chance'])} |")
    return lines


def resolution_audit_markdown(audit: dict) -> list[str]:
    """Whether the model's decisions change with the film's size (covidtl.resolution_audit):
    per variant, the share of decisions changed, and sensitivity and specificity beside the
    unchanged films'."""
    variants = audit.get("variants") or {}
    if not variants:
        return []
    as_is = audit.get("as_is") or {}
    lines = [
        f"#### Does the answer depend on the film's size? ({_cell(audit.get('data', '?'))}, "
        f"{audit.get('n', '?')} {_cell(audit.get('split', '?'))} films, {audit.get('n_positive', '?')} COVID-19)",
        "Each film is scored again at another size, through the app's path, at the model's threshold. A decision "
        "that changes with how a site exports its films, not with the lungs, is one a new site cannot rely on.",
        "\n| film | decisions changed | sensitivity | specificity |",
        "|---|---|---|---|",
        f"| as stored | – | {_num(as_is.get('sensitivity'))} | {_num(as_is.get('specificity'))} |",
    ]
    for name, v in variants.items():
        changed = _num(100 * v["flipped"], 1) + " %" if isinstance(v.get("flipped"), (int, float)) else "n/a"
        lines.append(f"| {_cell(name)}: {_cell(v.get('change'))} | {changed} | {_num(v.get('sensitivity'))} | "
                     f"{_num(v.get('specificity'))} |")
    return lines


def lung_model_markdown(card: dict) -> str:
    """The lung segmentation model's card for humans (it is not a classifier)."""
    lines = [f"### {_cell(card.get('name', '?'))} (lung segmentation)"]
    if card.get("description"):
        lines.append(_cell(card["description"]))
    lines.append(f"Input {card.get('input_size', '?')} px; {card.get('parameters', '?')} parameters. "
                 f"Preprocessing: {_cell(card.get('preprocessing', '?'))}.")
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["\n| split | images | Dice mean | median | min | implausible masks |", "|---|---|---|---|---|---|"]
        for split, m in metrics.items():
            lines.append(f"| {_cell(split)} | {m.get('images', '?')} | {_num(m.get('dice_mean'), 4)} | "
                         f"{_num(m.get('dice_median'), 4)} | {_num(m.get('dice_min'), 4)} | {m.get('implausible', '?')} |")
    data = card.get("data") or {}
    if data.get("provenance"):
        lines.append(f"\n**Data:** {_cell(data['provenance'])}")
    if card.get("intended_use"):
        lines.append(f"\n**Intended use:** {_cell(card['intended_use'])}")
    lines += [f"- {_cell(item)}" for item in card.get("limitations") or []]
    return "\n".join(lines)


def held_out_path(weights_dir: Path, name: str) -> Path:
    """Where `python -m train.loso` puts recipe `name`'s leave-one-source-out result."""
    return Path(weights_dir) / f"{name}{HELD_OUT_SUFFIX}"


@dataclass(frozen=True)
class HeldOut:
    """A recipe's leave-one-source-out result (`run`, the card's own seed) and the same
    recipe's runs with other seeds (`other_seeds`, any of its sources): how far one run's
    figures move with the seed."""

    run: dict
    other_seeds: list[dict]


def _read_loso(path: Path) -> tuple[dict, dict] | None:
    """(result, its recipe, epochs and seed) of a `train.loso` JSON with folds; None, with a
    warning, when it cannot be read or is not one."""
    try:
        result = json.loads(path.read_text())
        folds = [(fold["held_out"], fold["n"], fold["n_positive"], fold["overall"]) for fold in result["folds"]]
        ran = {key: result[key] for key in ("recipe", "epochs", "seed")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring %s: not a train.loso result (%r)", path, err)
        return None
    if not folds:
        log.warning("ignoring %s: no folds", path)
        return None
    return result, ran


def read_held_out(weights_dir: Path, card: dict) -> HeldOut | None:
    """The leave-one-source-out result beside `card` (`held_out_path`), with the runs of the
    same recipe and epochs with other seeds kept in `weights_dir/ablation/` (as
    `<name>.*.loso.json`, from `train.loso --seed N`). None when there is no result beside
    the card, or it cannot be read, or it is not of the card's recipe, epochs and seed (a
    stale or hand-placed file would describe another model; it is ignored with a warning)."""
    name = card.get("name", "")
    path = held_out_path(weights_dir, name)
    read = _read_loso(path) if path.is_file() else None
    if read is None:
        return None
    result, ran = read
    config = card.get("config") or {}
    expected = {"recipe": name, "epochs": config.get("epochs"), "seed": config.get("seed")}
    if ran != expected:
        log.warning("ignoring %s: it is of %s, the card of %s", path, ran, expected)
        return None
    others = [_read_loso(other) for other in sorted((Path(weights_dir) / "ablation").glob(f"{name}.*{HELD_OUT_SUFFIX}"))]
    other_seeds = [
        other for other, of in filter(None, others)
        if of["recipe"] == name and of["epochs"] == ran["epochs"] and of["seed"] != ran["seed"]
    ]
    return HeldOut(result, other_seeds)


def _value(overall: dict, key: str) -> float | None:
    value = (overall.get(key) or {}).get("value")
    return value if isinstance(value, (int, float)) else None


def _fold_rates(overall: dict) -> list[str]:
    names = (("auc", "AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"))
    return [f"{label} {_value(overall, key):.3f}" for key, label in names if _value(overall, key) is not None]


def _other_seeds(held: HeldOut, fold: dict) -> str:
    """The other seeds' AUC on the source `fold` (of `held.run`) held out (specificity where
    the source has one class), e.g. "AUC 0.719, 0.701"; "" when no other seed held it out."""
    key = "auc" if _value(fold["overall"], "auc") is not None else "specificity"
    values = [_value(other["overall"], key) for run in held.other_seeds for other in run["folds"]
              if other["held_out"] == fold["held_out"]]
    shown = [f"{value:.3f}" for value in values if value is not None]
    return f"{'AUC' if key == 'auc' else key} {', '.join(shown)}" if shown else ""


def held_out_summary(held: HeldOut) -> str:
    """One sentence for an answer: what the recipe did on each source it never saw."""
    parts = []
    for fold in held.run["folds"]:
        other = _other_seeds(held, fold)
        parts.append(f"{fold['held_out']} {', '.join(_fold_rates(fold['overall']))}"
                     + (f" (other seeds: {other})" if other else ""))
    return (
        "How far to trust this at a new hospital: retrained without one source at a time and scored on "
        f"that source's films (leave-one-source-out, at each run's own threshold), this recipe got: {'; '.join(parts)}."
    )


def held_out_markdown(held: HeldOut) -> list[str]:
    """The leave-one-source-out folds as a card section: the honest estimate for a new site."""
    result = held.run
    lines = [
        "#### At a site it never saw",
        (
            f"The recipe retrained without one source at a time ({result.get('epochs', '?')} epochs, seed "
            f"{result.get('seed', '?')}), then scored on every film of that source at that run's own threshold. "
            "Expect a new hospital to look like these rows, not like the test split, whose sources were all "
            "seen in training. Other seeds: the same recipe run again with another seed."
        ),
        "",
        "| held-out source | n (positive) | ROC AUC (95 % interval) | sensitivity | specificity | other seeds |",
        "|---|---|---|---|---|---|",
    ]
    for fold in result["folds"]:
        overall = fold["overall"]
        lines.append(
            f"| {_cell(fold['held_out'])} | {fold['n']} ({fold['n_positive']}) | {_metric_cell(overall.get('auc'))} | "
            f"{_metric_cell(overall.get('sensitivity'))} | {_metric_cell(overall.get('specificity'))} | "
            f"{_other_seeds(held, fold) or 'not run'} |"
        )
    commands = [run["command"] for run in (result, *held.other_seeds) if run.get("command")]
    if commands:
        lines.append("\nFrom " + "; ".join(f"`{_cell(command)}`" for command in commands) + ".")
    return lines


def card_markdown(card: dict, held_out: HeldOut | None = None) -> str:
    """A model card for humans: threshold and its rule, metrics with 95 % intervals,
    per-source results, the leave-one-source-out result `held_out` (`read_held_out`) when
    given, provenance, intended use and limitations. Absent parts are skipped."""
    lines = [f"### {_cell(card.get('name', '?'))}"]
    facts = [f"architecture `{_cell(card.get('architecture', '?'))}`", f"input {card.get('input_size', '?')} px"]
    if card.get("initialisation") is not None:
        facts.append(f"initialisation {_cell(card['initialisation'])}")
    if card.get("best_epoch") is not None:
        last = (card.get("config") or {}).get("keep_epoch") == "last"
        facts.append(f"weights of epoch {card['best_epoch']} ({'the last' if last else 'best validation AUC'})")
    if card.get("created") is not None:
        facts.append(f"created {_cell(card['created'])}")
    lines.append("; ".join(facts) + ".")
    lines.append(
        f"\n**Operating threshold:** flags {POSITIVE_NAME} when P({POSITIVE_NAME}) ≥ {_num(card.get('threshold'))}."
    )
    if card.get("threshold_rule"):
        lines.append(f"Chosen by: {_cell(card['threshold_rule'])}.")
    if card.get("intended_use"):
        lines.append(f"\n**Intended use:** {_cell(card['intended_use'])}")
    limitations = card.get("limitations") or []
    if limitations:
        lines.append("\n**Limitations**\n")
        lines += [f"- {_cell(item)}" for item in limitations]

    metrics = card.get("metrics") or {}
    if not metrics:
        lines.append("\n_This card has no evaluation results: the model's performance is unknown._")
    for split in sorted(metrics, key=lambda s: (s != "test", s)):
        if isinstance(metrics[split], dict):
            lines.append("")
            lines += _report_markdown(split, metrics[split])
    if held_out:
        lines.append("")
        lines += held_out_markdown(held_out)
    crop = card.get("lung_crop")
    if isinstance(crop, dict):
        kept = ", ".join(f"{s} {n}/{(crop.get('images') or {}).get(s, '?')}" for s, n in (crop.get("kept_whole") or {}).items())
        lines.append(f"\n**Lung crop:** each image is cut to its lungs (lung model `{_cell(crop.get('lung_model'))}`, "
                     f"margin {crop.get('margin')}) before the resize; kept whole (implausible mask): {kept}.")
    if card.get("film_size") and card.get("film_jpeg"):
        lines.append(f"\n**One resolution, one copy:** every film is first made into a {card['film_size']} x "
                     f"{card['film_size']} px JPEG copy (quality {card['film_jpeg']}) and seen as such "
                     "(`covidtl.harmonize`), in training and here alike.")
    elif card.get("film_size"):
        lines.append(f"\n**One resolution:** every film is seen at the detail of a {card['film_size']} x "
                     f"{card['film_size']} px copy of it (`covidtl.harmonize`), in training and here alike.")
    if isinstance(card.get("shortcut_audit"), dict):
        lines.append("")
        lines += _audit_markdown(card["shortcut_audit"])
    if isinstance(card.get("site_audit"), dict):
        lines.append("")
        lines += site_audit_markdown(card["site_audit"])
    if isinstance(card.get("resolution_audit"), dict):
        lines.append("")
        lines += resolution_audit_markdown(card["resolution_audit"])
    if isinstance(card.get("data"), dict):
        lines.append("")
        lines += _data_markdown(card["data"])
    if card.get("command"):
        lines.append(f"\nTrained with `{_cell(card['command'])}`.")
    return "\n".join(lines)


def card_plots(card: dict, weights_dir: Path) -> list[tuple[Image.Image, str]]:
    """The card's PNG plots that exist inside `weights_dir`, with captions."""
    plots = card.get("plots") or {}
    images = []
    root = weights_dir.resolve()
    for caption, filename in plots.items() if isinstance(plots, dict) else ():
        path = (weights_dir / str(filename)).resolve()
        if path.parent != root or not path.is_file():  # only files beside the card
            continue
        with Image.open(path) as image:
            images.append((image.convert("RGB"), caption.replace("_", " ")))
    return images
