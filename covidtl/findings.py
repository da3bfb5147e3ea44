"""What each film shows beyond its COVID-19 label: the target of within-site pathology supervision.

In COVIDx most sources hold one class (every BIMCV film is COVID-19, every RSNA film normal), so
the COVID-19 label alone can be learnt by telling the hospitals apart. Some sources hold several
findings: NIH pneumonia and no-finding films, Kermany bacterial/viral pneumonia and normal
children, Cohen's other pneumonias beside its COVID-19 films. A second target that must be told
apart *within* those sources rewards features of the lungs, not of the site:

    0  no finding           (NIH / RSNA "No Finding", Kermany normal, Cohen "No Finding")
    1  other pneumonia      (any other finding of a COVID-19-negative film, Kermany bacteria/virus)
    2  COVID-19             (every positive film)
   -1  unknown              (no metadata row and no file-name rule: left out of the loss)

Where the findings come from: the data set's ``metadata.csv`` (columns ``filename`` and
``finding``, as in covidx-plus and covidx-large) and, for Kermany films, the file name
(``person12_bacteria_45.jpeg`` / ``person3_virus_16.jpeg`` pneumonia, ``IM-...``/``NORMAL...``
normal).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covidtl.classes import POSITIVE
from covidtl.labels import Record

FINDINGS: tuple[str, ...] = ("no finding", "other pneumonia", "COVID-19")
NO_FINDING, OTHER_PNEUMONIA, COVID = 0, 1, 2
UNKNOWN = -1
METADATA = "metadata.csv"


def read_metadata_findings(root: Path) -> dict[str, str]:
    """{filename: finding} from ``root/metadata.csv``; empty when the file is absent.

    Raises ValueError naming the file when it lacks the columns, or when one file name has
    two different findings (the target would be ambiguous)."""
    path = Path(root) / METADATA
    if not path.is_file():
        return {}
    findings: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"filename", "finding"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: needs the columns {sorted(missing)} for findings; it has {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            name, finding = row["filename"], (row["finding"] or "").strip()
            if findings.get(name, finding) != finding:
                raise ValueError(f"{path}, line {line}: {name} has finding {finding!r} and {findings[name]!r} elsewhere")
            findings[name] = finding
    return findings


def kermany_finding(filename: str) -> int:
    """The finding a Kermany file name encodes, or UNKNOWN."""
    name = filename.lower()
    if "bacteria" in name or "virus" in name:
        return OTHER_PNEUMONIA
    if name.startswith(("im-", "normal")):
        return NO_FINDING
    return UNKNOWN


def finding_target(record: Record, finding: str | None) -> int:
    """One film's target (see the module docstring); `finding` is its metadata text or None."""
    if record.label == POSITIVE:
        return COVID
    if finding:
        return NO_FINDING if finding.lower() == "no finding" else OTHER_PNEUMONIA
    if record.source == "kermany":
        return kermany_finding(record.filename)
    return UNKNOWN


def finding_targets(records: Sequence[Record], root: Path) -> np.ndarray:
    """int64 [N]: each record's target, from ``root``'s metadata and the file-name rules."""
    findings = read_metadata_findings(root)
    return np.array([finding_target(r, findings.get(r.filename)) for r in records], dtype=np.int64)
