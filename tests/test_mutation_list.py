"""`make mutation-check` is not part of `make test` (it takes minutes), so its list of breakages could drift from
the code without anyone noticing: this checks, in a second, that every breakage still applies (each old text
occurs exactly once in its file) and names a test that exists."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mutation_check import BREAKAGES, REPO


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: b.name)
def test_every_breakage_still_applies_to_the_code_and_names_a_real_test(breakage):
    text = (REPO / breakage.path).read_text()
    for old, new in breakage.edits:
        assert text.count(old) == 1, f"{breakage.path} holds {old!r} {text.count(old)} times: update the list"
        assert new != old
    path, _, name = breakage.test.partition("::")
    assert f"def {name.split('[')[0]}(" in (REPO / path).read_text(), f"no test {breakage.test}"
