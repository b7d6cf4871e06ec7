# The README's two commands: `make run` (set up, then all four rounds on the embedded default) and `make test`.
.PHONY: setup run test tiny lint

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/python round.py --config configs/embedded.yaml $(ARGS)

tiny: setup
	.venv/bin/python round.py --config configs/tiny.yaml $(ARGS)

lint: setup
	.venv/bin/ruff check .

test: setup
	.venv/bin/ruff check .
	PYTHONFAULTHANDLER=1 .venv/bin/python -m pytest -q $(ARGS)
