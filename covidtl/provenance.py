"""What we know about each COVIDx source: who the patients are and the images' license.

Model cards use this to state data provenance and to warn, from the data themselves,
when a source holds a single label (a model can then learn the source, not the disease).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from covidtl.classes import CLASSES
from covidtl.labels import Record


@dataclass(frozen=True)
class SourceInfo:
    description: str
    population: str  # "adult", "pediatric", "mixed" or "unknown"
    license: str


SOURCES: dict[str, SourceInfo] = {
    "bimcv": SourceInfo(
        "BIMCV-COVID19+ (Valencia region hospitals), RT-PCR-confirmed COVID-19 adults, via the COVID-19 "
        "Radiography Database (Chowdhury et al. 2020, Rahman et al. 2021), resized to 224 x 224",
        "adult",
        "CC BY 4.0",
    ),
    "cohen": SourceInfo(
        "COVID-19 image data collection (Cohen et al., 2020); many images are figures from publications",
        "adult",
        "mostly CC BY / CC BY-NC-SA / Apache 2.0 (per image)",
    ),
    "fig1": SourceInfo("Figure 1 COVID-19 chest X-ray dataset initiative (COVID-Net team)", "adult", "CC BY-NC-SA"),
    "kermany": SourceInfo(
        "Kermany et al. 2018 pediatric chest X-rays (normal, bacterial and viral pneumonia), patients aged 1 to 5",
        "pediatric",
        "CC BY 4.0",
    ),
    "nih": SourceInfo(
        "NIH ChestX-ray14 (Wang et al., 2017), adults, 'No Finding' and non-COVID-19 pneumonia, collected before 2020",
        "adult",
        "unrestricted use; cite Wang et al. CVPR 2017, acknowledge the NIH Clinical Center",
    ),
    "rsna": SourceInfo(
        "RSNA Pneumonia Detection Challenge normal films (NIH ChestX-ray14 adults without lung opacity), "
        "via the COVID-19 Radiography Database, resized to 224 x 224",
        "adult",
        "public; cite Wang et al. CVPR 2017 and the RSNA challenge",
    ),
}

UNKNOWN = SourceInfo("not described in covidtl.provenance", "unknown", "unknown: check the source")


def adult_sources(sources: Sequence[str]) -> list[str]:
    """The sources seen whose patients are adults (per `SOURCES`), sorted: the population
    the app is for, pooled for the adult metrics of a report."""
    return sorted(s for s in set(sources) if SOURCES.get(s, UNKNOWN).population == "adult")


def split_summary(records: Sequence[Record]) -> dict:
    """Counts per label and per source of one split (JSON-serializable)."""
    by_source: dict[str, Counter] = {}
    for r in records:
        by_source.setdefault(r.source, Counter())[CLASSES[r.label]] += 1
    return {
        "n": len(records),
        "n_positive": sum(r.label == CLASSES.index("positive") for r in records),
        "per_source": {s: dict(sorted(c.items())) for s, c in sorted(by_source.items())},
    }


def source_table(sources: Sequence[str]) -> dict[str, dict[str, str]]:
    """Description, population and license of each source seen."""
    return {s: vars(SOURCES.get(s, UNKNOWN)) for s in sorted(set(sources))}


def shortcut_warnings(records: Sequence[Record]) -> list[str]:
    """Plain-language warnings for confounded sources in the training data."""
    warnings = []
    summary = split_summary(records)["per_source"]
    for source, counts in summary.items():
        info = SOURCES.get(source, UNKNOWN)
        if len(counts) == 1:
            (label, n), = counts.items()
            warnings.append(
                f"Every training image from source '{source}' ({n} images, {info.population} patients) is "
                f"{label}: the model can score well by recognising that source instead of the disease."
            )
    populations = {
        CLASSES[label]: {SOURCES.get(r.source, UNKNOWN).population for r in records if r.label == label}
        for label in range(len(CLASSES))
    }
    if populations.get("positive") == {"adult"} and "pediatric" in populations.get("negative", set()):
        warnings.append(
            "Every positive training image is from an adult, while many negatives are pediatric: "
            "the model may be telling children from adults rather than COVID-19 from other findings."
        )
    return warnings
