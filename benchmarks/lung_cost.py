"""Question 8: what does finding the lungs cost, next to classifying the image?

In one run on CPU at batch 1, interleaved: the lung model's forward pass at its input
size (192 x 192) against efficientnet_lite0's forward pass at 224 x 224 (the default
classifier). The lung model is the shipped one (weights/lungs_lite0_unet.safetensors)
when present, else the same network with random weights (same cost). Prints
``ratio=<lung / lite0>`` last (target <= 1.5).

    python -m benchmarks.lung_cost                 # ~20 s on 2 cores
"""

from __future__ import annotations

import torch

from benchmarks import common
from covidtl.lungs import LUNG_INPUT_SIZE, LUNG_MODEL_NAME, create_lung_model, load_lung_model
from covidtl.models import count_parameters, create_model, get_spec

LIMIT = 1.5



def main(argv: list[str] | None = None) -> float:
    args = common.parser(__doc__).parse_args(argv)
    repeats, _ = common.start(args, 30)
    shipped = args.weights_dir / f"{LUNG_MODEL_NAME}.safetensors"
    if shipped.is_file():
        lung_model, note = load_lung_model(shipped)[0], f"lung model: shipped {shipped.name}"
    else:
        torch.manual_seed(0)
        lung_model, note = create_lung_model(pretrained=False).eval(), "lung model: untrained (random weights, same cost)"
    classifier = create_model("efficientnet_lite0", pretrained=False).eval()
    print(note)
    size = get_spec("efficientnet_lite0").input_size
    lung_x, cls_x = torch.randn(1, 3, LUNG_INPUT_SIZE, LUNG_INPUT_SIZE), torch.randn(1, 3, size, size)
    t = common.interleaved({"lungs": common.bare_forward(lung_model, lung_x), "lite0": common.bare_forward(classifier, cls_x)}, repeats,
                           warmup=1 if args.quick else 3)
    ratio = t["lungs"] / t["lite0"]
    print(f"medians of {repeats} interleaved repeats, batch 1")
    common.table(
        ["model", "input", "parameters", "forward"],
        [
            ["lung U-Net (lite0 stem + blocks 0-4)", f"{LUNG_INPUT_SIZE} px", f"{count_parameters(lung_model)[1]:,}",
             common.ms(t["lungs"])],
            ["efficientnet_lite0 classifier", f"{size} px", f"{count_parameters(classifier)[1]:,}", common.ms(t["lite0"])],
        ],
    )
    print(f"lung forward / lite0 forward (target <= {LIMIT})")
    print(f"ratio={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
