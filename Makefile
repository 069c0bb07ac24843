# The two commands of the README.
.PHONY: demo test lint unit setup setup-test bench

demo: setup
	.venv/bin/serialmuxd demo

test: setup-test lint
	.venv/bin/pytest -q

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check src tests
	.venv/bin/mypy

unit: setup-test
	.venv/bin/pytest -q -m "not qemu and not browser"

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

bench: setup-test
	.venv/bin/python bench/run.py
