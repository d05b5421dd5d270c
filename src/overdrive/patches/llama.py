"""Patches for the Llama family: Llama, Mistral, Qwen2 and Qwen3.

They share one decoder structure in transformers 5 (``<P>RMSNorm``, ``<P>MLP`` with SwiGLU,
module-level ``apply_rotary_pos_emb`` called from ``<P>Attention.forward``, ``<P>ForCausalLM`` with
``model`` + ``lm_head``); Qwen3 adds per-head ``q_norm``/``k_norm`` RMSNorms, which get patched too.

Every swap is guarded by a structural check and a tiny numerical self-test against the class's own
``forward`` (on CPU, fp32), so a future transformers release that changes a module's math makes the
patch fall back with a warning instead of silently changing the model. The self-tests never depend on
the model being built: transformers 5 builds ``from_pretrained`` models under ``torch.device("meta")``
and the requested default dtype, so the tests pin their own device and dtype, and only a pass is
cached (a failure is re-checked for the next model instead of disabling the kernel for the process).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

from overdrive.kernels.rms_norm import rms_norm as _rms_norm
from overdrive.kernels.rope import apply_rotary_pos_emb as _rope
from overdrive.kernels.swiglu import swiglu as _swiglu
from overdrive.patches._causal_lm import FUSED_CE_FLAG, CausalLMPatch, check_causal_lm_class
from overdrive.patches._swap import original_class, swap_class

#: ``config.model_type`` -> class-name prefix in ``transformers.models.<type>.modeling_<type>``.
MODEL_TYPES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
#: (kind, class or function) whose self-test passed in this process. Failures are never cached.
_SELF_CHECKS_PASSED: set[tuple[str, object]] = set()


class RMSNormPatch:
    """Mixin: ``<P>RMSNorm.forward`` -> :func:`overdrive.kernels.rms_norm.rms_norm`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _rms_norm(hidden_states, self.weight, self.variance_epsilon)  # type: ignore[attr-defined]


class SwiGLUMLPPatch:
    """Mixin: ``<P>MLP.forward`` -> projections as-is, gating by :func:`overdrive.kernels.swiglu.swiglu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))  # type: ignore[attr-defined]


def rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature as HF's module-level ``apply_rotary_pos_emb``; installed in its place."""
    return _rope(q, k, cos, sin, unsqueeze_dim)


def modeling_module(model_type: str) -> types.ModuleType:
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


# ---------------------------------------------------------------------------------------------- checks
def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Self-test data: CPU fp32 from a private generator, whatever device/dtype context is active."""
    return torch.randn(*shape, generator=g, device="cpu", dtype=torch.float32)


@contextlib.contextmanager
def _reference_env() -> Iterator[None]:
    """CPU, fp32 default dtype, no grad: the self-tests' own environment.

    A model being built may sit inside ``torch.device("meta")`` (transformers 5 ``from_pretrained``)
    and a non-fp32 default dtype (``dtype=torch.bfloat16``); both leak into tensors the kernels create
    internally. The inner device context wins over the outer one; the default dtype is restored after.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"), torch.no_grad():
            yield
    finally:
        torch.set_default_dtype(previous)


def _self_check(kind: str, subject: object, run: Callable[[], str | None]) -> str | None:
    """Run ``run`` once per subject while it passes; a failure is reported but not cached, so an
    environment problem while one model is built cannot disable a kernel for every later model."""
    key = (kind, subject)
    if key in _SELF_CHECKS_PASSED:
        return None
    try:
        with _reference_env():
            reason = run()
    except Exception as exc:  # any mismatch in structure shows up here
        return f"self-test raised {type(exc).__name__}: {exc}"
    if reason is None:
        _SELF_CHECKS_PASSED.add(key)
    return reason


def check_rms_norm(module: nn.Module) -> str | None:
    cls = original_class(module)
    if not hasattr(module, "weight") or not hasattr(module, "variance_epsilon"):
        return f"{cls.__name__} has no weight/variance_epsilon"

    def run() -> str | None:
        g = torch.Generator(device="cpu").manual_seed(0)
        stand_in = types.SimpleNamespace(weight=_randn(g, 16), variance_epsilon=1e-6)
        x = _randn(g, 3, 16) * 3
        ok = _close(cls.forward(stand_in, x), _rms_norm(x, stand_in.weight, 1e-6))
        return None if ok else f"{cls.__name__}.forward is not Llama-style RMSNorm"

    return _self_check("rms_norm", cls, run)


def check_mlp(module: nn.Module) -> str | None:
    cls = original_class(module)
    if not all(
        isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")
    ):
        return f"{cls.__name__} has no gate_proj/up_proj/down_proj"
    act = getattr(module, "act_fn", None)
    if act is None or type(act).__name__ not in ("SiLUActivation", "SiLU"):
        return f"{cls.__name__} activation is {type(act).__name__}, not SiLU"

    def run() -> str | None:
        g = torch.Generator(device="cpu").manual_seed(0)  # never touch the global RNG (models initialising)

        def linear(n_in: int, n_out: int) -> Callable[[torch.Tensor], torch.Tensor]:
            w, b = _randn(g, n_out, n_in) / n_in**0.5, _randn(g, n_out)
            return lambda x: x @ w.t() + b

        stand_in = types.SimpleNamespace(
            gate_proj=linear(8, 12), up_proj=linear(8, 12), down_proj=linear(12, 8), act_fn=nn.SiLU()
        )
        x = _randn(g, 4, 8)
        ok = _close(cls.forward(stand_in, x), SwiGLUMLPPatch.forward(stand_in, x))  # type: ignore[arg-type]
        return None if ok else f"{cls.__name__}.forward is not down(silu(gate(x)) * up(x))"

    return _self_check("mlp", cls, run)


def check_rope(model_type: str) -> str | None:
    mod = modeling_module(model_type)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        return f"{mod.__name__} has no apply_rotary_pos_emb"
    if list(inspect.signature(fn).parameters) != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
        return f"{mod.__name__}.apply_rotary_pos_emb has signature {inspect.signature(fn)}"
    attn = getattr(mod, f"{MODEL_TYPES[model_type]}Attention", None)
    fwd = getattr(attn, "forward", None)
    if not isinstance(fwd, types.FunctionType) or hasattr(fwd, "__wrapped__"):
        return f"{mod.__name__} attention forward is wrapped or missing"
    if "apply_rotary_pos_emb" not in fwd.__code__.co_names:
        return f"{mod.__name__} attention does not call the module-level apply_rotary_pos_emb"

    def run() -> str | None:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k = _randn(g, 2, 4, 5, 8), _randn(g, 2, 2, 5, 8)
        cos, sin = _randn(g, 2, 5, 8), _randn(g, 2, 5, 8)
        ok = all(
            _close(a, b) for a, b in zip(fn(q, k, cos, sin), rotary_pos_emb(q, k, cos, sin), strict=True)
        )
        return None if ok else f"{mod.__name__}.apply_rotary_pos_emb is not the standard rotate_half RoPE"

    return _self_check("rope", fn, run)


# ---------------------------------------------------------------------------------------------- apply
_ROPE_MIXINS: dict[str, type] = {}


def rope_attention_mixin(model_type: str) -> type:
    """Mixin whose ``forward`` is HF's own ``<P>Attention.forward`` code, re-bound to globals where
    ``apply_rotary_pos_emb`` is ours. Per-instance (no process-wide monkeypatching) and no copy of
    HF's attention logic: only the name lookup for the RoPE function differs.
    """
    if model_type not in _ROPE_MIXINS:
        mod = modeling_module(model_type)
        orig = getattr(mod, f"{MODEL_TYPES[model_type]}Attention").forward
        scope = dict(vars(mod))
        scope["apply_rotary_pos_emb"] = rotary_pos_emb
        fwd = types.FunctionType(orig.__code__, scope, orig.__name__, orig.__defaults__, orig.__closure__)
        fwd.__kwdefaults__ = orig.__kwdefaults__
        fwd.__doc__ = orig.__doc__
        fwd.__annotations__ = dict(getattr(orig, "__annotations__", {}))
        _ROPE_MIXINS[model_type] = type(f"RopePatch{MODEL_TYPES[model_type]}", (), {"forward": fwd})
    return _ROPE_MIXINS[model_type]


def patch(
    model: nn.Module,
    model_type: str,
    *,
    fused_cross_entropy: bool,
    rms_norm: bool,
    rope: bool,
    swiglu: bool,
) -> tuple[dict[str, int], dict[str, str]]:
    """Patch one Llama-family model in place; returns ({feature: modules patched}, {feature: why skipped})."""
    mod = modeling_module(model_type)
    prefix = MODEL_TYPES[model_type]
    applied: dict[str, int] = {}
    skipped: dict[str, str] = {}

    def swap_all(feature: str, cls_name: str, mixin: type, check: Callable[[nn.Module], str | None]) -> None:
        target = getattr(mod, cls_name, None)
        # Exact class only: a user subclass may override forward, and must then keep its own.
        subs = [m for m in model.modules() if target is not None and original_class(m) is target]
        for sub in subs:  # check all first: a feature is patched everywhere or nowhere
            reason = check(sub)
            if reason is not None:
                skipped[feature] = reason
                return
        for sub in subs:
            swap_class(sub, mixin)
        applied[feature] = len(subs)

    if rms_norm:
        swap_all("rms_norm", f"{prefix}RMSNorm", RMSNormPatch, check_rms_norm)
    if swiglu:
        swap_all("swiglu", f"{prefix}MLP", SwiGLUMLPPatch, check_mlp)
    if rope:
        reason = check_rope(model_type)
        if reason is None:
            swap_all("rope", f"{prefix}Attention", rope_attention_mixin(model_type), lambda _m: None)
        else:
            skipped["rope"] = reason
    if fused_cross_entropy:
        causal_cls = getattr(mod, f"{prefix}ForCausalLM", None)
        if original_class(model) is not causal_cls or causal_cls is None:
            if isinstance(model, nn.Module) and hasattr(model, "lm_head"):
                skipped["fused_cross_entropy"] = f"{type(model).__name__} is not {prefix}ForCausalLM"
        else:
            reason = check_causal_lm_class(causal_cls)
            if reason is not None:
                skipped["fused_cross_entropy"] = reason
            else:
                swap_class(model, CausalLMPatch)
                setattr(model, FUSED_CE_FLAG, True)
                applied["fused_cross_entropy"] = 1
    return applied, skipped
