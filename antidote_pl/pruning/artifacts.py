"""The pruning artefacts of a repair stage, written and read in one place.

A pruning run writes, beside the pruned model:

* ``mask.safetensors``: the boolean removal masks (True = removed), in each parameter's layout and
  keyed by ``model.named_parameters()`` names; its header carries the report as JSON;
* ``mask.json``: the same report, readable (method, alpha, targets, realised fractions, and the
  fingerprints of the target tensors before and after pruning);
* optionally ``scores.safetensors``: the scores behind the masks, so other alphas can be swept;
* optionally ``sweep_masks.safetensors``: the masks of several alphas (the callback's ``sweep_alphas``
  and its own alpha), computed from one scoring by the function that computed the applied mask, and
  keyed ``"<alpha>/<parameter name>"`` with the names of the model that was pruned (as loaded for
  the repair, i.e. the names the scores carry). The report records each alpha's content hash
  (``sweep_mask_sha256``), so an edit that keeps every count is caught like one of ``mask.safetensors``
  (whose masked weights must be zero in the saved model).

:class:`RepairArtifacts` is the typed reader of all of them; :func:`read_report`, :func:`read_masks`
and :func:`read_scores` remain as the per-file readers it is built on.

Readers check what they read: the two copies of the report agree, every mask names a parameter of
the right shape, the masked weights are zero, and saved scores belong to the adapter they are put on.
A tampered or mismatched artefact is a :class:`~antidote_pl.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from antidote_pl.errors import ConfigError, bad_file, bad_value
from antidote_pl.pruning.apply import check_mask_shapes, load_tensors, save_tensors
from antidote_pl.utils.files import check_safetensors_file, read_json_file
from antidote_pl.utils.hashing import files_fingerprint, tensors_digest, tensors_fingerprint

MASK_FILE = "mask.safetensors"
REPORT_FILE = "mask.json"
SCORES_FILE = "scores.safetensors"
SWEEP_FILE = "sweep_masks.safetensors"
#: Report key: alpha -> :func:`~antidote_pl.utils.hashing.tensors_digest` of the sweep masks written for it.
SWEEP_DIGESTS = "sweep_mask_sha256"


def targets_fingerprint(params: Mapping[str, torch.Tensor]) -> str:
    """Fingerprint of the target tensors (names, shapes, sampled values)."""
    return tensors_fingerprint(params.items())


def alpha_key(alpha: float) -> str:
    """The text form of an alpha used in file keys and report keys (``repr``: round-trips exactly)."""
    return repr(float(alpha))


def write_artifacts(
    directory: Path,
    masks: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor] | None,
    report: Mapping[str, Any],
    sweep: Mapping[float, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Writes masks, the report and (optionally) scores and sweep masks into ``directory``.

    Args:
        directory: A stage being saved (the module's temporary directory).
        masks: The applied masks, keyed like the saved model's parameters.
        scores: Scores in parameter layout, keyed like the pruned model's parameters, or ``None``.
        report: The pruning report; with a sweep it must carry ``sweep_removed_fraction``.
        sweep: ``{alpha: masks}`` keyed like ``scores``, or ``None``.
    """
    if sweep:
        report = {**report, SWEEP_DIGESTS: {alpha_key(a): tensors_digest(m) for a, m in sweep.items()}}
    text = json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    save_tensors(directory / MASK_FILE, masks, metadata={"report": text})
    if scores is not None:
        save_tensors(directory / SCORES_FILE, scores)
    if sweep:
        alphas = sorted(sweep)
        flat = {f"{alpha_key(a)}/{n}": m for a in alphas for n, m in sweep[a].items()}
        save_tensors(directory / SWEEP_FILE, flat, metadata={"alphas": json.dumps(alphas)})
    (directory / REPORT_FILE).write_text(text)


def has_artifacts(directory: str | Path) -> bool:
    """Whether ``directory`` holds a pruning run's masks."""
    return (Path(directory) / MASK_FILE).is_file() or (Path(directory) / REPORT_FILE).is_file()


def read_report(directory: str | Path) -> dict[str, Any]:
    """Reads ``mask.json`` and checks it against the copy in ``mask.safetensors``'s header.

    Raises:
        ConfigError: for a missing, unreadable or disagreeing file.
    """
    d = Path(directory)
    report = read_json_file(d / REPORT_FILE, "a pruning report (mask.json)")
    if not isinstance(report, dict) or "target" not in report:
        raise bad_file(d / REPORT_FILE, "not a pruning report (no 'target'); expected mask.json of a repair")
    check_safetensors_file(d / MASK_FILE, "the pruning masks")
    with safe_open(str(d / MASK_FILE), "pt") as f:
        header = (f.metadata() or {}).get("report")
    if header is not None and json.loads(header) != json.loads(json.dumps(report, default=str)):
        raise bad_file(d / REPORT_FILE, f"differs from the report stored in {MASK_FILE}: one was edited")
    return report


def read_masks(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads and cross-checks ``mask.safetensors`` and ``mask.json``.

    Returns:
        ``(masks, report)``; masks are bool tensors in parameter layout.
    """
    d = Path(directory)
    report = read_report(d)
    masks = load_tensors(d / MASK_FILE)
    _check_masks(d / MASK_FILE, masks, report.get("removed_fraction"))
    return masks, report


def _check_masks(path: Path, masks: Mapping[str, torch.Tensor], recorded: float | None) -> None:
    """Masks are bool and remove the fraction the report records (when it records one)."""
    bad = [n for n, m in masks.items() if m.dtype != torch.bool]
    if bad:
        raise bad_file(path, f"mask {bad[0]} has dtype {masks[bad[0]].dtype}; masks are bool")
    if recorded is not None and masks:
        total = sum(m.numel() for m in masks.values())
        actual = sum(int(m.sum()) for m in masks.values()) / max(total, 1)
        if abs(actual - float(recorded)) > 1e-6:
            raise bad_file(path, f"removes {actual:.6f} of its targets but {REPORT_FILE} says {recorded:.6f}")


def verify_pruned_model(directory: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Checks that a loaded repair stage carries its own masks: names, shapes, zeros, fingerprint.

    Call it on the model as loaded (the peft model before merging, or the full model) so parameter
    names match the ones the masks were saved under.

    Returns:
        The pruning report.

    Raises:
        ConfigError: naming the directory and what does not match.
    """
    d = Path(directory)
    masks, report = read_masks(d)
    params = dict(model.named_parameters())
    try:
        check_mask_shapes(masks, params)
    except ConfigError as err:
        raise bad_file(d / MASK_FILE, f"does not fit the stage's weights: {err}") from err
    # Zeroed entries stay zero unless a masked update was merged (lora_delta) or the adapter was
    # merged over pruned base weights; names and shapes are checked in every case.
    if report.get("target") != "lora_delta" and not report.get("merged_adapter"):
        # Masked entries were zeroed in place; a non-zero one means weights or masks were swapped.
        for name, mask in masks.items():
            if bool(params[name].detach()[mask.to(params[name].device)].ne(0).any()):
                raise bad_file(
                    d / MASK_FILE,
                    f"{name}: masked weights are not zero in the saved model; the masks "
                    "or the weights were replaced after pruning",
                )
        expected = report.get("pruned_fingerprint")
        # Only full-precision weights can reproduce the fingerprint of the fp32 tensors pruned.
        full = all(params[n].dtype == torch.float32 for n in masks)
        found = targets_fingerprint({n: params[n] for n in masks})
        if expected is not None and full and found != expected:
            raise bad_file(
                d / REPORT_FILE, f"pruned weights fingerprint {found} differs from the recorded {expected}"
            )
    return report


def read_scores(directory: str | Path, params: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Reads saved scores for an alpha sweep and checks they were computed on ``params``.

    Args:
        directory: A scoring run's output (``scores.safetensors`` + ``mask.json``).
        params: The current target tensors, by name (before any mask is applied).

    Returns:
        ``(scores, report)``, scores in parameter layout.

    Raises:
        ConfigError: if the files are unreadable, or the scores belong to other weights.
    """
    d = Path(directory)
    report = read_report(d)
    check_safetensors_file(d / SCORES_FILE, "saved pruning scores")
    scores = load_tensors(d / SCORES_FILE)
    try:
        check_mask_shapes(scores, params)
    except ConfigError as err:
        raise bad_file(d / SCORES_FILE, f"does not fit the model being repaired: {err}") from err
    expected = report.get("scored_fingerprint")
    found = targets_fingerprint({n: params[n] for n in scores})
    if expected is not None and found != expected:
        raise bad_file(
            d / SCORES_FILE,
            f"was computed on other weights (fingerprint {expected}, model being repaired {found}); "
            "rescore it (pipeline --force true)",
        )
    return scores, report


def artifacts_fingerprint(directory: str | Path) -> str:
    """Content hash of a pruning run's artefacts, for cache keys of results computed from them."""
    d = Path(directory)
    # The sweep file joins the hash only when present, so runs without one keep their old hash.
    sweep = [d / SWEEP_FILE] if (d / SWEEP_FILE).is_file() else []
    return files_fingerprint([d / REPORT_FILE, d / MASK_FILE, d / SCORES_FILE, *sweep])


@dataclass(frozen=True)
class RepairArtifacts:
    """The checked artefacts of one pruning run: its report, masks (one alpha or a sweep) and scores.

    Build it with :meth:`read`; tensors are loaded on access. Masks of the sweep file are keyed like
    ``named_parameters()`` of the model that was pruned (the fine-tuned model as loaded for the
    repair; the names the scores carry), so they apply to a fresh copy of it with
    :func:`~antidote_pl.pruning.apply_masks_` (``lora``/``linear`` targets) or
    :func:`~antidote_pl.pruning.apply_target_masks_` (any target, ``lora_delta`` included)::

        art = RepairArtifacts.read("outputs/tiny/repair")
        for alpha in art.alphas:
            apply_masks_(dict(model.named_parameters()), art.masks(alpha))

    Attributes:
        directory: The stage directory read.
        report: The pruning report (``mask.json``).
        fingerprint: Content hash of the artefact files (see :func:`artifacts_fingerprint`).
        alphas: Alphas with saved masks, ascending (the callback's own alpha included).
    """

    directory: Path
    report: dict[str, Any]
    fingerprint: str
    alphas: list[float]

    @classmethod
    def read(cls, directory: str | Path) -> RepairArtifacts:
        """Reads and checks a pruning run's artefacts.

        Raises:
            ConfigError: naming the file that is missing, unreadable, or disagrees with the report.
        """
        d = Path(directory)
        _, report = read_masks(d)
        alphas = [float(report["alpha"])] if "alpha" in report else []
        if (d / SWEEP_FILE).is_file() or "sweep_removed_fraction" in report:
            alphas = _check_sweep_file(d, report)
        if (d / SCORES_FILE).exists():
            check_safetensors_file(d / SCORES_FILE, "saved pruning scores")
        return cls(d, report, artifacts_fingerprint(d), alphas)

    @property
    def alpha(self) -> float:
        """The alpha of the mask the callback applied to the saved model."""
        return float(self.report["alpha"])

    @property
    def has_scores(self) -> bool:
        """Whether the run saved its scores (``save_scores``)."""
        return (self.directory / SCORES_FILE).is_file()

    def masks(self, alpha: float | None = None) -> dict[str, torch.Tensor]:
        """Bool removal masks (True = removed) in parameter layout, for one saved alpha.

        Args:
            alpha: One of :attr:`alphas`; ``None`` is the callback's own alpha. With a sweep file the
                masks come from it (names of the pruned model as loaded); without one, the own alpha
                is ``mask.safetensors`` (names of the saved model: merged names when the report says
                ``merged_adapter``).

        Raises:
            ConfigError: an alpha without saved masks, or masks that disagree with the report.
        """
        alpha = self.alpha if alpha is None else float(alpha)
        if alpha not in self.alphas:
            raise bad_value("alpha", alpha, f"one of the saved alphas {self.alphas}")
        if not (self.directory / SWEEP_FILE).is_file():
            return read_masks(self.directory)[0]
        prefix = f"{alpha_key(alpha)}/"
        path = self.directory / SWEEP_FILE
        with safe_open(str(path), "pt") as f:
            keys = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (not a dict)
            masks = {k[len(prefix) :]: f.get_tensor(k) for k in keys}
        _check_masks(path, masks, self.report["sweep_removed_fraction"][alpha_key(alpha)])
        digests = self.report.get(SWEEP_DIGESTS)
        if digests is not None and (
            not isinstance(digests, dict) or digests.get(alpha_key(alpha)) != tensors_digest(masks)
        ):
            raise bad_file(
                path,
                f"the masks of alpha {alpha:g} differ from the content hash {REPORT_FILE} records for them "
                f"({SWEEP_DIGESTS}): the file was changed after the run; rerun the scoring",
            )
        return masks

    def scores(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The saved scores in parameter layout (see :func:`read_scores`).

        Args:
            params: The pruned model's target tensors by name, before any mask; when given, the
                scores are checked to belong to them (names, shapes, fingerprint).

        Raises:
            ConfigError: no saved scores, or scores of other weights.
        """
        if params is not None:
            return read_scores(self.directory, params)[0]
        check_safetensors_file(self.directory / SCORES_FILE, "saved pruning scores (save_scores: true)")
        return load_tensors(self.directory / SCORES_FILE)


def _check_sweep_file(d: Path, report: Mapping[str, Any]) -> list[float]:
    """Checks the sweep file's header against the report; returns its alphas, ascending."""
    path = d / SWEEP_FILE
    keys = check_safetensors_file(path, f"the sweep masks recorded in {REPORT_FILE}")
    recorded = report.get("sweep_removed_fraction")
    if not isinstance(recorded, dict):
        raise bad_file(d / REPORT_FILE, f"has no 'sweep_removed_fraction' for the masks in {SWEEP_FILE}")
    with safe_open(str(path), "pt") as f:
        header = (f.metadata() or {}).get("alphas")
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    try:
        alphas = sorted(float(a) for a in json.loads(header))
    except (TypeError, ValueError) as err:
        raise bad_file(path, f"header has no readable 'alphas' list ({err})") from err
    if sorted(recorded) != sorted(alpha_key(a) for a in alphas):
        raise bad_file(path, f"holds alphas {alphas} but {REPORT_FILE} records {sorted(recorded)}")
    by_alpha: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, name = key.partition("/")
        by_alpha.setdefault(prefix, set()).add(name)
    names = {frozenset(v) for v in by_alpha.values()}
    if set(by_alpha) != set(recorded) or len(names) != 1:
        raise bad_file(path, "every alpha must mask the same tensors, and only the recorded alphas")
    bad = [k for k, t in dtypes.items() if t != "BOOL"]
    if bad:
        raise bad_file(path, f"mask {bad[0]} has dtype {dtypes[bad[0]]}; masks are bool")
    return alphas
