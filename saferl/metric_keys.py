"""Names of the metrics one module writes and another reads (learners → coordinator → metrics
file → report, studies, Prometheus). Keys only one module uses stay next to their use."""

LAGRANGE_MULTIPLIER = "lagrange_multiplier"  # λ of a Lagrangian learner after its dual phase
EPISODE_RETURN = "episode/return"  # mean undiscounted return of the episodes since the last row
EPISODE_COST = "episode/cost"  # their mean undiscounted cost
EPISODE_COUNT = "episode/count"
COST_LIMIT = "cost_limit"  # the run's limit b, on every row
SKIPPED_UPDATES = "health/skipped_updates"  # optimiser steps refused by the non-finite guard
