"""Swap overdrive's kernels into HF causal LMs.

``patch_model(model)`` patches one model in place; ``patch_transformers()`` makes every model of a
supported type built afterwards (``from_pretrained``/``from_config``/direct construction, e.g. inside
``run_clm.py``) patched as it is constructed, by hooking ``PreTrainedModel.post_init``.

Patching swaps module classes in place (see ``_swap.py``): parameter names, ``state_dict`` keys and
``config.architectures`` are unchanged, and every feature falls back to HF's implementation, with a
warning, when the installed transformers does not have the structure the kernel replaces.

When kernels are swapped in, one INFO line through transformers' logger names them and the model
(see :func:`_log_patched`): INFO because run_clm.py & co. set transformers' verbosity to INFO on the
main process (``log_level="passive"``) and WARNING on the other ranks: printed once per node, not per rank.
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers.utils import logging as hf_logging

from overdrive.patches import llama as _llama
from overdrive.patches._causal_lm import FUSED_CE_FLAG
from overdrive.patches._swap import is_swapped, restore_class

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PatchReport",
    "patch_model",
    "patch_transformers",
    "unpatch_model",
    "unpatch_transformers",
    "unwrap_model",
]

#: model_type -> family module exposing ``patch(model, model_type, **features)``.
_FAMILIES: dict[str, Any] = {mt: _llama for mt in _llama.MODEL_TYPES}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)
_FEATURES = ("fused_cross_entropy", "rms_norm", "rope", "swiglu")
#: Under transformers' root logger so that its verbosity (``set_verbosity_*``, run_clm's
#: ``--log_level``) and handler apply.
logger = hf_logging.get_logger("transformers.overdrive")


@dataclass
class PatchReport:
    """What :func:`patch_model` did: modules patched per feature, and why any feature fell back."""

    model_class: str
    model_type: str | None
    family: str | None = None
    applied: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return self.family is not None

    def summary(self) -> str:
        if not self.supported:
            return f"{self.model_class} (model_type={self.model_type!r}): unsupported, untouched"
        done = ", ".join(f"{k}={v}" for k, v in self.applied.items()) or "nothing"
        fell = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return f"{self.model_class} [{self.family}]: patched {done}" + (
            f"; fallbacks: {fell}" if fell else ""
        )

    def __str__(self) -> str:
        return self.summary()


def unwrap_model(model: Any) -> nn.Module:
    """Reach the HF model inside PEFT / DDP / torch.compile wrappers."""
    for _ in range(8):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
            model = model.module
        else:
            break
    return model


_VERSION_WARNED: list[bool] = []


def _log_patched(report: PatchReport, model: nn.Module) -> None:
    """The one line saying which kernels went into which model (INFO: see the module docstring)."""
    if not report.applied:
        return
    source = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    origin = f" from {source!r}" if source else ""
    kernels = ", ".join(f"{k} x{v}" for k, v in sorted(report.applied.items()))
    fell = "; fell back: " + ", ".join(sorted(report.skipped)) if report.skipped else ""
    logger.info(
        f"overdrive: kernels patched into {report.model_class}{origin} "
        f"(model_type={report.model_type}): {kernels}{fell}"
    )


def _count_swapped(model: nn.Module) -> int:
    return sum(int(is_swapped(m)) for m in model.modules())


def _check_transformers_version() -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5 and not _VERSION_WARNED:
        _VERSION_WARNED.append(True)
        warnings.warn(
            f"overdrive: patches target transformers>=5 (found {transformers.__version__}); relying on "
            "per-module structural and numerical self-checks, which fall back where they fail.",
            stacklevel=3,
        )


def patch_model(
    model: nn.Module,
    *,
    strict: bool = False,
    fused_cross_entropy: bool = True,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
) -> PatchReport:
    """Patch a HF Llama/Mistral/Qwen2/Qwen3 model in place with overdrive's kernels.

    Unsupported architectures are left untouched with a warning (``ValueError`` if ``strict``); a
    feature whose HF counterpart fails the compatibility checks falls back with a warning (with
    ``strict`` the model is restored and ``ValueError`` raised). Idempotent.

    ``fused_cross_entropy`` only changes the *training* forward with labels: it returns the loss and
    ``logits=None``. In eval mode, without labels, or with ``logits_to_keep`` the HF path runs.
    ``rope`` makes this model's attention modules call overdrive's RoPE (numerically identical forward).
    Logs one INFO line (transformers' logger) when it swaps in kernels that were not there yet.
    """
    base = unwrap_model(model)
    before = _count_swapped(base)
    report = _patch(base, strict, fused_cross_entropy, rms_norm, rope, swiglu)
    if _count_swapped(base) > before:
        _log_patched(report, base)
    return report


def _patch(
    base: nn.Module, strict: bool, fused_cross_entropy: bool, rms_norm: bool, rope: bool, swiglu: bool
) -> PatchReport:
    """:func:`patch_model` on an unwrapped model, without the log line."""
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    report = PatchReport(model_class=type(base).__name__, model_type=model_type)
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        msg = (
            f"overdrive: no kernel patches for model_type={model_type!r} ({type(base).__name__}); "
            f"model left untouched. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
        return report
    _check_transformers_version()
    report.family = family.__name__.rsplit(".", 1)[-1]
    report.applied, report.skipped = family.patch(
        base,
        model_type,
        fused_cross_entropy=fused_cross_entropy,
        rms_norm=rms_norm,
        rope=rope,
        swiglu=swiglu,
    )
    if report.skipped:
        msg = "; ".join(f"{k} not patched ({v})" for k, v in report.skipped.items())
        if strict:
            unpatch_model(base)
            raise ValueError(f"overdrive: {msg}")
        warnings.warn(f"overdrive: {msg}; falling back to the HF implementation.", stacklevel=3)
    return report


def unpatch_model(model: nn.Module) -> int:
    """Restore the original classes of every patched module; returns how many were restored."""
    base = unwrap_model(model)
    count = sum(int(restore_class(m)) for m in base.modules())
    base.__dict__.pop(FUSED_CE_FLAG, None)
    return count


# ---------------------------------------------------------------------------------------------- global
_HOOK: dict[str, Any] = {"original": None, "kwargs": {}}
_UNSUPPORTED_WARNED: set[str] = set()


def _is_generative(model: nn.Module) -> bool:
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin) or type(model).__name__.endswith("ForCausalLM")


def _built_inside_another_model(model: nn.Module) -> bool:
    """True while another HF model's ``__init__`` is on the stack (e.g. ``LlamaModel`` inside
    ``LlamaForCausalLM``): the enclosing model's ``post_init`` comes later and reports for both."""
    from transformers import PreTrainedModel

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            owner = frame.f_locals.get("self")
            if owner is not model and isinstance(owner, PreTrainedModel):
                return True
        frame = frame.f_back
    return False


def _on_model_built(model: nn.Module) -> None:
    kwargs = dict(_HOOK["kwargs"])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _FAMILIES:
        report = _patch(model, **kwargs)
        if not _built_inside_another_model(model):
            _log_patched(report, model)
    elif _is_generative(model) and str(model_type) not in _UNSUPPORTED_WARNED:
        _UNSUPPORTED_WARNED.add(str(model_type))
        if kwargs.get("strict"):
            raise ValueError(f"overdrive: no kernel patches for model_type={model_type!r}")
        warnings.warn(
            f"overdrive: no kernel patches for model_type={model_type!r} ({type(model).__name__}); "
            "it runs unpatched.",
            stacklevel=3,
        )


def patch_transformers(
    *,
    strict: bool = False,
    fused_cross_entropy: bool = True,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
) -> None:
    """Patch every supported model constructed from now on (same options as :func:`patch_model`).

    Hooks ``PreTrainedModel.post_init``, which every HF model calls at the end of ``__init__``
    (before ``from_pretrained`` loads weights; patching does not touch parameters). Calling it
    again updates the options. Models built earlier are not affected: use :func:`patch_model`.
    """
    from transformers import PreTrainedModel

    _HOOK["kwargs"] = {
        "strict": strict,
        "fused_cross_entropy": fused_cross_entropy,
        "rms_norm": rms_norm,
        "rope": rope,
        "swiglu": swiglu,
    }
    if _HOOK["original"] is not None:
        return
    original = PreTrainedModel.post_init

    @functools.wraps(original)
    def post_init(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        _on_model_built(self)
        return out

    _HOOK["original"] = original
    PreTrainedModel.post_init = post_init  # type: ignore[method-assign]


def unpatch_transformers() -> None:
    """Undo :func:`patch_transformers`. Already-built models keep their kernels (see :func:`unpatch_model`)."""
    from transformers import PreTrainedModel

    if _HOOK["original"] is not None:
        PreTrainedModel.post_init = _HOOK["original"]  # type: ignore[method-assign]
        _HOOK["original"] = None
