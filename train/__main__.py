"""Fine-tune a backbone on COVIDx and export it to weights/ with a model card.

    python -m train --recipe train/recipes/efficientnet_lite0.toml --data ../shared/data/covidx-mini
    python -m train --recipe train/recipes/resnet18.toml            # Kaggle download (online)
    torchrun --nproc_per_node 2 -m train --recipe ... --data ...    # DistributedDataParallel

See `python -m train --help`.
"""

from train.run import main

if __name__ == "__main__":
    raise SystemExit(main())
