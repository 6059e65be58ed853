# One entry point per job; every target creates or reuses .venv itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# DeepSpeed's CPU accelerator only where there is no GPU (the code picks CUDA + NCCL whenever torch sees one).
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
DATA    ?= ../shared/data

.PHONY: venv demo test test-fast bench bench-glue clean

venv: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull several GB of CUDA wheels.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[demo,test,bench]'
	rm -f $(VENV)/.installed-* && touch $@

demo: venv
	$(BIN)/python -m arc_dist.demo $(ARGS)

test: venv
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not slurm" tests

# Timing benchmarks (minutes): relation loss, stage-1 step vs a plain MiniLMv2 step, student vs teacher inference.
bench: venv
	$(BIN)/python benchmarks/relation_loss.py
	$(BIN)/python benchmarks/stage1_step.py
	$(BIN)/python benchmarks/inference.py

# The GLUE comparison table (an hour or more on 2 CPU cores; resumable). E.g. make bench-glue ARGS="--tasks rte --steps 60"
# (seeds or --methods run apart join with ARGS="--merge a.json b.json --out benchmarks/results/glue_table.json")
bench-glue: venv
	$(BIN)/python benchmarks/glue_table.py --glue-dir $(DATA)/glue $(if $(filter --student,$(ARGS)),,--text $(DATA)/wikitext-2-raw) $(ARGS)

clean:
	rm -rf demo_out runs .cache
