"""The mutation list (tests/mutations.py) stays in sync with the code: each breakage's
original text is found exactly once in its file, and each names tests that exist. The
breakages themselves run only on demand (`python -m tests.mutations`): they take minutes."""

from __future__ import annotations

import pytest

from tests.mutations import MUTATIONS, ROOT, check, main


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_breakage_applies_exactly_once(mutation):
    assert check(mutation) is None, check(mutation)


def test_each_breakage_names_tests_that_exist():
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    for mutation in MUTATIONS:
        assert mutation.tests, mutation.name
        for node in mutation.tests:
            file, _, name = node.partition("::")
            text = (ROOT / file).read_text()
            assert name.split("[")[0] == "" or f"def {name.split('[')[0]}(" in text, node


def test_list_prints_every_breakage(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(m.name in out for m in MUTATIONS)
