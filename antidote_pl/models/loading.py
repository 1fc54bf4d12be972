"""Loading tokenizers, causal LMs and LoRA adapters, by hub name, local path or config.

Everything here is architecture-generic: nothing assumes Llama module names.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from antidote_pl.errors import ConfigError, bad_value, check_choice
from antidote_pl.models.gguf import is_gguf_spec, load_gguf_causal_lm, load_gguf_tokenizer
from antidote_pl.pruning.artifacts import has_artifacts, read_masks, verify_pruned_model
from antidote_pl.tinyworld.model import tiny_llama_config
from antidote_pl.tinyworld.tokenizer import build_tokenizer
from antidote_pl.utils.files import (
    STAGE_FILE,
    check_safetensors_file,
    looks_local,
    read_json_file,
    read_stage_metadata,
)
from antidote_pl.utils.hashing import tensors_fingerprint

log = logging.getLogger(__name__)

TINY_WORLD = "tiny-world"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Wraps a peft call that reads transformers' deprecated ``is_gradient_checkpointing``.

    peft checks it on every model it wraps, and transformers answers with a FutureWarning on every
    LoRA stage that a user cannot act on; only that warning is hidden, and only around the call.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def resolve_dtype(dtype: str, field: str = "model.dtype") -> torch.dtype:
    """Maps ``fp32``/``bf16``/``fp16`` to a torch dtype, with a clear error otherwise."""
    check_choice(field, dtype, DTYPES)
    return DTYPES[dtype]


def load_tokenizer(spec: str, field: str = "tokenizer"):
    """Loads a tokenizer by hub name or local directory, or builds the tiny world one.

    The result always has a pad token (falling back to EOS, then UNK) and pads on the right,
    which is what training collators expect; generation switches to left padding itself.

    Args:
        spec: ``"tiny-world"``, a local directory, a hub name or a GGUF source (a ``.gguf`` file or
            ``pkg://<package>/<file>.gguf``, see :mod:`antidote_pl.models.gguf`).
        field: Config field name used in error messages.

    Raises:
        ConfigError: if the tokenizer cannot be found or loaded.
    """
    if spec == TINY_WORLD:
        tok = build_tokenizer()
    elif is_gguf_spec(spec):
        tok = load_gguf_tokenizer(spec, field)
    else:
        if looks_local(spec) and not Path(spec).expanduser().exists():
            raise bad_value(field, spec, "an existing local directory, a hub name or 'tiny-world'")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{field}={spec!r} could not be loaded as a tokenizer: {err}") from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def base_fingerprint(config: Any) -> dict[str, Any]:
    """Architecture facts that two models must share for an adapter to transfer between them."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "n_embd", "n_layer")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


def build_config(model_config: dict | str, vocab_size: int | None, field: str = "model.model_config"):
    """Builds a transformers config for random initialisation.

    Args:
        model_config: A dict with ``model_type`` and the config's fields, or a tiny world preset
            name: ``"tiny-world"`` (default size) or ``"tiny-world-fast"``.
        vocab_size: Used when the dict gives none (the tokenizer's size).
        field: Config field name used in error messages.
    """
    from transformers import AutoConfig

    if isinstance(model_config, str):
        presets = {TINY_WORLD: "default", f"{TINY_WORLD}-fast": "fast"}
        if model_config not in presets:
            raise bad_value(field, model_config, f"a dict with 'model_type' or one of {sorted(presets)}")

        model_config = {"model_type": "llama", **tiny_llama_config(presets[model_config])}
    cfg = dict(model_config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise bad_value(f"{field}.model_type", model_type, "a transformers model type such as 'llama'")
    if vocab_size is not None:
        cfg.setdefault("vocab_size", vocab_size)
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except ValueError as err:
        raise ConfigError(
            f"{field}.model_type={model_type!r} is not a known transformers model: {err}"
        ) from err


def load_causal_lm(
    model_name_or_path: str | None,
    model_config: dict | str | None = None,
    dtype: str = "fp32",
    vocab_size: int | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Loads a Hugging Face causal LM from a hub name or a local path, or random-inits one.

    Args:
        model_name_or_path: Hub name, local directory of a saved model, or a GGUF source (see
            :mod:`antidote_pl.models.gguf`). Exclusive with ``model_config``.
        model_config: Config for random initialisation (see :func:`build_config`).
        dtype: ``fp32``, ``bf16`` or ``fp16``.
        vocab_size: Vocabulary size for random init, normally ``len(tokenizer)``.
        attn_implementation: Optional ``eager``/``sdpa``/... passed to transformers.
        trust_remote_code: Off by default; only for models whose code you have read.

    Raises:
        ConfigError: on a missing path, both or neither source given, or a bad dtype.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    if (model_name_or_path is None) == (model_config is None):
        raise ConfigError(
            "exactly one of model.model_name_or_path and model.model_config must be set, got "
            f"model_name_or_path={model_name_or_path!r}, model_config={model_config!r}."
        )
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if model_config is not None:
        config = build_config(model_config, vocab_size)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **kwargs)
        return model
    if is_gguf_spec(model_name_or_path):
        return load_gguf_causal_lm(model_name_or_path, torch_dtype, **kwargs)
    local = Path(model_name_or_path).expanduser()
    if looks_local(model_name_or_path) and not local.exists():
        raise bad_value("model.model_name_or_path", model_name_or_path, "an existing directory or a hub name")
    if local.is_dir():
        # A truncated shard fails deep inside transformers (a long traceback naming no file): read
        # every header first, which costs no tensor load.
        for weights in sorted(local.glob("model*.safetensors")):
            check_safetensors_file(weights, "the model's weights")
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.model_name_or_path={model_name_or_path!r} could not be loaded as a causal LM: {err}"
        ) from err


def base_weights_record(model: nn.Module, dtype: str) -> dict[str, str]:
    """Identity of the weights an adapter is trained on, recorded in its stage metadata."""
    return {"dtype": dtype, "fingerprint": tensors_fingerprint(model.named_parameters())}


def _dtype_name(model: nn.Module) -> str | None:
    param = next(model.parameters(), None)
    names = {v: k for k, v in DTYPES.items()}
    return None if param is None else names.get(param.dtype)


def check_adapter_dir(path: str, model: nn.Module, field: str) -> dict[str, Any]:
    """Checks that ``path`` holds a peft adapter made for exactly this ``model``.

    Before any weight is loaded: the adapter files exist and are readable, the architecture
    fingerprint recorded by antidote_pl stages matches, the base weights recorded at training time
    are the ones of ``model`` (same sampled-weight fingerprint, when loaded in the same dtype), and
    the adapter's target modules exist.

    Returns:
        The adapter config as a dict.

    Raises:
        ConfigError: naming ``field`` and the mismatch.
    """
    p = Path(path).expanduser()
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise bad_value(field, path, "a directory holding a peft adapter (adapter_config.json)")
    adapter_cfg = read_json_file(cfg_file, "a peft adapter_config.json")
    weights = p / "adapter_model.safetensors"
    if not weights.is_file() and not (p / "adapter_model.bin").is_file():
        raise bad_value(field, path, "a peft adapter directory with adapter_model.safetensors")
    if weights.is_file():
        check_safetensors_file(weights, "the adapter's weights")
    if (p / STAGE_FILE).is_file():
        _check_recorded_base(read_stage_metadata(path, field), model, path, field)
    targets = adapter_cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise ConfigError(f"{field}={path!r} targets modules {missing} that the model does not have.")
    return adapter_cfg


def _check_recorded_base(meta: dict[str, Any], model: nn.Module, path: str, field: str) -> None:
    recorded = meta.get("base_fingerprint", {})
    actual = base_fingerprint(model.config)
    diff = {k: (recorded[k], actual.get(k)) for k in recorded if recorded[k] != actual.get(k)}
    if diff:
        raise ConfigError(
            f"{field}={path!r} was trained on another base model: (adapter, model) differ in {diff}."
        )
    weights = meta.get("base_weights")
    # Fingerprints hash values in their dtype: compare only when the model is loaded as trained.
    if weights and weights.get("dtype") == _dtype_name(model):
        found = tensors_fingerprint(model.named_parameters())
        if found != weights.get("fingerprint"):
            raise ConfigError(
                f"{field}={path!r} was trained on other base weights than the model it is put on "
                f"(recorded base {meta.get('base_model')!r}, merged {meta.get('merged_adapters', [])}; "
                f"weights fingerprint {weights.get('fingerprint')} vs {found}). Load the base it was "
                "trained on."
            )


def merge_adapters(model: nn.Module, paths: list[str], field: str = "model.merge_adapters") -> nn.Module:
    """Merges each LoRA adapter in ``paths`` into the weights, in order, and returns a plain model."""
    from peft import PeftModel

    for i, path in enumerate(paths):
        check_adapter_dir(path, model, f"{field}[{i}]")
        try:
            with quiet_peft():
                peft_model = PeftModel.from_pretrained(model, path, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"{field}[{i}]={path!r} does not fit the base model: {err}") from err
        model = peft_model.merge_and_unload()
    return model


def load_stage(path: str, dtype: str = "fp32", field: str = "stage", merge: bool = True):
    """Loads a stage output (full model, or adapter on its recorded base) for evaluation.

    Args:
        path: Output directory written by :meth:`CausalLMSFTModule.save_stage`.
        dtype: Weight dtype.
        field: Config field name used in error messages.
        merge: Merge the adapter into the weights (plain model, fastest for generation).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    meta = read_stage_metadata(path, field)
    pruned = has_artifacts(path)
    if pruned:
        read_masks(path)  # a tampered mask file fails here, before any model loads
    tokenizer = load_tokenizer(path, field=field)
    if meta["kind"] == "full_model":
        model = load_causal_lm(path, dtype=dtype)
        if pruned:
            verify_pruned_model(path, model)
    else:
        base = meta["base_model"]
        if not isinstance(base, str):
            raise ConfigError(f"{field}={path!r}: its base model was random-init and cannot be rebuilt.")
        if looks_local(base) and not is_gguf_spec(base) and not Path(base).expanduser().exists():
            raise ConfigError(
                f"{Path(path) / STAGE_FILE}: its base_model {base!r} does not exist; a stage loads the base "
                "it was trained on, so keep a project's stages together when moving or copying it."
            )
        model = load_causal_lm(base, dtype=dtype)
        model = merge_adapters(model, list(meta.get("merged_adapters", [])), field=f"{field}.merged_adapters")
        from peft import PeftModel

        check_adapter_dir(path, model, field)
        with quiet_peft():
            model = PeftModel.from_pretrained(model, path, is_trainable=False)
        if pruned:
            # Before merging: masks are keyed by the adapter's parameter names.
            verify_pruned_model(path, model)
        if merge:
            model = model.merge_and_unload()
    return model.eval(), tokenizer
