"""Analyses of a finished run: mask analytics (:mod:`~antidote_pl.analysis.masks`) and table helpers.

Everything here is a pure function of saved artefacts (masks, report rows, verdicts), so a report can
call it after the fact without retraining or re-evaluating anything.
"""
