"""LoRA, DoRA and QLoRA adapters through peft, as one step of `parallelize` (right after kernels).

Why here: adapters must exist before recompute, compile and data parallelism wrap the decoder layers, so that
FSDP2/DDP/DeepSpeed see the final parameters (frozen base, trainable adapters) and compile traces the adapted
layers. peft injects its layers into the HF model in place (`inject_adapter_in_model`), so the HF model stays
the top-level module and its parameter names stay the checkpoint keys, with peft's parts inserted:
`q_proj.base_layer.weight` (frozen base), `q_proj.lora_A.default.weight` (trainable).

Filling the meta model: the base weights are filled as before (materialize / load_weights map `base_layer.`
and `original_module.` away, see WRAPPER_PARTS there), then `fill_adapters` writes the adapter tensors:
LoRA A/B from peft's own init run on full-size CPU tensors seeded by (seed, module name) — the same values on
every rank and layout — the DoRA magnitude from the filled base weight, and `modules_to_save` copies from the
base module. QLoRA fills and quantises the base to NF4 (bitsandbytes) before the adapters are injected, so peft
picks its 4-bit LoRA layers.

Nothing here imports peft or torch at module import (the CLI imports the package for its flags).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overdrive.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from overdrive.config import TrainConfig
    from overdrive.core.runtime import Runtime
    from overdrive.parallel.strategy import Strategy

ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft's adapter tensors: lora_A/lora_B/lora_magnitude_vector/lora_embedding_*, and modules_to_save copies
_ADAPTER_TENSOR = re.compile(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save)\.")


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The adapter flags of a run (`adapter_spec`); `parallelize` applies it."""

    r: int
    alpha: float
    dropout: float
    target: str  # "all-linear" or comma-separated module names
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    load_in_4bit: bool = False
    seed: int = 42
    compute_dtype: str = "fp32"  # QLoRA: dtype the 4-bit layers compute in (the run's precision)

    @property
    def targets(self) -> str | list[str]:
        return "all-linear" if self.target == "all-linear" else _names(self.target)

    def lora_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets,
            use_dora=self.use_dora,
            modules_to_save=list(self.modules_to_save) or None,
            task_type="CAUSAL_LM",
        )


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def adapter_spec(cfg: TrainConfig) -> AdapterSpec | None:
    """The run's adapters, or None without --lora-r."""
    if cfg.lora_r is None:
        return None
    return AdapterSpec(
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target=cfg.lora_target.strip(),
        use_dora=cfg.use_dora,
        modules_to_save=tuple(_names(cfg.modules_to_save)),
        load_in_4bit=cfg.load_in_4bit,
        seed=cfg.seed,
        compute_dtype="bf16" if cfg.precision == "bf16" else "fp32",
    )


# ------------------------------------------------------------------------------------------ validation


def check_adapters(cfg: TrainConfig, strategy: Strategy, model_config: Any = None) -> None:
    """The adapter flags against each other, the strategy and (when known) the model; before anything starts."""
    if cfg.lora_r is None:
        needs_r = {
            "--use-dora": cfg.use_dora,
            "--modules-to-save": bool(cfg.modules_to_save),
            "--load-in-4bit": cfg.load_in_4bit,
        }
        given = [flag for flag, on in needs_r.items() if on]
        if given:
            raise UsageError(f"{given[0]} configures LoRA adapters; add --lora-r R (e.g. --lora-r 16)")
        return
    if not _names(cfg.lora_target):
        raise UsageError("--lora-target is empty; pass all-linear or module names such as q_proj,v_proj")
    if strategy.tensor_parallel != 1:
        raise UsageError(
            "LoRA adapters are not supported with tensor parallelism; use a single, ddp, fsdp, hsdp or "
            "deepspeed strategy"
        )
    zero3 = strategy.engine == "deepspeed" and strategy.resolved_zero_stage == 3
    if cfg.use_dora and zero3:
        raise UsageError(
            "--use-dora is not supported with DeepSpeed ZeRO-3 (DoRA reads the partitioned base weight); "
            "use --strategy fsdp or drop --use-dora"
        )
    if cfg.load_in_4bit:
        check_qlora(strategy)
    if model_config is not None:
        from overdrive.parallel.materialize import build_meta_model

        check_targets(build_meta_model(copy.deepcopy(model_config), "sdpa", "float32"), adapter_spec(cfg))


def check_qlora(strategy: Strategy) -> None:
    """QLoRA needs bitsandbytes and a layout that keeps whole NF4 tensors on each rank."""
    if strategy.engine == "deepspeed" or strategy.data_parallel in ("fsdp", "hsdp"):
        raise UsageError(
            "--load-in-4bit (QLoRA) runs with the single and ddp strategies; sharding NF4 weights with "
            "FSDP/DeepSpeed is not supported yet: use --strategy single or ddp"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("--load-in-4bit needs bitsandbytes; pip install 'overdrive[finetune]'") from None


def check_targets(model: nn.Module, spec: AdapterSpec | None) -> None:
    """--lora-target and --modules-to-save must name modules of this model (peft matches name suffixes)."""
    from torch import nn

    if spec is None:
        return
    linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    modules = {n: m for n, m in model.named_modules() if n}
    if spec.targets != "all-linear":
        for target in spec.targets:
            found = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
            if not found:
                raise UsageError(
                    f"--lora-target {target} is not a module of {type(model).__name__}; its linear layers "
                    f"are {', '.join(linear)} (or pass all-linear)"
                )
            if not all(isinstance(m, nn.Linear) for m in found):
                raise UsageError(
                    f"--lora-target {target} is a {type(found[0]).__name__}, not a linear layer; LoRA here "
                    f"adapts {', '.join(linear)}; train it fully with --modules-to-save {target}"
                )
    for name in spec.modules_to_save:
        if not any(n == name or n.endswith("." + name) for n in modules):
            raise UsageError(
                f"--modules-to-save {name} is not a module of {type(model).__name__}; "
                "pass module names such as lm_head or embed_tokens"
            )
        if spec.targets != "all-linear" and name in spec.targets:
            raise UsageError(
                f"{name} is both a --lora-target and in --modules-to-save; pass it to one of them"
            )


# ------------------------------------------------------------------------------------------ the step


def is_adapter_tensor(name: str) -> bool:
    """True for peft's adapter tensors (filled by `fill_adapters`, not from the base weights)."""
    return bool(_ADAPTER_TENSOR.search(name))


def apply_adapters(
    model: nn.Module,
    spec: AdapterSpec,
    fill: Callable[[nn.Module], None] | None,
    runtime: Runtime,
) -> Callable[[nn.Module], None]:
    """Inject peft's adapters into `model` in place; returns the fill for base and adapters together.

    The base is frozen (peft marks only adapter tensors trainable). QLoRA fills and quantises the base now,
    so the returned fill writes only the adapters.
    """
    from peft import inject_adapter_in_model

    check_targets(model, spec)
    if spec.load_in_4bit:
        if fill is not None:
            fill(model)
            fill = None
        quantize_base(model, spec, runtime.device)
    on_meta = any(p.is_meta for p in model.parameters())
    try:
        with warnings.catch_warnings():  # peft asks HF for is_gradient_checkpointing, deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            inject_adapter_in_model(spec.lora_config(), model, ADAPTER_NAME, low_cpu_mem_usage=on_meta)
    except ValueError as exc:  # peft's own refusals (e.g. an unsupported layer type)
        raise UsageError(f"peft could not add the adapters: {exc}") from None
    # the base reference the adapter files name: the --model directory (empty for a from-scratch base)
    source = getattr(model.config, "name_or_path", "") or ""
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = source if os.path.isdir(source) else None
    if runtime.rank == 0:
        print(f"overdrive: {describe(model, spec)}", file=sys.stderr)
    base_fill = fill

    def fill_all(m: nn.Module) -> None:
        if base_fill is not None:
            base_fill(m)
        fill_adapters(m, spec, runtime.device)

    return fill_all


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, whole-model sizes on any layout (DTensor shapes are global, ZeRO-3
    keeps the full size in ds_numel; a packed NF4 weight counts its original elements)."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = int(getattr(p, "ds_numel", 0) or p.numel())
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n = int(_prod(shape)) if shape is not None else n
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _prod(shape: Any) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def describe(model: nn.Module, spec: AdapterSpec) -> str:
    """The one line a run logs: the adapter and trainable vs total parameters."""
    trainable, total = parameter_counts(model)
    kind = "QLoRA (NF4 base)" if spec.load_in_4bit else "DoRA" if spec.use_dora else "LoRA"
    layers = sum(1 for m in model.modules() if _is_lora_layer(m))
    return (
        f"{kind} r={spec.r} alpha={spec.alpha:g} on {layers} layers: {trainable:,} trainable of {total:,} "
        f"parameters ({100 * trainable / max(total, 1):.2f}%)"
    )


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


# ------------------------------------------------------------------------------------------ filling


def fill_adapters(model: nn.Module, spec: AdapterSpec, device: torch.device | str) -> None:
    """Write every adapter tensor after the base is filled: LoRA A/B, DoRA magnitudes, modules_to_save."""
    import torch

    from overdrive.parallel.materialize import _unwrapped_name

    _allocate_meta(model, device)
    with torch.no_grad():
        for name, module in model.named_modules():
            fqn = _unwrapped_name(name + ".").rstrip(".")
            if _is_lora_layer(module):
                full = _initial_lora(module, _seed(spec.seed, fqn))
                _write(module, full)
                if ADAPTER_NAME in module.lora_magnitude_vector:
                    _write_magnitude(module, full)
            elif type(module).__name__ == "ModulesToSaveWrapper":
                _copy_local(module.original_module, module.modules_to_save[ADAPTER_NAME])


def _seed(seed: int, fqn: str) -> int:
    from overdrive.parallel.materialize import _module_seed

    return _module_seed(seed, f"adapter:{fqn}")


def _allocate_meta(model: nn.Module, device: torch.device | str) -> None:
    """Adapter tensors still on meta (a model filled before injection, as QLoRA is) get storage on `device`."""
    import torch

    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is not None and tensor.is_meta:
                    value = torch.empty_like(tensor, device=device)
                    store[key] = (
                        torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
                        if isinstance(tensor, torch.nn.Parameter)
                        else value
                    )


def _initial_lora(layer: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Full-size CPU fp32 A/B of one layer from peft's own `reset_lora_parameters`, seeded by its name.

    It runs on a shallow clone whose lora_A/lora_B hold fresh CPU tensors, so neither sharded storage nor
    the global RNG stream is touched: every rank and layout computes the same values.
    """
    import torch
    from torch import nn

    holders: dict[str, nn.Module] = {}
    for part in ("lora_A", "lora_B"):
        source = getattr(layer, part)[ADAPTER_NAME]
        holder = nn.Module()
        for key, tensor in source._parameters.items():
            if tensor is not None:
                empty = torch.empty(tuple(tensor.shape), dtype=torch.float32, device="cpu")
                holder.register_parameter(key, nn.Parameter(empty, requires_grad=False))
        holders[part] = holder
    clone = copy.copy(layer)
    clone.__dict__ = dict(layer.__dict__)
    clone.__dict__["_modules"] = {
        **layer._modules,
        **{part: nn.ModuleDict({ADAPTER_NAME: h}) for part, h in holders.items()},
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clone.reset_lora_parameters(ADAPTER_NAME, True)
    return {f"{part}.{key}": t.detach() for part, h in holders.items() for key, t in h._parameters.items()}


def _write(layer: nn.Module, full: dict[str, torch.Tensor]) -> None:
    from overdrive.parallel.materialize import write_full

    for key, value in full.items():
        part, _, attr = key.partition(".")
        target = getattr(getattr(layer, part)[ADAPTER_NAME], attr)
        write_full(target, value, key)


def _write_magnitude(layer: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """DoRA's magnitude is the row norm of the base weight plus the initial LoRA product (peft's rule)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    from overdrive.parallel.materialize import write_full

    weight = _full_base_weight(layer)
    lora = full["lora_B.weight"] @ full["lora_A.weight"]
    norm = DoraLinearLayer(layer.fan_in_fan_out).get_weight_norm(weight, lora, layer.scaling[ADAPTER_NAME])
    write_full(layer.lora_magnitude_vector[ADAPTER_NAME].weight, norm, "lora_magnitude_vector")


def _full_base_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight at full size in fp32 on CPU (gathered from shards, dequantised from NF4)."""
    from peft.utils.integrations import dequantize_module_weight
    from torch.distributed.tensor import DTensor

    base = layer.get_base_layer()
    weight = base.weight
    if isinstance(weight, DTensor):
        return weight.full_tensor().float().cpu()
    return dequantize_module_weight(base).detach().float().cpu()


def _copy_local(source: nn.Module, target: nn.Module) -> None:
    """modules_to_save starts as a copy of the base module; both are sharded alike, so shards copy over."""
    from torch.distributed.tensor import DTensor

    sources = dict(source.named_parameters())
    for key, tensor in target.named_parameters():
        src = sources[key]
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        local.copy_(src.to_local() if isinstance(src, DTensor) else src)


# ------------------------------------------------------------------------------------------ QLoRA


def quantize_base(model: nn.Module, spec: AdapterSpec, device: torch.device | str) -> int:
    """Replace every filled nn.Linear except the output head by a bitsandbytes NF4 Linear4bit (frozen).

    Quantisation happens when the Params4bit moves to `device` (bitsandbytes' rule), double-quantised as in
    QLoRA; the layers compute in the run's precision. Returns how many layers were quantised.
    """
    import bitsandbytes as bnb
    import torch
    from torch import nn

    compute = torch.bfloat16 if spec.compute_dtype == "bf16" else torch.float32
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute,
            compress_statistics=True,
            quant_type="nf4",
            device="cpu",
        )
        weight = module.weight.detach().to("cpu", torch.float32)
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.detach().to("cpu"), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, q.to(device))
        count += 1
    return count


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds bitsandbytes NF4 weights (QLoRA)."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def save_trainable(model: nn.Module, path: Path) -> None:
    """A QLoRA checkpoint's model file: the trainable tensors only (the NF4 base is rebuilt by the fill)."""
    from safetensors.torch import save_file

    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path), metadata={"format": "pt", "overdrive": "trainable-only"})


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load `save_trainable`'s file: every trainable tensor must be there, and nothing else."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys():
        raise RuntimeError(
            f"{path} holds other tensors than this model's adapters; resume with the same flags"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
