"""Every case file the fuzzer saved for a bug we fixed replays as a pass.

A failure found by ``flex-oracle fuzz`` is fixed, and its JSON case file goes
into ``tests/cases/``; this test replays each one exactly as a bisect script
would (``flex-oracle replay CASE.json``), so the bug cannot return unseen.
"""

from pathlib import Path

import pytest

from properties.cli import main

CASES = sorted((Path(__file__).parent / "cases").glob("*.json"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_saved_case_replays_as_pass(path, capsys):
    assert main(["replay", str(path), "--target", "kernels", "--device", "cpu"]) == 0, capsys.readouterr().out
