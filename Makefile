# The README's two commands: `make demo` and `make test`. Both set everything up first.
.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/lrsearch demo --quick

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check lrsearch tests bench

bench: setup
	.venv/bin/python bench/range_test_overhead.py

clean:
	rm -rf lrsearch-runs mlruns.db .pytest_cache
