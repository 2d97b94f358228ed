"""``pdkit doctor``: which stack would run here, and would pdkit run it.

Why a separate check: the failures of a wrong stack are quiet.  An lmcache wheel built for another torch
does not crash, it logs «compiled extension not found» and runs on slow fallbacks; a vLLM release pdkit
never saw may rename a connector or a hook and fail at the first request, on the GPU machine.  So the
facts are gathered here (package metadata, ``nvidia-smi -L``, a subprocess that imports the lmcache
extension and torch with a timeout -- nothing is imported into this process) and judged against the one
version table, ``pdkit/stack.py``.

Verdicts: ``ok`` (GPU serving with a known stack), ``sim-only`` (no vLLM or no GPU: only ``--engine sim``
runs here; exit 0), ``refused`` (a known-bad or untested combination; exit 2 with one line naming the
fix).  ``pdkit launch`` (engine vllm, not ``--dry-run``) runs :func:`check_launch` before starting any
engine; ``--allow-untested-stack`` turns its refusal into a warning.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Literal

from pdkit import stack as stacks
from pdkit.errors import ConfigError

Verdict = Literal["ok", "sim-only", "refused"]
PROBE_TIMEOUT_S = 60.0
FIX_INSTALL = "pip install -e '.[gpu]'"


@dataclass
class Facts:
    """What was found on this machine (or, in tests, a synthetic machine)."""

    versions: dict[str, str | None]  # distribution name -> version (None: not installed)
    gpus: list[str] = field(default_factory=list)  # `nvidia-smi -L` lines
    torch_cuda: str | None = None  # torch.version.cuda (None: CPU build or torch absent)
    lmcache_extension: dict[str, Any] | None = None  # {"module", "ok", "detail"}
    ucx_plugins: list[str] = field(default_factory=list)


@dataclass
class Diagnosis:
    """The judged facts: what pdkit would plan for, each problem as one line, and the verdict."""

    facts: Facts
    stack: dict[str, Any]
    verdict: Verdict
    errors: list[str] = field(default_factory=list)  # each "<problem>; <fix>"
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.verdict == "refused" else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "errors": self.errors,
            "warnings": self.warnings,
            "stack": self.stack,
            **asdict(self.facts),
        }

    def render(self) -> str:
        f = self.facts
        ext = f.lmcache_extension
        lines = [
            f"vllm     {f.versions.get('vllm') or 'not installed'}",
            f"torch    {f.versions.get('torch') or 'not installed'}"
            + (f" (CUDA {f.torch_cuda})" if f.torch_cuda else ""),
            f"lmcache  {f.versions.get('lmcache') or 'not installed'}"
            + (f" (extension {ext['module']}: {'loads' if ext['ok'] else ext['detail']})" if ext else ""),
            f"nixl     {f.versions.get('nixl') or 'not installed'}"
            + "".join(f"\n         {line}" for line in f.ucx_plugins),
            f"GPUs     {len(f.gpus)}" + "".join(f"\n         {g}" for g in f.gpus),
            f"plan for vLLM {self.stack['vllm']} ({self.stack['status']}; known good: torch {self.stack['torch']}, "
            f"lmcache {self.stack['lmcache']}, nixl {self.stack['nixl']})",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"error: {e}" for e in self.errors]
        lines.append(
            f"verdict: {self.verdict}" + (" (only --engine sim runs here)" if self.verdict == "sim-only" else "")
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- probes
def _run(argv: list[str], timeout: float = PROBE_TIMEOUT_S) -> tuple[int, str]:
    """(exit code, stdout+stderr) of ``argv``; 124 on timeout, 127 when it cannot start."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f}s"
    except OSError as exc:
        return 127, str(exc)
    return done.returncode, (done.stdout + done.stderr).strip()


def probe_gpus() -> list[str]:
    """``nvidia-smi -L`` lines ("GPU 0: NVIDIA H200 (UUID: ...)"); empty without a driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    code, out = _run(["nvidia-smi", "-L"], timeout=20)
    return [line for line in out.splitlines() if line.startswith("GPU ")] if code == 0 else []


def probe_torch_cuda() -> str | None:
    """torch's CUDA version, read in a subprocess (importing torch here would cost seconds)."""
    code, out = _run([sys.executable, "-c", "import torch; print(torch.version.cuda or '')"])
    last = out.splitlines()[-1].strip() if out else ""
    return (last or None) if code == 0 else None


def lmcache_extension_module(lmcache_version: str) -> str | None:
    """The compiled extension's module: from the table, else whichever candidate the installed files hold."""
    known = stacks.lmcache_extension_module(lmcache_version)
    if known is not None:
        return known
    files = {str(p).replace("/", ".").split(".cpython")[0] for p in (metadata.files("lmcache") or ())}
    return next((m for m in stacks.LMCACHE_EXTENSION_MODULES if m in files), None)


def probe_lmcache_extension(lmcache_version: str) -> dict[str, Any] | None:
    """Import lmcache's compiled extension after torch in a subprocess: an ABI mismatch shows as an ImportError
    («undefined symbol»), which LMCache itself only logs as «compiled extension not found»."""
    module = lmcache_extension_module(lmcache_version)
    if module is None:
        return None
    code, out = _run([sys.executable, "-c", f"import torch, {module}"])
    detail = "" if code == 0 else (out.splitlines()[-1] if out else f"exit {code}")
    return {"module": module, "ok": code == 0, "detail": detail[:300]}


def probe_ucx_plugins() -> list[str]:
    """NIXL backend plugins and UCX transports the nixl wheels ship, e.g. ``cu12: UCX, GDS | uct: cuda, ib``.

    Read from the wheels' file lists (nixl 1.5 puts them in ``nixl-cu12``/``nixl-cu13``), no import: a
    missing ``UCX`` plugin or ``cuda`` transport explains a NIXL that falls back to TCP or fails to start.
    """
    out: list[str] = []
    for dist in ("nixl", "nixl-cu12", "nixl-cu13"):
        try:
            files = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            continue
        plugins = sorted({p.name[len("libplugin_") : -3] for p in files if p.name.startswith("libplugin_")
                          and p.name.endswith(".so")})  # fmt: skip
        transports = sorted(
            {
                p.name[len("libuct_") :].split(".so")[0]
                for p in files
                if p.name.startswith("libuct_") and ".so" in p.name
            }
        )
        if plugins or transports:
            out.append(f"{dist.removeprefix('nixl-') or dist}: {', '.join(plugins)} | uct: {', '.join(transports)}")
    return out


def gather(installed: Callable[[str], str | None] = stacks.installed_version) -> Facts:
    """The facts of this machine."""
    versions = {name: installed(name) for name in ("vllm", "torch", "lmcache", "nixl")}
    if versions["nixl"] is None:
        versions["nixl"] = installed("nixl-cu12") or installed("nixl-cu13")  # the per-CUDA wheels alone
    lmcache = versions["lmcache"]
    return Facts(
        versions=versions,
        gpus=probe_gpus(),
        torch_cuda=probe_torch_cuda() if versions["torch"] else None,
        lmcache_extension=probe_lmcache_extension(lmcache) if lmcache else None,
        ucx_plugins=probe_ucx_plugins() if versions["nixl"] else [],
    )


# ---------------------------------------------------------------------------------------------- verdict
def diagnose(
    facts: Facts,
    *,
    lmcache_enabled: bool = True,
    disagg: bool = True,
    vllm_version: str | None = None,
) -> Diagnosis:
    """Judge ``facts`` for a deployment with (or without) LMCache in-process and NIXL (disagg)."""
    vllm = facts.versions.get("vllm")
    stack = stacks.stack_for(vllm_version or vllm)
    summary = {
        "vllm": stack.vllm,
        "status": stack.status,
        "known": stack.known,
        "torch": stack.torch,
        "lmcache": stack.lmcache,
        "nixl": stack.nixl,
        "notes": list(stack.notes),
    }
    errors: list[str] = []
    warnings: list[str] = []
    if (
        vllm is not None
        and vllm_version is not None
        and stacks.parse_version(vllm) != stacks.parse_version(vllm_version)
    ):
        errors.append(f"the config plans for vLLM {vllm_version} but vLLM {vllm} is installed; drop vllm_version "
                      f"(--vllm-version) or install vllm=={vllm_version}")  # fmt: skip
    if vllm is None:
        warnings.append(f"vLLM is not installed; {FIX_INSTALL} on a GPU machine for --engine vllm")
        return Diagnosis(facts, summary, "sim-only", errors, warnings)
    known = ", ".join(stacks.STACKS)
    torch = facts.versions.get("torch")
    if not stack.known or stack.status == "untested":
        no_lmcache = lmcache_enabled and torch is not None and _no_lmcache_for(torch)
        errors.append(
            f"vLLM {vllm} is untested with pdkit (known: {known})"
            + (f" and no lmcache release is built for its torch {torch}" if no_lmcache else "")
            + f"; install a known stack ({FIX_INSTALL}: vLLM {stacks.DEFAULT_VERSION}), "
            + ("run with --no-lmcache, " if no_lmcache else "")
            + "or pass --allow-untested-stack"
        )
    elif torch is None:
        errors.append(f"torch is not installed; pip install torch=={stack.torch}")
    elif not stacks.same_minor(torch, stack.torch):
        errors.append(f"vLLM {vllm} needs torch {stack.torch}, this is torch {torch}; pip install torch=={stack.torch}")
    _judge_lmcache(facts, stack, torch, lmcache_enabled, errors, warnings)
    if disagg and facts.versions.get("nixl") is None:
        errors.append(f"nixl is not installed (disagg transfers KV with NIXL); pip install nixl=={stack.nixl}")
    elif disagg and facts.versions.get("nixl") not in (None, stack.nixl):
        warnings.append(f"nixl {facts.versions.get('nixl')} is not the known-good {stack.nixl} for vLLM {stack.vllm}")
    if not facts.gpus:
        # Without a GPU the stack cannot serve anyway: say what would be refused, but sim still runs.
        warnings += [f"on a GPU machine this would be refused: {e}" for e in errors]
        warnings.append("no GPU found (nvidia-smi -L): only --engine sim runs here")
        return Diagnosis(facts, summary, "sim-only", [], warnings)
    return Diagnosis(facts, summary, "refused" if errors else "ok", errors, warnings)


def _no_lmcache_for(torch: str) -> bool:
    """No lmcache release pdkit knows is built for this torch (e.g. torch 2.14 for vLLM 0.33)."""
    return not any(
        stacks.lmcache_torch(s.lmcache) and stacks.same_minor(stacks.lmcache_torch(s.lmcache) or "0.0", torch)
        for s in stacks.STACKS.values()
    )


def _judge_lmcache(
    facts: Facts, stack: stacks.Stack, torch: str | None, enabled: bool, errors: list[str], warnings: list[str]
) -> None:
    out = errors if enabled else warnings
    lmcache = facts.versions.get("lmcache")
    if lmcache is None:
        if enabled:
            errors.append(f"lmcache is not installed; pip install lmcache=={stack.lmcache} or run with --no-lmcache")
        return
    built_for = stacks.lmcache_torch(lmcache)
    fix = f"pip install lmcache=={stack.lmcache}" + (" or run with --no-lmcache" if enabled else "")
    if built_for is None:
        warnings.append(
            f"lmcache {lmcache} is not in pdkit's table (known good with vLLM {stack.vllm}: {stack.lmcache})"
        )
    elif torch is not None and not stacks.same_minor(built_for, torch):
        out.append(f"lmcache {lmcache} is built for torch {built_for}, this is torch {torch}; {fix}")
        return
    ext = facts.lmcache_extension
    if ext is not None and not ext["ok"]:
        if "undefined symbol" in ext["detail"]:
            out.append(
                f"lmcache's compiled extension {ext['module']} does not load with this torch ({ext['detail']}); {fix}"
            )
        else:
            warnings.append(f"lmcache's compiled extension {ext['module']} does not load: {ext['detail']}")


# ---------------------------------------------------------------------------------------------- entry points
def run_doctor(as_json: bool, lmcache_enabled: bool = True, disagg: bool = True) -> int:
    """``pdkit doctor``: print the stack and verdict; exit code 2 when refused."""
    diagnosis = diagnose(gather(), lmcache_enabled=lmcache_enabled, disagg=disagg)
    if as_json:
        print(json.dumps(diagnosis.to_json(), indent=1))
    else:
        print(diagnosis.render())
        if diagnosis.verdict == "refused":
            print(f"pdkit: error: stack: {diagnosis.errors[0]}", file=sys.stderr)
    return diagnosis.exit_code


def check_launch(
    *,
    lmcache_enabled: bool,
    disagg: bool,
    allow_untested: bool,
    vllm_version: str | None = None,
    facts: Facts | None = None,
) -> list[str]:
    """Before ``pdkit launch`` starts a vLLM engine: raise ConfigError unless the stack is known-good here.

    Returns the warnings to print.  ``allow_untested`` downgrades every refusal (and "no GPU") to a warning.
    """
    diagnosis = diagnose(facts or gather(), lmcache_enabled=lmcache_enabled, disagg=disagg, vllm_version=vllm_version)
    problems = list(diagnosis.errors)
    if diagnosis.verdict == "sim-only":
        problems = [w for w in diagnosis.warnings if not w.startswith("on a GPU machine")][-1:]
    if not problems or allow_untested:
        return diagnosis.warnings + [f"untested stack allowed: {p}" for p in problems]
    problem, _, fix = problems[0].rpartition("; ")
    if not problem:
        problem, fix = problems[0], "use --engine sim here, or --allow-untested-stack"
    raise ConfigError("stack", problem, fix + " (pdkit doctor shows the whole stack)")
