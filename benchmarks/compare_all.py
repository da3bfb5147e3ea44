"""Question 3: does "Compare all models" cost no more than running each model on its own?

The app's own handlers, side by side in one run, on one 1024 x 1024 8-bit PNG:

    compare  app.compare(store, gate, file, "Grad-CAM"): reads the file once, one preprocessing
             per input geometry, then every model's prediction and Grad-CAM
    singles  app.classify(store, gate, file, model, "Grad-CAM", 0.4) for each model in turn
             (each reads and preprocesses the file itself), summed

Models are loaded once, before timing (the store keeps them). Ratio: compare / sum of
singles, printed last.

    python -m benchmarks.compare_all                  # ~1 minute on 2 cores
"""

from __future__ import annotations

import os

from benchmarks import common

LIMIT = 1.0
SIZE, QUICK_SIZE = 1024, 256


def main(argv: list[str] | None = None) -> float:
    args = common.parser(__doc__).parse_args(argv)
    repeats, scratch = common.start(args, 10)
    folder, note = common.model_folder(args, scratch)
    print(note)
    os.environ["COVIDTL_WEIGHTS"] = str(folder)  # the app builds its page at import
    import app

    store = app.ModelStore(folder)
    names = [
        n for n in store.names() if not args.models or n in args.models or store.cards[n]["architecture"] in args.models
    ]
    names = names[:2] if args.quick else names
    store.load_all()
    # Only the cheap input checks: the fitted one would refuse the synthetic film (and it
    # costs the same once per request on both sides).
    gate = app.ScopeGate()
    size = QUICK_SIZE if args.quick else SIZE
    path = str(common.write_xray(scratch / f"{size}x{size}x8.png", size, size))

    def compare():
        # The handler runs every model in the store; restrict it to `names` like the singles.
        app.compare(_Only(store, names), gate, path, "Grad-CAM")

    sides = {"compare": compare} | {
        name: (lambda name=name: app.classify(store, gate, path, name, "Grad-CAM", 0.4)) for name in names
    }
    t = common.interleaved(sides, repeats)
    singles = sum(t[name] for name in names)
    ratio = t["compare"] / singles
    print(f"medians of {repeats} interleaved repeats, {size}x{size} 8-bit PNG, {len(names)} models")
    common.table(
        ["run", "time"],
        [[f"classify {n}", common.ms(t[n])] for n in names]
        + [["sum of singles", common.ms(singles)], ["compare all", common.ms(t["compare"])]],
    )
    print(f"ratio compare-all / sum of single runs: {ratio:.2f} (target <= {LIMIT})")
    return ratio


class _Only:
    """A view of a ModelStore offering only some of its models (same loaded predictors)."""

    def __init__(self, store, names: list[str]) -> None:
        self.store, self._names = store, names
        self.weights_dir, self.cards, self.skipped = store.weights_dir, store.cards, store.skipped

    def names(self) -> list[str]:
        return list(self._names)

    def get(self, name: str):
        return self.store.get(name)

    def load_all(self) -> dict:
        return {name: self.store.get(name) for name in self._names}


if __name__ == "__main__":
    main()
