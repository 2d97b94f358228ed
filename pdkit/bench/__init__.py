"""``pdkit bench``: a serving benchmark for OpenAI-compatible endpoints (issue 8).

Why a benchmark of our own: P/D disaggregation is worth running only where it measurably wins, and the
win shows in the tails (ITL p99, TTFT under load) and in *goodput* -- requests/s that meet the latency
SLOs -- not in mean throughput.  The tool drives a frontend or a single engine with fixed-shape Poisson
traffic, multi-turn shared-prefix sessions and repeated long prefixes (LMCache cold vs warm), and can
read the engines' NIXL transfer metrics in the same run.

Modules: :mod:`.stats` (percentiles, goodput), :mod:`.prompts` (exact-length prompts),
:mod:`.client` (one streamed request -> :class:`~.client.RequestRecord`), :mod:`.workloads` (arrival
processes and time bounds), :mod:`.progress` (progress bar), :mod:`.worker_metrics` (Prometheus
scrapes, NIXL deltas), :mod:`.report` (JSON, PNG plots, merging runs), :mod:`.run` (one run:
:class:`~.run.BenchConfig` -> :func:`~.run.run_benchmark`), :mod:`.cli` (``bench`` and
``bench_compare``, registered by ``pdkit.cli``).  See docs/benchmarks.md.
"""
