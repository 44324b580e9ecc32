"""What a run's results say, in a few sentences: who won at which rates, and does it hold up;
the console table and the report's headline box both say it, from the run's paired tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

ALPHA = 0.05
# Below these counts a ranking of AUCs is mostly noise: the 95% CI of one AUC spans about
# ±0.1 with 100 patients at 40% prevalence, more than the gaps between good methods.
MIN_RELIABLE_PATIENTS = 100
MIN_RELIABLE_PER_CLASS = 30

# (versus, difference, p_holm, test, p_floor) where no lead is tested.
NO_TEST = (None, float("nan"), float("nan"), "DeLong", 0.0)
RATE_MEANING = "r = share of test patients whose clinical data is withheld (0: all have it)"


def format_p(p: float) -> str:
    """One p-value format everywhere: ``p < 0.001``, ``p = 0.004``, ``p = 0.032``, ``p = 0.41``
    (three decimals below 0.1, two above)."""
    if p is None or not np.isfinite(p):
        return "p = n/a"
    if p < 0.001:
        return "p < 0.001"
    if p < 0.1:
        return f"p = {p:.3f}"
    return f"p = {min(p, 1.0):.2f}"


def tests_label(delong: pd.DataFrame) -> str:
    """The paired test(s) of a tests table: ``DeLong``, ``exact permutation test``."""
    names = list(dict.fromkeys(delong["test"].dropna())) if "test" in delong else []
    return " / ".join(test_name(str(n)) for n in names) or "DeLong"


def test_name(test: str) -> str:
    return test if test == "DeLong" else f"{test} test"


def auc_text(auc: float) -> str:
    """An AUC as every table prints it; equal texts are a tie."""
    return f"{auc:.3f}"


@dataclass
class RateResult:
    """The winner at one missing rate and the test of its lead against ``versus``: the
    runner-up when the winner is the reference method, else the reference (every paired test
    is against it). ``tied``: every method sharing the highest printed AUC, no lead tested."""

    rate: float
    best: str
    auc: float
    ci: tuple[float, float]
    versus: str | None
    difference: float  # best minus versus
    p_holm: float
    test: str  # the paired test behind p_holm
    p_floor: float  # the smallest p-value that test can give here (before Holm)
    tied: list[str] = field(default_factory=list)

    @property
    def significant(self) -> bool:
        return bool(np.isfinite(self.p_holm) and self.p_holm < ALPHA)

    @property
    def leaders(self) -> str:
        """``bd`` or, for a tie, ``bd and fusion-mean`` / ``bd, moddrop and fusion-mean``."""
        names = self.tied or [self.best]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"


@dataclass
class Headline:
    methods: list[str]
    reference: str
    n_patients: int
    n_positive: int
    rates: list[RateResult]
    ci_half_width: float  # median over methods and rates
    significant_cells: set[tuple[str, float]]  # (method, rate) that differ from the reference
    class_sizes: list[int] | None = None  # K > 2 classes: test patients per class

    @property
    def sizes(self) -> list[int]:
        """Test patients per class (binary: negative, positive)."""
        return self.class_sizes or [self.n_patients - self.n_positive, self.n_positive]

    @property
    def unreliable(self) -> bool:
        return self.n_patients < MIN_RELIABLE_PATIENTS or min(self.sizes) < MIN_RELIABLE_PER_CLASS

    def balance(self) -> str:
        if self.class_sizes:
            *rest, last = (str(n) for n in self.class_sizes)
            return f"classes of {', '.join(rest)} and {last} patients"
        return f"{self.n_positive} positive"

    def compared(self) -> str:
        """What was compared on what: the first sentence of the headline."""
        rates = [r.rate for r in self.rates]
        return (
            f"{len(self.methods)} methods ({', '.join(self.methods)}) on "
            f"{self.n_patients} test patients ({self.balance()}), with clinical data "
            f"withheld from {rates[0]:.0%} to {rates[-1]:.0%} of them (r = "
            f"{rates[0]:g} to {rates[-1]:g})."
        )

    def winners(self) -> str:
        """Who has the highest AUC at which rates, with the AUCs at the ends of each span."""
        by_rate = {r.rate: r for r in self.rates}
        groups = _runs([(r.leaders, r.rate) for r in self.rates])
        if len(groups) == 1 and len(self.rates) > 1 and not self.rates[0].tied:
            first, last = self.rates[0], self.rates[-1]
            return (
                f"{groups[0][0]} has the highest AUC at every rate: {auc_text(first.auc)} at "
                f"r = {first.rate:g}, {auc_text(last.auc)} at r = {last.rate:g}."
            )
        parts = []
        for leaders, rates in groups:
            aucs = [auc_text(by_rate[r].auc) for r in (rates[0], rates[-1])]
            span = aucs[0] if aucs[0] == aucs[1] else f"{aucs[0]} to {aucs[1]}"
            tie = " (tie)" if by_rate[rates[0]].tied else ""
            where = f"r = {rates[0]:g}" + (f"–{rates[-1]:g}" if len(rates) > 1 else "")
            parts.append(f"{leaders}{tie} at {where} ({span})")
        return "Highest AUC: " + "; ".join(parts) + "."

    def significance(self) -> str:
        """Whether the leads hold up, with the p-values, and what was tested against what."""
        tested = [r for r in self.rates if r.versus is not None]
        ties = [r.rate for r in self.rates if r.tied]
        tie_note = f" Tied at {_rates_text(ties)}: no lead to test." if ties else ""
        if len(self.methods) < 2:
            return "One method only: nothing to compare it with."
        if not tested:
            no_reference = f"the reference method '{self.reference}' was not evaluated"
            return tie_note.strip() or f"No significance tests: {no_reference}."
        how = (
            f"top AUC against {self.reference}, or against the runner-up where "
            f"{self.reference} is top; "
            f"{' / '.join(dict.fromkeys(test_name(r.test) for r in tested))}, Holm-corrected"
        )
        sig = [r for r in tested if r.significant]
        nonsig = [r for r in tested if not r.significant]
        if not sig:
            low = format_p(min(r.p_holm for r in nonsig))
            if len(nonsig) > 1:
                low = "every " + low.replace("p = ", "p ≥ ").replace("p < ", "p ≥ ")
            verdict = f"No lead is statistically significant ({how}: {low})."
        elif not nonsig:
            high = format_p(max(r.p_holm for r in sig)).replace("p = ", "p ≤ ")
            verdict = f"Every lead is statistically significant ({how}: {high})."
        else:
            verdict = (
                f"Significant leads ({how} p < 0.05) at {_rates_text([r.rate for r in sig])}; "
                f"not significant at {_rates_text([r.rate for r in nonsig])}."
            )
        verdict += tie_note
        # On small test sets, the smallest p-value the test could give at all.
        if floors := [r.p_floor for r in tested if r.p_floor > 0]:
            verdict += (
                f" With {self.n_patients} test patients no p-value can fall below "
                f"{min(floors):.2g} (before Holm's correction)."
            )
        return verdict

    def reliability(self) -> str | None:
        """A warning when the test set is too small for a reliable ranking."""
        if not self.unreliable:
            return None
        n_negative = self.n_patients - self.n_positive
        balance = (
            self.balance()
            if self.class_sizes
            else f"{self.n_positive} positive, {n_negative} negative"
        )
        return (
            f"Only {self.n_patients} test patients ({balance}): each AUC's 95% CI spans "
            f"about ±{self.ci_half_width:.2f}, so this "
            "ranking is not reliable. Use a larger test set, or k-fold cross-validation "
            "(cohort.splits.mode: kfold)."
        )


def _rates_text(rates: list[float]) -> str:
    return ", ".join(f"r = {r:g}" for r in rates)


def _runs(items: list[tuple[str, float]]) -> list[tuple[str, list[float]]]:
    """Group consecutive rates that share a winner."""
    groups: list[tuple[str, list[float]]] = []
    for method, rate in items:
        if groups and groups[-1][0] == method:
            groups[-1][1].append(rate)
        else:
            groups.append((method, [rate]))
    return groups


def build_headline(metrics: pd.DataFrame, delong: pd.DataFrame, reference: str) -> Headline:
    """The headline facts from the run's metrics and paired tests."""
    methods = list(dict.fromkeys(metrics["method"]))
    significant = {
        (row.method, float(row.missing_rate))
        for row in delong.itertuples()
        if np.isfinite(row.p_holm) and row.p_holm < ALPHA
    }
    results = []
    for rate, rows in metrics.groupby("missing_rate", sort=True):
        ranked = _ranked(rows, reference)
        best = ranked.iloc[0]
        tied = [str(m) for m in ranked["method"][ranked["auc_text"] == auc_text(best.auc)]]
        if len(tied) > 1:
            test: tuple = NO_TEST
        else:
            tied = []
            test = _test_of_lead(ranked, delong, reference, float(rate))
        ci = (float(best.auc_ci_low), float(best.auc_ci_high))
        # The test's fields follow the winner's in RateResult's order.
        results.append(RateResult(float(rate), str(best.method), float(best.auc), ci, *test, tied))
    widths = (metrics["auc_ci_high"] - metrics["auc_ci_low"]).to_numpy(dtype=float)
    widths = widths[np.isfinite(widths)]
    n_positive = int(metrics["n_positive"].iloc[0]) if "n_positive" in metrics else 0
    per_class = [c for c in metrics.columns if c.startswith("n_class_")]
    return Headline(
        class_sizes=[int(metrics[c].iloc[0]) for c in per_class] or None,
        methods=methods,
        reference=reference,
        n_patients=int(metrics["n_patients"].iloc[0]),
        n_positive=n_positive,
        rates=results,
        ci_half_width=float(np.median(widths) / 2) if len(widths) else float("nan"),
        significant_cells=significant,
    )


def _ranked(rows: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Methods by printed AUC, highest first; among equal AUCs the reference comes first, then
    the table's order."""
    ranked = rows.assign(
        auc_text=[auc_text(a) for a in rows["auc"]],
        not_reference=rows["method"] != reference,
    )
    return ranked.sort_values(
        ["auc_text", "not_reference", "auc"], ascending=[False, True, False], kind="stable"
    ).reset_index(drop=True)


def _test_of_lead(
    ranked: pd.DataFrame, delong: pd.DataFrame, reference: str, rate: float
) -> tuple[str | None, float, float, str, float]:
    """``(versus, difference, p_holm, test, p_floor)`` of the top method's lead, the fields of
    ``RateResult`` in their order."""
    at_rate = delong[np.isclose(delong["missing_rate"].astype(float), rate)]
    if at_rate.empty or len(ranked) < 2:
        return NO_TEST
    best = str(ranked.iloc[0].method)
    versus = str(ranked.iloc[1].method) if best == reference else reference
    row = at_rate[at_rate["method"] == (versus if best == reference else best)]
    if row.empty:
        return NO_TEST
    row = row.iloc[0]
    sign = -1.0 if best == reference else 1.0
    test = str(row["test"]) if "test" in row and pd.notna(row["test"]) else "DeLong"
    floor = float(row["p_floor"]) if "p_floor" in row and pd.notna(row["p_floor"]) else 0.0
    return versus, sign * float(row.auc_difference), float(row.p_holm), test, floor
