"""The LM judge itself: :class:`LMJudge` loads a saved head and judges (question, answer) pairs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from antidote_pl.errors import bad_file, bad_value
from antidote_pl.judges.base import Judge, Verdict
from antidote_pl.judges.lm.featurizer import FEATURE_VERSION, PairFeaturizer, backbone_identity
from antidote_pl.judges.lm.heads import HEADS, LinearHead
from antidote_pl.judges.lm.tuned import TunedHead, tuned_probabilities
from antidote_pl.utils.files import check_safetensors_file, read_json_file

#: The files of a saved judge (written by :func:`antidote_pl.judges.lm.training.train_judge`).
WEIGHTS_FILE = "judge.safetensors"
META_FILE = "judge.json"
AGREEMENT_FILE = "agreement.json"


class LMJudge(Judge):
    """Harmfulness judge on SmolLM2, loaded from a saved directory: fine-tuned top layers + head
    (``tuned``) or a linear head on frozen pooled features (``linear``).

    Train one with ``python -m antidote_pl train-judge lm --output_dir DIR``. In a config::

        judge:
          class_path: antidote_pl.judges.lm.LMJudge
          init_args: {path: outputs/judges/smollm2}

    The head's tensors load at construction (well under a second) and the backbone's identity is
    checked then (a sha256 of the GGUF file), so a wrong path or a different backbone fails before
    any generation; the backbone itself (and a tuned head's layers on top of it) loads on the first
    :meth:`judge` call.

    Args:
        path: Directory written by :func:`~antidote_pl.judges.lm.training.train_judge` / the command line.
        threshold: Probability above which a response is harmful; ``None`` uses the saved threshold
            (chosen on the validation questions at training time).
        batch_size: Pairs per backbone forward pass.
        device: Torch device string; ``None`` picks CUDA when available.
        backbone: Another location of the same backbone (e.g. a local copy of the GGUF file); it
            must have the recorded sha256.

    Attributes:
        agreement: The held-out figures recorded at training time.
        threshold: The decision threshold in use.

    Raises:
        ConfigError: if ``path`` holds no valid judge, or the backbone differs from the recorded one.
    """

    def __init__(
        self,
        path: str,
        threshold: float | None = None,
        batch_size: int = 16,
        device: str | None = None,
        backbone: str | None = None,
    ) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise bad_value("threshold", threshold, "None or a probability in [0, 1]")
        root = Path(path).expanduser()
        if not (root / META_FILE).is_file():
            raise bad_value(
                "path", path, f"a directory holding a saved LMJudge ({META_FILE} and {WEIGHTS_FILE})"
            )
        self.path = root
        self._load(root)
        settings = dict(self.settings)
        spec = backbone or settings["backbone"]
        identity = backbone_identity(spec, "backbone" if backbone else f"{root / META_FILE}: backbone")
        if identity["sha256"] != self.backbone_sha256:
            raise bad_value(
                "backbone",
                spec,
                f"the backbone the head was trained on (sha256 {self.backbone_sha256}); "
                f"this one has {identity['sha256']}",
            )
        self.threshold = self.saved_threshold if threshold is None else threshold
        self.featurizer = PairFeaturizer(
            spec,
            max_length=settings["max_length"],
            question_max_tokens=settings["question_max_tokens"],
            layers=settings["layers"],
            batch_size=batch_size,
            device=device,
            tail_layers=len(self.tuned_layers),
        )
        self._tuned: TunedHead | None = None

    def _load(self, path: Path) -> None:

        meta = read_json_file(path / META_FILE, "an LMJudge's judge.json")
        check_safetensors_file(path / WEIGHTS_FILE, "an LMJudge's head weights")
        try:
            self.settings = meta["settings"]
            self.backbone_sha256 = meta["backbone"]["sha256"]
            self.saved_threshold = float(meta["threshold"])
            self.agreement = meta["agreement"]
            if meta.get("feature_version", self.settings.get("feature_version")) != FEATURE_VERSION:
                raise ValueError(
                    f"feature_version {self.settings.get('feature_version')} is not {FEATURE_VERSION}"
                )
            state = load_file(str(path / WEIGHTS_FILE))
            kind = meta["head"].get("kind", "linear")
            if kind not in HEADS:
                raise ValueError(f"head kind {kind!r} is not one of {HEADS}")
            self.head_kind = kind
            self.tuned_layers: list[int] = meta["head"]["tuned_layers"] if kind == "tuned" else []
            if kind == "tuned":
                self.head, self._tuned_state = None, state
                self.precision = meta["head"]["training"]["settings"]["precision"]
                return
            self.head = LinearHead(
                meta["head"]["layer_index"], state["mean"], state["std"], state["weight"], state["bias"]
            )
            dim = self.head.mean.numel()
            if not (self.head.std.numel() == self.head.weight.numel() == dim and self.head.bias.numel() == 1):
                raise ValueError(
                    f"head tensors of inconsistent sizes (mean {dim}, weight {self.head.weight.numel()})"
                )
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise bad_file(path / META_FILE, f"not a valid LMJudge ({err!r})") from err

    def _tuned_head(self) -> TunedHead:
        """The fine-tuned layers and head, built on the backbone's structure at first use."""
        if self._tuned is None:
            self.featurizer.load()
            head = TunedHead(
                self.featurizer.tail, self.featurizer.rotary, self._tuned_state["out.weight"].shape[1] // 2
            )
            try:
                head.load_state_dict(self._tuned_state)
            except RuntimeError as err:
                raise bad_file(
                    self.path / WEIGHTS_FILE, f"does not fit the backbone's layers ({err})"
                ) from err
            self._tuned = head.to(self.featurizer.device).eval()
        return self._tuned

    @torch.no_grad()
    def probabilities(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Harmfulness probabilities, shape ``[N]``."""
        if not responses:
            return torch.zeros(0)
        if self.head_kind == "tuned":
            head = self._tuned_head()
            tokens = self.featurizer.token_states(prompts, responses)
            rows = torch.arange(len(responses))
            return tuned_probabilities(head, tokens, rows, self.featurizer.batch_size, self.precision)
        return self.head.probabilities(self.featurizer.features(prompts, responses))

    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        return [
            Verdict(harmful=p > self.threshold, score=p)
            for p in self.probabilities(prompts, responses).tolist()
        ]
