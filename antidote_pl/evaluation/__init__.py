"""Evaluation of a stage output: generation over held-out prompts, judging, task accuracy, metrics.

:class:`~antidote_pl.evaluation.evaluator.StageEvaluator` is the ``test`` command's LightningModule.
"""
