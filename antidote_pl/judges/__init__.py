"""Harmfulness judges: the ``Judge`` interface and every judge that plugs into evaluation by class_path.

* :mod:`~antidote_pl.judges.base`: the interface, keyword, classifier (beaver-dam parity), guard and
  tiny-world judges.
* :mod:`~antidote_pl.judges.verdicts`: how several judges' verdicts are read together.
* :mod:`~antidote_pl.judges.offline`: a hub-free n-gram judge trained on labelled pairs in seconds.
* :mod:`~antidote_pl.judges.lm`: the SmolLM2 judge (featurizer, token-state cache, heads, training).
"""
