# Two commands a newcomer needs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean screenshot

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
		echo "$(PYTHON) cannot create a virtualenv: on Debian, apt install python3-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/fleetgate demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pki gateway console simulators tests scripts
	$(BIN)/mypy pki
	$(BIN)/mypy gateway simulators console scripts

# pytest exits 5 when it collected no test: a broken suite, not a pass (make would report any
# failing exit as 2, so the check lives here rather than in the caller).
test: lint
	@QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: a broken suite, not a pass"; exit 1; fi; \
	exit $$rc

# docs/console.png from a real run: a gateway, a simulated fleet, operator actions (~3 min).
screenshot: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python scripts/console_screenshot.py $(SCREENSHOT_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
