"""Checkpoints of fixed-seed runs stay bit-identical: the reference digests were made by the code before the
issue-20 renovation (tests/regression_cases.py)."""

import json
from pathlib import Path

import pytest
from regression_cases import CASES, digest, run_case

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_digests.json").read_text())


def test_every_case_has_a_reference():
    assert set(REFERENCE) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_tensors_are_bit_identical(name, tmp_path):
    assert digest(run_case(name, tmp_path / name)) == REFERENCE[name]
