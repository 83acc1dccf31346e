# `make demo` and `make test` do all set-up on a fresh machine (creating .venv as needed).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data/bccd
SLIDES ?= $(DATA)/JPEGImages
OUT    ?= results

.PHONY: install demo test test-fast chromium bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pinned so pip takes the wheels this workplace keeps on local disk instead of downloading.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/bccd-batch run $(SLIDES) --out $(OUT) --labels $(DATA); rc=$$?; \
	  if [ $$rc -ne 0 ] && [ $$rc -ne 3 ]; then exit $$rc; fi
	@echo "report: $(OUT)/latest/report.html"

# The report is tested in a real browser: Debian's chromium, installed here when missing (root, as in CI).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: chromium could not be installed; the browser test will be skipped"

test: install chromium
	$(BIN)/python -m pytest -q -m "not gpu"

# The edit-test loop: everything but the tests marked slow (interrupts, soak, multi-process runs, training).
test-fast: install chromium
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

# GPU throughput table (see docs/benchmarks.md); BENCH_IMAGES copies of BCCD images end to end.
BENCH_IMAGES ?= 10000
BENCH_DEVICES ?= all
bench: install
	$(BIN)/bccd-batch bench --images $(BENCH_IMAGES) --data $(DATA) --devices $(BENCH_DEVICES)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
