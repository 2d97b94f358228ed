"""The one table of vLLM stacks pdkit knows, and which one a plan is built for.

Every difference between supported vLLM versions that pdkit acts on lives in :data:`STACKS`; the rest of
pdkit asks :func:`stack_for` instead of comparing version strings itself.  A plan is built for

* the version named in the config (``vllm_version``) or on the command line (``--vllm-version``): planning
  for another machine, so nothing is read from this one;
* otherwise the vLLM installed here, read from package metadata (``importlib.metadata``: importing vllm
  takes seconds and initialises CUDA state, so pdkit never does at import time);
* otherwise (sim, CI lint, a laptop) the newest proven stack, :data:`DEFAULT_VERSION`.

A version outside the table is planned like the newest known stack of the same or lower release (vLLM
keeps its registry names), but :func:`stack_for` marks it ``known=False`` so ``pdkit doctor`` and
``pdkit launch`` can refuse it until someone checks it (``--allow-untested-stack``).

Status words: ``proven`` = pdkit's own GPU checks passed on it (scripts/gpu_check_stack.py); ``seen`` = a GPU
run of ``pdkit launch`` worked there, pdkit's GPU checks still pending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Literal

StackStatus = Literal["proven", "seen", "untested"]
LMCacheMode = Literal["in_process", "mp"]


@dataclass(frozen=True)
class Stack:
    """What one vLLM release needs from pdkit, and the packages it is known to work with."""

    vllm: str
    status: StackStatus
    torch: str  # the torch release vLLM pins (major.minor.patch)
    lmcache: str  # the lmcache release known to work with it (built for ``torch``)
    nixl: str
    # Registry names (vllm/distributed/kv_transfer/kv_connector/factory.py of that release).
    nixl_pull_connector: str = "NixlConnector"
    nixl_push_connector: str = "NixlPushConnector"
    lmcache_connector: str = "LMCacheConnectorV1"
    # LMCache's multi-process mode: vLLM's connector for an ``lmcache server`` of its own (issue 16).
    lmcache_mp_connector: str = "LMCacheMPConnector"
    # Whether LMCache can run inside this vLLM (a lmcache wheel is built for its torch); False: only mp.
    lmcache_in_process: bool = True
    # vLLM's check_stop_strings when several stop strings appear in one chunk: True = the one that completes
    # earliest (0.32 on), False = the first listed (0.26).  The seeded stream re-implements the check.
    stop_string_earliest_end: bool = True
    # First-token seeding (docs/seeding.md) proven on a GPU with this release: greedy seeded == agg, streamed
    # and not, NIXL pull and push.  ``frontend.seed_first_token`` unset seeds only decodes of such releases.
    seeding_proven: bool = False
    # Extra ``vllm serve`` flags and env every worker of this release gets (none needed so far).
    serve_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # What changed for pdkit at this release; shown by ``pdkit doctor``.
    notes: tuple[str, ...] = ()
    known: bool = True

    def connector_names(self) -> set[str]:
        """Names whose classes import without lmcache's MP package (``lmcache_mp_connector`` imports lmcache)."""
        return {self.nixl_pull_connector, self.nixl_push_connector, self.lmcache_connector}

    def default_lmcache_mode(self) -> LMCacheMode:
        """``in_process`` (the proven one) where it can run, else ``mp``."""
        return "in_process" if self.lmcache_in_process else "mp"


# One row a vLLM release: (vllm, status, torch, lmcache, nixl) first, then what differs from the defaults.
_ROWS: tuple[Stack, ...] = (
    Stack(
        "0.26.0", "proven", "2.11.0", "0.5.2", "1.5.1",
        stop_string_earliest_end=False,
        seeding_proven=True,  # one H200, pull and push (Ray), 2026-12-03: docs/results/h200x1-2026-12-03-v026
        notes=(
            "proven on 2xH200 (docs/gpu-results.md); the stack check re-run on one H200 on 2026-12-03",
            "first-token seeding proven on one H200 (pull and push): on by default",
        ),
    ),
    Stack(
        "0.32.0", "proven", "2.13.0", "0.5.6", "1.5.1",
        # NixlConnector is still registered (an alias of NixlPullConnector): the name pdkit ran with on GPU.
        notes=(
            "proven on one H200 (scripts/gpu_check_stack.py, docs/results/h200x1-2026-12-01-v032); not yet on 2xH200",
            "LMCache MP mode (lmcache.mode=mp) proven on one H200: agg/disagg == agg, lmcache server killed under "
            "load restarted with 0 failed requests (docs/results/h200x1-2026-12-03-v032)",
            "KVTransferConfig rejects unknown fields and dropped kv_rank/kv_parallel_size/kv_ip/kv_buffer_size",
            "NIXL's compatibility hash adds the transfer mode: push and pull sides never pair",
            "model runner asks connectors for get_transfer_results (PdConnector merges its children's)",
            "prefill kv_transfer_params carry transfer_mode; push pairs D's blocks on P from the ends: first-token "
            "seeding skips push at N % block_size == 0 (SEED_WHOLE_BLOCK, docs/seeding.md)",
        ),
    ),
    # No lmcache wheel is built for torch 2.14: the server runs 0.5.6 in its own torch-2.13 env.
    Stack(
        "0.33.0", "untested", "2.14.0", "0.5.6", "1.5.1",
        lmcache_in_process=False,
        # Registry names read from the vllm 0.33.0 wheel (factory.py): unchanged from 0.32.0, and its
        # lmcache_mp_connector.py / config/kv_transfer.py are byte-identical to 0.32.0's.
        notes=(
            "table read from the vllm 0.33.0 wheel; no GPU run yet",
            "CPU: the -m vllm tests run on 0.33.0's Python layer (torch 2.13 CPU build; scripts/test.sh part 3), "
            "first-token seeding's scheduler/NIXL proof included",
            "BlockStored gained ownership, session_id, lookahead_token_ids: pdkit's KV-event decoder ignores "
            "them, and msgspec writes a map16 header (16 keys) where 0.32 wrote a fixmap: same document",
            "torch 2.14: no lmcache wheel, so LMCache runs in multi-process mode (lmcache.mode=mp)",
            "the vLLM side of LMCacheMPConnector imports lmcache.lmcache_native (links libtorch): check "
            "that it loads under torch 2.14 before trusting mp mode here (docs/lmcache-mp.md)",
        ),
    ),
)  # fmt: skip
STACKS: dict[str, Stack] = {row.vllm: row for row in _ROWS}
DEFAULT_VERSION = "0.32.0"

# First-token seeding (docs/seeding.md) when the prompt fills whole blocks, so the seed token opens a block
# the prefill never had.  Keyed by the ``transfer_mode`` of the prefill's kv_transfer_params, because that
# is what the frontend sees of a worker's vLLM: None = 0.26 (no such field; its push writer cuts the longer
# block list), "pull"/"push" = 0.32.  "pad": repeat the last remote block id (the decode pairs from the
# ends); "refuse": decode unseeded (0.32's push writer pairs from the ends on the prefill and asserts).
SeedWholeBlock = Literal["pad", "refuse"]
SEED_WHOLE_BLOCK: dict[str | None, SeedWholeBlock] = {None: "pad", "pull": "pad", "push": "refuse"}

# The torch release each lmcache wheel is compiled against (its extension breaks on another torch ABI:
# LMCache then logs «compiled extension not found» and runs on slow fallbacks).  From the wheels.
_LMCACHE_TORCH = [((0, 4, 6), (0, 5, 3), "2.11"), ((0, 5, 4), (0, 5, 6), "2.13")]
# The compiled extension's module name per lmcache release (0.5.6 renamed c_ops to cuda_ops; read from the
# wheels' file lists).  Unknown releases: doctor looks for either name in the installed files.
LMCACHE_EXTENSION_MODULES = ("lmcache.cuda_ops", "lmcache.c_ops")
_LMCACHE_EXTENSION = [((0, 0, 0), (0, 5, 3), "lmcache.c_ops"), ((0, 5, 6), (9, 9, 9), "lmcache.cuda_ops")]


def parse_version(text: str) -> tuple[int, int, int]:
    """``"0.32.0"``, ``"0.32.0rc1"``, ``"2.13.0+cu130"`` -> (0, 32, 0); raises ValueError otherwise."""
    match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def installed_version(package: str) -> str | None:
    """The installed distribution's version from its metadata (no import), or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def stack_for(vllm_version: str | None) -> Stack:
    """The stack for ``vllm_version``; ``None`` = the default (newest proven-or-seen) stack.

    An unknown version gets the newest known stack at or below it (else the oldest), with ``known=False``
    and ``status="untested"``: registry names rarely change, but nobody checked that release.
    """
    if vllm_version is None:
        return STACKS[DEFAULT_VERSION]
    wanted = parse_version(vllm_version)
    for version, stack in STACKS.items():
        if parse_version(version) == wanted:
            return stack
    ordered = sorted(STACKS.values(), key=lambda s: parse_version(s.vllm))
    base = ordered[0]
    for stack in ordered:
        if parse_version(stack.vllm) <= wanted:
            base = stack
    return replace(base, vllm=vllm_version, status="untested", known=False, notes=(f"planned like {base.vllm}",))


def seeds_by_default(engine: str, vllm_version: str | None) -> bool:
    """Whether first-token seeding is on for a decode worker when ``frontend.seed_first_token`` is unset.

    The simulator always (it serves seeded decodes as vLLM 0.26 does); vLLM when its release is a row of
    this table with ``seeding_proven``: seeding relies on that release's NIXL decode side, so an unknown,
    unreadable or missing version is not proven.  The frontend asks this per decode worker, the launch
    plan for its summary line.
    """
    if engine != "vllm":
        return True
    if vllm_version is None:
        return False
    try:
        stack = stack_for(vllm_version)
    except ValueError:
        return False
    return stack.known and stack.seeding_proven


def plan_stack(configured: str | None = None) -> Stack:
    """The stack a plan targets: the configured version, else the installed vLLM, else the default."""
    return stack_for(configured if configured is not None else installed_version("vllm"))


def lmcache_torch(lmcache_version: str) -> str | None:
    """The torch major.minor this lmcache release is compiled for, when pdkit knows."""
    v = parse_version(lmcache_version)
    return next((torch for lo, hi, torch in _LMCACHE_TORCH if lo <= v <= hi), None)


def lmcache_extension_module(lmcache_version: str) -> str | None:
    """The compiled extension's import name for this lmcache release, when pdkit knows."""
    v = parse_version(lmcache_version)
    return next((mod for lo, hi, mod in _LMCACHE_EXTENSION if lo <= v <= hi), None)


def same_minor(a: str, b: str) -> bool:
    """Whether two versions share major.minor (torch ABI compatibility is per minor release)."""
    return parse_version(a)[:2] == parse_version(b)[:2]
