"""Numbers in tables by magnitude (llmcycle/core/numbers.py), with hand-written values."""
import math

import pytest

from llmcycle.core.numbers import number


@pytest.mark.parametrize("value,expected", [
    (0.995, "0.995"), (0.5, "0.500"), (9.9994, "9.999"), (12.3, "12.3"), (1234.5, "1,234.5"),
    (999_999.9, "999,999.9"), (0.001, "0.001"), (-0.25, "-0.250"), (0.0, "0.000"),
    (1.41e-5, "1.41e-05"), (0.000999, "9.99e-04"), (-3.2e-7, "-3.20e-07"),  # tiny: 0.000 would hide them
    (1.9e17, "1.90e+17"), (1e6, "1.00e+06"), (-2.5e9, "-2.50e+09"),  # huge: no 25-character cells
    (7, "7"), (12345678, "12345678"), (0, "0"),  # integers as integers
    (True, "True"), (False, "False"),
])
def test_magnitude_picks_fixed_or_scientific(value, expected):
    assert number(value) == expected


def test_digits_missing_and_non_finite():
    assert number(12.3456, 3) == "12.346" and number(1984.4, 0) == "1,984" and number(0.5, 1) == "0.5"
    assert number(1.41e-5, 1) == "1.41e-05"  # scientific whatever the decimals asked for
    assert number(None) == "n/a" and number(None, missing="") == ""
    assert number(math.nan) == "nan" and number(math.inf) == "inf" and number(-math.inf) == "-inf"
    assert number("rougeL") == "rougeL"


def test_a_huge_cell_is_at_most_eight_characters():
    assert len(number(1.9e17)) <= 8 and len(number(123456789.0)) <= 8 and len(number(1e-12)) <= 8
