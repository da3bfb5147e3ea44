"""The mutation list (tests/mutations.py) stays in sync with the code: each breakage's
original text is found exactly once in its file, the mutated file still compiles, and each
names tests that exist. The breakages themselves run only on demand
(`python -m tests.mutations`): they take minutes."""

from __future__ import annotations

import pytest

from tests.mutations import MUTATIONS, ROOT, Mutation, check, main


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_breakage_applies_exactly_once(mutation):
    assert check(mutation) is None, check(mutation)


def test_a_breakage_that_does_not_compile_is_not_applied(tmp_path):
    """A replacement that breaks the syntax would fail every test and prove nothing."""
    (tmp_path / "m.py").write_text("def f(x):\n    return x + 1\n")
    fine = Mutation("off by one", "m.py", "x + 1", "x + 2", ("t.py",))
    broken = Mutation("dedented", "m.py", "    return x + 1\n", "return x + 1\n", ("t.py",))
    assert check(fine, tmp_path) is None
    assert "does not compile" in check(broken, tmp_path)


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
