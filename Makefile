# Two commands do all set-up: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist
# demo: LeNet-5 on all of real Fashion-MNIST (54k train / 6k val / 10k test), the seed's
# augmentation, cosine schedule; sized for a 2-core laptop CPU (< 5 min)
DEMO_RUN := log/demo/lenet5-fashion-$(shell date +%Y%m%d-%H%M%S)  # a new run each time: nothing overwritten
DEMO_ARGS ?= --model lenet5 --dataset fashion --epochs 12 --batch-size 128 --lr 0.05 \
	--scheduler cosine --run-dir $(DEMO_RUN)

.PHONY: demo test report bench venv fashion clean-venv lab gpu-check gpu-check-dry mutate

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

# Real data offline: Debian's dataset-fashion-mnist when we are root on Debian; otherwise the
# code finds ./data or downloads Fashion-MNIST itself.
fashion:
	@if [ ! -d $(FASHION) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
		echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded"; \
	fi

demo: $(STAMP) fashion
	$(PY) -m cifarlab train $(DEMO_ARGS)

test: $(STAMP) fashion
	$(PY) -m pytest -n 2 --dist loadfile tests

report: $(STAMP)
	$(PY) -m cifarlab report --log log --out report

# lab: Jupyter Lab from the project root on the project's virtualenv and its kernel ("python3"
# is installed into .venv by the venv step); the notebooks find the root themselves.
lab: $(STAMP)
	$(PY) -m jupyter lab --notebook-dir=. notebooks/01_cifar_training.ipynb

bench: $(STAMP)
	$(PY) -m cifarlab bench throughput --model resnet20 --device cpu

# mutate: mutation testing (mutmut) of the science-critical modules listed in pyproject.toml's
# [tool.cifarlab.mutate], each against its own tests; not part of `make test`. One core by
# default (MAX_CHILDREN=1); MODULES="dropout/layers.py optim/slbi.py" picks some. Scores:
# build/mutate/summary.md; surviving mutants: build/mutate/<module>/survivors.txt. Long: README.
# After adding tests for survivors: make mutate MODULES=... MUTATE_ARGS=--retest-survivors
MAX_CHILDREN ?= 1
mutate: $(STAMP)
	$(PY) scripts/mutate.py --max-children $(MAX_CHILDREN) $(MUTATE_ARGS) $(MODULES)

# gpu-check: the CUDA paths on a machine with one GPU and no network, < 8 min (scripts/gpu_check.py):
# CUDA tests, resnet18 eager vs --compile, bench, host syncs, SLBI fused vs eager, kill-and-resume,
# EDropout, Grad-CAM -> bench/gpu-check/summary.{json,md}. Uses .venv if there is one, else the
# machine's python (PyTorch preinstalled) with the package from ./code; installs nothing.
# gpu-check-dry (= make gpu-check ARGS=--cpu): the same steps on the CPU at toy size.
GPU_PY = $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))
gpu-check:
	PYTHONPATH=code $(GPU_PY) scripts/gpu_check.py $(ARGS)

gpu-check-dry:
	PYTHONPATH=code $(GPU_PY) scripts/gpu_check.py --cpu $(ARGS)
