"""The pruning artefacts of a repair stage, written and read in one place.

A pruning run writes, beside the pruned model:

* ``mask.safetensors``: the boolean removal masks (True = removed), in each parameter's layout and
  keyed by ``model.named_parameters()`` names; its header carries the report as JSON;
* ``mask.json``: the same report, readable (method, alpha, targets, realised fractions, and the
  fingerprints of the target tensors before and after pruning);
* optionally ``scores.safetensors``: the scores behind the masks, so other alphas can be swept.

Readers check what they read: the two copies of the report agree, every mask names a parameter of
the right shape, the masked weights are zero, and saved scores belong to the adapter they are put on.
A tampered or mismatched artefact is a :class:`~antidote_pl.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from antidote_pl.errors import ConfigError, bad_file
from antidote_pl.pruning.apply import check_mask_shapes, load_tensors, save_tensors
from antidote_pl.utils.files import check_safetensors_file, read_json_file
from antidote_pl.utils.hashing import files_fingerprint, tensors_fingerprint

MASK_FILE = "mask.safetensors"
REPORT_FILE = "mask.json"
SCORES_FILE = "scores.safetensors"


def targets_fingerprint(params: Mapping[str, torch.Tensor]) -> str:
    """Fingerprint of the target tensors (names, shapes, sampled values)."""
    return tensors_fingerprint(params.items())


def write_artifacts(
    directory: Path,
    masks: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor] | None,
    report: Mapping[str, Any],
) -> None:
    """Writes masks, the report and (optionally) scores into ``directory`` (a stage being saved)."""
    text = json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    save_tensors(directory / MASK_FILE, masks, metadata={"report": text})
    if scores is not None:
        save_tensors(directory / SCORES_FILE, scores)
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
    from safetensors import safe_open

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
    bad = [n for n, m in masks.items() if m.dtype != torch.bool]
    if bad:
        raise bad_file(d / MASK_FILE, f"mask {bad[0]} has dtype {masks[bad[0]].dtype}; masks are bool")
    recorded = report.get("removed_fraction")
    if recorded is not None and masks:
        total = sum(m.numel() for m in masks.values())
        actual = sum(int(m.sum()) for m in masks.values()) / max(total, 1)
        if abs(actual - float(recorded)) > 1e-6:
            raise bad_file(
                d / MASK_FILE, f"removes {actual:.6f} of its targets but {REPORT_FILE} says {recorded:.6f}"
            )
    return masks, report


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
    return files_fingerprint([d / REPORT_FILE, d / MASK_FILE, d / SCORES_FILE])
