"""overdrive: a training accelerator for HuggingFace causal language models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "patch_model", "patch_transformers"]


def patch_model(model: Any, **kwargs: Any) -> Any:
    """Swap fused kernels into an HF causal LM in place (see overdrive.patches)."""
    from overdrive.patches import patch_model as _patch_model

    return _patch_model(model, **kwargs)


def patch_transformers(**kwargs: Any) -> Any:
    """Make every supported causal LM loaded afterwards use overdrive's kernels."""
    from overdrive.patches import patch_transformers as _patch_transformers

    return _patch_transformers(**kwargs)
