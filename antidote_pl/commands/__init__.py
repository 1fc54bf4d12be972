"""Command-line front door: every ``python -m antidote_pl <command>`` (console script ``antidote-pl``).

The top layer of the package: each command module parses its arguments (jsonargparse, one flag style:
:mod:`antidote_pl.commands.args`) and calls building blocks below it; :mod:`~antidote_pl.commands.dispatch`
names them all.

* ``fit``, ``validate``, ``test``, ``predict``: LightningCLI's subcommands
  (:mod:`~antidote_pl.commands.stages`).
* ``pipeline``: the whole experiment (:mod:`~antidote_pl.commands.pipeline`).
* ``tokenizer``: a BPE tokenizer from local records (:mod:`~antidote_pl.commands.tokenizer`).
* ``train-judge lm`` / ``train-judge ngram``: the SmolLM2 or the n-gram judge
  (:mod:`~antidote_pl.commands.train_judge`).
* ``rescore``: a finished run's answers judged again (:mod:`~antidote_pl.commands.rescore`).
* ``replay check`` / ``replay replay``: a manifest checked, a run rerun (:mod:`~antidote_pl.commands.replay`).
* ``report``: the SmolLM2 world's report (:mod:`~antidote_pl.commands.report`).
* ``check``: tiny-world stages' rates (:mod:`~antidote_pl.commands.check`).
* ``posthoc``: mask and judge analysis of a finished run (:mod:`~antidote_pl.commands.posthoc`).
"""
