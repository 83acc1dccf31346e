# `make demo` and `make test` do all set-up on a fresh machine (creating .venv as needed).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data/bccd
SLIDES ?= $(DATA)/JPEGImages
OUT    ?= results

.PHONY: install demo test bench clean

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
	@echo "results: $(OUT)/latest"

test: install
	$(BIN)/python -m pytest -q -m "not gpu"

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
