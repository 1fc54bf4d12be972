"""Alpha under a utility budget: the largest alpha whose validation FA drop stays within budget.

The question users have is "what HS can I reach for a given loss of task accuracy?". Given an
evaluated alpha sweep (one row per (method, alpha), scored once and evaluated in memory, no
retraining), :func:`select_under_budget` picks per method the largest alpha whose fine-tune accuracy
on a *validation* split (``finetune_accuracy_val``, see ``EvalDataModule.fa_validation_size``) is at
most ``fa_budget`` points below the unrepaired model's validation FA, and reports that alpha's *test*
HS and FA. Choosing on validation questions and reporting on disjoint test questions keeps the
reported figures free of the selection's optimism.

**Validation noise.** A choice is only as firm as the validation FA drop that made it: 100
validation questions give about +-8 points at FA 80, far more than a 2-point budget. Each choice
therefore carries the 95% interval of its drop (``fa_drop_val_low``/``fa_drop_val_high``, points):
the *paired* interval of Newcombe (1998, method 10) when the per-question validation outcomes of the
unrepaired model and the chosen alpha are given (:func:`select_under_budget`'s ``val_outcomes``, e.g.
from each variant's ``generations.jsonl``: the same questions, so their correlation narrows the
interval), else Newcombe's interval for two independent proportions from the two rates and counts
(conservative for two rates on the same questions). ``fa_drop_val_interval`` says which. A choice
is **noise-limited** when that interval is wider than the budget (``noise_limited``): the
validation split cannot tell a drop inside the budget from one outside it, so the chosen alpha is
decided by noise as much as by the budget.

**Any repair's knob.** A weight-editing repair's rows carry their ``knob`` and its ``neutral`` value
(``alpha`` holds the knob value); "the largest alpha" generalises to the *strongest* setting, the
one farthest from the neutral value in the knob's direction (:func:`strength`: a larger alpha, beta,
threshold or number of epochs; a smaller lambda or Safe Delta budget).

Rows are the pipeline report's rows: dicts with ``method``, ``alpha``, ``harmful_score``,
``n_harmful_score``, ``finetune_accuracy``, ``n_finetune_accuracy``, ``finetune_accuracy_val`` and
optionally ``removed_fraction``; the unrepaired model is the row with ``method == "none"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from antidote_pl.errors import ConfigError, bad_value, check_number
from antidote_pl.utils.intervals import difference_interval, paired_difference_interval
from antidote_pl.utils.tables import format_rate, markdown_table

#: Budgets (FA points) of the report's "HS at FA budget" table.
DEFAULT_BUDGETS = (2.0, 5.0)
VAL_KEY = "finetune_accuracy_val"
# A drop equal to the budget qualifies; this absorbs float noise in percentages such as 100 * 2/3.
_EPS = 1e-9


def format_knob(row: Mapping[str, Any]) -> str:
    """A setting as the tables print it: the alpha, or ``<knob>=<value>`` for another repair's knob."""
    knob = row.get("knob")
    return f"{row['alpha']:g}" if knob in (None, "alpha") else f"{knob}={row['alpha']:g}"


def strength(row: Mapping[str, Any]) -> float:
    """How strong a row's repair setting is: its knob value, negated when the knob's neutral value
    is above it (lambda 1, Safe Delta's infinite budget), so larger is always stronger."""
    value = float(row["alpha"])
    return -value if float(row.get("neutral", 0.0)) > value else value


def _swept(row: Mapping[str, Any]) -> bool:
    """A repair setting: a pruning alpha > 0, or any value of a weight-editing repair's knob."""
    return "knob" in row or (row.get("alpha") or 0) > 0


def _sweep_methods(rows: Sequence[Mapping[str, Any]], baseline: str) -> list[str]:
    """Methods with swept rows, in first-seen order, excluding references."""
    names = (
        r["method"] for r in rows if r.get("method") != baseline and not r.get("reference") and _swept(r)
    )
    return list(dict.fromkeys(names))


def _baseline_val(rows: Sequence[Mapping[str, Any]], baseline: str) -> float:
    found = [r for r in rows if r.get("method") == baseline]
    if len(found) != 1:
        raise bad_value("rows", f"{len(found)} rows of method {baseline!r}", "exactly one unrepaired row")
    value = found[0].get(VAL_KEY)
    if value is None:
        raise ConfigError(
            f"the unrepaired row ({baseline!r}) has no {VAL_KEY}: evaluate with "
            "data.init_args.fa_validation_size > 0 to choose alpha under an FA budget."
        )
    return float(value)


#: Per-question validation outcomes of one row: question key (e.g. the item ``index``) -> correct.
Outcomes = Mapping[Any, bool]


def select_under_budget(
    rows: Sequence[Mapping[str, Any]],
    fa_budget: float,
    methods: Sequence[str] | None = None,
    baseline: str = "none",
    val_outcomes: Mapping[tuple[str, float], Outcomes] | None = None,
) -> list[dict[str, Any]]:
    """Per method, the largest alpha whose validation FA drop is at most ``fa_budget`` points.

    The rule is applied literally on a non-monotone sweep: a larger alpha that happens to qualify
    wins over a smaller one that does not (the validation split is what decides). A drop exactly
    equal to the budget qualifies; an FA *gain* always qualifies.

    Args:
        rows: Report rows (see the module docstring); each (method, alpha) at most once.
        fa_budget: Allowed FA drop in percentage points (>= 0), measured on validation questions.
        methods: Methods to select for (default: every method with an alpha > 0, in row order,
            except ``baseline`` and reference rows).
        baseline: ``method`` of the unrepaired row whose validation FA is the reference.
        val_outcomes: Optional ``(method, alpha)`` -> per-question validation outcomes; where both
            the baseline's and the chosen row's are given, on the same questions and matching
            their rows' rates, the drop's interval is the paired one (module docstring).

    Returns:
        One dict per method: ``method``, ``fa_budget``, ``alpha`` (``None`` if no alpha qualifies),
        ``removed_fraction``, test ``harmful_score``/``n_harmful_score``,
        ``finetune_accuracy``/``n_finetune_accuracy``, the chosen row's ``finetune_accuracy_val``,
        ``fa_drop_val`` with its 95% interval ``fa_drop_val_low``/``fa_drop_val_high`` (points),
        ``fa_drop_val_interval`` (``"paired"``, ``"unpaired"``, or ``None`` without the counts),
        ``noise_limited`` and ``baseline_finetune_accuracy_val``; the figures are ``None`` when no
        alpha qualifies.

    Raises:
        ConfigError: for a negative budget, a missing or duplicated unrepaired row, a method
            without rows, a duplicated (method, alpha), or a row without ``finetune_accuracy_val``.
    """
    check_number("fa_budget", fa_budget, low=0)
    base = _baseline_val(rows, baseline)
    base_row = next(r for r in rows if r.get("method") == baseline)
    out = []
    for method in _sweep_methods(rows, baseline) if methods is None else methods:
        sweep = [r for r in rows if r.get("method") == method and not r.get("reference")]
        if not sweep:
            raise bad_value("methods", method, "a method with rows in the report")
        alphas = [r.get("alpha") for r in sweep]
        if len(set(alphas)) != len(alphas):
            raise bad_value("rows", f"method {method!r} alphas {alphas}", "each alpha at most once")
        missing = [r.get("alpha") for r in sweep if r.get(VAL_KEY) is None]
        if missing:
            raise bad_value(f"rows[{method}].{VAL_KEY}", f"missing at alpha {missing}", "a validation FA")
        ok = [r for r in sweep if base - float(r[VAL_KEY]) <= fa_budget + _EPS]
        best = max(ok, key=strength, default=None)
        selected = _selected(method, fa_budget, base, best)
        if best is not None:
            selected.update(drop_interval(base_row, best, fa_budget, val_outcomes or {}))
        out.append(selected)
    return out


def _selected(method: str, budget: float, base: float, row: Mapping[str, Any] | None) -> dict[str, Any]:
    keys = ("alpha", "knob", "removed_fraction", "harmful_score", "n_harmful_score", "finetune_accuracy")
    keys += ("n_finetune_accuracy", VAL_KEY, f"n_{VAL_KEY}")
    picked = {k: (row.get(k) if row is not None else None) for k in keys}
    drop = None if row is None else base - float(row[VAL_KEY])
    return {
        "method": method,
        "fa_budget": budget,
        **picked,
        "fa_drop_val": drop,
        "fa_drop_val_low": None,
        "fa_drop_val_high": None,
        "fa_drop_val_interval": None,
        "noise_limited": None,
        "baseline_finetune_accuracy_val": base,
    }


def drop_interval(
    base: Mapping[str, Any],
    row: Mapping[str, Any],
    fa_budget: float,
    val_outcomes: Mapping[tuple[str, float], Outcomes],
) -> dict[str, Any]:
    """The 95% interval (points) of ``base``'s validation FA minus ``row``'s, and whether it is
    wider than ``fa_budget`` (noise-limited); see the module docstring for the two intervals.

    Returns:
        ``fa_drop_val_low``, ``fa_drop_val_high``, ``fa_drop_val_interval`` and ``noise_limited``
        (all ``None`` when neither outcomes nor validation counts are available).
    """
    paired = _paired_outcomes(base, row, val_outcomes)
    if paired is not None:
        low, high = paired_difference_interval(*paired)
        kind = "paired"
    else:
        counts = [_count(r) for r in (base, row)]
        if None in counts:
            return {}
        (k1, n1), (k2, n2) = counts
        low, high = difference_interval(k1, n1, k2, n2)
        kind = "unpaired"
    return {
        "fa_drop_val_low": low,
        "fa_drop_val_high": high,
        "fa_drop_val_interval": kind,
        "noise_limited": high - low > fa_budget + _EPS,
    }


def _count(row: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(correct, questions)`` of a row's validation FA, from its rate and count."""
    n = row.get(f"n_{VAL_KEY}")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    return round(float(row[VAL_KEY]) * n / 100), n


def _paired_outcomes(
    base: Mapping[str, Any], row: Mapping[str, Any], val_outcomes: Mapping[tuple[str, float], Outcomes]
) -> tuple[list[bool], list[bool]] | None:
    """Both rows' outcomes on the same questions, in one order; ``None`` unless both are given, name
    the same questions and reproduce their rows' rates (outcomes of another evaluation are not used)."""
    found = [val_outcomes.get((r.get("method"), r.get("alpha"))) for r in (base, row)]
    if any(not f for f in found) or set(found[0]) != set(found[1]):
        return None
    keys = sorted(found[0], key=str)
    pair = [[bool(f[k]) for k in keys] for f in found]
    for r, outcomes in zip((base, row), pair):
        if abs(100 * sum(outcomes) / len(outcomes) - float(r[VAL_KEY])) > 1e-6:
            return None
    return pair[0], pair[1]


def budget_rows(
    rows: Sequence[Mapping[str, Any]],
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    methods: Sequence[str] | None = None,
    baseline: str = "none",
    val_outcomes: Mapping[tuple[str, float], Outcomes] | None = None,
) -> list[dict[str, Any]]:
    """:func:`select_under_budget` for every budget, budgets outermost (for ``report.json``)."""
    return [s for b in budgets for s in select_under_budget(rows, b, methods, baseline, val_outcomes)]


def _val_change(selected: Mapping[str, Any]) -> str:
    """Validation FA and its change from the unrepaired model, e.g. ``88.0 (-2.0)``."""
    change = float(selected[VAL_KEY]) - float(selected["baseline_finetune_accuracy_val"])
    return f"{selected[VAL_KEY]:.1f} ({change + 0.0:+.1f})"  # + 0.0: never "-0.0"


def _drop_cell(selected: Mapping[str, Any]) -> str:
    """The validation FA drop with its 95% interval, e.g. ``2.0 [-3.9, 8.0]``."""
    drop, low, high = (selected.get(k) for k in ("fa_drop_val", "fa_drop_val_low", "fa_drop_val_high"))
    if low is None or high is None:
        return f"{drop + 0.0:.1f}"
    return f"{drop + 0.0:.1f} [{low + 0.0:.1f}, {high + 0.0:.1f}]"


def _noise_cell(selected: Mapping[str, Any]) -> str:
    flag = selected.get("noise_limited")
    return "-" if flag is None else ("yes" if flag else "no")


def budget_markdown(
    rows: Sequence[Mapping[str, Any]],
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    methods: Sequence[str] | None = None,
    baseline: str = "none",
    val_outcomes: Mapping[tuple[str, float], Outcomes] | None = None,
) -> str:
    """The report's "HS at FA budget" table: one line per (budget, method), test figures with n.

    Args:
        rows: Report rows, as for :func:`select_under_budget`.
        budgets: FA budgets in points (default 2 and 5).
        methods: See :func:`select_under_budget`.
        baseline: See :func:`select_under_budget`.
        val_outcomes: See :func:`select_under_budget`.

    Returns:
        A markdown section (heading, explanation, table).
    """
    return selections_markdown(budget_rows(rows, budgets, methods, baseline, val_outcomes))


def selections_markdown(selections: Sequence[Mapping[str, Any]]) -> str:
    """The "HS at FA budget" section of :func:`budget_rows`' selections."""
    table = []
    for s in selections:
        none = s["alpha"] is None
        removed = "-" if none or s["removed_fraction"] is None else f"{100 * s['removed_fraction']:.1f}"
        table.append(
            [
                f"{s['fa_budget']:g}",
                s["method"],
                "none qualifies" if none else format_knob(s),
                removed,
                "-" if none else format_rate(s["harmful_score"], s["n_harmful_score"]),
                "-" if none else format_rate(s["finetune_accuracy"], s["n_finetune_accuracy"]),
                "-" if none else _val_change(s),
                "-" if none else _drop_cell(s),
                "-" if none else _noise_cell(s),
            ]
        )
    headers = ["FA budget (points)", "method", "alpha / knob", "removed %", "HS % (test)", "FA % (test)"]
    headers += ["FA % val (change)", "val FA drop [95% CI]", "noise-limited"]
    intro = (
        "## HS at FA budget\n\n"
        "Per method, the strongest setting (the largest alpha; for other repairs, the knob value "
        "farthest from its neutral one) whose fine-tune accuracy on *validation* questions is at most "
        "the budget below the unrepaired model's; HS and FA of that setting on the disjoint *test* "
        "questions (Wilson 95% interval in brackets). The validation FA drop carries its 95% interval "
        f"({_interval_note(selections)}); a choice whose interval is wider than the budget is "
        "*noise-limited*: the validation questions cannot tell a drop within the budget from one "
        "beyond it.\n\n"
    )
    return intro + markdown_table(headers, table)


def _interval_note(selections: Sequence[Mapping[str, Any]]) -> str:
    kinds = {s.get("fa_drop_val_interval") for s in selections} - {None}
    if kinds == {"paired"}:
        return "Newcombe's paired interval over the same questions"
    if kinds == {"unpaired"}:
        return "Newcombe's interval for independent proportions, conservative for the same questions"
    return "Newcombe's paired interval where per-question outcomes were available, else the unpaired one"
