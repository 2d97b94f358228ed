"""Deployment -> Ray placement groups, and whether a cluster can hold them (no Ray import here).

Why one placement group per role, one bundle per worker: a bundle always lands on one node, so a
worker's tensor-parallel GPUs are packed together by construction (what STRICT_PACK would give a
group of one-GPU bundles), while SPREAD across the bundles of a role puts its workers on different
nodes where the cluster allows it, so losing one node costs a role one worker rather than all of them.
Ray still places a SPREAD group when nodes run short (it packs instead), which keeps small clusters and
one-node development clusters usable.

Why the capacity check before any placement group exists: Ray waits forever for a group it cannot place
(it might autoscale); a deployment that can never fit is refused at once with the numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from pdkit.config import Deployment, Role
from pdkit.errors import ConfigError

ROLE_STRATEGY = "SPREAD"  # across the workers of a role; inside a worker one bundle is one node
FRONTEND_BUNDLE = {"CPU": 1.0}
_FRACTION_STEP = 10_000  # Ray accepts fractional GPUs down to 0.0001


@dataclass(frozen=True)
class GroupPlacement:
    """One Ray placement group: its name, strategy and one bundle per process it holds."""

    role: str
    name: str
    strategy: str
    bundles: list[dict[str, float]]
    processes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def worker_gpus(dep: Deployment, role: Role) -> float:
    """GPUs one worker of ``role`` asks Ray for.

    ``tensor_parallel_size`` by default; with ``share_gpus`` a fraction, 1/N for the N workers the plan
    puts on its fullest GPU (rounded down), so N workers fit on one GPU as with the local backend.
    """
    group = dep.group(role)
    if dep.ray.gpus_per_worker is not None:
        gpus = dep.ray.gpus_per_worker
    elif dep.share_gpus:
        if group.tensor_parallel_size > 1:
            raise ConfigError(
                "share_gpus",
                f"{role} workers use tensor_parallel_size {group.tensor_parallel_size}; Ray shares only single GPUs",
                "use --tp 1 with --share-gpus, or drop --share-gpus",
            )
        gpus = math.floor(_FRACTION_STEP / dep.workers_per_gpu()) / _FRACTION_STEP
    else:
        gpus = float(group.tensor_parallel_size)
    if gpus > 1 and not float(gpus).is_integer():
        raise ConfigError("ray.gpus_per_worker", f"{gpus} GPUs: Ray splits only single GPUs", "use a whole number")
    return gpus


def worker_bundle(dep: Deployment, role: Role) -> dict[str, float]:
    """The resources of one worker's bundle (and its actor)."""
    bundle: dict[str, float] = {}
    if dep.ray.cpus_per_worker > 0:
        bundle["CPU"] = float(dep.ray.cpus_per_worker)
    gpus = worker_gpus(dep, role)
    if gpus > 0:
        bundle["GPU"] = gpus
    if not bundle:
        raise ConfigError(
            "ray.cpus_per_worker",
            "workers asking for neither CPU nor GPU cannot be placed by Ray",
            "give ray.cpus_per_worker > 0 (or GPUs per worker)",
        )
    return bundle


def placement_groups(dep: Deployment) -> list[GroupPlacement]:
    """The placement groups ``--backend ray`` creates, in start-up order (frontend group first if any)."""
    groups: list[GroupPlacement] = []
    if dep.ray.frontend_on_cluster:
        bundles = [dict(FRONTEND_BUNDLE)]
        groups.append(GroupPlacement("frontend", "pdkit-frontend", "STRICT_PACK", bundles, ["frontend"]))
    for role in dep.roles():
        count = dep.group(role).num_workers
        bundle = worker_bundle(dep, role)
        names = [f"{role}-{i}" for i in range(count)]
        groups.append(GroupPlacement(role, f"pdkit-{role}", ROLE_STRATEGY, [dict(bundle) for _ in names], names))
    return groups


def _fmt(value: float) -> str:
    return f"{value:g}"


def check_capacity(groups: list[GroupPlacement], nodes: list[dict[str, float]]) -> None:
    """Refuse (ConfigError) groups the cluster's alive ``nodes`` (their total resources) can never hold."""
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            totals[key] = totals.get(key, 0.0) + value
    wanted: dict[str, float] = {}
    for group in groups:
        for bundle in group.bundles:
            for key, value in bundle.items():
                wanted[key] = wanted.get(key, 0.0) + value
    for key, value in sorted(wanted.items()):
        have = totals.get(key, 0.0)
        if value > have + 1e-9:
            parts = ", ".join(
                f"{len(g.bundles)} {g.role} x {_fmt(g.bundles[0].get(key, 0.0))}" for g in groups if g.bundles
            )
            raise ConfigError(
                "--backend ray",
                f"the deployment asks for {_fmt(value)} {key} ({parts}) but the Ray cluster has {_fmt(have)} "
                f"on {len(nodes)} node(s)",
                f"add nodes with {key}, run fewer workers, or share GPUs (--share-gpus)",
            )
    for group in groups:
        bundle = group.bundles[0] if group.bundles else {}
        if bundle and not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes):
            need = ", ".join(f"{_fmt(v)} {k}" for k, v in bundle.items())
            raise ConfigError(
                f"{group.role}.tensor_parallel_size",
                f"each {group.role} worker needs {need} on one node but no node of the Ray cluster has that much",
                "lower tensor_parallel_size or add a larger node",
            )


def format_placement(dep: Deployment, groups: list[GroupPlacement]) -> str:
    """The ``--dry-run`` lines for the Ray backend."""
    where = "a Ray actor (placement group pdkit-frontend)" if dep.ray.frontend_on_cluster else "this machine"
    lines = [
        f"ray: address={dep.ray.address} namespace={dep.ray.namespace}; frontend on {where}",
        "ray: one actor per worker (agent + engine); node IPs replace 127.0.0.1 in URLs unless all nodes are local",
    ]
    for group in groups:
        bundles = ", ".join("{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in b.items()) + "}" for b in group.bundles)
        lines.append(f"[placement group {group.name}] strategy={group.strategy} bundles=[{bundles}]")
        lines.append(f"  processes: {', '.join(group.processes)}")
    return "\n".join(lines) + "\n"
