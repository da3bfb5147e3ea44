"""The one class order used everywhere: data, metrics, export, app.

Index 1 is the positive (COVID-19) class, so ``probs[:, POSITIVE]`` is P(COVID-19).
"""

CLASSES: tuple[str, ...] = ("negative", "positive")
POSITIVE: int = CLASSES.index("positive")
DISPLAY_NAMES: dict[str, str] = {"negative": "Negative", "positive": "COVID-19"}
POSITIVE_NAME: str = DISPLAY_NAMES[CLASSES[POSITIVE]]  # "COVID-19", as people read it
