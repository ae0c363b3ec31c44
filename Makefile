# The two commands of the README: `make demo` and `make test`.
# Each creates .venv and installs the project (pinned, see pyproject.toml) when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit bench soak chaos throughput-postgres peer clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m grid_flows.dev.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m benchmarks.run

# Soak test, not part of `make test`: 4 requesting processes for SOAK_MINUTES (default 10), a lender
# killed and restarted half way; exits non-zero if an acceptance check fails (see BENCHMARKS.md).
SOAK_MINUTES ?= 10
soak: $(STAMP)
	$(PY) -m benchmarks.soak --minutes $(SOAK_MINUTES)

# Controller chaos, not part of `make test`: the boost controller killed CHAOS_KILLS times (default 30) at
# random points of request, release and expiry; exits non-zero if a record is lost, a group is orphaned
# or a boost outlives its deadline by more than 1 s plus the restart (see BENCHMARKS.md).
CHAOS_KILLS ?= 30
chaos: $(STAMP)
	$(PY) -m benchmarks.chaos --kills $(CHAOS_KILLS)

# Row 9 of `make bench` (admission throughput) with its Prefect server on PostgreSQL instead of
# SQLite; installs PostgreSQL with apt-get when missing (needs root, as `make e2e`).
throughput-postgres: $(STAMP)
	bash scripts/with-postgres.sh $(PY) -m benchmarks.admission_throughput

# prefect-ray's own test suite against BoostRayTaskRunner, beside RayTaskRunner (scripts/peer.py;
# ~30 minutes, not part of `make test`). It stops every Ray process of this user: run it alone.
peer: $(STAMP)
	$(PY) scripts/peer.py

unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

clean:
	rm -rf $(VENV) .demo

# Real end-to-end run on this machine (PostgreSQL, `prefect server start`, `ray start` x3,
# work pool + worker, browser check of the UI); needs root for apt-get and PostgreSQL.
.PHONY: e2e
e2e: $(STAMP)
	$(PY) -c 'import playwright' 2>/dev/null || $(PY) -m pip install --quiet playwright
	bash scripts/e2e-real.sh
