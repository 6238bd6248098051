# The two commands: `make run` (try the gateway on the embedded default policy) and
# `make test` (install what the tests need and run the whole suite). Both create or
# reuse the project's own virtualenv in .venv/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check bench bench-deliver bench-filters clean

$(STAMP): pyproject.toml
	sh scripts/bootstrap.sh "$(PYTHON)" "$(VENV)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gateway run $(if $(POLICY),--policy $(POLICY))

test: $(STAMP)
	sh scripts/install-system-deps.sh
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/gateway check $(POLICY)

bench: $(STAMP)
	sh scripts/install-system-deps.sh
	$(BIN)/python bench/accept.py

bench-deliver: $(STAMP)
	sh scripts/install-system-deps.sh
	$(BIN)/python bench/deliver.py

bench-filters: $(STAMP)
	sh scripts/install-system-deps.sh
	$(BIN)/python bench/filters.py

clean:
	rm -rf $(VENV) var .pytest_cache
