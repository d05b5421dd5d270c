"""Meta-device construction: build a model with no memory, parallelize it, then fill only the local shards.

Building the full fp32 model on every rank before sharding costs ~32 GB per rank for llama3-8b. Here the
model is built on `meta`, parallelized (tensor parallel and FSDP2/HSDP make parameters DTensors, still on
meta), and only then does each rank allocate its local shards and fill them:

- `materialize` (from a config): each module of the unparallelized `reference` is initialised at full size on
  CPU by HF's own `_init_weights`, from an RNG seeded by (seed, module name), and each rank keeps its chunk.
  The full model is therefore the same for any layout and world size, and for any dtype (init runs in fp32,
  then is cast), while the extra memory is one module's full tensors at a time.
- `load_weights` (from a checkpoint): safetensors are read one tensor at a time and each rank keeps its chunk.

Order for the caller::

    model = build_meta_model(config, attn_implementation, dtype, vocab_size)
    reference = meta_reference(model)          # before any parallel transform
    <tensor parallel, activation checkpointing, compile, FSDP2/HSDP on `model`>
    materialize(model, reference, seed=seed, device=device)   # or load_weights(model, reference, dir, device)
    <DDP / DeepSpeed wrap, which need real tensors>
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init

from overdrive.errors import UsageError
from overdrive.modeling import DTYPES, check_attn

INDEX_FILE = "model.safetensors.index.json"
# Keys old checkpoints carry that current models compute (HF drops them the same way when loading).
ALWAYS_IGNORED = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")
WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
# peft adapters (overdrive.parallel.adapters) put the base tensors one level down; adapter tensors are
# filled by adapters.fill_adapters, not from the base weights
ADAPTER_BASE_PARTS = ("base_layer.", "original_module.")


def build_meta_model(
    config: PretrainedConfig, attn_implementation: str, dtype: str, vocab_size: int | None = None
) -> PreTrainedModel:
    """The HF causal LM with every tensor on `meta`: shapes, names and ties, no memory and no init work.

    dtype "auto" means the config's dtype when it names one (a fine-tuning config), else float32.
    """
    if vocab_size is not None:
        config.vocab_size = vocab_size
    config.use_cache = False
    check_attn(attn_implementation)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=_torch_dtype(dtype, config)
        )


def _torch_dtype(dtype: str, config: PretrainedConfig) -> torch.dtype:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return DTYPES[dtype]
    named = getattr(config, "dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32


def meta_reference(model: nn.Module) -> nn.Module:
    """A meta deep copy of the model before any parallel transform (free): the full shapes and names."""
    for name, tensor in _named_tensors(model):
        if not tensor.is_meta:
            raise ValueError(f"meta_reference needs a model on the meta device; {name} is on {tensor.device}")
    return copy.deepcopy(model)


# --------------------------------------------------------------------------------------------- from a config


@torch.no_grad()
def materialize(model: nn.Module, reference: nn.Module, *, seed: int, device: torch.device | str) -> None:
    """Allocate the model's local shards on `device` and fill them with HF's init, identically for any layout.

    `model` may hold plain meta tensors or meta DTensors (FSDP2 Shard(0), tensor-parallel Shard(0)/Shard(1),
    2-D meshes); `reference` is `meta_reference(model)` taken before parallelizing. No collective is used.
    """
    targets = _allocate(model, device)
    written: set[int] = set()
    for fqn, full in _initialised_modules(reference, seed, _held_by(model, targets)):
        _write_module(targets, fqn, full, written)
    _check_all_written(targets, written)


def _held_by(model: nn.Module, targets: dict[str, torch.Tensor]) -> Callable[[str, nn.Module], bool] | None:
    """For a pipeline stage (a part of the reference model), the reference modules the stage holds."""
    from overdrive.parallel.pipeline import is_stage

    if not is_stage(model):
        return None
    return lambda fqn, module: any(_join(fqn, name) in targets for name in _tensors_of(module))


def _initialised_modules(
    reference: nn.Module, seed: int, wanted: Callable[[str, nn.Module], bool] | None = None
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(module name, its own tensors at full size, initialised) per (wanted) module, one alive at a time."""
    seen: set[int] = set()
    for fqn, module, owner in _modules_with_owner(reference):
        if wanted is None or wanted(fqn, module):
            yield fqn, _init_module(module, owner, _module_seed(seed, fqn), seen, fqn or "<root>")


def _modules_with_owner(root: nn.Module) -> Iterator[tuple[str, nn.Module, PreTrainedModel]]:
    """Modules that own tensors, each with the nearest enclosing HF model, whose `_init_weights` applies."""
    if not isinstance(root, PreTrainedModel):
        raise TypeError(f"the reference must be a transformers PreTrainedModel, not {type(root).__name__}")
    owners: dict[str, PreTrainedModel] = {}
    for fqn, module in root.named_modules():
        parent = fqn.rpartition(".")[0] if fqn else None
        owner = module if isinstance(module, PreTrainedModel) else owners[parent]  # type: ignore[index]
        owners[fqn] = owner
        if module._parameters or module._buffers:
            yield fqn, module, owner


def _module_seed(seed: int, fqn: str) -> int:
    """A stable 63-bit seed per (seed, module name): the same on every rank, process and Python run."""
    digest = hashlib.sha256(f"overdrive-init:{seed}:{fqn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _init_module(
    module: nn.Module, owner: PreTrainedModel, seed: int, seen: set[int], where: str
) -> dict[str, torch.Tensor]:
    """Run HF's init for one module on a CPU clone of its own tensors; tensors seen before (ties) skipped."""
    clone, fresh = _cpu_clone(module, seen)
    if not fresh:
        return {}
    with torch.random.fork_rng(devices=[]), hf_init.guard_torch_init_functions():
        torch.default_generator.manual_seed(seed)
        owner._init_weights(clone)
    out = {name: _tensors_of(clone)[name] for name in fresh}
    for name, tensor in out.items():
        if tensor.is_floating_point() and torch.isnan(tensor).any():
            raise UsageError(
                f"{type(owner).__name__}._init_weights leaves {where}.{name} unset, so this model cannot be "
                "built on the meta device; fine-tune it from weights (--model) instead"
            )
    return out


def _cpu_clone(module: nn.Module, seen: set[int]) -> tuple[nn.Module, list[str]]:
    """A shallow copy of `module` whose own tensors are fresh full-size CPU tensors (floats in fp32,
    NaN-filled so an init that skips one is caught); tensors initialised elsewhere stay meta, flagged done."""
    clone = copy.copy(module)
    clone.__dict__ = dict(module.__dict__)
    fresh: list[str] = []
    for store in ("_parameters", "_buffers"):
        tensors = {}
        for name, tensor in getattr(module, store).items():
            if tensor is None:
                tensors[name] = None
                continue
            if id(tensor) in seen:
                tensors[name] = _done_placeholder(tensor, store)
                continue
            seen.add(id(tensor))
            fresh.append(name)
            tensors[name] = _fresh_cpu(tensor, store)
        clone.__dict__[store] = tensors
    return clone, fresh


def _fresh_cpu(tensor: torch.Tensor, store: str) -> torch.Tensor:
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    value = torch.empty(tensor.shape, dtype=dtype, device="cpu")
    value.fill_(float("nan") if value.is_floating_point() else 0)
    return nn.Parameter(value, requires_grad=False) if store == "_parameters" else value


def _done_placeholder(tensor: torch.Tensor, store: str) -> torch.Tensor:
    value = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if store == "_parameters":
        value = nn.Parameter(value, requires_grad=False)
    value._is_hf_initialized = True  # HF's init functions skip flagged tensors
    return value


def _tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**module._parameters, **module._buffers}


# ----------------------------------------------------------------------------------------- local shards


def _allocate(model: nn.Module, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Allocate (uninitialised) local shards on `device`, keep ties, and map every name to its tensor."""
    aliases = _aliases(model)
    model.to_empty(device=torch.device(device))  # FSDP2 re-registers its padded shards in its _apply
    for alias, canonical in aliases:
        parent, _, attr = alias.rpartition(".")
        owner_path, _, canonical_attr = canonical.rpartition(".")
        source = model.get_submodule(owner_path)
        store = "_parameters" if canonical_attr in source._parameters else "_buffers"
        getattr(model.get_submodule(parent), store)[attr] = getattr(source, store)[canonical_attr]
    from overdrive.parallel.adapters import is_adapter_tensor

    return {_unwrapped_name(n): t for n, t in _named_tensors(model) if not is_adapter_tensor(n)}


def _unwrapped_name(name: str) -> str:
    """The name without the path parts that wrappers insert (checkpoint_wrapper, torch.compile, FSDP1, peft)."""
    for part in WRAPPER_PARTS + ADAPTER_BASE_PARTS:
        name = name.replace(part, "")
    return name


def _aliases(model: nn.Module) -> list[tuple[str, str]]:
    """(alias name, first name) for tensors reachable under several names, e.g. a tied lm_head."""
    first: dict[int, str] = {}
    out = []
    for name, tensor in _named_tensors(model):
        if id(tensor) in first:
            out.append((name, first[id(tensor)]))
        else:
            first[id(tensor)] = name
    return out


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _write_module(
    targets: dict[str, torch.Tensor], fqn: str, full: dict[str, torch.Tensor], written: set[int]
) -> None:
    for name, value in full.items():
        key = _join(fqn, name)
        target = targets.get(key)
        if target is None:
            raise RuntimeError(
                f"the parallelized model has no tensor {key}; was it renamed after meta_reference?"
            )
        write_full(target, value, key)
        written.add(id(target))


def write_full(target: torch.Tensor, full: torch.Tensor, name: str = "tensor") -> None:
    """Copy the part of `full` this rank holds into `target` (DTensor or plain tensor), cast to its dtype."""
    if tuple(target.shape) != tuple(full.shape):
        raise RuntimeError(f"{name}: full shape {tuple(full.shape)} but the model has {tuple(target.shape)}")
    with torch.no_grad():
        if isinstance(target, DTensor):
            # src_data_rank=None: every rank splits its own copy; no collective, any placement (also strided).
            local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(local.to_local())
        else:
            target.copy_(full)


def _check_all_written(targets: dict[str, torch.Tensor], written: set[int]) -> None:
    left = [name for name, tensor in targets.items() if id(tensor) not in written]
    if left:
        raise RuntimeError(f"no value for {len(left)} tensor(s) of the model, e.g. {left[:3]}")


# ----------------------------------------------------------------------------------------- from a checkpoint


@torch.no_grad()
def load_weights(
    model: nn.Module, reference: nn.Module, checkpoint_dir: str | Path, device: torch.device | str
) -> None:
    """Stream *.safetensors into the local shards of a parallelized meta model, one tensor at a time.

    Keys, shapes and coverage are checked from the file headers before anything is allocated; tensors are
    cast to the model's dtype; tied weights are filled once; non-persistent buffers (rotary inv_freq) are
    recomputed.
    """
    plan = _load_plan(reference, Path(checkpoint_dir))
    targets = _allocate(model, device)
    held = _held_by(model, targets)
    if held is not None:  # a pipeline stage reads only its own tensors
        plan = {path: {k: n for k, n in keys.items() if n in targets} for path, keys in plan.items()}
    written: set[int] = set()
    _stream(plan, targets, written)

    def unfilled(fqn: str, module: nn.Module) -> bool:
        if held is not None and not held(fqn, module):
            return False
        return any(id(targets.get(_join(fqn, n))) not in written for n in _tensors_of(module))

    for fqn, full in _initialised_modules(reference, 0, unfilled):  # what no file holds: computed buffers
        _write_module(
            targets,
            fqn,
            {n: t for n, t in full.items() if id(targets[_join(fqn, n)]) not in written},
            written,
        )
    _check_all_written(targets, written)


def _load_plan(reference: nn.Module, root: Path) -> dict[Path, dict[str, str]]:
    """{file: {checkpoint key: model name}}, after refusing missing, unexpected and misshapen tensors."""
    expected = _persistent_shapes(reference)
    ignore_missing = _patterns(getattr(reference, "_keys_to_ignore_on_load_missing", None))
    ignore_extra = _patterns(getattr(reference, "_keys_to_ignore_on_load_unexpected", None), ALWAYS_IGNORED)
    plan: dict[Path, dict[str, str]] = {}
    unexpected: list[str] = []
    found: set[str] = set()
    for path in _checkpoint_files(root):
        for key, shape in _headers(path):
            name = _model_name(key, expected, reference)
            if name is None:
                if not ignore_extra.search(key):
                    unexpected.append(key)
                continue
            if shape != expected[name]:
                raise UsageError(
                    f"{path.name}: {key} has shape {shape} but the model expects {expected[name]}; "
                    "the config.json does not match these weights"
                )
            plan.setdefault(path, {})[key] = name
            found.add(name)
    _refuse_bad_keys(root, reference, found, unexpected, ignore_missing)
    return plan


def _headers(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor in a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return [(key, tuple(f.get_slice(key).get_shape())) for key in f.keys()]  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise UsageError(
            f"{path} is not a readable safetensors file ({exc}); re-download or re-save it"
        ) from None


def _refuse_bad_keys(
    root: Path,
    reference: nn.Module,
    found: set[str],
    unexpected: list[str],
    ignore_missing: re.Pattern[str],
) -> None:
    """One UsageError naming what the files lack and what they hold in excess; a tied alias counts."""
    tensors = reference.state_dict(keep_vars=True)
    covered = {id(tensors[n]) for n in found}
    missing = [n for n, t in tensors.items() if id(t) not in covered and not ignore_missing.search(n)]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) the model needs (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(
            f"{len(unexpected)} tensor(s) the model does not have (e.g. {', '.join(unexpected[:3])})"
        )
    raise UsageError(
        f"the weights in {root} do not fit the model built from its config.json: {'; '.join(parts)}; "
        "pass a directory whose config.json and *.safetensors come from the same save_pretrained"
    )


def _persistent_shapes(reference: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every name a checkpoint may hold (tied aliases included) and its full shape."""
    return {name: tuple(t.shape) for name, t in reference.state_dict(keep_vars=True).items()}


def _model_name(key: str, expected: dict, reference: nn.Module) -> str | None:
    """The model name for a checkpoint key; a base-model checkpoint may lack (or add) the base prefix."""
    if key in expected:
        return key
    prefix = getattr(reference, "base_model_prefix", "")
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    if prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1 :] in expected:
        return key[len(prefix) + 1 :]
    return None


def _patterns(*groups: object) -> re.Pattern[str]:
    items = [p for group in groups for p in (group or ())]
    return re.compile("|".join(f"(?:{p})" for p in items)) if items else re.compile(r"(?!x)x")


def _checkpoint_files(root: Path) -> list[Path]:
    """A checkpoint's safetensors files: those its index names if it has one, else every *.safetensors."""
    if not root.is_dir():
        raise UsageError(f"--model {root} is not a directory; pass the directory holding the *.safetensors")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(
                f"{index} is not a readable safetensors index ({exc}); fix or re-save it"
            ) from None
        absent = [n for n in names if not (root / n).is_file()]
        if absent:
            raise UsageError(f"{index} names {absent[0]}, which is not in {root}; copy the whole checkpoint")
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{root} has no *.safetensors weights; pass a directory written by save_pretrained")
    return files


def _stream(plan: dict[Path, dict[str, str]], targets: dict[str, torch.Tensor], written: set[int]) -> None:
    """Read each tensor once and keep this rank's part, cast to the model's dtype."""
    from safetensors import safe_open

    for path, keys in plan.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key, name in keys.items():
                target = targets[name]
                write_full(target, f.get_tensor(key), name)
                written.add(id(target))
