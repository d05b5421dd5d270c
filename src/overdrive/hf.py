"""HF ``Trainer`` integration: the kernel/compile/checkpointing part of an overdrive strategy.

Why: many users keep their own ``Trainer`` script (``run_clm.py`` & co.). Two lines give them the
same model-side speedups overdrive's own training loop uses::

    import overdrive
    overdrive.patch_transformers()                 # kernels for every supported model built afterwards
    trainer = Trainer(..., callbacks=[OverdriveCallback(compile="regional")])

or ``OverdriveTrainer(..., overdrive={"compile": "regional", "activation_checkpointing": True})``.
Everything happens in place on the model, before the first training step, so Trainer's optimizer,
accelerate preparation and checkpoints see the same parameters and ``state_dict`` keys.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback

from overdrive.kernels.compile import compile_model
from overdrive.patches import PatchReport, patch_model, unwrap_model

__all__ = ["OverdriveCallback", "OverdriveOptions", "OverdriveResult", "OverdriveTrainer", "apply_overdrive"]

_COMPILE_MODES = (None, "regional", "full")


@dataclass
class OverdriveOptions:
    """Model-side knobs of a strategy.

    kernels: swap in fused kernels (``patch_model``); ``patch_kwargs`` selects features.
    compile: ``"regional"`` (each decoder block, in place), ``"full"`` (whole model) or None.
    activation_checkpointing: recompute each decoder block in backward (non-reentrant).
    """

    kernels: bool = True
    compile: str | None = None
    activation_checkpointing: bool = False
    patch_kwargs: dict[str, Any] = field(default_factory=dict)
    compile_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.compile not in _COMPILE_MODES:
            raise ValueError(f"compile must be one of {_COMPILE_MODES}, got {self.compile!r}")


@dataclass
class OverdriveResult:
    """What :func:`apply_overdrive` changed (for logs)."""

    patch: PatchReport | None = None
    compiled_modules: int = 0
    activation_checkpointing: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["patch"] = self.patch.summary() if self.patch is not None else None
        return out


def apply_overdrive(
    model: nn.Module, options: OverdriveOptions | None = None, **kwargs: Any
) -> OverdriveResult:
    """Apply kernels, activation checkpointing and compilation to ``model`` in place (in that order).

    Checkpointing is enabled before compiling so the compiled blocks are the checkpointed ones.
    ``kwargs`` build an :class:`OverdriveOptions` when ``options`` is None.
    """
    opts = options or OverdriveOptions(**kwargs)
    base = unwrap_model(model)
    result = OverdriveResult()
    if opts.kernels:
        result.patch = patch_model(base, **opts.patch_kwargs)
    if opts.activation_checkpointing:
        if not getattr(base, "supports_gradient_checkpointing", False):
            warnings.warn(
                f"overdrive: {type(base).__name__} does not support gradient checkpointing.", stacklevel=2
            )
        else:
            ckpt_kwargs = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
            if hasattr(base, "config"):
                base.config.use_cache = False
            result.activation_checkpointing = True
    if opts.compile is not None:
        result.compiled_modules = compile_model(
            base, regional=opts.compile == "regional", **opts.compile_kwargs
        )
    return result


class OverdriveCallback(TrainerCallback):
    """Applies :func:`apply_overdrive` to the Trainer's model at the end of ``Trainer.__init__``."""

    def __init__(self, options: OverdriveOptions | None = None, **kwargs: Any) -> None:
        self.options = options or OverdriveOptions(**kwargs)
        self.result: OverdriveResult | None = None

    def on_init_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if self.result is not None or model is None:
            return
        if self.options.compile is not None and getattr(args, "torch_compile", False):
            warnings.warn(
                "overdrive: TrainingArguments.torch_compile is also set; the model would be compiled twice. "
                "Disable one of them.",
                stacklevel=2,
            )
        if self.options.activation_checkpointing and getattr(args, "gradient_checkpointing", False):
            warnings.warn(
                "overdrive: gradient checkpointing is already enabled by TrainingArguments.", stacklevel=2
            )
        self.result = apply_overdrive(model, self.options)


class OverdriveTrainer(Trainer):
    """``Trainer`` that applies an overdrive model strategy; ``overdrive=`` takes options or a dict."""

    def __init__(
        self, *args: Any, overdrive: OverdriveOptions | dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        opts = overdrive if isinstance(overdrive, OverdriveOptions) else OverdriveOptions(**(overdrive or {}))
        self.overdrive_callback = OverdriveCallback(opts)
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.overdrive_callback]
        super().__init__(*args, **kwargs)
