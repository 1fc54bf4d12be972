"""What a pipeline run records about itself: the manifest assembled from its specs and results.

Kept apart from :mod:`antidote_pl.experiment.pipeline` (the recipe) and
:mod:`antidote_pl.experiment.manifest` (how a manifest is built, written and checked).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from antidote_pl.experiment.manifest import build_manifest, datamodule_from_config, file_entries
from antidote_pl.experiment.specs import config_list


def run_manifest(p: Any) -> dict[str, Any]:
    """The reproducibility manifest of a pipeline run: configs, data windows, stages, seeds, machine,
    git, the inputs each result was computed from, and the pipeline spec itself (``pipeline``).

    Args:
        p: The :class:`~antidote_pl.experiment.pipeline.Pipeline`, after its steps ran.
    """
    evaluation = config_list(p.evaluation)
    configs: dict[str, Any] = {"evaluation": evaluation[0]}
    configs |= {f"evaluation[{i}]": c for i, c in enumerate(evaluation) if i}
    specs = p.all_stages
    for spec in specs:
        for i, config in enumerate(spec.configs):
            configs[f"stages.{spec.name}[{i}]"] = (config, spec.overrides)
    for i, config in enumerate(p.repair.configs):
        configs[f"repair[{i}]"] = (config, p.repair.overrides)
    for method, fragment in p.repair.methods.items():
        configs[f"repair.methods.{method}"] = (fragment, p.repair.args(method))
    stage = p.stages[-1]
    datamodules = {
        stage.name: datamodule_from_config(stage.configs, stage.overrides),
        "evaluation": datamodule_from_config(p.evaluation),
    }
    models = {s.name: p.stage_dirs[s.name] for s in specs if s.command == "fit"}
    # A tokenizer stage writes tokenizer files, not a model stage: its files and hashes.
    tokenizers = {s.name: file_entries([p.stage_dirs[s.name]]) for s in specs if s.command != "fit"}
    extra = {
        "alphas": p.alphas,
        "values": p.repair.values,
        "methods": list(p.repair.methods),
        "output_dir": p.output_dir,
        "tokenizer_stages": tokenizers,
        # Per result, the files and code it was computed from, as recorded when it was computed.
        "inputs": p.results.recorded,
        # The run's own spec, enough to rebuild it (``python -m antidote_pl replay replay``).
        "pipeline": {
            "stages": [asdict(s) for s in p.stages],
            "repair": asdict(p.repair),
            "evaluation": p.evaluation,
            "output_dir": p.output_dir,
            "references": p.references,
            "baselines": [asdict(b) for b in p.baselines],
            "durability": None if p.durability is None else asdict(p.durability),
        },
    }
    return build_manifest(configs, datamodules, models, p.stage_seeds, extra)
