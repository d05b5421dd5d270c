"""Plan before running: a device table, a per-device memory model, a step-time model and the strategy ranking.

Nothing outside `overdrive.cli` imports this package; it may import `overdrive.train`, `overdrive.parallel`
and `overdrive.core`.
"""
