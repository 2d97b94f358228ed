"""Issue 21 on one H200: disaggregated TTFT with first-token seeding vs unseeded vs aggregated.

Why: the prefill hop already samples the first token; with ``frontend.seed_first_token`` the frontend
streams it at once and seeds the decode with it (docs/seeding.md).  This measures what that buys, on
the real product (``pdkit launch``, vLLM 0.26, the embedded synthetic Llama-8B, dummy weights), and
re-checks that greedy seeded output equals aggregated output token for token.

Deployments (one at a time, each with the whole GPU's share; the agg reference is kept in memory):
    agg:    ``pdkit launch agg --gpu 0``                    (one worker)
    disagg: ``pdkit launch disagg --share-gpus``            (prefill + decode on GPU 0, NIXL between them)
Unseeded and seeded run on the *same* disagg deployment: a request with ``X-Pdkit-Seed: off`` takes
the unseeded path (a per-request debugging aid the frontend honours; it affects only that request).

Stages (each one device call, well under 10 minutes; ``--engine sim`` rehearses them on a CPU):
    python3 scripts/gpu_bench_seeding.py --stage zero-load     # 10 distinct ~6.6k-token prompts per
        # variant, one at a time: median client TTFT agg / disagg unseeded / disagg seeded, plus the
        # greedy equality check (prompts of 15, 16, 17, 31, 32, 33, 2048, 6600 tokens + chat)
    python3 scripts/gpu_bench_seeding.py --stage serve-agg     # vllm bench serve 2048/128 at --rates
    python3 scripts/gpu_bench_seeding.py --stage serve-disagg  # the same, unseeded then seeded
    python3 scripts/gpu_bench_seeding.py --stage report        # merge what is under $OUT, plot it
Every stage writes ``$OUT/bench_seeding_<stage>.json``, then refreshes ``$OUT/bench_seeding.json`` (all
results side by side) and ``$OUT/bench_seeding.png`` (when matplotlib is importable).  Prompts are
distinct per variant and request (a salt in front), so no prefix cache or LMCache hit flatters a variant.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pdkit.gpu_check import harness as g

ZERO_LOAD_TOKENS = 6600
ZERO_LOAD_PROMPTS = 10
WARMUP = 2
EQUALITY_TOKENS = (15, 16, 17, 31, 32, 33, 2048, 6600)  # around the block size (16), and long ones
EQUALITY_MAX_TOKENS = 32
SERVE_IN, SERVE_OUT = 2048, 128
DEFAULT_RATES = "2,4,8"
SEED_OFF = {"X-Pdkit-Seed": "off"}
AGG, UNSEEDED, SEEDED = "agg", "disagg_unseeded", "disagg_seeded"
RAY_PUSH = "ray-push"
SPLIT_STAGES = ("zero-load", "serve-agg", "serve-disagg")
ONE_START_STAGES = ("agg", "disagg", RAY_PUSH)  # one deployment start per stage
READY_LINES = ("all processes ready", "all workers ready on Ray")
REF = g.STATE / "seeding_agg_reference.json"


# ------------------------------------------------------------------------------------ deployments


def deployment(mode: str, engine: str) -> tuple[list[str], dict[str, Any]]:
    """(pdkit launch args, config) of the agg, the one-GPU disagg or the Ray + push disagg deployment."""
    config: dict[str, Any] = {**g.common_config(), "engine": engine, "mode": "agg" if mode == "agg" else "disagg"}
    if mode == "agg":
        config["agg"] = {"gpus": [[0]]}
        return ["agg", "--gpu", "0"], config
    config |= {"share_gpus": True, "prefill": {"gpus": [[0]]}, "decode": {"gpus": [[0]]}}
    config["frontend"] = {**config["frontend"], "seed_first_token": True}
    if mode == RAY_PUSH:
        # One node: a private Ray cluster of this machine; the simulator asks for no GPU (a CPU rehearsal).
        config |= {"backend": "ray", "nixl": {"mode": "push"}}
        config["ray"] = {"address": "local", **({"gpus_per_worker": 0} if engine == "sim" else {})}
    return ["disagg"], config


class Running:
    """One launched deployment (``with Running(...)``): stopped and its logs saved on exit."""

    def __init__(self, mode: str, engine: str, tag: str) -> None:
        self.mode, self.engine, self.tag = mode, engine, tag
        self.run_dir = g.STATE / f"seeding-{tag}"

    def __enter__(self) -> Running:
        args, config = deployment(self.mode, self.engine)
        self.proc, t0 = g.start(args, config, self.run_dir)
        ready_s = wait_ready(self.proc, self.run_dir, t0)
        g.log(f"{self.mode} ready in {ready_s:.1f} s")
        self.ready_s = ready_s
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped = g.stop(self.proc, self.run_dir)
        g.log("stop", self.stopped)
        g.save_logs(self.run_dir, f"seeding-{self.tag}")


def wait_ready(proc: subprocess.Popen, run_dir: Path, t0: float, timeout: float = 540) -> float:
    """Seconds until the launcher (local or Ray backend) said every process is ready."""
    while time.time() - t0 < timeout:
        text = (run_dir / "launch.log").read_text(errors="replace")
        if any(line in text for line in READY_LINES):
            return time.time() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"pdkit launch exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(1)
    raise TimeoutError("pdkit launch not ready in time")


# ------------------------------------------------------------------------------------ prompts


def tokenizer() -> Any:
    from tokenizers import Tokenizer

    from pdkit.model_files import default_model_dir

    return Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))


def prompt_ids(tok: Any, n: int, salt: str) -> list[int]:
    """``n`` token ids of deterministic text; ``salt`` (in front) makes every block distinct."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta"]
    lines = [f"[{salt}]"] + [f"row {i}: {words[(i * 7) % 10]} = f({i}, {(i * 13) % 17}) # {words[i % 10]}"
                              for i in range(n // 4 + 16)]  # fmt: skip
    ids = tok.encode("\n".join(lines), add_special_tokens=False).ids[:n]
    assert len(ids) == n, f"prompt builder gave {len(ids)} tokens, wanted {n}"
    return ids


# ------------------------------------------------------------------------------------ client


def stream(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One streamed request to the frontend (``pdkit bench``'s client): client TTFT, text, token ids,
    finish reason, usage."""
    return g.stream_request(path, {**body, "return_token_ids": True}, headers=headers)


def whole(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The same request not streamed (``stream: false``): text, token ids, finish reason, usage."""
    conn = http.client.HTTPConnection("127.0.0.1", g.PORT, timeout=300)
    conn.request("POST", path, json.dumps({**body, "stream": False, "return_token_ids": True}),
                 {"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{path} answered {resp.status}: {data}")
    choice = data["choices"][0]
    text = choice["text"] if "text" in choice else (choice.get("message") or {}).get("content")
    return {"text": text or "", "ids": choice.get("token_ids") or [], "finish": choice.get("finish_reason"),
            "usage": data.get("usage")}  # fmt: skip


def frontend_metric(name: str, **labels: str) -> float:
    from pdkit import prom

    return prom.total(prom.fetch(f"http://127.0.0.1:{g.PORT}", timeout_s=30), name, **labels)


def seeded_counts() -> dict[str, float]:
    return {o: frontend_metric("pdkit_frontend_seeded_hops_total", outcome=o)
            for o in ("seeded", "ended_at_prefill", "refused", "fallback")}  # fmt: skip


# ------------------------------------------------------------------------------------ zero load


def ttft_runs(tok: Any, variant: str, headers: dict[str, str] | None) -> dict[str, Any]:
    """Warm-up, then ZERO_LOAD_PROMPTS distinct prompts one at a time: the client's TTFT of each."""
    for i in range(WARMUP):
        stream("/v1/completions", {"prompt": prompt_ids(tok, 512, f"warm {variant} {i}"), "max_tokens": 4}, headers)
    ttfts = []
    for i in range(ZERO_LOAD_PROMPTS):
        body = {"prompt": prompt_ids(tok, ZERO_LOAD_TOKENS, f"{variant} {i}"), "max_tokens": 8, "temperature": 0}
        r = stream("/v1/completions", body, headers)
        ttfts.append(r["ttft_s"])
        g.log(f"{variant} #{i}: TTFT {r['ttft_s'] * 1000:.1f} ms")
    return {"ttft_s": ttfts, "median_ttft_ms": round(statistics.median(ttfts) * 1000, 2),
            "min_ttft_ms": round(min(ttfts) * 1000, 2), "max_ttft_ms": round(max(ttfts) * 1000, 2)}  # fmt: skip


def equality_requests(tok: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, path, body) of the greedy equality check: completions of several lengths, two chats."""
    out = [
        (f"completion-{n}", "/v1/completions",
         {"prompt": prompt_ids(tok, n, f"eq {n}"), "max_tokens": EQUALITY_MAX_TOKENS, "temperature": 0})
        for n in EQUALITY_TOKENS
    ]  # fmt: skip
    for words in (20, 1500):
        content = " ".join(f"w{i % 97}" for i in range(words))
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": EQUALITY_MAX_TOKENS, "temperature": 0}
        out.append((f"chat-{words}w", "/v1/chat/completions", body))
    return out


def outputs(requests: list[tuple[str, str, dict[str, Any]]], headers: dict[str, str] | None) -> dict[str, Any]:
    """Each request streamed, then the short ones (< 2048 tokens) again not streamed (``<name>-whole``):
    a non-streamed seeded answer is the frontend's concatenation of the two hops, checked apart."""
    got = {}
    for name, path, body in requests:
        r = stream(path, body, headers)
        got[name] = {k: r[k] for k in ("text", "ids", "finish", "usage")}
    for name, path, body in requests:
        if not name.startswith("completion-") or int(name.split("-")[1]) < 2048:
            got[f"{name}-whole"] = whole(path, body, headers)
    return got


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Per request: equal token ids / text / usage; the first differing position when not."""
    out: dict[str, Any] = {}
    for name, want in ref.items():
        have = got[name]
        first_diff = next((i for i, (a, b) in enumerate(zip(want["ids"], have["ids"], strict=False)) if a != b), None)
        if first_diff is None and len(want["ids"]) != len(have["ids"]):
            first_diff = min(len(want["ids"]), len(have["ids"]))
        out[name] = {"ids_equal": want["ids"] == have["ids"], "text_equal": want["text"] == have["text"],
                     "usage_equal": want["usage"] == have["usage"], "first_diff": first_diff}  # fmt: skip
    return out


def stage_zero_load(engine: str) -> dict[str, Any]:
    tok = tokenizer()
    eq = equality_requests(tok)
    result: dict[str, Any] = {"prompt_tokens": ZERO_LOAD_TOKENS, "prompts": ZERO_LOAD_PROMPTS}
    with Running("agg", engine, "agg") as dep:
        result["agg_ready_s"] = round(dep.ready_s, 1)
        result[AGG] = ttft_runs(tok, AGG, None)
        ref = outputs(eq, None)
    with Running("disagg", engine, "disagg") as dep:
        result["disagg_ready_s"] = round(dep.ready_s, 1)
        seeded_eq = outputs(eq, None)  # first, so the seeded path meets cold caches
        unseeded_eq = outputs(eq, SEED_OFF)
        for variant, headers in ((UNSEEDED, SEED_OFF), (SEEDED, None)):
            result[variant] = ttft_runs(tok, variant, headers)
        result["seeded_hops"] = seeded_counts()
    summarize_zero_load(result, ref, seeded_eq, unseeded_eq)
    return result


def summarize_zero_load(result: dict[str, Any], ref: dict[str, Any], seeded: dict[str, Any],
                        unseeded: dict[str, Any]) -> None:  # fmt: skip
    """Equality of both disagg paths with agg, and the median TTFT ratios, into ``result``."""
    result["equality_seeded_vs_agg"] = compare(ref, seeded)
    result["equality_unseeded_vs_agg"] = compare(ref, unseeded)
    result["greedy_equal"] = all(v["ids_equal"] for v in result["equality_seeded_vs_agg"].values())
    result["greedy_equal_unseeded"] = all(v["ids_equal"] for v in result["equality_unseeded_vs_agg"].values())
    a, u, s = (result[v]["median_ttft_ms"] for v in (AGG, UNSEEDED, SEEDED))
    result["summary"] = {"median_ttft_ms": {AGG: a, UNSEEDED: u, SEEDED: s},
                         "seeded_over_agg": round(s / a, 3), "unseeded_over_agg": round(u / a, 3)}  # fmt: skip
    g.log("zero load median TTFT ms:", result["summary"], "greedy equal:", result["greedy_equal"])


# ------------------------------------------------------------------------------------ under load


def vllm_bench(label: str, rate: float, prompts: int, seed: int, headers: dict[str, str] | None) -> dict[str, Any]:
    """``vllm bench serve`` (random 2048/128, ignore EOS) through the frontend; the figures it reports."""
    from pdkit.model_files import default_model_dir

    name = f"vllm_bench_seeding_{label}_{rate:g}.json"
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
            "--base-url", f"http://127.0.0.1:{g.PORT}", "--endpoint", "/v1/completions", "--model", "synth",
            "--tokenizer", str(default_model_dir()), "--dataset-name", "random",
            "--random-input-len", str(SERVE_IN), "--random-output-len", str(SERVE_OUT), "--ignore-eos",
            "--num-prompts", str(prompts), "--request-rate", f"{rate:g}", "--seed", str(seed),
            "--disable-tqdm", "--save-result", "--result-dir", str(g.OUT), "--result-filename", name]  # fmt: skip
    if headers:
        argv += ["--header", *(f"{k}={v}" for k, v in headers.items())]
    g.log("vllm bench:", label, f"rate {rate:g}", f"{prompts} prompts")
    t0 = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    out: dict[str, Any] = {
        "rate": rate,
        "num_prompts": prompts,
        "rc": done.returncode,
        "wall_s": round(time.time() - t0),
    }
    try:
        data = json.loads((g.OUT / name).read_text())
    except (OSError, json.JSONDecodeError):
        return {**out, "error": "no result file", "output_tail": (done.stdout + done.stderr)[-2000:]}
    keys = ("completed", "failed", "request_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
            "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_tpot_ms")  # fmt: skip
    return out | {k: data.get(k) for k in keys}


def serve_runs(variant: str, headers: dict[str, str] | None, k: int, rates: list[float]) -> list[dict[str, Any]]:
    """``vllm bench serve`` at each rate for one variant (``k``: which variant, for distinct prompts)."""
    runs = []
    for rate in rates:
        prompts = max(16, int(rate * 8))  # ~8 s of arrivals per rate: the whole stage fits one call
        seed = 1000 * (k + 1) + int(rate * 10)  # distinct random prompts per run: no cache hits
        runs.append(vllm_bench(variant, rate, prompts, seed, headers))
        g.log(variant, {key: runs[-1].get(key) for key in ("rate", "mean_ttft_ms", "p99_ttft_ms",
                                                            "mean_itl_ms", "failed")})  # fmt: skip
    return runs


def stage_serve(engine: str, mode: str, rates: list[float]) -> dict[str, Any]:
    if importlib.util.find_spec("vllm") is None:
        return {"error": "vllm is not importable here: vllm bench serve cannot run"}
    variants = [(AGG, None)] if mode == "agg" else [(UNSEEDED, SEED_OFF), (SEEDED, None)]
    result: dict[str, Any] = {"input_len": SERVE_IN, "output_len": SERVE_OUT}
    with Running(mode, engine, f"serve-{mode}") as dep:
        result[f"{mode}_ready_s"] = round(dep.ready_s, 1)
        for k, (variant, headers) in enumerate(variants):
            result[variant] = serve_runs(variant, headers, k + 1 if mode == "disagg" else 0, rates)
        if mode == "disagg":
            result["seeded_hops"] = seeded_counts()
    return result


# ------------------------------------------------------------------------------------ one deployment each


def stage_agg(engine: str, rates: list[float]) -> dict[str, Any]:
    """The agg half of zero-load and serve-agg on ONE agg deployment (saves a start); keeps the reference."""
    tok = tokenizer()
    with Running("agg", engine, "agg") as dep:
        zero = {"agg_ready_s": round(dep.ready_s, 1), AGG: ttft_runs(tok, AGG, None)}
        ref = outputs(equality_requests(tok), None)
        serve = {"input_len": SERVE_IN, "output_len": SERVE_OUT, "agg_ready_s": round(dep.ready_s, 1)}
        serve[AGG] = serve_runs(AGG, None, 0, rates) if rates else []
    REF.write_text(json.dumps({"zero": zero, "ref": ref}))
    # also under $OUT: the reference is the same on every machine (seeded dummy weights), so a later
    # session can carry it in and skip the agg start (``--ref-from``)
    (g.OUT / "seeding_agg_reference.json").write_text(REF.read_text())
    (g.OUT / "bench_seeding_serve-agg.json").write_text(json.dumps(serve | {"engine": engine}, indent=1))
    return {"zero": zero, "serve": serve, "reference_requests": len(ref)}


def stage_disagg(engine: str, rates: list[float], agg_from: Path | None = None) -> dict[str, Any]:
    """The disagg half of zero-load and serve-disagg on ONE disagg deployment, against stage agg's reference.

    ``agg_from``: a stored stage-agg result (a machine that went cold lost the reference): its agg TTFT
    figures are used, and seeded output is compared with the unseeded output of the same deployment
    (unseeded disagg == agg is the earlier, separate GPU check)."""
    tok = tokenizer()
    if agg_from is None:
        saved = json.loads(REF.read_text())
    else:
        agg = json.loads(agg_from.read_text())
        saved = {"zero": {"agg_ready_s": agg["agg_ready_s"], AGG: agg[AGG], "agg_from": agg_from.name}, "ref": None}
    eq = equality_requests(tok)
    result: dict[str, Any] = {"prompt_tokens": ZERO_LOAD_TOKENS, "prompts": ZERO_LOAD_PROMPTS, **saved["zero"]}
    serve: dict[str, Any] = {"input_len": SERVE_IN, "output_len": SERVE_OUT}
    with Running("disagg", engine, "disagg") as dep:
        result["disagg_ready_s"] = serve["disagg_ready_s"] = round(dep.ready_s, 1)
        seeded_eq = outputs(eq, None)  # first, so the seeded path meets cold caches
        unseeded_eq = outputs(eq, SEED_OFF)
        for variant, headers in ((UNSEEDED, SEED_OFF), (SEEDED, None)):
            result[variant] = ttft_runs(tok, variant, headers)
        result["seeded_hops"] = seeded_counts()
        for k, (variant, headers) in enumerate(((UNSEEDED, SEED_OFF), (SEEDED, None))):
            serve[variant] = serve_runs(variant, headers, k + 1, rates) if rates else []
        serve["seeded_hops"] = seeded_counts()
    summarize_zero_load(result, saved["ref"] or unseeded_eq, seeded_eq, unseeded_eq)
    if saved["ref"] is None:
        result["reference"] = "disagg_unseeded of the same deployment (no agg reference on this machine)"
        result["greedy_equal_unseeded"] = None  # compared with itself: says nothing
    (g.OUT / "bench_seeding_zero-load.json").write_text(json.dumps(result | {"engine": engine}, indent=1))
    (g.OUT / "bench_seeding_serve-disagg.json").write_text(json.dumps(serve | {"engine": engine}, indent=1))
    return {"summary": result["summary"], "greedy_equal": result["greedy_equal"]}


def stage_ray_push(engine: str) -> dict[str, Any]:
    """Issue 20's one-GPU check and issue 21's push mode in one start: ``--backend ray`` (a one-node Ray
    cluster of this machine, a fractional GPU per worker) with NIXL push and seeding; the smoke chat, then
    the greedy equality set seeded and unseeded against stage agg's reference; the stop's teardown line."""
    tok = tokenizer()
    ref = json.loads(REF.read_text())["ref"] if REF.is_file() else None
    with Running(RAY_PUSH, engine, RAY_PUSH) as dep:
        ready_s = round(dep.ready_s, 1)
        smoke = stream("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}],
                                                 "max_tokens": 8, "temperature": 0})  # fmt: skip
        seeded_eq = outputs(equality_requests(tok), None)
        unseeded_eq = outputs(equality_requests(tok), SEED_OFF)
        hops = seeded_counts()
    launch_log = (dep.run_dir / "launch.log").read_text(errors="replace")
    placed = [line.strip() for line in launch_log.splitlines() if " ready on " in line or "GPUs (Ray)" in line]
    teardown = [line.strip() for line in launch_log.splitlines() if "removed" in line and "actor" in line]
    # without this machine's agg reference (it went cold), seeded is held against unseeded of the same run
    seeded_cmp, unseeded_cmp = compare(ref or unseeded_eq, seeded_eq), compare(ref or unseeded_eq, unseeded_eq)
    return {
        "reference": "agg" if ref else "disagg_unseeded of the same deployment (no agg reference here)",
        "ready_s": ready_s,
        "smoke_answered": bool(smoke["text"]),
        "equality_seeded_vs_agg": seeded_cmp,
        "equality_unseeded_vs_agg": unseeded_cmp,
        "greedy_equal_seeded": all(v["ids_equal"] for v in seeded_cmp.values()),
        "greedy_equal_unseeded": all(v["ids_equal"] for v in unseeded_cmp.values()),
        "seeded_hops": hops,
        "placement_lines": placed,
        "teardown_lines": teardown,
        "stop": dep.stopped,
        "bad_log_lines": g.scan_logs(dep.run_dir),
    }


# ------------------------------------------------------------------------------------ report


def report() -> dict[str, Any]:
    """Everything under $OUT side by side (bench_seeding.json) and one plot (bench_seeding.png)."""
    merged: dict[str, Any] = {}
    for stage in ("zero-load", "serve-agg", "serve-disagg"):
        path = g.OUT / f"bench_seeding_{stage}.json"
        if path.is_file():
            merged[stage] = json.loads(path.read_text())
    table = []
    serve = {**merged.get("serve-agg", {}), **merged.get("serve-disagg", {})}
    for variant in (AGG, UNSEEDED, SEEDED):
        for run in serve.get(variant) or []:
            table.append({"variant": variant, **{k: run.get(k) for k in ("rate", "mean_ttft_ms", "p99_ttft_ms",
                          "mean_itl_ms", "p99_itl_ms", "completed", "failed")}})  # fmt: skip
    merged["serve_table"] = table
    if "zero-load" in merged:
        merged["zero_load_summary"] = merged["zero-load"].get("summary")
        merged["greedy_equal"] = merged["zero-load"].get("greedy_equal")
    (g.OUT / "bench_seeding.json").write_text(json.dumps(merged, indent=1))
    plot(merged)
    return merged


def plot(merged: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        g.log("matplotlib not importable: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    zero = merged.get("zero_load_summary") or {}
    if zero:
        names = list(zero["median_ttft_ms"])
        axes[0].bar(names, [zero["median_ttft_ms"][n] for n in names], color=["tab:gray", "tab:red", "tab:green"])
        axes[0].set_title(f"zero load, {ZERO_LOAD_TOKENS}-token prompt: median TTFT")
        axes[0].set_ylabel("ms")
    colors = {AGG: "tab:gray", UNSEEDED: "tab:red", SEEDED: "tab:green"}
    for variant in (AGG, UNSEEDED, SEEDED):
        rows = [r for r in merged.get("serve_table", []) if r["variant"] == variant and r.get("mean_ttft_ms")]
        if not rows:
            continue
        rates = [r["rate"] for r in rows]
        for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(rates, [r[f"mean_{key}_ms"] for r in rows], "o-", color=colors[variant], label=f"{variant} mean")
            ax.plot(rates, [r[f"p99_{key}_ms"] for r in rows], "x--", color=colors[variant], label=f"{variant} p99")
    for ax, what in ((axes[1], "TTFT"), (axes[2], "ITL")):
        ax.set_title(f"vllm bench serve {SERVE_IN}/{SERVE_OUT}: {what}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(g.OUT / "bench_seeding.png", dpi=110)
    g.log("plot:", g.OUT / "bench_seeding.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=[*SPLIT_STAGES, *ONE_START_STAGES, "report"], required=True)
    parser.add_argument("--engine", choices=["vllm", "sim"], default="vllm", help="sim: rehearse on a CPU")
    parser.add_argument("--rates", default=DEFAULT_RATES, help="serve stages: request rates, comma-separated")
    parser.add_argument("--agg-from", type=Path, help="stage disagg: a stored stage-agg result instead of this "
                        "machine's reference (seeded is then compared with unseeded)")  # fmt: skip
    parser.add_argument("--ref-from", type=Path, help="stages disagg and ray-push: a seeding_agg_reference.json "
                        "that stage agg wrote to $OUT (any machine: the synthetic model's outputs are the same "
                        "everywhere), so the agg start can be skipped")  # fmt: skip
    args = parser.parse_args()
    g.OUT.mkdir(parents=True, exist_ok=True)
    if args.ref_from is not None:
        REF.parent.mkdir(parents=True, exist_ok=True)
        REF.write_text(args.ref_from.read_text())
    t0 = time.time()
    rates = [float(r) for r in args.rates.split(",") if r]
    if args.stage in ONE_START_STAGES:
        if args.stage == "agg":
            result = stage_agg(args.engine, rates)
        elif args.stage == "disagg":
            result = stage_disagg(args.engine, rates, args.agg_from)
        else:
            result = stage_ray_push(args.engine)
            (g.OUT / "bench_seeding_ray-push.json").write_text(json.dumps(result | {"engine": args.engine}, indent=1))
        g.log(args.stage, "done in", round(time.time() - t0), "s:", json.dumps(result)[:3000])
        if args.stage == "agg":
            return 0
        if args.stage == RAY_PUSH:
            return 0 if result["greedy_equal_seeded"] and result["greedy_equal_unseeded"] else 1
    elif args.stage != "report":
        if args.stage == "zero-load":
            result = stage_zero_load(args.engine)
        else:
            result = stage_serve(args.engine, args.stage.removeprefix("serve-"), rates)
        result |= {"engine": args.engine, "stage": args.stage, "wall_s": round(time.time() - t0)}
        (g.OUT / f"bench_seeding_{args.stage}.json").write_text(json.dumps(result, indent=1))
    merged = report()
    g.log("done in", round(time.time() - t0), "s;", json.dumps(merged.get("zero_load_summary")),
          json.dumps(merged.get("serve_table")))  # fmt: skip
    return 0 if merged.get("greedy_equal", True) is not False else 1


if __name__ == "__main__":
    sys.exit(main())
