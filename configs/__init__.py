"""Deployment presets (``*.yaml``) and the Grafana dashboard, installed as ``pdkit.configs``.

Why a package: ``--config disagg-2p2d`` must find the presets from a wheel too, not only from a
checkout; :func:`pdkit.config.presets_dir` reads them through importlib.resources.
"""
