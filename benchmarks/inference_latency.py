"""Question 1: does predicting on a big image cost little more than decoding it plus the
model's own forward pass?

For a 1024 x 1024 8-bit PNG and a 2500 x 3000 16-bit PNG, each drawn (X-ray-like, with no
lungs a lung model finds: a lung-crop model keeps it whole) and a real film (a shipped
example, resized: a lung-crop model cuts it to its lungs), per model, side by side in one run:

    decode   PIL reads the file (every pixel, no conversion)
    forward  the model on a ready input tensor [1, 3, S, S] (inference mode); for a model
             trained on lung crops, plus its lung model on a ready [1, 3, 192, 192] tensor
             (both networks run on every upload)
    predict  load_upload(file, min_side=predictor.resize_side) + Predictor.predict: checks,
             reduced decode, 16-bit rescale, resize, crop, normalize, forward, softmax
    full     the same with load_upload(file) at full size (min_side=None), for comparison

Ratio: predict / (decode + forward); the worst over models and images is printed last.

    python -m benchmarks.inference_latency            # ~2 minutes on 2 cores
"""

from __future__ import annotations

from functools import partial

import torch

from benchmarks import common
from covidtl.inference import load_upload
from covidtl.lungs import LUNG_INPUT_SIZE

IMAGES = {  # name: (width, height, bits, writer)
    "1024x1024 8-bit PNG": (1024, 1024, 8, common.write_xray),
    "2500x3000 16-bit PNG": (2500, 3000, 16, common.write_xray),
    "1024x1024 8-bit PNG film": (1024, 1024, 8, common.write_film),
    "2500x3000 16-bit PNG film": (2500, 3000, 16, common.write_film),
}
QUICK_IMAGES = {
    "256x256 8-bit PNG": (256, 256, 8, common.write_xray),
    "300x360 16-bit PNG": (300, 360, 16, common.write_xray),
    "300x300 8-bit PNG film": (300, 300, 8, common.write_film),
}
LIMIT = 1.2


def own_forward(predictor):
    """The networks one upload runs, on ready tensors: the classifier, and its lung model first
    when it was trained on lung crops."""
    classify = common.bare_forward(predictor.model, common.ready_input(predictor))
    if predictor.lungs is None:
        return classify
    find_lungs = common.bare_forward(predictor.lungs, torch.randn(1, 3, LUNG_INPUT_SIZE, LUNG_INPUT_SIZE))

    def both() -> object:
        find_lungs()
        return classify()

    return both


def main(argv: list[str] | None = None) -> float:
    args = common.parser(__doc__).parse_args(argv)
    repeats, scratch = common.start(args, 15)
    models, note = common.predictors(args, scratch)
    print(note)
    rows, worst = [], 0.0
    for label, (width, height, bits, write) in (QUICK_IMAGES if args.quick else IMAGES).items():
        path = write(scratch / f"{label.replace(' ', '_')}.png", width, height, bits)
        for predictor in models:
            side = predictor.resize_side
            t = common.interleaved(
                {
                    "decode": partial(common.decode, path),
                    "forward": own_forward(predictor),
                    "predict": lambda p=predictor, path=path, side=side: p.predict(load_upload(path, min_side=side)),
                    "full": lambda p=predictor, path=path: p.predict(load_upload(path)),
                },
                repeats,
            )
            ratio = t["predict"] / (t["decode"] + t["forward"])
            worst = max(worst, ratio)
            rows.append(
                [
                    label,
                    predictor.name,
                    common.ms(t["decode"]),
                    common.ms(t["forward"]),
                    common.ms(t["predict"]),
                    f"{ratio:5.2f}",
                    common.ms(t["full"]),
                    f"{t['full'] / (t['decode'] + t['forward']):5.2f}",
                ]
            )
    print(f"medians of {repeats} interleaved repeats")
    common.table(["image", "model", "decode", "forward", "predict", "ratio", "full-size predict", "ratio"], rows)
    print(f"ratio predict / (decode + forward), worst of all: {worst:.2f} (target <= {LIMIT})")
    return worst


if __name__ == "__main__":
    main()
