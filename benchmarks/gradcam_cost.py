"""Question 2: what does a Grad-CAM cost, next to the model's bare forward pass?

Per model, side by side in one run, on a ready input tensor [1, 3, S, S]:

    forward   the model in inference mode
    grad-cam  Predictor.explain(x, "Grad-CAM"): hooks, forward, backward from the positive
              class down to the CAM layer only, the map, its upsampling to S x S
    before    the same map the way it was made before (pytorch-grad-cam's GradCAM on the
              model as is: the backward pass runs through every layer to every parameter)

Ratio: grad-cam / forward; the worst over models is printed last.

    python -m benchmarks.gradcam_cost                 # ~1 minute on 2 cores
"""

from __future__ import annotations

from functools import partial

import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from benchmarks import common
from covidtl.classes import POSITIVE

LIMIT = 3.5


def full_backward_cam(predictor, x):
    layer = predictor.model.get_submodule(predictor.spec.cam_layer)

    def run():
        with torch.enable_grad(), GradCAM(model=predictor.model, target_layers=[layer]) as cam:
            heatmap = cam(input_tensor=x, targets=[ClassifierOutputTarget(POSITIVE)])[0]
        predictor.model.zero_grad(set_to_none=True)
        return heatmap

    return run


def main(argv: list[str] | None = None) -> float:
    args = common.parser(__doc__).parse_args(argv)
    repeats, scratch = common.start(args, 15)
    models, note = common.predictors(args, scratch)
    print(note)
    rows, worst = [], 0.0
    for predictor in models:
        x = common.ready_input(predictor)
        t = common.interleaved(
            {
                "forward": common.bare_forward(predictor.model, x),
                "grad-cam": partial(predictor.explain, x, "Grad-CAM"),
                "before": full_backward_cam(predictor, x),
            },
            repeats,
        )
        ratio = t["grad-cam"] / t["forward"]
        worst = max(worst, ratio)
        rows.append(
            [
                predictor.name,
                common.ms(t["forward"]),
                common.ms(t["grad-cam"]),
                f"{ratio:5.2f}",
                common.ms(t["before"]),
                f"{t['before'] / t['forward']:5.2f}",
            ]
        )
    print(f"medians of {repeats} interleaved repeats, input {tuple(x.shape)}")
    common.table(["model", "forward", "grad-cam", "ratio", "before (full backward)", "ratio"], rows)
    print(f"ratio grad-cam / forward, worst of all: {worst:.2f} (target <= {LIMIT})")
    return worst


if __name__ == "__main__":
    main()
