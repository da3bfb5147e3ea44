"""COVIDx label files: records, parsing and writing, split paths, patient-level splits.

A COVIDx folder (the Kaggle ``andyczhao/covidx-cxr2`` release and ``covidx-mini``) holds
one label file and one image folder per split::

    ROOT/
      train.txt  val.txt  test.txt    lines "patient_id filename label source"
      train/  val/  test/             the image files named in those lines

Labels are indices into :data:`covidtl.classes.CLASSES` (0 = negative, 1 = positive).
Nothing here prints or seeds: library code logs, the entry point seeds.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from covidtl.classes import CLASSES
from covidtl.images import IMAGE_EXTENSIONS

__all__ = [
    "LABEL_MAP",
    "LAYOUT_HELP",
    "SPLITS",
    "LabelFileError",
    "Record",
    "parse_label_file",
    "patient_split",
    "split_paths",
    "spread",
    "write_label_file",
]


SPLITS: tuple[str, ...] = ("train", "val", "test")


LAYOUT_HELP = (
    "a COVIDx folder holds one label file and one image folder per split: "
    "ROOT/train.txt ROOT/val.txt ROOT/test.txt with lines 'patient_id filename label source' "
    "(label positive|negative) and the images in ROOT/train/ ROOT/val/ ROOT/test/"
)


# Case-sensitive, exactly as written in the COVIDx releases. The 3-class releases
# (COVIDx <= 8A/9A) label COVID-19 / normal / pneumonia; for the binary COVID-19 task
# both normal and (non-COVID) pneumonia are negatives, as in COVIDx 8B/9B.
LABEL_MAP: dict[str, int] = {
    "negative": CLASSES.index("negative"),
    "positive": CLASSES.index("positive"),
    "COVID-19": CLASSES.index("positive"),
    "normal": CLASSES.index("negative"),
    "pneumonia": CLASSES.index("negative"),
}


_EXPECTED_LINE = "expected 'patient_id filename label source'"


@dataclass(frozen=True)
class Record:
    """One labelled image: ``label`` is an index into ``CLASSES`` (1 = COVID-19 positive)."""

    patient_id: str
    filename: str
    label: int
    source: str


class LabelFileError(ValueError):
    """A label file line that does not read as ``patient_id filename label source``."""


def _line_error(path: Path, lineno: int, what: str) -> LabelFileError:
    return LabelFileError(f"{path}:{lineno}: {what}; {_EXPECTED_LINE}")


def _parse_line(path: Path, lineno: int, line: str) -> Record:
    # Split from the right: patient ids may contain spaces ("COVID 1 COVID(1).png positive sirm"
    # in COVIDx 8B), filename, label and source never do.
    parts = line.rsplit(None, 3)
    if len(parts) < 4:
        hint = " (the source field seems missing)" if parts[-1] in LABEL_MAP else ""
        raise _line_error(path, lineno, f"found {len(parts)} fields in {line!r}, need at least 4{hint}")
    patient_id, filename, label_name, source = parts
    label = LABEL_MAP.get(label_name)
    if label is None:
        if source in LABEL_MAP:
            what = f"the source field is missing in {line!r} (last field {source!r} is a label)"
        else:
            accepted = ", ".join(sorted(LABEL_MAP))
            what = f"unknown label {label_name!r} in {line!r}; accepted labels: {accepted}"
        raise _line_error(path, lineno, what)
    if os.path.splitext(filename)[1].lower() not in IMAGE_EXTENSIONS:
        accepted = " ".join(sorted(IMAGE_EXTENSIONS))
        raise _line_error(path, lineno, f"filename {filename!r} has no image extension ({accepted}) in {line!r}")
    return Record(patient_id=patient_id, filename=filename, label=label, source=source)


def parse_label_file(path: str | Path) -> list[Record]:
    """Read a COVIDx label file: one ``patient_id filename label source`` line per image.

    The last three space-separated fields are filename, label and source; everything before
    them is the patient id, which may contain spaces. Blank lines are skipped. Labels map
    through :data:`LABEL_MAP`, so 3-class files (COVID-19/normal/pneumonia) read as binary.

    Raises:
        LabelFileError: a malformed line, naming ``file:line``.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    records: list[Record] = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _line_error(path, lineno, f"not UTF-8 text ({error.reason} at byte {error.start})") from error
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if line.strip():
            records.append(_parse_line(path, lineno, line))
    return records


def write_label_file(records: Iterable[Record], path: str | Path) -> None:
    """Write records as a COVIDx label file that :func:`parse_label_file` reads back.

    Labels are written as their ``CLASSES`` name (``negative`` / ``positive``).

    Raises:
        ValueError: a filename or source containing whitespace, an empty field, or a label
            outside ``CLASSES``; nothing is written then.
    """
    lines = []
    for record in records:
        for field in ("filename", "source"):
            value = getattr(record, field)
            if not value or len(value.split()) != 1 or value != value.strip():
                raise ValueError(f"{field} {value!r} of {record} must be one non-empty word")
        if not record.patient_id.strip():
            raise ValueError(f"empty patient_id in {record}")
        if not 0 <= record.label < len(CLASSES):
            raise ValueError(f"label {record.label} of {record} is not an index into {CLASSES}")
        lines.append(f"{record.patient_id} {record.filename} {CLASSES[record.label]} {record.source}\n")
    Path(path).write_text("".join(lines), encoding="utf-8")


def spread(records: Sequence[Record], count: int) -> list[Record]:
    """At most `count` of `records` (0: all), evenly spaced in (source, filename) order, so that
    every source keeps its share of a sample (positions ``linspace(0, n - 1, count)``, rounded)."""
    ranked = sorted(records, key=lambda r: (r.source, r.filename))
    if count <= 0 or count >= len(ranked):
        return ranked
    step = (len(ranked) - 1) / (count - 1) if count > 1 else 0.0
    return [ranked[i] for i in dict.fromkeys(round(k * step) for k in range(count))]


def split_paths(root: Path, split: str) -> tuple[Path, Path]:
    """Return ``(root / f"{split}.txt", root / split)``: a split's label file and image folder.

    ``split`` is usually one of :data:`SPLITS`; any other plain name (``test_sirm``) works
    for folders that carry extra label files in the same layout. Both paths must exist.

    Raises:
        ValueError: ``split`` is empty or contains a path separator.
        FileNotFoundError: what is missing, and the expected layout.
    """
    if not split or split != Path(split).name or split in (".", ".."):
        raise ValueError(f"split must be a plain name such as {SPLITS}, got {split!r}")
    root = Path(root)
    label_file, image_dir = root / f"{split}.txt", root / split
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist; {LAYOUT_HELP}")
    if not label_file.is_file():
        present = sorted(path.name for path in root.glob("*.txt"))
        raise FileNotFoundError(
            f"no label file {label_file} for split {split!r} (label files present: "
            f"{', '.join(present) or 'none'}); {LAYOUT_HELP}"
        )
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"no image folder {image_dir} for split {split!r} next to {label_file.name}; {LAYOUT_HELP}"
        )
    return label_file, image_dir


def patient_split(
    records: Sequence[Record],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Split records into train/val/test with every patient's images in one split.

    Patients are stratified by their most frequent ``(label, source)``; within each stratum
    they are shuffled with ``seed`` and each goes to the split furthest below its target
    share of that stratum's images. The result does not depend on the input order.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, records in input order.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers summing to 1, got {fractions}")
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_patient[record.patient_id].append(record)

    strata: dict[tuple[int, str], list[str]] = defaultdict(list)
    for patient, images in by_patient.items():
        counts = Counter((r.label, r.source) for r in images)
        key = min(counts, key=lambda k: (-counts[k], k))
        strata[key].append(patient)

    rng = random.Random(seed)
    split_of: dict[str, str] = {}
    for key in sorted(strata):
        patients = sorted(strata[key])
        rng.shuffle(patients)
        total = sum(len(by_patient[p]) for p in patients)
        filled = [0] * len(SPLITS)
        for patient in patients:
            deficits = [f * total - n for f, n in zip(fractions, filled)]
            best = max(range(len(SPLITS)), key=lambda i: (fractions[i] > 0, deficits[i], -i))
            filled[best] += len(by_patient[patient])
            split_of[patient] = SPLITS[best]

    splits: dict[str, list[Record]] = {split: [] for split in SPLITS}
    for record in records:
        splits[split_of[record.patient_id]].append(record)
    return splits
