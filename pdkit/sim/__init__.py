"""The simulated engine (``pdkit sim-worker``): a CPU stand-in for a vLLM worker.

Public entry points: :class:`pdkit.sim.server.SimWorker` (in-process), :func:`pdkit.sim.server.serve_sim_worker`
and :func:`pdkit.sim.cli.sim_worker` (the CLI command).  See docs/simulator.md.
"""
