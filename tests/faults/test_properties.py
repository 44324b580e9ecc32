"""Property-based tests (hypothesis) of the value parsers, identifiers and the table reader."""

from __future__ import annotations

import math
import string

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bidistill.cohort import load_cohort
from bidistill.cohort.identifiers import identifier_problem, read_identifier
from bidistill.cohort.parsers import is_blank, normalise_text, parse_number, parse_percent
from bidistill.config import CohortConfig
from bidistill.errors import CohortError

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda x: round(x, 3))


@given(finite)
def test_a_number_reads_back_in_each_spelling(x):
    text = f"{x:.3f}"
    assert math.isclose(parse_number(text), x, abs_tol=1e-9)
    assert math.isclose(parse_number(f" {text} cm "), x, abs_tol=1e-9)
    if "." in text and len(text.split(".")[1]) != 3:
        assert math.isclose(parse_number(text.replace(".", ",")), x, abs_tol=1e-9)


@given(st.text(max_size=30))
def test_parsers_return_a_float_or_raise_value_error(cell):
    for parse in (parse_number, parse_percent):
        try:
            value = parse(cell)
        except ValueError:
            continue
        assert isinstance(value, float)
        assert math.isnan(value) == is_blank(cell)


@given(st.floats(min_value=0, max_value=100, allow_nan=False), st.floats(0, 100))
def test_a_percentage_range_is_its_midpoint_in_the_unit_interval(lo, hi):
    lo, hi = sorted((round(lo, 1), round(hi, 1)))
    value = parse_percent(f"{lo}-{hi}%")
    assert 0 <= value <= 1
    assert math.isclose(value, (lo + hi) / 200, abs_tol=1e-9)


@given(st.text(max_size=30))
def test_normalising_text_is_idempotent(cell):
    once = normalise_text(cell)
    assert normalise_text(once) == once


@given(st.text(min_size=1, max_size=20))
def test_identifiers_read_back_exactly(text):
    identifier = read_identifier(text)
    if identifier is None:
        assert not text.strip()
        return
    assert identifier == text.strip()  # no Unicode normalisation, no case change
    problem = identifier_problem(identifier, names_files=True)
    if problem is None:
        assert "/" not in identifier and "\\" not in identifier and identifier not in (".", "..")


# --- the table reader ---------------------------------------------------------------------------

ids = st.text(alphabet=string.ascii_letters + string.digits + "-_éＰ０", min_size=1, max_size=8)
patient = st.fixed_dictionaries(
    {
        "label": st.sampled_from(["N0", "N+", "n0", " N+ "]),
        "age": st.one_of(st.none(), st.integers(18, 95)),
        "size": st.one_of(st.none(), finite.map(abs)),
        "slides": st.integers(1, 3),
    }
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(ids, patient, min_size=2, max_size=15),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_the_table_reader_gives_back_every_patient_and_value(tmp_path, patients, rnd, comma):
    rows = []
    for pid, p in patients.items():
        size = "" if p["size"] is None else f"{p['size']:.2f}"
        for s in range(p["slides"]):
            rows.append(
                {
                    "pid": pid,
                    "slide": f"{pid}#{s}",
                    "status": p["label"],
                    "age": "" if p["age"] is None or s else str(p["age"]),  # blank: filled
                    "size": size.replace(".", ",") if comma else size,
                }
            )
    rnd.shuffle(rows)
    path = tmp_path / "t.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    cfg = CohortConfig.model_validate(
        {
            "table": str(path),
            "patient_column": "pid",
            "slide_column": "slide",
            "label": {"column": "status", "positive": ["N+"], "negative": ["N0"]},
            "clinical": [
                {"column": "age", "kind": "numeric"},
                {"column": "size", "kind": "numeric", "parser": "number"},
            ],
        }
    )
    stripped = {p.strip(): v for p, v in patients.items()}
    labels = {pid: int("+" in p["label"]) for pid, p in stripped.items()}
    if len(stripped) != len(patients) or len(set(labels.values())) < 2:
        with pytest.raises(CohortError):
            load_cohort(cfg)
        return
    cohort = load_cohort(cfg)
    assert set(cohort.patients.index) == set(patients)
    for pid, p in patients.items():
        row = cohort.patients.loc[pid]
        assert row["label"] == labels[pid]
        assert (math.isnan(row["age"]) and p["age"] is None) or row["age"] == p["age"]
        if p["size"] is None:
            assert math.isnan(row["size"])
        else:
            assert math.isclose(row["size"], round(p["size"], 2), abs_tol=1e-9)
        assert sorted(cohort.slides_of(pid)) == [f"{pid}#{s}" for s in range(p["slides"])]
