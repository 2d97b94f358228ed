"""The GPU checks' harness: start a ``pdkit launch`` deployment, wait for ready, send requests, scan logs, stop.

Why in the package: every ``scripts/gpu_*`` check drives pdkit the same way (a deployment file written
to a run folder, «all processes ready» in the launcher's log, greedy streamed requests on the frontend's
port, known-bad log lines, Ctrl-C and a look for leftover vLLM processes).  One copy here keeps those
checks comparable; the scripts keep only what each proves.  Stdlib only at module level (``tokenizers``
is imported where prompts are built, ``pdkit bench``'s aiohttp client where requests are sent): no vLLM
import, so ``--help`` and dry runs work on a CPU machine.

``OUT`` (``$OUT``, what comes back from a device call) and ``STATE`` (run folders) are read at import.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT", "/tmp/pdkit-gpu-out"))
STATE = Path("/tmp/pdkit-gpu-check")
PORT = 8000
TARGET_TOKENS = [30, 120, 400, 900, 1800, 3000, 4500, 6000]
CHAT_INDICES = [0, 3, 6]
MAX_TOKENS = 32
BAD_LOG_PATTERNS = [
    r"compatibility hash mismatch",
    r"compiled extension not found",
    r"NIXL_ERR",
    r"nixl.*(error|failed)",
    r"Traceback \(most recent call last\)",
]


def log(*args: object) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def build_prompts(model_dir: Path) -> list[str]:
    """Deterministic prompts of about TARGET_TOKENS tokens each (cut with the shipped tokenizer)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta"]
    prompts = []
    for n, target in enumerate(TARGET_TOKENS):
        lines = [
            f"record {i}: {words[(i * 7 + n) % 10]} = compute({i}, {(i * 13 + n) % 17}) # {words[(i + n) % 10]}"
            for i in range(target // 4 + 16)
        ]
        ids = tok.encode("\n".join(lines), add_special_tokens=False).ids[: target - 1]
        prompts.append(tok.decode(ids))
    return prompts


def stream_request(
    path: str, body: dict, timeout: float = 300, port: int | None = None, headers: dict[str, str] | None = None
) -> dict:
    """POST a streaming request to the frontend (``port``: another deployment's) through ``pdkit bench``'s
    client: text, TTFT, end-to-end time, usage, the token ids (when the body asks ``return_token_ids``)
    and the finish reason.

    Raises RuntimeError on any failure the client records (an HTTP error, an error chunk, a timeout), so a
    check never mistakes a failed stream for a short answer."""
    from pdkit.bench.client import stream_once

    rec = stream_once(f"http://127.0.0.1:{port or PORT}{path}", body, headers=headers, timeout_s=timeout)
    if not rec.ok:
        raise RuntimeError(f"{path} -> {rec.error} (HTTP {rec.status}): {rec.error_detail}")
    return {"text": rec.text, "ttft_s": rec.ttft_s, "e2e_s": rec.e2e_s, "usage": rec.usage, "ids": rec.token_ids,
            "finish": rec.finish_reason}  # fmt: skip


def run_prompts(prompts: list[str]) -> list[dict]:
    results = []
    for i, prompt in enumerate(prompts):
        r = stream_request(
            "/v1/completions", {"model": "synth", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        )
        results.append({"kind": "completion", "index": i, **r})
    for i in CHAT_INDICES:
        body = {
            "model": "synth",
            "messages": [{"role": "user", "content": prompts[i]}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        results.append({"kind": "chat", "index": i, **stream_request("/v1/chat/completions", body)})
    return results


def calibrate(prompts_by_len: dict[int, str]) -> dict:
    """Measurements for the simulator's latency model (docs/simulator.md): prefill time vs prompt length
    (TTFT of max_tokens=1 requests, run alone) and decode step time vs batch size (ITL of concurrent
    streams with short prompts)."""
    import concurrent.futures as cf

    from pdkit.bench.stats import percentile

    prefill = {}
    for n, prompt in sorted(prompts_by_len.items()):
        times = []
        for rep in range(3):
            body = {"model": "synth", "prompt": f"{rep} {prompt}", "max_tokens": 1, "temperature": 0}
            times.append(stream_request("/v1/completions", body)["e2e_s"])
        prefill[n] = round(min(times), 4)
    decode = {}
    for batch in (1, 8, 32, 64):

        def one(i: int, batch: int = batch) -> dict:
            body = {"model": "synth", "prompt": f"request {i} of batch {batch}: hello", "max_tokens": 64,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            return stream_request("/v1/completions", body)

        with cf.ThreadPoolExecutor(batch) as pool:
            rs = list(pool.map(one, range(batch)))
        itl = [(r["e2e_s"] - r["ttft_s"]) / 63 for r in rs if r["ttft_s"] is not None]
        decode[batch] = round(percentile(itl, 50) or 0.0, 5)
    return {"prefill_s_by_tokens": prefill, "decode_step_s_by_batch": decode}


def launch(mode_args: list[str], config: dict, run_dir: Path, timeout: float = 540) -> tuple[subprocess.Popen, float]:
    """Start ``pdkit launch`` and wait until it reports every process ready; returns (process, seconds)."""
    proc, t0 = start(mode_args, config, run_dir)
    return proc, wait_ready(proc, run_dir, t0, timeout)


def start(mode_args: list[str], config: dict, run_dir: Path) -> tuple[subprocess.Popen, float]:
    """Start ``pdkit launch`` without waiting (several deployments can come up side by side)."""
    cfg = run_dir / "deployment.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps(config))  # JSON is valid YAML
    argv = [sys.executable, "-m", "pdkit.cli", "launch", *mode_args, "--config", str(cfg), "--run-dir", str(run_dir)]
    log("starting:", " ".join(argv))
    out = open(run_dir / "launch.log", "w")  # noqa: SIM115
    t0 = time.time()
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True), t0


def wait_ready(proc: subprocess.Popen, run_dir: Path, t0: float, timeout: float = 540) -> float:
    """Seconds from ``t0`` until the launcher logged «all processes ready» (raises if it exits first)."""
    while time.time() - t0 < timeout:
        text = (run_dir / "launch.log").read_text(errors="replace")
        if "all processes ready" in text:
            return time.time() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"pdkit launch exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(1)
    raise TimeoutError("pdkit launch not ready in time")


def dry_run(deployments: list[tuple[list[str], dict]]) -> int:
    """``pdkit launch ... --dry-run`` for each (mode args, config): the plans a GPU run would start are
    valid (checked on the CPU machine before spending device time).  Returns 0 when all are."""
    import tempfile

    rc = 0
    for mode_args, config in deployments:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(json.dumps(config))
            f.flush()
            argv = [sys.executable, "-m", "pdkit.cli", "launch", *mode_args, "--config", f.name, "--dry-run"]
            done = subprocess.run(argv, capture_output=True, text=True)
        log("dry run", " ".join(mode_args), "ok" if done.returncode == 0 else f"FAILED: {done.stderr.strip()}")
        rc |= done.returncode
    return rc


def stop(proc: subprocess.Popen, run_dir: Path, check_leftover: bool = True) -> dict:
    """Ctrl-C the launcher; report how long the stop took and whether any vLLM process survived.

    ``check_leftover=False`` while another deployment still runs (its processes are not leftovers);
    call :func:`leftover` once all are stopped.
    """
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    out: dict = {"stop_s": round(time.time() - t0, 1), "launcher_rc": proc.returncode}
    if check_leftover:
        time.sleep(2)
        out["leftover"] = leftover()
    return out


def leftover() -> str:
    """Command lines of pdkit / vLLM processes still alive, this process and its ancestors left out.

    Why the ancestors: a shell that started this script may carry ``pdkit.cli`` in its own command line
    (a device call's wrapper does), which is not a leftover of the deployment."""
    found = subprocess.run(["pgrep", "-af", "vllm.entrypoints|pdkit.cli"], capture_output=True, text=True).stdout
    mine = _ancestors(os.getpid())
    return "\n".join(line for line in found.splitlines() if int(line.split(maxsplit=1)[0]) not in mine).strip()


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its parents up to init (``supervisor.proc_stats``, the one /proc reader)."""
    from pdkit.supervisor import proc_stats

    parent = {p: int(fields[1]) for p, fields in proc_stats()}
    out: set[int] = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        pid = parent.get(pid, 0)
    return out


def ready_times(run_dir: Path) -> dict[str, float]:
    text = (run_dir / "launch.log").read_text(errors="replace")
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"pdkit: (\S+) ready in ([\d.]+) s", text)}


def scan_logs(run_dir: Path) -> list[str]:
    bad = []
    for path in sorted(run_dir.glob("*.log")):
        for n, line in enumerate(path.read_text(errors="replace").splitlines()):
            if "import_utils.py" in line:  # vLLM's notes on optional modules it could not import (nixl_ep)
                continue
            for pat in BAD_LOG_PATTERNS:
                if re.search(pat, line, re.IGNORECASE):
                    bad.append(f"{path.name}:{n + 1}: {line.strip()[:300]}")
    return bad


def lmcache_hits(run_dir: Path) -> list[tuple[int, int]]:
    """(total, hit) per request, in order, from LMCache's scheduler log lines on the prefill worker."""
    text = (run_dir / "prefill-0.log").read_text(errors="replace")
    pat = re.compile(
        r"Reqid: (\S+), Total tokens (\d+), Inference Engine computed tokens: \d+, LMCache hit tokens: (\d+)"
    )
    per_request: dict[str, tuple[int, int]] = {}
    for m in pat.finditer(text):
        per_request[m.group(1)] = (int(m.group(2)), int(m.group(3)))  # the last lookup of a request counts
    return list(per_request.values())


def save_logs(run_dir: Path, stage: str) -> None:
    with tarfile.open(OUT / f"logs_{stage}.tar.gz", "w:gz") as tar:
        for path in run_dir.glob("*.log"):
            tar.add(path, arcname=path.name)


def common_config() -> dict:
    return {
        "enforce_eager": True,
        "max_model_len": 8192,
        "lmcache": {"chunk_size": 256, "cpu_gb": 20, "save_unfull_chunk": True},
        "frontend": {"port": PORT},
    }


def stack_report() -> dict:
    """``pdkit doctor --json`` of this machine: the versions, GPUs and verdict the results belong to."""
    argv = [sys.executable, "-m", "pdkit.cli", "doctor", "--json"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        return {"exit_code": done.returncode, **json.loads(done.stdout)}
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        return {"error": repr(exc)}
