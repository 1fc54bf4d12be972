"""Discovery of the weight matrices Antidote scores and prunes.

Targets are found generically (``isinstance`` checks on peft's ``LoraLayer``, ``nn.Linear`` and
transformers' ``Conv1D``), never through architecture-specific attribute paths, and are keyed by the
parameter's full name in ``model.named_parameters()`` so saved masks line up with the model, as in the
official code (reference §B.1).

Every tensor handed to the scoring and selection functions is in *row layout* ``[out_features,
in_features]``: one row per output feature, one column per input feature (the Wanda statistic is per
column). Transformers' ``Conv1D`` stores its weight as ``[in, out]``; :func:`to_param_layout` turns
row-layout masks back into the parameter's own layout before they are saved or applied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from antidote_pl.errors import bad_value, check_choice

TARGET_KINDS = ("lora", "lora_delta", "linear")

# Leaf names that attention blocks across model families use for their *output* projection; every
# other linear child of an attention module projects into query/key/value space.
_OUTPUT_PROJECTION_NAMES = frozenset({"o_proj", "out_proj", "c_proj", "dense", "wo", "o", "proj_out"})
_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)


@dataclass(frozen=True, eq=False)
class TargetInfo:
    """One prunable matrix and where its activation statistic is measured.

    Attributes:
        name: Full name of ``param`` in ``model.named_parameters()``; the key of its mask and score.
        kind: ``"lora_A"``, ``"lora_B"``, ``"lora_delta"`` or ``"linear"``.
        hook_module: Module whose forward *input* is the activation the statistic is built from.
        param: The parameter that masks are applied to. For ``lora_delta`` this is the frozen base
            weight into which the masked update is merged.
        in_features: Number of columns in row layout (length of the activation statistic).
        out_features: Number of rows in row layout.
        transposed: True when ``param`` is stored ``[in, out]`` (transformers ``Conv1D``, or peft's
            ``fan_in_fan_out`` base layers).
        lora_layer: The peft ``LoraLayer`` (``lora_delta`` only).
        adapter_name: The peft adapter (LoRA kinds only).
    """

    name: str
    kind: str
    hook_module: nn.Module
    param: nn.Parameter
    in_features: int
    out_features: int
    transposed: bool = False
    lora_layer: nn.Module | None = None
    adapter_name: str | None = None

    def weight(self) -> torch.Tensor:
        """Returns the scored matrix in row layout ``[out, in]``, detached.

        For ``lora_delta`` it is the effective update ``scale * B @ A`` in fp32.
        """
        if self.kind == "lora_delta":
            layer, adapter = self.lora_layer, self.adapter_name
            return lora_delta_weight(
                layer.lora_A[adapter].weight.detach(),
                layer.lora_B[adapter].weight.detach(),
                layer.scaling[adapter],
            )
        weight = self.param.detach()
        return weight.t() if self.transposed else weight

    def to_param_layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maps a row-layout tensor (mask or score) onto the layout of ``param``."""
        return tensor.t().contiguous() if self.transposed else tensor


def lora_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Effective LoRA update ``scale * B @ A`` in fp32, row layout ``[out, in]``.

    Args:
        lora_a: ``lora_A`` weight, ``[r, in]``.
        lora_b: ``lora_B`` weight, ``[out, r]``.
        scale: peft's ``scaling[adapter]`` (``lora_alpha / r`` or its rsLoRA variant).
    """
    return float(scale) * (lora_b.float() @ lora_a.float())


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(module, (nn.Linear, Conv1D))


def default_lora_target_modules(model: nn.Module) -> list[str]:
    """Finds the attention query/key/value projection leaf names, for peft's ``target_modules``.

    An attention module is any module whose class name contains "Attention"/"Attn"; its direct
    linear children (``nn.Linear`` or ``Conv1D``) are the projections, minus the output projection
    (recognised by its conventional leaf name, e.g. ``o_proj``, ``out_proj``, ``c_proj``).
    Llama, Mistral, Gemma and Qwen2 give ``["q_proj", "k_proj", "v_proj"]``; GPT-2 gives its fused
    ``["c_attn"]``.

    Args:
        model: A transformers model (before peft wrapping).

    Returns:
        Unique leaf names in order of first appearance.

    Raises:
        ConfigError: If no attention module with input projections exists.
    """
    names: dict[str, None] = {}
    attention_classes = set()
    for module in model.modules():
        if not _ATTENTION_CLASS.search(type(module).__name__):
            continue
        attention_classes.add(type(module).__name__)
        for child_name, child in module.named_children():
            if is_linear_like(child) and child_name not in _OUTPUT_PROJECTION_NAMES:
                names[child_name] = None
    if not names:
        raise bad_value(
            "model.lora_target_modules",
            None,
            "explicit module names: no attention q/k/v projections were found automatically "
            f"(attention-like classes found: {sorted(attention_classes) or 'none'})",
        )
    return list(names)


def find_targets(
    model: nn.Module,
    target: str = "lora",
    adapter_name: str = "default",
    include: list[str] | None = None,
) -> dict[str, TargetInfo]:
    """Finds the matrices to score and prune.

    Args:
        model: The model whose ``named_parameters()`` names key the result (pass the same object
            whose parameters the masks are later applied to, e.g. the ``PeftModel``).
        target: ``"lora"``: every peft ``LoraLayer``'s ``lora_A[adapter]`` (statistic: the layer
            input) and ``lora_B[adapter]`` (statistic: the output of A), as in the official code.
            ``"lora_delta"``: the effective update ``scale * B @ A`` of each ``LoraLayer``
            (statistic: the layer input), keyed by the base layer's weight. ``"linear"``: weights of
            ``nn.Linear``/``Conv1D`` modules of a fully fine-tuned model, excluding LoRA factors and
            the output head (``lm_head``).
        adapter_name: peft adapter to prune (LoRA kinds).
        include: Optional substrings; a module is kept only if its dotted name contains one of them
            (e.g. ``["q_proj", "k_proj", "v_proj"]``).

    Returns:
        Targets keyed by full parameter name, in module order.

    Raises:
        ConfigError: Unknown ``target``, or nothing matched (the message says what was found).
    """
    check_choice("target", target, TARGET_KINDS)
    param_names = {id(p): n for n, p in model.named_parameters()}
    if target == "linear":
        candidates = _linear_targets(model, param_names)
    else:
        candidates = _lora_targets(model, param_names, target, adapter_name)
    selected = [(module_name, info) for module_name, info in candidates if _included(module_name, include)]
    if not selected:
        found = sorted({module_name for module_name, _ in candidates})
        if candidates:
            raise bad_value(
                "include",
                include,
                f"substrings of at least one candidate module name; {len(found)} candidates, "
                f"e.g. {found[:6]}",
            )
        raise bad_value("target", target, _nothing_found_hint(model, target, adapter_name))
    result: dict[str, TargetInfo] = {}
    for _, info in selected:
        if info.name in result:
            raise bad_value("target", target, f"distinct parameters per target, but {info.name} repeats")
        result[info.name] = info
    return result


def target_weights(targets: dict[str, TargetInfo]) -> dict[str, torch.Tensor]:
    """Row-layout weights ``[out, in]`` of every target, keyed like the targets."""
    return {name: info.weight() for name, info in targets.items()}


def to_param_layout(
    tensors: dict[str, torch.Tensor], targets: dict[str, TargetInfo]
) -> dict[str, torch.Tensor]:
    """Maps row-layout masks or scores onto each target parameter's own layout (for save/apply)."""
    return {name: targets[name].to_param_layout(t) for name, t in tensors.items()}


def merged_param_name(name: str) -> str:
    """A peft model's parameter name as it is in the merged model (``merge_and_unload``).

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` becomes
    ``model.layers.0.self_attn.q_proj.weight``; names of a plain model are unchanged.
    """
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _included(module_name: str, include: list[str] | None) -> bool:
    return include is None or any(s in module_name for s in include)


def _lora_targets(
    model: nn.Module, param_names: dict[int, str], target: str, adapter: str
) -> list[tuple[str, TargetInfo]]:
    out: list[tuple[str, TargetInfo]] = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        # Embedding/conv LoRA variants keep different factor types; Antidote's statistic is per
        # input feature of a linear map, so only linear factors qualify.
        if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
            continue
        if target == "lora":
            out.append((module_name, _linear_info(param_names, "lora_A", lora_a, adapter)))
            out.append((module_name, _linear_info(param_names, "lora_B", lora_b, adapter)))
            continue
        if adapter in getattr(layer, "lora_variant", {}):
            # DoRA-like variants rescale the update, so scale * B @ A is not the effective delta.
            raise bad_value("target", target, f"plain LoRA adapters; {module_name} uses a LoRA variant")
        base_weight = layer.get_base_layer().weight
        out.append(
            (
                module_name,
                TargetInfo(
                    name=param_names[id(base_weight)],
                    kind="lora_delta",
                    hook_module=layer,
                    param=base_weight,
                    in_features=lora_a.in_features,
                    out_features=lora_b.out_features,
                    transposed=bool(getattr(layer, "fan_in_fan_out", False)),
                    lora_layer=layer,
                    adapter_name=adapter,
                ),
            )
        )
    return out


def _linear_info(param_names: dict[int, str], kind: str, module: nn.Linear, adapter: str) -> TargetInfo:
    return TargetInfo(
        name=param_names[id(module.weight)],
        kind=kind,
        hook_module=module,
        param=module.weight,
        in_features=module.in_features,
        out_features=module.out_features,
        adapter_name=adapter,
    )


def _linear_targets(model: nn.Module, param_names: dict[int, str]) -> list[tuple[str, TargetInfo]]:
    excluded = _lora_factor_modules(model) | _output_head_modules(model)
    out: list[tuple[str, TargetInfo]] = []
    for module_name, module in model.named_modules():
        if id(module) in excluded or not is_linear_like(module):
            continue
        weight = module.weight
        if id(weight) not in param_names:
            continue  # tied to a parameter reported under another module's name
        transposed = isinstance(module, Conv1D)
        # Conv1D stores [in, out]; nn.Linear stores [out, in].
        in_features, out_features = weight.shape if transposed else weight.shape[::-1]
        info = TargetInfo(
            name=param_names[id(weight)],
            kind="linear",
            hook_module=module,
            param=weight,
            in_features=int(in_features),
            out_features=int(out_features),
            transposed=transposed,
        )
        out.append((module_name, info))
    return out


def _lora_factor_modules(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for factors in (layer.lora_A, layer.lora_B):
                ids.update(id(m) for m in factors.modules())
    return ids


def _output_head_modules(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            head = module.get_output_embeddings()
            if head is not None:
                ids.add(id(head))
    return ids


def _nothing_found_hint(model: nn.Module, target: str, adapter: str) -> str:
    if target == "linear":
        return "a model with nn.Linear or Conv1D layers besides the output head; none were found"
    adapters = sorted({a for m in model.modules() if isinstance(m, LoraLayer) for a in m.lora_A})
    n_layers = sum(isinstance(m, LoraLayer) for m in model.modules())
    return (
        f"a peft model with linear LoRA layers for adapter {adapter!r}; found {n_layers} LoraLayer "
        f"modules with adapters {adapters}"
    )
