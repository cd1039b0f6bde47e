.PHONY: setup demo test lint

setup:
	scripts/setup

demo:
	scripts/demo

test:
	scripts/check

lint:
	scripts/setup && .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy coop
