"""Result files (JSON, one per run) and PNG plots, for one run or several merged (agg vs disagg).

The JSON carries the exact command line and an environment summary so a number in docs/ can always be
traced to how it was produced.  matplotlib is imported only when plotting (Agg backend, no display), so
the benchmark itself runs where matplotlib is missing; ``--no-plots`` skips it explicitly.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = "pdkit-bench/1"
_ENV_PREFIXES = ("CUDA_", "NCCL_", "UCX_", "NIXL_", "VLLM_", "LMCACHE_", "PYTHONHASHSEED", "PDKIT_")
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    """GPU names via nvidia-smi (empty on CPU hosts); never imports torch or CUDA."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def environment() -> dict[str, Any]:
    """Host, versions, GPUs and the serving-relevant environment variables (never secrets)."""
    env = {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(_ENV_PREFIXES) and not any(w in k.upper() for w in _SECRET_WORDS)
    }
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {d: _version(d) for d in ("pdkit", "vllm", "torch", "nixl", "lmcache", "aiohttp")},
        "gpus": _gpus(),
        "env": env,
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    return shlex.join(list(sys.argv if argv is None else argv))


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=False, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read result files, refusing ones that are not benchmark results."""
    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{p} is not a pdkit bench result (schema {data.get('schema')!r}, want {SCHEMA})")
        data.setdefault("label", Path(p).stem)
        out.append(data)
    return out


# ------------------------------------------------------------------------------------------- plots


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _series(result: dict[str, Any], shape: str, key: str, stat: str) -> tuple[list[float], list[float]]:
    """(rates, values) of one statistic for one shape, finite rates only, sorted by rate."""
    pts = []
    for p in result["points"]:
        if p.get("shape_key") != shape or p.get("rate") is None:
            continue
        summ = p["summary"]
        v = summ["goodput"]["goodput_rps"] if key == "goodput" else summ[key].get(stat) if stat else summ.get(key)
        if v is not None:
            pts.append((p["rate"], v))
    pts.sort()
    return [r for r, _ in pts], [v for _, v in pts]


def plot_results(results: Sequence[dict[str, Any]], out_dir: str | Path, prefix: str = "") -> list[Path]:
    """PNG plots of one or several results; one line per result ``label``.  Returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    labels = [r.get("label") or f"run{i}" for i, r in enumerate(results)]

    sweeps = [(lab, r) for lab, r in zip(labels, results, strict=False) if r.get("workload") == "sweep"]
    shapes = sorted({p["shape_key"] for _, r in sweeps for p in r["points"] if p.get("shape_key")})
    for shape in shapes:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, key, title, scale in ((axes[0], "ttft_s", "TTFT", 1.0), (axes[1], "itl_s", "ITL", 1e3)):
            for lab, r in sweeps:
                for stat, style in (("p50", "-o"), ("p99", "--s")):
                    xs, ys = _series(r, shape, key, stat)
                    if xs:
                        ax.plot(xs, [y * scale for y in ys], style, label=f"{lab} {stat}")
            slo = sweeps[0][1]["settings"]["slo"]
            ax.axhline(slo["ttft_s"] if key == "ttft_s" else slo["itl_s"] * 1e3, color="grey", lw=0.8, ls=":")
            _dress(
                ax, f"{title} vs rate, {shape}", "request rate (req/s)", f"{title} ({'s' if scale == 1.0 else 'ms'})"
            )
        written.append(_save(fig, out / f"{prefix}{_safe(shape)}-latency.png", plt))

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for lab, r in sweeps:
            xs, ys = _series(r, shape, "goodput", "")
            if xs:
                ax.plot(xs, ys, "-o", label=f"{lab} goodput")
            xs, ys = _series(r, shape, "request_throughput_rps", "")
            if xs:
                ax.plot(xs, ys, ":", label=f"{lab} throughput")
        lim = max(
            (p["rate"] for _, r in sweeps for p in r["points"] if p.get("shape_key") == shape and p["rate"]), default=1
        )
        ax.plot([0, lim], [0, lim], color="grey", lw=0.8, ls="--", label="offered load")
        slo = sweeps[0][1]["settings"]["slo"]
        goodput_title = f"goodput (TTFT<={slo['ttft_s']:g}s, ITL {slo['itl_stat']}<={slo['itl_s'] * 1e3:g}ms), {shape}"
        _dress(ax, goodput_title, "request rate (req/s)", "req/s")
        written.append(_save(fig, out / f"{prefix}{_safe(shape)}-goodput.png", plt))

    repeats = [(lab, r) for lab, r in zip(labels, results, strict=False) if r.get("workload") == "repeat"]
    if repeats:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        width = 0.8 / len(repeats)
        for i, (lab, r) in enumerate(repeats):
            phases = r["points"][0]["phases"]
            names = list(phases)
            vals = [phases[n]["ttft_s"]["p50"] or 0.0 for n in names]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"{lab} TTFT p50")
            ax.set_xticks([j + width * (len(repeats) - 1) / 2 for j in range(len(names))], names)
        _dress(ax, "repeated prefixes: cold vs warm TTFT", None, "TTFT p50 (s)", grid_axis="y")
        written.append(_save(fig, out / f"{prefix}repeat-ttft.png", plt))

    multis = [(lab, r) for lab, r in zip(labels, results, strict=False) if r.get("workload") == "multiturn"]
    if multis:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for lab, r in multis:
            by_turn = r["points"][0]["by_turn"]
            turns = sorted(by_turn, key=int)
            for stat, style in (("p50", "-o"), ("p99", "--s")):
                ax.plot(
                    [int(t) for t in turns],
                    [by_turn[t]["ttft_s"][stat] or 0.0 for t in turns],
                    style,
                    label=f"{lab} {stat}",
                )
        _dress(ax, "multi-turn shared prefix: TTFT by turn", "turn", "TTFT (s)")
        written.append(_save(fig, out / f"{prefix}multiturn-ttft.png", plt))
    return written


def _dress(ax: Any, title: str, xlabel: str | None, ylabel: str, grid_axis: str = "both") -> None:
    """Title, axis labels, a light grid and a legend (when anything is labelled): every plot's finish."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis=grid_axis)
    if ax.get_legend_handles_labels()[0]:  # a burst-only run has no finite-rate line to label
        ax.legend(fontsize=8)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table (one row per label x point) for docs/benchmarks.md."""
    rows = [
        "| run | point | ok/total | TTFT p50/p99 (s) | ITL p50/p99 (ms) | TPOT p50 (ms) | goodput (req/s) "
        "| out tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(x: Any, scale: float = 1.0, nd: int = 3) -> str:
        return "-" if x is None else f"{x * scale:.{nd}f}"

    for r in results:
        for p in r["points"]:
            items = list(p["phases"].items()) if p.get("phases") else [(p["name"], p["summary"])]
            for name, s in items:
                rows.append(
                    f"| {r.get('label')} | {name} | {s['completed']}/{s['requests']} | "
                    f"{f(s['ttft_s']['p50'])} / {f(s['ttft_s']['p99'])} | "
                    f"{f(s['itl_s']['p50'], 1e3, 1)} / {f(s['itl_s']['p99'], 1e3, 1)} | "
                    f"{f(s['tpot_s']['p50'], 1e3, 1)} | "
                    f"{f(s['goodput']['goodput_rps'], 1, 2)} | {f(s['output_token_throughput_tps'], 1, 0)} |"
                )
    return "\n".join(rows)


def group_by(records: Sequence[Any], key: str) -> dict[str, list[Any]]:
    """Records grouped by one of their tags (e.g. ``turn``, ``phase``), in first-seen order."""
    out: dict[str, list[Any]] = defaultdict(list)
    for r in records:
        out[str(r.tags.get(key))].append(r)
    return dict(out)
