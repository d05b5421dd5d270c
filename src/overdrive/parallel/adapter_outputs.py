"""What an adapter run writes: peft adapter directories, the base they apply to, and merged exports.

OUTPUT/final of a LoRA run holds `adapter_model.safetensors` + `adapter_config.json` (written by peft's own
`save_pretrained`, so `peft.PeftModel.from_pretrained(base, dir)` and `AutoModelForCausalLM.from_pretrained(dir)`
load it) and a reference to the base: the fine-tuned `--model` directory, or `base/` for a from-scratch base
(which no other directory holds). Checkpoints keep the whole model (base included) under peft's names plus
`hf/adapter_config.json`, so `overdrive export CKPT OUT [--merge]` needs nothing but the checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overdrive.errors import UsageError
from overdrive.parallel.adapters import ADAPTER_CONFIG, ADAPTER_NAME, _is_lora_layer, is_adapter_tensor

__all__ = [
    "ADAPTER_CONFIG",
    "export_adapter_checkpoint",
    "export_final_adapter",
    "has_adapters",
    "save_adapter_config",
]

if TYPE_CHECKING:
    import torch
    from torch import nn


def has_adapters(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def save_adapter_config(model: nn.Module, directory: Path) -> None:
    """adapter_config.json beside a checkpoint's hf/config.json, so exports know the adapters."""
    if has_adapters(model):
        model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))


def export_final_adapter(model: nn.Module, state: dict[str, torch.Tensor], out: Path, location: Path) -> None:
    """OUTPUT/final of an adapter run: peft's adapter files and the base they apply to.

    `state` is the full (gathered) state dict with peft's names; `location` is where `out` will end up.
    """
    lora = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    save_adapter(state, model.config, lora, out, location, dequantized_base(model, state))


def dequantized_base(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """QLoRA: the base weights as the run saw them (NF4 dequantised) with HF names; None without NF4 layers."""
    from peft.utils.integrations import dequantize_module_weight

    from overdrive.parallel.materialize import _unwrapped_name

    dequantized = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit" and not _is_lora_layer(module):
            weight = dequantize_module_weight(module).detach().float().cpu()
            dequantized[_unwrapped_name(f"{name}.weight")] = weight
    if not dequantized:
        return None
    # bitsandbytes stores each NF4 weight with companions (weight.absmax, weight.quant_map, ...): dropped
    base = base_weights(state)
    kept = {k: v for k, v in base.items() if k.rpartition(".weight.")[0] + ".weight" not in dequantized}
    return {**kept, **dequantized}


def save_adapter(
    state: dict[str, torch.Tensor],
    config: Any,
    lora: Any,
    out: Path,
    location: Path,
    base_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """adapter_model.safetensors + adapter_config.json through peft's own save_pretrained, and the base.

    The base reference is the fine-tuned --model directory when there is one; a from-scratch base (no
    directory holds it) is written to `out/base` as an HF model, and the adapter config points there.
    """
    from peft import get_peft_model

    from overdrive.parallel.materialize import build_meta_model

    base_ref = lora.base_model_name_or_path
    if not (base_ref and Path(base_ref).is_dir() and any(Path(base_ref).glob("*.safetensors"))):
        base_ref = str(Path(location).absolute() / "base")
        plain = build_meta_model(copy.deepcopy(config), _attn(config), "float32")
        weights = base_state if base_state is not None else base_weights(state)
        plain.save_pretrained(str(Path(out) / "base"), state_dict=weights, safe_serialization=True)
    skeleton = get_peft_model(
        build_meta_model(copy.deepcopy(config), _attn(config), "float32"), lora, low_cpu_mem_usage=True
    )
    skeleton.peft_config[ADAPTER_NAME].base_model_name_or_path = base_ref  # get_peft_model resets it
    prefixed = {f"base_model.model.{k}": v for k, v in state.items() if is_adapter_tensor(k)}
    skeleton.save_pretrained(
        str(out), state_dict=prefixed, safe_serialization=True, save_embedding_layers=False
    )
    (Path(out) / "README.md").unlink(missing_ok=True)  # peft's model-card template says nothing here


def _attn(config: Any) -> str:
    attn = getattr(config, "_attn_implementation", None)
    return attn if attn in ("eager", "sdpa") else "sdpa"


def base_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's own state dict out of an adapted one: peft's levels removed, adapter tensors dropped."""
    from overdrive.parallel.materialize import ADAPTER_BASE_PARTS

    out = {}
    for key, value in state.items():
        if is_adapter_tensor(key):
            continue
        for part in ADAPTER_BASE_PARTS:
            key = key.replace(part, "")
        out[key] = value
    return out


def export_adapter_checkpoint(
    weights: dict[str, torch.Tensor], hf_dir: Path, out: Path, location: Path, merge: bool
) -> None:
    """`overdrive export` of an adapter checkpoint: the adapter and its base, or (--merge) one merged model."""
    from peft import LoraConfig
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(hf_dir))
    lora = LoraConfig.from_pretrained(str(hf_dir))
    if all(is_adapter_tensor(k) for k in weights):  # QLoRA: the NF4 base is not in the checkpoint
        raise UsageError(
            "this QLoRA checkpoint holds only the adapters (its NF4 base is rebuilt when it resumes); use the "
            "adapter in OUTPUT/final with its base model"
        )
    if not merge:
        save_adapter(weights, config, lora, out, location)
        return
    merged_model(weights, config, lora).save_pretrained(str(out), safe_serialization=True)


def merged_model(weights: dict[str, torch.Tensor], config: Any, lora: Any) -> nn.Module:
    """The base with the adapters folded in (peft's merge_and_unload), as a plain HF model on CPU."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.use_cache = True
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=_attn(config))
    peft_model = get_peft_model(model, lora)
    prefixed = {f"base_model.model.{k}": v for k, v in weights.items()}
    result = peft_model.load_state_dict(prefixed, strict=False)
    tied = _tied_with(peft_model, set(prefixed))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise UsageError(
            f"the checkpoint does not fit its adapter config (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}); export another checkpoint"
        )
    return peft_model.merge_and_unload()


def _tied_with(model: nn.Module, loaded: set[str]) -> set[str]:
    """Names sharing their tensor with a loaded name (a tied lm_head / embedding): checkpoints keep one."""
    groups: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        groups.setdefault(id(tensor), []).append(name)
    return {n for names in groups.values() if len(names) > 1 and set(names) & loaded for n in names}
