"""Baseline defenses as small strategy objects plugged into :class:`CausalLMSFTModule`.

Alignment stage: :class:`Vaccine`, :class:`RepNoise`, :class:`Booster`. Fine-tuning stage:
:class:`Lisa`, :class:`LDIFS`. Select one in a config with
``model.init_args.defense: {class_path: antidote_pl.defenses.Vaccine, init_args: {rho: 2}}``.
"""

from antidote_pl.defenses.base import Defense
from antidote_pl.defenses.booster import Booster
from antidote_pl.defenses.ldifs import LDIFS
from antidote_pl.defenses.lisa import Lisa
from antidote_pl.defenses.repnoise import RepNoise
from antidote_pl.defenses.vaccine import Vaccine

__all__ = ["LDIFS", "Booster", "Defense", "Lisa", "RepNoise", "Vaccine"]
