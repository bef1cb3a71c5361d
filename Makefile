# The two commands of the README. Both bootstrap the interpreters first (idempotent: a no-op
# when deploy/requirements-*.txt, deploy/setup.sh and pyproject.toml are unchanged).
PY := .venv/bin/python

.PHONY: setup run test test-slow test-cluster bench docs lint typecheck
setup:
	@bash deploy/setup.sh

# PPO-Lag on the point/hazard task (configs/quickstart.yaml), embedded local Ray cluster: the cost
# comes under its limit while the return rises, in about three minutes on 2 cores.
run: setup
	$(PY) -m saferl.cli train quickstart

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The real multi-process cluster (head + two worker nodes as `ray start` processes): slow, run by CI.
test-cluster: setup
	$(PY) -m pytest -q -m slow tests/test_cluster_processes.py

bench: setup
	$(PY) -m saferl.cli bench rollout

# Lint (ruff; the rules and their reasons are in pyproject.toml's [tool.ruff]) and the type check.
lint: setup
	.venv/bin/ruff check .
	bash deploy/typecheck.sh

# mypy over the core modules listed in pyproject.toml's [tool.mypy].
typecheck: setup
	bash deploy/typecheck.sh

# The documentation site from docs/ (strict: a broken link or missing page fails it).
docs: setup
	.venv/bin/mkdocs build --strict --quiet
