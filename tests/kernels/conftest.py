"""These tiny-model tests run single-threaded (see tests.numerics.single_thread)."""

from tests.numerics import single_thread  # noqa: F401  (autouse fixture, registered for this directory)
