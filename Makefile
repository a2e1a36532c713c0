# The README's two commands: `make demo` and `make test`. Both set everything up first.
.PHONY: setup demo test lint bench docs docs-serve clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/lrsearch demo --quick

# three workers, each module whole on one (its shared searches, servers and clusters are module-scoped):
# the suite waits on Ray and subprocesses much of the time, and three overlap those waits on 2 cores;
# modules go out in conftest's order, the slowest first, so that the workers end together
test: setup
	.venv/bin/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

lint: setup
	.venv/bin/ruff check lrsearch tests bench

bench: setup
	.venv/bin/python bench/range_test_overhead.py

# The documentation site (mkdocs.yml, docs/): built strictly into site/, a broken link or a missing
# reference fails it; docs-serve rebuilds on every change of docs/, lrsearch/ or BENCHMARKS.md.
docs: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs serve -a 127.0.0.1:8000

clean:
	rm -rf lrsearch-runs mlflow.db mlruns.db mlruns mlartifacts site .pytest_cache
