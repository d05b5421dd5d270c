"""In-place class swapping used by the patches.

Why class swapping: parameters, buffers, hooks and ``state_dict`` keys of the module stay exactly as
they are; only ``forward`` changes. The patched class is ``type(name, (Mixin, Original), ...)`` so
``isinstance`` checks keep passing, ``super().forward`` reaches the original implementation for
fallbacks, and ``__name__`` is kept identical (``save_pretrained`` writes ``config.architectures``
from it). Generated classes are registered as attributes of this module under a unique
``__qualname__`` so that pickling a patched module works in any process that applied the patch.
"""

from __future__ import annotations

import sys

from torch import nn

_ORIGINAL_ATTR = "_overdrive_original_class"


def original_class(module: nn.Module) -> type:
    """The class the module had before patching (its own class if unpatched)."""
    return getattr(type(module), _ORIGINAL_ATTR, type(module))


def is_swapped(module: nn.Module) -> bool:
    return _ORIGINAL_ATTR in type(module).__dict__


def patched_class(original: type, mixin: type) -> type:
    """The (cached) subclass combining ``mixin``'s overrides with ``original``."""
    qualname = f"{mixin.__name__}__{original.__module__.replace('.', '_')}__{original.__qualname__}"
    this = sys.modules[__name__]
    cls = getattr(this, qualname, None)
    if cls is None:
        cls = type(original.__name__, (mixin, original), {_ORIGINAL_ATTR: original, "__module__": __name__})
        cls.__qualname__ = qualname
        setattr(this, qualname, cls)
    return cls


def swap_class(module: nn.Module, mixin: type) -> bool:
    """Patch ``module`` in place with ``mixin``; False if it was already patched."""
    if is_swapped(module):
        return False
    module.__class__ = patched_class(type(module), mixin)
    return True


def restore_class(module: nn.Module) -> bool:
    """Undo :func:`swap_class`; False if the module was not patched."""
    if not is_swapped(module):
        return False
    module.__class__ = original_class(module)
    return True
