#!/usr/bin/env python3
"""Serving benchmark without the ``pdkit`` entry point: the same code as ``pdkit bench``.

python scripts/bench_serving.py [pdkit bench options]      # run a benchmark
python scripts/bench_serving.py compare A.json B.json ...  # merge results into comparison plots
"""

from __future__ import annotations

import sys

import typer

from pdkit.bench.cli import bench, bench_compare


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        sys.argv.pop(1)
        typer.run(bench_compare)
    else:
        typer.run(bench)


if __name__ == "__main__":
    main()
