"""Mask analytics: where a repair removes weights, and how much two repairs agree.

Masks follow the project's convention (:mod:`antidote_pl.pruning.apply`, ``mask.safetensors``):
``dict[str, bool Tensor]`` keyed by ``model.named_parameters()`` names, **True = removed**. Masks
that are compared must name the same tensors with the same shapes and be in the same layout (the
parameter layout of ``mask.safetensors``, or the score layout of an in-memory sweep, but not a mix).

* :func:`removed_by_layer_module`: realised removed fraction per transformer layer and module type
  (``q``/``k``/``v``/``o``/``gate``/``up``/``down`` or the module's own name, and the tensor kind:
  ``lora_A``, ``lora_B``, ``weight``), the per-layer view behind one overall fraction;
* :func:`jaccard` and :func:`jaccard_matrix`: overlap of the removed sets (across alphas, seeds,
  calibration sets, methods), with :func:`chance_jaccard`, the overlap two independent random masks
  of the same fractions would have, as the reference: an overlap near chance means the two scores
  pick unrelated weights, one near 1 that they pick the same (e.g. Wanda's mask is magnitude's, i.e.
  it finds large weights rather than harm-specific ones);
* :func:`corresponding_masks`: the masks of *independently trained* LoRA adapters (other seeds)
  in coordinates that mean the same in both. A LoRA update ``BA`` equals ``(BM)(M^-1 A)`` for any
  invertible ``r x r`` matrix ``M``, so the rank axis of two independently initialised adapters is
  arbitrary and entry ``(i, j)`` of one ``lora_A`` has nothing to do with entry ``(i, j)`` of the
  other: entry-level overlap across seeds is near chance by construction. What does correspond is
  ``lora_A``'s input features (columns) and ``lora_B``'s output features (rows), and every entry of a
  full weight or of a merged delta ``scale * B @ A`` (``lora_delta`` targets);
* :func:`write_heatmap` (layers x module types, PNG, atomic), :func:`overlap_markdown` and
  :func:`layer_module_markdown` for the report.

Within one adapter (Wanda vs magnitude, alphas, calibration sets on the same fine-tuned LoRA) the
entries correspond and are compared as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from antidote_pl.errors import ConfigError, bad_value
from antidote_pl.utils.io import save_png
from antidote_pl.utils.tables import markdown_table

Masks = Mapping[str, torch.Tensor]

#: Short names of the usual Llama-family projections; any other module keeps its own leaf name.
SHORT_MODULES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]
# "layers.3." (Llama, Mistral, Gemma, Qwen2), "h.3." (GPT-2), "blocks.3.", "layer.3." (BERT-like).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def describe_tensor(name: str) -> tuple[int | None, str, str]:
    """``(layer, module, kind)`` of a parameter name.

    ``layer`` is the transformer block index (``None`` outside the blocks, e.g. ``lm_head``);
    ``module`` the short projection name (``q`` ... ``down``) or the module's leaf name; ``kind``
    ``lora_A``, ``lora_B`` or ``weight`` (a full or base-layer weight, or another tensor).

    >>> describe_tensor("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight")
    (3, 'q', 'lora_A')
    """
    parts = name.split(".")
    kind = next((p for p in parts if p in ("lora_A", "lora_B")), "weight")
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else None
    # The owning module: what precedes lora_A/lora_B (then the adapter name and "weight"), or the
    # tensor's own name; peft's "base_layer" wrapper is not a module type.
    owner = parts[: parts.index(kind)] if kind != "weight" else parts[:-1]
    owner = [p for p in owner if p != "base_layer"]
    leaf = owner[-1] if owner else parts[0]
    return layer, SHORT_MODULES.get(leaf, leaf), kind


def column_name(module: str, kind: str) -> str:
    """The heat map's column for a tensor: its module, with the LoRA factor when it is one."""
    return module if kind == "weight" else f"{module}.{kind}"


def _check_bool(masks: Masks, field: str) -> None:
    if not masks:
        raise bad_value(field, "{}", "at least one mask tensor")
    bad = [n for n, m in masks.items() if m.dtype != torch.bool]
    if bad:
        raise bad_value(f"{field}[{bad[0]}]", f"dtype {masks[bad[0]].dtype}", "a bool mask (True = removed)")


def removed_by_layer_module(masks: Masks) -> list[dict[str, Any]]:
    """Realised removed fraction per (layer, module, kind), summed over the matching tensors.

    Args:
        masks: Removal masks (True = removed), keyed by parameter name.

    Returns:
        Rows ``{"layer", "module", "kind", "column", "removed", "total", "fraction"}`` sorted by
        layer (``None`` last) and module order; ``column`` is ``module`` for a weight, else
        ``module.kind`` (e.g. ``q.lora_B``); ``fraction`` is in [0, 1].

    Raises:
        ConfigError: for an empty mapping or a non-bool mask.
    """
    _check_bool(masks, "masks")
    cells: dict[tuple[int | None, str, str], list[int]] = {}
    for name, mask in masks.items():
        layer, module, kind = describe_tensor(name)
        cell = cells.setdefault((layer, module, kind), [0, 0])
        cell[0] += int(mask.sum())
        cell[1] += mask.numel()
    rows = [
        {
            "layer": layer,
            "module": module,
            "kind": kind,
            "column": column_name(module, kind),
            "removed": removed,
            "total": total,
            "fraction": removed / total if total else 0.0,
        }
        for (layer, module, kind), (removed, total) in cells.items()
    ]
    return sorted(rows, key=lambda r: (r["layer"] is None, r["layer"] or 0, *column_sort_key(r["column"])))


def column_sort_key(column: str) -> tuple[int, str]:
    """Orders columns as the modules run in a decoder layer (q, k, v, o, then the MLP)."""
    module = column.split(".")[0]
    return (_ORDER.index(module) if module in _ORDER else len(_ORDER), column)


def _check_comparable(a: Masks, b: Masks, names: tuple[str, str]) -> None:
    _check_bool(a, names[0])
    _check_bool(b, names[1])
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:2]
        raise ConfigError(f"masks {names[0]} and {names[1]} name different tensors (e.g. {only}).")
    for n in a:
        if a[n].shape != b[n].shape:
            raise ConfigError(
                f"masks {names[0]} and {names[1]}: {n} has shapes {tuple(a[n].shape)} and "
                f"{tuple(b[n].shape)}; compare masks in one layout."
            )


def jaccard(a: Masks, b: Masks, names: tuple[str, str] = ("a", "b")) -> float:
    """Jaccard overlap ``|A ∩ B| / |A ∪ B|`` of the removed sets of two masks.

    Two empty removed sets are the same set, so their overlap is 1.0; an empty and a non-empty one
    overlap 0.0.

    Args:
        a: First mask mapping (True = removed).
        b: Second mask mapping, same names and shapes.
        names: How the two are named in errors.

    Raises:
        ConfigError: for non-bool masks, different tensor names or shapes.
    """
    _check_comparable(a, b, names)
    inter = union = 0
    for n, ma in a.items():
        mb = b[n].to(ma.device)
        inter += int((ma & mb).sum())
        union += int((ma | mb).sum())
    return 1.0 if union == 0 else inter / union


def corresponding_masks(masks: Masks) -> dict[str, torch.Tensor]:
    """Masks projected to coordinates shared by independently trained adapters (module docstring).

    ``lora_A`` (``[r, in]``) becomes its input columns touched (any entry of the column removed,
    ``[in]``); ``lora_B`` (``[out, r]``) its output rows touched (``[out]``); any other tensor (a full
    weight, a merged delta) stays as it is. Compare masks of different seeds only after this.

    Args:
        masks: Removal masks (True = removed) in parameter layout (peft's factors are
            ``nn.Linear``: ``[out, in]``), keyed by parameter name.

    Returns:
        The projected masks under the same names.
    """
    _check_bool(masks, "masks")
    out = {}
    for name, mask in masks.items():
        kind = describe_tensor(name)[2]
        if kind != "weight" and mask.dim() != 2:
            raise bad_value(f"masks[{name}]", f"shape {tuple(mask.shape)}", "a 2-D LoRA factor")
        out[name] = mask.any(dim=0) if kind == "lora_A" else mask.any(dim=1) if kind == "lora_B" else mask
    return out


def removed_fraction(masks: Masks) -> float:
    """Fraction of all masked entries that are removed."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def chance_jaccard(p: float, q: float) -> float:
    """Expected Jaccard of two independent uniform random masks removing fractions ``p`` and ``q``.

    ``pq / (p + q - pq)`` (large-N limit); 1.0 when both are 0, as :func:`jaccard` defines it.
    """
    for field, v in (("p", p), ("q", q)):
        if not 0.0 <= v <= 1.0:
            raise bad_value(field, v, "a fraction in [0, 1]")
    union = p + q - p * q
    return 1.0 if union == 0 else p * q / union


def jaccard_matrix(masks: Mapping[str, Masks]) -> dict[str, dict[str, float]]:
    """Pairwise :func:`jaccard` of named mask sets (e.g. ``"wanda a0.1"``, ``"magnitude a0.1"``).

    Returns:
        ``matrix[x][y]``, symmetric, 1.0 on the diagonal.
    """
    if len(masks) < 1:
        raise bad_value("masks", "{}", "at least one named mask set")
    names = list(masks)
    out: dict[str, dict[str, float]] = {x: {} for x in names}
    for i, x in enumerate(names):
        _check_bool(masks[x], x)
        out[x][x] = 1.0
        for y in names[i + 1 :]:
            out[x][y] = out[y][x] = jaccard(masks[x], masks[y], (x, y))
    return out


def overlap_markdown(
    masks: Mapping[str, Masks], with_chance: bool = True, fraction_label: str = "removed %"
) -> str:
    """A markdown overlap table of named mask sets: Jaccard (and chance level) per pair.

    Args:
        masks: Name -> mask mapping; every pair is compared.
        with_chance: Add, after each Jaccard, the overlap two random masks of the same removed
            fractions would have (in brackets).
        fraction_label: Header of the fraction column (e.g. ``touched %`` for
            :func:`corresponding_masks`).

    Returns:
        A square table, the names as rows and columns, plus the fraction column.
    """
    matrix = jaccard_matrix(masks)
    names = list(masks)
    fractions = {n: removed_fraction(masks[n]) for n in names}
    rows = []
    for x in names:
        cells = []
        for y in names:
            cell = f"{matrix[x][y]:.3f}"
            if with_chance and x != y:
                cell += f" ({chance_jaccard(fractions[x], fractions[y]):.3f})"
            cells.append(cell)
        rows.append([x, f"{100 * fractions[x]:.1f}", *cells])
    return markdown_table(["mask", fraction_label, *names], rows)


def _grid(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Layer labels, column labels and the fraction (or ``None``) per cell."""
    layers = list(dict.fromkeys("other" if r["layer"] is None else str(r["layer"]) for r in rows))
    columns = sorted({r["column"] for r in rows}, key=column_sort_key)
    values: list[list[float | None]] = [[None] * len(columns) for _ in layers]
    for r in rows:
        label = "other" if r["layer"] is None else str(r["layer"])
        values[layers.index(label)][columns.index(r["column"])] = r["fraction"]
    return layers, columns, values


def layer_module_markdown(masks: Masks) -> str:
    """Removed % per layer (rows) and module type (columns) as a markdown table."""
    layers, columns, values = _grid(removed_by_layer_module(masks))
    body = [
        [layer, *("-" if v is None else f"{100 * v:.1f}" for v in vals)]
        for layer, vals in zip(layers, values)
    ]
    return markdown_table(["layer", *columns], body)


def write_heatmap(masks: Masks, path: str | Path, title: str | None = None) -> None:
    """Writes a heat map PNG of the removed fraction, layers (rows) x module types (columns).

    Written atomically (temporary file, then rename). Cells without a tensor are blank.

    Args:
        masks: Removal masks (True = removed), keyed by parameter name.
        path: Destination ``.png``; parent directories are created.
        title: Figure title (default: "removed fraction per layer and module").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, columns, values = _grid(removed_by_layer_module(masks))
    data = np.array([[np.nan if v is None else 100 * v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(columns), 1.2 + 0.35 * len(layers)))
    image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title or "removed fraction per layer and module")
    fig.colorbar(image, ax=ax, label="removed %")
    save_png(fig, path, dpi=110)


def _file_stem(name: str) -> str:
    """A file-name-safe version of a mask set's name (``wanda a0.1`` -> ``wanda_a0.1``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "mask"


def mask_analytics_markdown(
    masks: Mapping[str, Masks], out_dir: str | Path, heatmaps: Sequence[str] | None = None
) -> str:
    """The report's mask-analytics section: overlap table, heat maps (written), per-layer tables.

    Args:
        masks: Name -> masks, e.g. ``{"wanda a0.1": ..., "magnitude a0.1": ..., "wanda s1 a0.1": ...}``
            (every pair is compared, so pass the sets whose overlap matters: across alphas, seeds,
            calibration sets, methods).
        out_dir: Where the heat maps go (``mask_heatmap_<name>.png``, linked relatively).
        heatmaps: Names to draw a heat map and a per-layer table for (default: all).

    Returns:
        A markdown section.
    """
    chosen = list(masks) if heatmaps is None else list(heatmaps)
    unknown = [n for n in chosen if n not in masks]
    if unknown:
        raise bad_value("heatmaps", unknown, f"names among {list(masks)}")
    parts = [
        "## Mask analytics\n\n",
        "Jaccard overlap of the removed sets (in brackets: the overlap of two random masks of the same "
        "removed fractions).\n\n",
        overlap_markdown(masks),
    ]
    for name in chosen:
        file = f"mask_heatmap_{_file_stem(name)}.png"
        write_heatmap(masks[name], Path(out_dir) / file, title=f"removed % per layer and module: {name}")
        parts += [f"\n### {name}\n\n![{name}]({file})\n\n", layer_module_markdown(masks[name])]
    return "".join(parts)
