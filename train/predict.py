"""Classify chest X-ray files in a batch: the app's answer, one line per film.

    covidtl-predict assets/examples/*.jpg
    covidtl-predict scans/*.dcm --model efficientnet_lite0_site_blind --json > answers.jsonl
    python -m train.predict FILES... [--model NAME] [--weights-dir DIR] [--json] [--explain-dir DIR]

Each film goes through `covidtl.answer` exactly as in the app (input check, lung fields,
calibrated P(COVID-19), the model's threshold), with the folder's input check and lung
model. Without --json a line says the decision, P(COVID-19), the threshold and the model
(or why the film is out of scope); with --json each line is one JSON object,
`covidtl.answer.Answer.to_json()` plus "file". `--explain-dir DIR` also writes each film's
heatmap (with the lungs' outline) as DIR/<name>.<model>.heatmap.png.

A file that cannot be read is reported (on stderr, and with --json as {"file", "error"})
and the others go on; the exit status is 1 if any file failed, 2 for a bad command line.
An out-of-scope film is an answer, not a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from covidtl.answer import Answer, ModelFolder, heatmap_overlay
from covidtl.decision import shown_digits
from covidtl.explain import CAM_METHODS, DEFAULT_METHOD
from covidtl.inference import BadInputError, ModelLoadError

REPO = Path(__file__).resolve().parents[1]
EXPLAIN_OPACITY = 0.4

log = logging.getLogger("train.predict")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="covidtl-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, metavar="FILES", help="chest X-rays: PNG, JPEG, BMP, TIFF or DICOM")
    p.add_argument("--model", help="a model of the weights folder (default: the folder's default model)")
    p.add_argument("--weights-dir", type=Path, default=REPO / "weights", help="exported models (default: weights/)")
    p.add_argument("--json", action="store_true", help="one JSON object per film instead of a line of text")
    p.add_argument("--explain-dir", type=Path, help="also write each film's heatmap PNG into this folder")
    p.add_argument("--method", choices=list(CAM_METHODS), default=DEFAULT_METHOD, help="heatmap method")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on, except with --json)")
    return p.parse_args(argv)


def answer_line(file: Path, answer: Answer) -> str:
    """One film's answer in a line, e.g. "x.png: Not flagged, P(COVID-19) = 0.118, threshold
    0.459, model efficientnet_lite0_film224", or for a refused film why it is out of scope."""
    if answer.p_covid is None:
        return f"{file}: {answer.decision}, model {answer.model}: {answer.reason}"
    digits = shown_digits(answer.p_covid, answer.threshold)
    return (
        f"{file}: {answer.decision}, P(COVID-19) = {answer.p_covid:.{digits}f}, threshold "
        f"{answer.threshold:.{digits}f}, model {answer.model}"
    )


def write_heatmap(answer: Answer, file: Path, folder: Path, taken: set[str]) -> Path | None:
    """Save `answer`'s heatmap over what the model saw as folder/<stem>.<model>.heatmap.png
    (a number added when two files share a stem); None for an out-of-scope film."""
    if answer.heatmap is None or answer.view is None:
        return None
    name, n = f"{file.stem}.{answer.model}.heatmap.png", 1
    while name in taken:
        n += 1
        name = f"{file.stem}-{n}.{answer.model}.heatmap.png"
    taken.add(name)
    path = folder / name
    Image.fromarray(heatmap_overlay(answer.view, answer.heatmap, answer.lungs_in_view, EXPLAIN_OPACITY)).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    folder = ModelFolder(args.weights_dir)
    if not folder.store.names():
        print(f"error: no models in {args.weights_dir}; train one with `python -m train --recipe ...`", file=sys.stderr)
        return 2
    if args.model is not None and args.model not in folder.store.cards:
        print(f"error: unknown model {args.model!r}; choose one of {', '.join(folder.store.names())}", file=sys.stderr)
        return 2
    try:
        folder.predictor(args.model)  # load it now: a model that cannot load fails every film alike
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.explain_dir is not None:
        args.explain_dir.mkdir(parents=True, exist_ok=True)
    heatmap = args.method if args.explain_dir is not None else None
    progress = (not args.json) if args.progress is None else args.progress
    failed, taken = 0, set()
    for file in tqdm(args.files, desc="films", unit="film", disable=not progress, file=sys.stderr):
        try:
            if not file.is_file():
                raise BadInputError(f"no such file: {file}")
            answer = folder.answer(file, args.model, heatmap=heatmap)
        except BadInputError as err:
            failed += 1
            tqdm.write(f"error: {file}: {err}", file=sys.stderr)
            if args.json:
                print(json.dumps({"file": str(file), "error": str(err)}), flush=True)
            continue
        if args.explain_dir is not None:
            write_heatmap(answer, file, args.explain_dir, taken)
        line = json.dumps({"file": str(file), **answer.to_json()}) if args.json else answer_line(file, answer)
        tqdm.write(line, file=sys.stdout)
    if failed:
        print(f"{failed} of {len(args.files)} files could not be classified", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
