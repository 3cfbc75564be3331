# imgsync — the README's two commands are `make demo` and `make test`; both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 is what this project is tested with (x86_64, CPU or CUDA);
# override for another platform, e.g. TORCH="torch==2.9.1 torchvision==0.24.1" on aarch64.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: install demo test services lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/imgsync demo

services:
	bash .ci/services

test: install services
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .imgsync .pytest_cache build *.egg-info
