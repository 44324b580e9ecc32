import math

import pytest

from bidistill.cohort.parsers import is_blank, normalise_text, parse_number, parse_percent


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("0.3", 0.3),
        ("30%", 0.3),
        ("30 %", 0.3),
        ("30-40%", 0.35),
        ("30%-40%", 0.35),
        ("<5%", 0.05),
        ("＜5%", 0.05),  # full-width less-than, as in BCNB
        ("＞30%", 0.30),
        ("３０％", 0.30),  # full-width digits and percent sign
        ("  12,5% ", 0.125),  # decimal comma and stray whitespace
        (45, 0.45),  # a bare number above 1 is a percentage
        (0.2, 0.2),
        ("100%", 1.0),
    ],
)
def test_parse_percent_reads_registry_forms(cell, expected):
    assert parse_percent(cell) == pytest.approx(expected)


@pytest.mark.parametrize(
    "cell", ["", "   ", None, float("nan"), "NA", " n/a ", "-", "#N/A", "null"]
)
def test_blank_cells_are_nan(cell):
    assert math.isnan(parse_percent(cell))
    assert math.isnan(parse_number(cell))
    assert is_blank(cell)


@pytest.mark.parametrize("cell", ["high", "30%%", "150%", "-5%"])
def test_parse_percent_refuses_nonsense(cell):
    with pytest.raises(ValueError):
        parse_percent(cell)


@pytest.mark.parametrize(
    ("cell", "expected"),
    [("3,5", 3.5), (" 2.1 cm ", 2.1), ("１２", 12.0), (7, 7.0), ("-1.5", -1.5)],
)
def test_parse_number(cell, expected):
    assert parse_number(cell) == pytest.approx(expected)


@pytest.mark.parametrize("cell", ["abc", "1.2.3", "3 4"])
def test_parse_number_refuses_text(cell):
    with pytest.raises(ValueError, match="expected a number"):
        parse_number(cell)


def test_normalise_text_drops_whole_float_tail_and_collapses_space():
    assert normalise_text(2.0) == "2"
    assert normalise_text("  Luminal   A ") == "Luminal A"
    assert normalise_text(2.5) == "2.5"


def test_whole_number_text_reads_like_a_whole_float():
    assert normalise_text("2.0") == "2" and normalise_text(" -3.00 ") == "-3"
    assert normalise_text("2.05") == "2.05" and normalise_text("P2.0a") == "P2.0a"


def test_comma_with_three_digits_is_ambiguous():
    with pytest.raises(ValueError, match="ambiguous"):
        parse_number("1,234")
    assert parse_number("0,125") == pytest.approx(0.125)
    assert parse_number("12,5") == pytest.approx(12.5)
