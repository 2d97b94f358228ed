"""``pdkit launch … --backend ray``: the local backend's plan, with every worker in a Ray actor.

What runs where: the frontend where ``pdkit launch`` runs (supervised as by the local backend) or, with
``--frontend-on-cluster``, in an actor of its own placement group; each worker (agent + engine) in an
actor on the bundle of its role's placement group (:mod:`pdkit.backends.placement`).  Workers still
register with the frontend over ZMQ with the deployment's secret, so routing, health and KV events work
exactly as on one machine.  Ray restarts a worker whose actor died; this driver only watches, reports,
and on Ctrl-C / SIGTERM stops the frontend (it drains), then the workers, and removes every actor and
placement group it made.  See docs/multi-node-ray.md.

Why addresses are node IPs unless every node is this machine: URLs, NIXL side channels and KV-event
endpoints must be reachable from other nodes; a cluster whose nodes all share this machine's address
(tests, a one-node cluster) keeps 127.0.0.1, so nothing binds off loopback needlessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each worker's own lines, not "[repeated 2x across cluster]"

import aiohttp  # noqa: E402
import ray  # noqa: E402
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError  # noqa: E402
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from pdkit.backends.placement import GroupPlacement, check_capacity, placement_groups  # noqa: E402
from pdkit.backends.ray_actor import LOOPBACK, TOKEN_ENV, ProcessActor, ProcessJob  # noqa: E402
from pdkit.config import Deployment, is_loopback  # noqa: E402
from pdkit.errors import ConfigError  # noqa: E402
from pdkit.plan import LaunchPlan  # noqa: E402
from pdkit.stop_signals import STOP_SIGNALS, stop_event  # noqa: E402
from pdkit.supervisor import (  # noqa: E402
    REQUIRED_ROLE,
    PortBusyError,
    StartupError,
    Supervisor,
    registered_ids,
    smoke_request,
)

ACTOR_PREFIX = "pdkit-"
PROBE_TIMEOUT_S = 3.0
WATCH_INTERVAL_S = 1.0
STOP_GRACE_S = 30.0
REACH_TIMEOUT_S = 3.0


class PlacementError(StartupError):
    """Ray did not place a placement group in time (the cluster is busy): one line, exit code 1."""


def _say(msg: str) -> None:
    print(f"pdkit: {msg}", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------ cluster


def _check_reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) nobody answers on is refused at once: Ray would retry for minutes."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError("--ray-address", f"'{address}' is not HOST:PORT", "use auto, HOST:6379 or ray://HOST:10001")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            "--ray-address",
            f"no Ray cluster answers at {address} ({exc.strerror or exc})",
            "start one (ray start --head) or pass the head's address (HOST:6379 or ray://HOST:10001)",
        ) from None


def connect(dep: Deployment) -> None:
    """Join the cluster at ``ray.address``.  Only ``local`` starts one (a private one-node cluster that lives
    as long as this launch: development, one GPU machine); ``auto`` without a cluster is refused rather
    than quietly running a private cluster nobody else can join."""
    address = dep.ray.address
    _check_reachable(address)
    try:
        ray.init(
            address=address,
            namespace=dep.ray.namespace,
            logging_level=logging.WARNING,
            log_to_driver=True,
            include_dashboard=False if address == "local" else None,
        )
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            "--ray-address",
            f"cannot join a Ray cluster at {address}: {first}",
            "start one (ray start --head) or pass --ray-address HOST:6379 / ray://HOST:10001",
        ) from None


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def all_nodes_local(nodes: list[dict[str, Any]], my_ip: str) -> bool:
    """Every node has this machine's address (``ray.cluster_utils.Cluster``, a one-node cluster)."""
    return all(n.get("NodeManagerAddress") in (my_ip, LOOPBACK) for n in nodes)


# ------------------------------------------------------------------------------------------- launch


@dataclass
class RayLaunch:
    """One ``--backend ray`` deployment: placement groups, actors, the frontend; torn down by :meth:`teardown`."""

    dep: Deployment
    plan: LaunchPlan
    groups: list[GroupPlacement]
    pgs: dict[str, PlacementGroup] = field(default_factory=dict)
    actors: dict[str, Any] = field(default_factory=dict)  # name -> actor handle
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # last info() per actor
    gone: dict[str, str] = field(default_factory=dict)  # name -> why it is down for good
    connected: bool = False
    loopback: bool = True
    secret: str | None = None
    frontend_url: str = ""
    failed: str | None = None
    frontend_sup: Supervisor | None = None  # the local frontend's supervisor (without --frontend-on-cluster)

    # --------------------------------------------------------------------------------- preparation

    def prepare(self) -> None:
        connect(self.dep)
        self.connected = True
        nodes = alive_nodes()
        check_capacity(self.groups, [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in nodes])
        self.loopback = all_nodes_local(nodes, ray.util.get_node_ip_address())
        self.secret = self._deployment_secret()
        for name in [p.name for p in self.plan.processes]:
            with contextlib.suppress(ValueError):
                ray.get_actor(ACTOR_PREFIX + name, namespace=self.dep.ray.namespace)
                raise ConfigError(
                    "ray.namespace",
                    f"actor {ACTOR_PREFIX}{name} already runs in namespace '{self.dep.ray.namespace}' "
                    "(another deployment)",
                    "stop that deployment or give this one its own ray.namespace",
                )
        where = "all nodes on this machine: 127.0.0.1" if self.loopback else "node IPs"
        _say(f"joined the Ray cluster at {self.dep.ray.address}: {len(nodes)} node(s); addresses: {where}")

    def _deployment_secret(self) -> str | None:
        """The token every process gets: the security branch's per-deployment secret when present."""
        try:
            from pdkit.secret import install_secret  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            install_secret = None
        if install_secret is not None:
            return str(install_secret(self.plan))
        token = self.dep.frontend.token or next(
            (p.env[TOKEN_ENV] for p in self.plan.processes if p.env.get(TOKEN_ENV)), None
        )
        if not self.loopback and not token:
            raise ConfigError(
                "frontend.token",
                "workers on other nodes register over the network but no token is set",
                "set frontend.token (or PDKIT_TOKEN) so only your workers can register",
            )
        return token

    def _frontend_host(self) -> str:
        host = self.dep.frontend.host
        if self.loopback or not is_loopback(host):
            return host
        return str(ray.util.get_node_ip_address())  # the nodes reach this machine there

    def place(self) -> None:
        """Create every placement group and wait until Ray has placed it."""
        for group in self.groups:
            pg = placement_group(group.bundles, strategy=group.strategy, name=group.name)
            self.pgs[group.role] = pg
        for group in self.groups:
            try:
                ray.get(self.pgs[group.role].ready(), timeout=self.dep.ray.placement_timeout_s)
            except GetTimeoutError:
                raise PlacementError(
                    f"placement group {group.name} ({len(group.bundles)} x {group.bundles[0]}) not placed within "
                    f"{self.dep.ray.placement_timeout_s:g} s: the cluster's free resources do not hold it "
                    f"(free now: {ray.available_resources()}); free them or raise ray.placement_timeout_s"
                ) from None

    # ------------------------------------------------------------------------------------- actors

    def _job(self, role: str, index: int, dep: Deployment) -> ProcessJob:
        return ProcessJob(
            dep=dep,
            role=role,
            index=index,
            run_dir=self.plan.run_dir,
            loopback=self.loopback,
            secret=self.secret,
            probe_timeout_s=self.plan.supervision.probe_timeout_s,
        )

    def _start_actor(self, group: GroupPlacement, index: int, job: ProcessJob) -> Any:
        bundle = group.bundles[index]
        restarts = self.dep.ray.max_restarts
        actor_cls = ray.remote(ProcessActor)
        handle = actor_cls.options(
            name=ACTOR_PREFIX + job.name,
            namespace=self.dep.ray.namespace,
            num_cpus=bundle.get("CPU", 0.0),
            num_gpus=bundle.get("GPU", 0.0),
            max_restarts=self.plan.supervision.max_restarts if restarts is None else restarts,
            max_task_retries=0,
            max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pgs[group.role], placement_group_bundle_index=index
            ),
        ).remote(job)
        self.actors[job.name] = handle
        return handle

    async def _actor_info(self, name: str) -> dict[str, Any] | None:
        """The actor's info(), None while Ray restarts it; raises RayActorError when it is dead for good."""
        ref = self.actors[name].info.remote()
        try:
            info: dict[str, Any] = await asyncio.to_thread(ray.get, ref, timeout=PROBE_TIMEOUT_S)
        except (ActorUnavailableError, GetTimeoutError):
            return None  # RayActorError (dead for good, or its constructor raised) goes to the caller
        return info

    async def _registered(self, http: aiohttp.ClientSession) -> set[str]:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            async with http.get(f"{self.frontend_url}/workers") as resp:
                return registered_ids(await resp.json())
        return set()

    async def _wait_registered(self, names: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while pending:
                seen = await self._registered(http)
                for name in list(pending):
                    try:
                        info = await self._actor_info(name)
                    except RayActorError:
                        raise StartupError(f"{name}'s actor died during start-up; {self._log_hint(name)}") from None
                    if info is not None:
                        self.info[name] = info
                        if info["down"]:
                            lines = "\n".join(f"    {x}" for x in self._last_lines(name)) or "    (no output)"
                            raise StartupError(f"{name} cannot start: {info['down']}; last lines:\n{lines}")
                    if name in seen:
                        pending.remove(name)
                        where = self.info.get(name, {})
                        _say(f"{name} ready on {where.get('host', '?')} (node {str(where.get('node_id', '?'))[:8]})")
                if pending and time.monotonic() > deadline:
                    raise StartupError(
                        f"{', '.join(pending)} not registered after {timeout_s:.0f} s; {self._log_hint(pending[0])}"
                    )
                if pending:
                    await asyncio.sleep(0.25)

    def _log_hint(self, name: str) -> str:
        info = self.info.get(name, {})
        log_file = info.get("log_file") or f"{self.plan.run_dir}/{name}.log"
        return f"read {log_file} on {info.get('host', 'its node')}"

    def _last_lines(self, name: str) -> list[str]:
        with contextlib.suppress(RayActorError, GetTimeoutError, ActorUnavailableError):
            lines: list[str] = ray.get(self.actors[name].last_lines.remote(), timeout=PROBE_TIMEOUT_S)
            return lines
        return []

    async def _wait_http(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise StartupError(f"the frontend at {url} did not answer within {timeout_s:.0f} s")
                await asyncio.sleep(0.2)

    # ---------------------------------------------------------------------------------------- run

    async def serve(self, smoke_test: bool) -> int:
        stop = stop_event()
        sup: Supervisor | None = None
        try:
            start = asyncio.create_task(self._start(stop))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                start.cancel()
                with contextlib.suppress(BaseException):
                    await start
                _say("interrupted during start-up; stopping")
                return 130
            stopper.cancel()
            sup = start.result()
            self._print_table()
            if smoke_test:
                plan = self.plan.model_copy(update={"frontend_url": self.frontend_url})
                return 0 if await smoke_request(plan) else 1
            watchers = [asyncio.create_task(self._watch(stop))]
            if sup is not None:
                watchers.append(asyncio.create_task(sup.watch(stop)))
            results = await asyncio.gather(*watchers)
            return 1 if self.failed or any(results) else 0
        finally:
            if self.frontend_sup is not None:
                await self.frontend_sup.stop()
            loop = asyncio.get_running_loop()
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    async def _start(self, stop: asyncio.Event) -> Supervisor | None:
        dep = self.dep
        fe_host = self._frontend_host()
        fe_dep = dep.model_copy(update={"frontend": dep.frontend.model_copy(update={"host": fe_host})})
        sup = None
        if dep.ray.frontend_on_cluster:
            group = next(g for g in self.groups if g.role == "frontend")
            self._start_actor(group, 0, self._job("frontend", 0, dep))
            info = None
            deadline = time.monotonic() + 120
            while info is None:
                info = await self._actor_info("frontend")
                if time.monotonic() > deadline:
                    raise StartupError("the frontend actor did not start within 120 s")
            self.info["frontend"] = info
            self.frontend_url = str(info["url"])
            await self._wait_http(f"{self.frontend_url}/health", 60)
            fe_dep = dep.model_copy(update={"frontend": dep.frontend.model_copy(update={"host": info["host"]})})
            _say(f"frontend ready on {info['host']} (node {str(info['node_id'])[:8]})")
        else:
            fe_job = self._job("frontend", 0, fe_dep)
            spec = fe_job.spec_for(fe_host, Path(self.plan.run_dir))
            fe_plan = self.plan.model_copy(update={"processes": [spec], "frontend_url": spec.url})
            if hasattr(fe_plan, "secret"):
                fe_plan.secret = self.secret  # the security branch's Supervisor installs this one
            # Supervised as by the local backend (restarts, drain on stop), but started on its own: the
            # Supervisor's start() would also wait for workers it does not know about here.
            sup = self.frontend_sup = Supervisor(fe_plan)
            Path(self.plan.run_dir).mkdir(parents=True, exist_ok=True)
            managed = sup.procs["frontend"]
            await sup._spawn(managed)
            await sup._wait_http(managed, f"{spec.url}/health")
            self.frontend_url = str(spec.url)
            _say(f"frontend ready at {self.frontend_url}")
        # Workers: fractional GPUs share one GPU, and vLLM profiles memory at start-up as if alone on
        # it, so shared workers start one at a time; otherwise all together.
        one_by_one = any(0 < b.get("GPU", 0) < 1 for g in self.groups for b in g.bundles)
        worker_groups = [g for g in self.groups if g.role != "frontend"]
        timeout = max(p.startup_timeout_s for p in self.plan.workers())
        started: list[str] = []
        for group in worker_groups:
            for index in range(len(group.bundles)):
                job = self._job(group.role, index, fe_dep)
                self._start_actor(group, index, job)
                started.append(job.name)
                if one_by_one:
                    await self._wait_registered([job.name], timeout)
        if not one_by_one:
            await self._wait_registered(started, timeout)
        return sup

    def _print_table(self) -> None:
        rows = [("process", "host", "node", "GPUs (Ray)", "URL")]
        for name in self.actors:
            i = self.info.get(name, {})
            gpus = ",".join(i.get("gpu_ids", [])) or "-"
            rows.append((name, i.get("host", "-"), str(i.get("node_id", "-"))[:8], gpus, i.get("url") or "-"))
        widths = [max(len(str(r[c])) for r in rows) for c in range(5)]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        _say("all workers ready on Ray:\n" + "\n".join("    " + line for line in lines))
        _say(f"serving the OpenAI API at {self.frontend_url}/v1 (model '{self.plan.served_model_name}')")

    async def _watch(self, stop: asyncio.Event) -> int:
        """Report Ray's restarts and actors down for good; stop when the mode's required role is gone."""
        pids = {name: info.get("pid") for name, info in self.info.items()}
        restarting: set[str] = set()
        while not stop.is_set():
            for name in list(self.actors):
                if name in self.gone:
                    continue
                try:
                    info = await self._actor_info(name)
                except RayActorError:
                    self.gone[name] = "its actor is dead and Ray will not restart it (max_restarts spent)"
                    _say(f"{name} is down for good: {self.gone[name]}; {self._log_hint(name)}")
                    continue
                if info is None:
                    if name not in restarting:
                        restarting.add(name)
                        _say(f"{name}: its actor is being restarted by Ray")
                    continue
                self.info[name] = info
                if info["down"]:
                    self.gone[name] = info["down"]
                    _say(f"{name} is down for good: {info['down']}; {self._log_hint(name)}")
                elif info.get("pid") != pids.get(name):
                    restarting.discard(name)
                    pids[name] = info.get("pid")
                    _say(f"{name} restarted by Ray on {info['host']} (node {str(info['node_id'])[:8]})")
            if self._lost_required():
                stop.set()
                return 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=WATCH_INTERVAL_S)
        return 0

    def _lost_required(self) -> bool:
        if "frontend" in self.gone:
            self.failed = "the frontend actor is down for good; stopping the deployment"
        else:
            required = REQUIRED_ROLE.get(self.plan.mode, "decode")
            group = [p.name for p in self.plan.workers() if p.role == required]
            if group and all(n in self.gone for n in group):
                self.failed = f"no {required} worker left ({', '.join(group)} down for good); stopping the deployment"
        if self.failed:
            _say(f"error: {self.failed}")
        return self.failed is not None

    # ------------------------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Frontend actor first (it drains), then workers; then kill every actor and remove every group."""
        if not self.connected:
            return
        if not self.actors and not self.pgs:
            with contextlib.suppress(Exception):
                ray.shutdown()
            return
        order = (["frontend"] if "frontend" in self.actors else []) + [n for n in self.actors if n != "frontend"]
        for batch in ([n for n in order if n == "frontend"], [n for n in order if n != "frontend"]):
            refs = [self.actors[n].stop.remote(STOP_GRACE_S) for n in batch]
            with contextlib.suppress(Exception):
                ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S + 10)
        for handle in self.actors.values():
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        for pg in self.pgs.values():
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        _say(f"stopped all processes; removed {len(self.actors)} actor(s) and {len(self.pgs)} placement group(s)")
        with contextlib.suppress(Exception):
            ray.shutdown()


def run_ray_launch(dep: Deployment, plan: LaunchPlan, smoke_test: bool = False) -> int:
    """Blocking entry for ``pdkit launch … --backend ray``: returns the exit code (ConfigError propagates)."""
    launch = RayLaunch(dep, plan, placement_groups(dep))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # before the event loop: SIGTERM = Ctrl-C
    try:
        launch.prepare()
        launch.place()
        return asyncio.run(launch.serve(smoke_test))
    except KeyboardInterrupt:
        _say("interrupted; stopping")
        return 130
    except PortBusyError as exc:
        _say(f"error: {exc}")
        return 2
    except StartupError as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        launch.teardown()
        signal.signal(signal.SIGTERM, previous)
