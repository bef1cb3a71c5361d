"""Offline tools over runs and the runtime: benchmarks, reports, evaluation and the paper studies.

The runtime (coordinator, iterations, faults, session, jobs) is ``saferl.cluster``; nothing
there imports from here."""
