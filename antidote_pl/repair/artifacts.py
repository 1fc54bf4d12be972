"""The artefacts of a weight-editing repair (every family but pruning), written and read in one place.

A pruning repair records *masks*; the other families (delta scaling, RESTA, SafeLoRA, Safe Delta,
refusal re-alignment) change parameter values, so they record *edits*: for one knob value, the new
value of every parameter the repair changes, keyed by ``model.named_parameters()`` names of the
fine-tuned model as loaded for the repair (the adapter unmerged). A repair run writes, beside the
repaired stage:

* ``repair.json``: the report (method, knob name and value, the values swept, per-value summaries,
  the fingerprint of the edited tensors before the repair, timings);
* with a sweep, ``sweep_edits.safetensors``: the edits of every swept value, keyed
  ``"<value>/<parameter name>"``, computed from one preparation (scores, projections, Hessians or a
  training run) by the function that computed the applied edit. Its header repeats the values, and
  the report records each value's content hash (``sweep_edit_sha256``), checked on every read.

:class:`EditArtifacts` reads them back, checked: the header agrees with the report, every value edits
the same tensors, and edits are only applied to the tensors they were computed from
(:meth:`EditArtifacts.check_source`). A tampered or mismatched file is a
:class:`~antidote_pl.errors.ConfigError` naming it.
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
from antidote_pl.pruning.apply import save_tensors
from antidote_pl.pruning.artifacts import alpha_key, targets_fingerprint
from antidote_pl.utils.files import check_safetensors_file, read_json_file
from antidote_pl.utils.hashing import files_fingerprint, tensors_digest
from antidote_pl.utils.io import atomic_write_json

EDIT_REPORT_FILE = "repair.json"
SWEEP_EDITS_FILE = "sweep_edits.safetensors"
#: The text form of a knob value in file and report keys (``repr``: round-trips exactly).
value_key = alpha_key
#: Report key: knob value -> :func:`~antidote_pl.utils.hashing.tensors_digest` of its saved edits.
SWEEP_EDIT_DIGESTS = "sweep_edit_sha256"


def has_edit_artifacts(directory: str | Path) -> bool:
    """Whether ``directory`` holds a weight-editing repair's report."""
    return (Path(directory) / EDIT_REPORT_FILE).is_file()


def write_edit_artifacts(
    directory: Path,
    report: Mapping[str, Any],
    sweep: Mapping[float, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Writes ``repair.json`` and, with a sweep, ``sweep_edits.safetensors`` into ``directory``.

    Args:
        directory: The (temporary) stage directory being written.
        report: The repair's report; with a sweep it must hold ``sweep_values``.
        sweep: Knob value -> edits (parameter name -> new tensor), every value editing the same names.
    """
    if sweep:
        report = {**report, SWEEP_EDIT_DIGESTS: {value_key(v): tensors_digest(e) for v, e in sweep.items()}}
    atomic_write_json(directory / EDIT_REPORT_FILE, dict(report))
    if not sweep:
        return
    tensors = {f"{value_key(v)}/{name}": t for v, edits in sweep.items() for name, t in edits.items()}
    header = {"values": json.dumps([float(v) for v in sweep])}
    save_tensors(directory / SWEEP_EDITS_FILE, tensors, metadata=header)


def edits_fingerprint(params: Mapping[str, torch.Tensor]) -> str:
    """Fingerprint of the tensors a repair edits, taken before the edit (names, shapes, values)."""
    return targets_fingerprint(params)


@dataclass(frozen=True)
class EditArtifacts:
    """The checked artefacts of one weight-editing repair run.

    Attributes:
        directory: The stage directory read.
        report: The repair report (``repair.json``).
        fingerprint: Content hash of the artefact files, for cache keys of results computed from them.
        values: Knob values with saved edits, ascending (empty without a sweep).
    """

    directory: Path
    report: dict[str, Any]
    fingerprint: str
    values: list[float]

    @classmethod
    def read(cls, directory: str | Path) -> EditArtifacts:
        """Reads and checks a repair run's report and sweep file.

        Raises:
            ConfigError: naming the file that is missing, unreadable, or disagrees with the report.
        """
        d = Path(directory)
        report = read_json_file(d / EDIT_REPORT_FILE, "a repair report written by a repair callback")
        if not isinstance(report, dict) or "method" not in report or "knob" not in report:
            raise bad_file(d / EDIT_REPORT_FILE, "not a repair report (no 'method' or 'knob')")
        values: list[float] = []
        if report.get("sweep_values"):
            values = _check_sweep_file(d, report)
        files = [d / EDIT_REPORT_FILE, *([d / SWEEP_EDITS_FILE] if values else [])]
        return cls(d, report, files_fingerprint(files), values)

    def edits(self, value: float) -> dict[str, torch.Tensor]:
        """The saved edits of one swept knob value (parameter name -> new tensor).

        Raises:
            ConfigError: a value without saved edits, or edits that differ from their recorded hash.
        """
        value = float(value)
        if value not in self.values:
            raise bad_value(self.report["knob"], value, f"one of the saved values {self.values}")
        prefix = f"{value_key(value)}/"
        with safe_open(str(self.directory / SWEEP_EDITS_FILE), "pt") as f:
            keys = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (not a dict)
            edits = {k[len(prefix) :]: f.get_tensor(k) for k in keys}
        digests = self.report.get(SWEEP_EDIT_DIGESTS)
        if digests is not None and (
            not isinstance(digests, dict) or digests.get(value_key(value)) != tensors_digest(edits)
        ):
            raise bad_file(
                self.directory / SWEEP_EDITS_FILE,
                f"the edits of {self.report['knob']}={value:g} differ from the content hash "
                f"{EDIT_REPORT_FILE} records for them ({SWEEP_EDIT_DIGESTS}): the file was changed "
                "after the run",
            )
        return edits

    def check_source(self, params: Mapping[str, torch.Tensor]) -> None:
        """Checks that ``params`` (the model's parameters by name) are the tensors the edits were
        computed from: same names and shapes, and the recorded fingerprint of their values.

        Raises:
            ConfigError: naming the report, for missing names, other shapes or other values.
        """
        path = self.directory / EDIT_REPORT_FILE
        shapes = self.report.get("edited_shapes", {})
        missing = [n for n in shapes if n not in params]
        if missing:
            raise bad_file(path, f"edits {missing[:3]} name no parameter of the model they are applied to")
        wrong = [n for n, s in shapes.items() if list(params[n].shape) != list(s)]
        if wrong:
            raise bad_file(path, f"edit {wrong[0]} has shape {shapes[wrong[0]]}, the model's is different")
        now = edits_fingerprint({n: params[n] for n in shapes})
        if now != self.report.get("source_fingerprint"):
            raise bad_file(path, "was computed from other weights than the model's (source fingerprint)")


def _check_sweep_file(d: Path, report: Mapping[str, Any]) -> list[float]:
    """Checks the sweep file's header and keys against the report; returns its values, ascending."""
    path = d / SWEEP_EDITS_FILE
    keys = check_safetensors_file(path, f"the swept edits recorded in {EDIT_REPORT_FILE}")
    with safe_open(str(path), "pt") as f:
        header = (f.metadata() or {}).get("values")
    try:
        values = sorted(float(v) for v in json.loads(header))
    except (TypeError, ValueError) as err:
        raise bad_file(path, f"header has no readable 'values' list ({err})") from err
    recorded = sorted(float(v) for v in report["sweep_values"])
    if values != recorded:
        raise bad_file(path, f"holds values {values} but {EDIT_REPORT_FILE} records {recorded}")
    by_value: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, name = key.partition("/")
        by_value.setdefault(prefix, set()).add(name)
    names = {frozenset(v) for v in by_value.values()}
    if set(by_value) != {value_key(v) for v in values} or len(names) != 1:
        raise bad_file(path, "every value must edit the same tensors, and only the recorded values")
    if set(next(iter(names))) != set(report.get("edited_shapes", {})):
        raise bad_file(path, f"edits other tensors than {EDIT_REPORT_FILE} records")
    return values


def apply_edits_(params: Mapping[str, torch.nn.Parameter], edits: Mapping[str, torch.Tensor]) -> None:
    """Copies each edit into the parameter of the same name, in place (dtype and device of the model).

    Raises:
        ConfigError: an edit naming no parameter, or of another shape, before anything changes.
    """
    unknown = [n for n in edits if n not in params]
    if unknown:
        raise ConfigError(f"edits {unknown[:3]}: not parameters of the model ({len(params)} parameters).")
    wrong = [n for n, t in edits.items() if tuple(t.shape) != tuple(params[n].shape)]
    if wrong:
        name = wrong[0]
        shapes = f"shape {tuple(edits[name].shape)}, parameter {tuple(params[name].shape)}"
        raise ConfigError(f"edit {name}: {shapes}.")
    with torch.no_grad():
        for name, tensor in edits.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
