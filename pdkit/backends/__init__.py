"""Where a deployment's workers run besides this machine (issue 20).

``placement`` turns a :class:`~pdkit.config.Deployment` into Ray placement groups and needs nothing but
pdkit (``--dry-run`` works without Ray or a cluster); ``ray_backend`` runs the plan on a Ray cluster and
is the only pdkit module that imports ``ray`` (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdkit.config import Deployment
    from pdkit.plan import LaunchPlan


def run_ray(dep: Deployment, plan: LaunchPlan, dry_run: bool, as_json: bool, smoke_test: bool) -> int:
    """``pdkit launch … --backend ray``: print the plan and its placement (``--dry-run``) or run it."""
    import json

    from pdkit.backends.placement import format_placement, placement_groups
    from pdkit.errors import ConfigError
    from pdkit.plan import format_plan

    groups = placement_groups(dep)
    if dry_run:
        if as_json:
            data = json.loads(plan.model_dump_json())
            data["ray"] = {**dep.ray.model_dump(), "placement_groups": [g.as_json() for g in groups]}
            print(json.dumps(data, indent=2))
        else:
            print(format_plan(plan) + format_placement(dep, groups), end="")
        return 0
    try:
        from pdkit.backends.ray_backend import run_ray_launch
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("ray"):
            raise
        raise ConfigError("--backend ray", "Ray is not installed", "pip install -e '.[ray]'") from None
    return run_ray_launch(dep, plan, smoke_test=smoke_test)
