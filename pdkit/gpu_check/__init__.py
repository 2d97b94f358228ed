"""Helpers for the GPU checks in ``scripts/gpu_*``: see :mod:`pdkit.gpu_check.harness`."""
