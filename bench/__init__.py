"""``python -m bench``: scale, latency, memory and API cost, measured on a real control plane.

Reading order follows a run: ``run`` (options; the whole run, top-down) → ``cluster`` (control
plane with audit logging, bulk object creation) → ``controller`` (a controller command as a
measured child process) → ``observe`` (rollouts seen from the outside) → ``apicost`` (requests by
verb from the audit log) → ``harness`` (one scenario against one controller) → ``scenarios``
(S1..S13) → ``scale`` (the many-objects run) → ``report`` (table, targets, JSON, plots).
``floor`` is the no-logic reactor that gives the latency floor; ``selfcheck`` checks the pure
parts without a cluster.

Nothing here asserts on time: numbers are measured and reported, and ``tests/`` stays free of timed
benchmarks.
"""
