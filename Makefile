# AToP Serve. On a fresh machine with python3, pip and make: `make serve`, `make test`.
# uv is installed into .tools/ when it is not on PATH (a venv: no PEP 668 trouble with system Pythons).

SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
RUN := $(UV) run --frozen

.PHONY: help install serve-install test test-browser demo-screenshot lint serve format clean proto bench loadtest fuzz container-test export train-default zoo mutation-check

help:
	@echo "make serve           gRPC, REST and the demo page on the shipped default model (installs the serving side only)"
	@echo "                     variables: MODEL_REPOSITORY=DIR HOST=0.0.0.0 PORT=8001 HTTP_PORT=8000 METRICS_PORT=8002"
	@echo "make serve-install   install only the serving side into .venv: server, clients, proto (no torch)"
	@echo "make install         install every workspace package into .venv: also the trainer and exporter (torch)"
	@echo "make test            lint + the whole test suite (but the browser test)"
	@echo "make test-browser    the demo page in headless Chromium (installs Debian's chromium, chromium-driver)"
	@echo "make demo-screenshot test-browser, saving the page to docs/demo.png"
	@echo "make lint            ruff check and format check"
	@echo "make mutation-check  break the product on purpose, one way at a time, in a copy: each must fail its test"
	@echo "make format          ruff fix and format"
	@echo "make train-default   the default models' recipe into RUNS=runs/default (resumable, hours on a CPU)"
	@echo "make zoo             copy a finished recipe's checkpoints over models/zoo"
	@echo "make export          rebuild model_repository/ from the checkpoints in models/zoo"
	@echo "make bench           atop-serve vs in-process onnxruntime vs NVIDIA Triton: ratios, JSON, PNG (~10 min)"
	@echo "make loadtest        atop-serve under twice its capacity on loopback for 60 s (~2 minutes; exit 1 on a miss)"
	@echo "make fuzz            coverage-guided fuzzing (atheris) of the decode path for FUZZ_SECONDS (600)"
	@echo "make container-test  build the serving image with podman, classify through it, SIGTERM it"
	@echo "make proto           regenerate the Python code of proto/atop_proto/*.proto"
	@echo "make clean           remove .venv, .tools and the caches"
	@echo "make help            this list"

$(CURDIR)/.tools/bin/uv:
	python3 -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

.venv/.synced: uv.lock pyproject.toml $(wildcard */pyproject.toml) | $(UV)
	$(UV) sync --frozen --all-packages
	touch $@

install: .venv/.synced

lint: install
	$(RUN) ruff check .
	$(RUN) ruff format --check .

# Two pytest processes: tests/triton imports tritonclient, whose protobuf names clash with ours (pyproject).
test: lint
	$(RUN) pytest
	$(RUN) pytest -o addopts="-ra --strict-markers" tests/triton

# The demo page in a real headless Chromium (tests/browser, Selenium): Debian's chromium and chromium-driver come
# from apt when missing (as root, else through sudo); Playwright's own browser download is not used, since only
# package registries can be reached here. ATOP_REQUIRE_BROWSER: the test fails, not skips, without a browser.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
test-browser: install
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; fi
	ATOP_REQUIRE_BROWSER=1 $(RUN) pytest -o addopts="-ra --strict-markers" tests/browser

demo-screenshot:
	ATOP_DEMO_SCREENSHOT=$(CURDIR)/docs/demo.png $(MAKE) test-browser

# Break the product on purpose, one breakage at a time, in a temporary copy of the tree, and run the test that
# must notice each (the list: tests/mutation_check.py); exit 1 unless every one is caught. Not part of `make
# test`: about 25 minutes on 2 cores. ONLY=TEXT runs the breakages whose name contains TEXT.
mutation-check: install
	$(RUN) python tests/mutation_check.py $(if $(ONLY),--only "$(ONLY)")

format: install
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

# Regenerate the Python code of proto/atop_proto/*.proto (committed; tests/test_proto.py fails when stale).
proto: install
	$(RUN) python -m atop_proto.generate proto

# The shipped default model repository (CIFAR-10, AToP purifier, 32 px); see model_repository/README.md.
MODEL_REPOSITORY ?= model_repository
ZOO ?= models/zoo

# The default models' recipe (models/zoo/README.md has the card: data, figures, timings). Every stage resumes
# from its run folder, so rerunning continues an interrupted recipe. Sized for 2 CPU cores (~10.7 h in all, over
# several sittings); on a GPU raise the epochs (e.g. PRETRAIN_EPOCHS=20 FINETUNE_EPOCHS=5).
# Pretraining runs in three stages: PRETRAIN_EPOCHS, then PRETRAIN_MORE_EPOCHS more with a restarted Adam and
# a fresh discriminator (how the shipped purifier was continued; `finetune` with the classification term
# held off for every epoch is plain L1 + GAN training from given weights), then one epoch at lr 1e-4: on all
# 10,000 test images the pretrained pipeline went 49.0% -> 55.4% -> 57.4% over those stages.
# AToP fine-tuning is one pass over all images at the paper's lr 1e-4 (from this purifier, lr 1e-3 made the
# coarse stage drift within an epoch and cost 7 points of pipeline accuracy; the card). The classifier averages
# each image with its mirror at test time (airbench's TTA; part of the exported graph).
RUNS ?= runs/default
DATA ?= ../shared/datasets/cifar10-jpg.tar.gz
CLASSIFIER_EPOCHS ?= 10
PRETRAIN_EPOCHS ?= 3
PRETRAIN_MORE_EPOCHS ?= 3
FINETUNE_EPOCHS ?= 1
FINETUNE_IMAGES ?= 0
# v4's and v5's classifier (the one the last purifier stage trains against) starts from one adversarially
# trained alone (N-FGSM, CLASSIFIER_EPOCHS), then trains behind RT + the AToP purifier (frozen) on adversarial
# examples made through the whole pipeline, at the served RT: no noise, 8 of the 64 blocks masked, only the
# holes pasted into the image (the RT grid in docs/robustness.md: less masking helps; the AT start carries the
# robustness). The attack is PGD, 2 steps, each gradient averaged over 2 RT draws: against v3's N-FGSM (one
# step, one draw) +1.7 clean points at the same robustness, for ~3.5x the stage's time (2.6 h at one thread;
# N-FGSM ~23 min an epoch at one thread).
# PIPELINE_ADV='--adv-kind n-fgsm' is v3; '--adv-kind none' only adapts the classifier.
PIPELINE_EPOCHS ?= 2
PIPELINE_ADV ?= --adv-kind pgd --adv-steps 2 --adv-eot 2
PIPELINE_RT ?= --rt-noise-sigma 0 --rt-mask-fraction 0.125 --output composite
# Every purifier stage after the first trains from given weights against the recipe's classifier.
FINETUNE = atop-train finetune --data-source $(DATA) --classifier $(RUNS)/classifier/classifier
# AToP as the paper runs it: the classification term on from the start at weight 0.5, lr 1e-4, the attack
# PGD-3 of 3/255 through RT + purifier + classifier (frozen). The last stage runs it once more (v5): the
# pipeline stage's purifier takes one more epoch against that stage's classifier (frozen) at the served RT,
# with a fresh discriminator, one round of alternating the two (+0.4 clean points, paired on all 10,000 test
# images; robustness level; docs/robustness.md).
ATOP = --ce-warmup-epochs 0 --ce-weight 0.5 --lr 1e-4 --attack-steps 3 --attack-step-size 0.0118
# Continued pretraining for $(1) epochs: the classification term never switches on (warm-up = every epoch), so
# no attack runs.
pretrain_more = $(FINETUNE) --eval-robust-images 0 --epochs $(1) --ce-warmup-epochs $(1)
# The classifier adversarially trained alone (with its mirror averaging): with N-FGSM, the pipeline stage's start;
# with PGD-2 and trained longer, the served classifier.
AT_RECIPE = atop-train classifier --data-source $(DATA) --arch-kwargs '{"flip_average": true}'
AT_CLASSIFIER = $(AT_RECIPE) --adv-kind n-fgsm
# The served classifier (v8): adversarially trained alone, from scratch, with PGD-2 (random start, 2 steps of
# 5/255) for SERVED_CLASSIFIER_EPOCHS, seed 1, then served behind the last stage's purifier unchanged. On this
# schedule PGD-2 leaks late (catastrophic overfitting: docs/design.md, "Training that diverges"): the divergence
# guard stops the run with the last sound epoch kept (v8's run: epoch 26 of 30) and atop-train exits non-zero;
# the run then goes on from there with the stronger SERVED_CLASSIFIER_FINISH attack, PGD-3 (3 steps of
# 2.5 x 8/255 / 3) and seed 2, to the end of the schedule (docs/robustness.md, "v8"). ~11 h on 2 cores. A run
# that never halts is served as it ends. The per-epoch PGD check (256 images) is part of the recipe.
SERVED_CLASSIFIER_EPOCHS ?= 30
SERVED_CLASSIFIER = $(AT_RECIPE) --adv-kind pgd --adv-steps 2 --seed 1 --eval-robust-images 256 \
    --out $(RUNS)/classifier-served --epochs $(SERVED_CLASSIFIER_EPOCHS)
SERVED_CLASSIFIER_FINISH = --adv-steps 3 --adv-step-size 0.026143790849673203 --seed 2
# v10 served the mean of three classifiers' logits: v8's and two 1.5x wider (96/384/384, lr scaled by
# airbench96's ratio) for 30 epochs, seed 1: one with PGD-3 from the start (v9's second member), one with PGD-4
# (4 steps of 5/255), whose divergence guard halts it in its last epoch with epoch 29 kept (atop-train then exits
# non-zero: the recipe goes on with the kept classifier). Both wide members were trained on a lent H200 in bf16
# autocast (332 s and 174 s; add --precision bf16 to train them the same way on a CPU, ~1 day each on 2 cores).
WIDE_RECIPE = atop-train classifier --data-source $(DATA) --epochs 30 --lr 1.173913 --seed 1 --adv-kind pgd \
    --arch-kwargs '{"flip_average": true, "widths": [96, 384, 384]}'
WIDE_CLASSIFIER = $(WIDE_RECIPE) --out $(RUNS)/classifier-wide --adv-steps 3 --adv-step-size 0.02614392156862745
WIDE_PGD4_CLASSIFIER = $(WIDE_RECIPE) --out $(RUNS)/classifier-wide-pgd4 --adv-steps 4 \
    --adv-step-size 0.0196078431372549
# v11 mixes that ensemble's probabilities with those of stage 1's classifier (trained without any attack: 90.6%
# clean alone, nothing robust), the ensemble's share MIXTURE_ROBUST_SHARE: on 2,000 images 0.875 was the largest
# share whose pipeline kept 85% clean (docs/robustness.md, "v11"; the grid: docs/robustness/probes/README.md).
# The mixture is stored in int8 and the purifier in fp16, so that the shipped weights keep within 30 MB.
MIXTURE_ROBUST_SHARE ?= 0.875
CHECKPOINT = $(RUN) python -m atop_models.checkpoint
train-default: install
	$(RUN) atop-train classifier --out $(RUNS)/classifier --data-source $(DATA) --data-eval-images 0 \
	    --epochs $(CLASSIFIER_EPOCHS) --arch-kwargs '{"flip_average": true}'
	$(RUN) atop-train pretrain --out $(RUNS)/pretrain --data-source $(DATA) --epochs $(PRETRAIN_EPOCHS) \
	    --cnum 24 --batch-size 64 --classifier $(RUNS)/classifier/classifier
	$(RUN) $(call pretrain_more,$(PRETRAIN_MORE_EPOCHS)) --out $(RUNS)/pretrain-more --lr 1e-3 \
	    --purifier $(RUNS)/pretrain/purifier --discriminator new
	$(RUN) $(call pretrain_more,1) --out $(RUNS)/pretrain-decay --lr 1e-4 --purifier $(RUNS)/pretrain-more/purifier
	$(RUN) $(FINETUNE) --out $(RUNS)/atop --epochs $(FINETUNE_EPOCHS) --data-train-images $(FINETUNE_IMAGES) \
	    $(ATOP) --purifier $(RUNS)/pretrain-decay/purifier
	$(RUN) $(AT_CLASSIFIER) --out $(RUNS)/classifier-at --epochs $(CLASSIFIER_EPOCHS)
	$(RUN) atop-train pipeline --out $(RUNS)/pipeline --data-source $(DATA) --epochs $(PIPELINE_EPOCHS) \
	    $(PIPELINE_ADV) $(PIPELINE_RT) --classifier $(RUNS)/classifier-at/classifier \
	    --purifier $(RUNS)/atop/purifier
	$(RUN) atop-train finetune --out $(RUNS)/alternation --data-source $(DATA) --epochs 1 --data-train-images 0 \
	    $(ATOP) $(PIPELINE_RT) --purifier $(RUNS)/pipeline/purifier --discriminator new \
	    --classifier $(RUNS)/pipeline/classifier
	$(RUN) $(SERVED_CLASSIFIER) || $(RUN) $(SERVED_CLASSIFIER) $(SERVED_CLASSIFIER_FINISH)
	$(RUN) $(WIDE_CLASSIFIER)
	$(RUN) $(WIDE_PGD4_CLASSIFIER) || test -f $(RUNS)/classifier-wide-pgd4/classifier.json
	$(CHECKPOINT) ensemble $(RUNS)/ensemble/classifier $(RUNS)/classifier-served/classifier \
	    $(RUNS)/classifier-wide/classifier $(RUNS)/classifier-wide-pgd4/classifier
	$(CHECKPOINT) mixture $(RUNS)/mixture/classifier $(RUNS)/ensemble/classifier $(RUNS)/classifier/classifier \
	    --weight $(MIXTURE_ROBUST_SHARE)
	$(CHECKPOINT) int8 $(RUNS)/mixture/classifier $(RUNS)/served/classifier
	$(CHECKPOINT) half $(RUNS)/alternation/purifier $(RUNS)/served/purifier

# Copy a finished recipe's checkpoints over the shipped ones (then `make export` to rebuild the repository).
zoo:
	cp $(RUNS)/served/classifier.safetensors $(RUNS)/served/classifier.json $(ZOO)/
	cp $(RUNS)/served/purifier.safetensors $(RUNS)/served/purifier.json $(ZOO)/

# Rebuild the shipped repository from the shipped checkpoints (models/zoo, see its README). One FP32 model:
# the server feeds it encoded, UINT8 and FP32 inputs alike, and the 30 MB budget for shipped weights holds.
export: install
	$(RUN) atop-export --classifier $(ZOO)/classifier --purifier $(ZOO)/purifier --repository $(MODEL_REPOSITORY) \
	    --inputs float

# The serving side only (no torch): --inexact leaves a full `make install` in .venv as it is.
serve-install: | $(UV)
	$(UV) sync --frozen --inexact --no-dev --package atop-server --package atop-clients

# HOST, PORT, HTTP_PORT, METRICS_PORT: passed on when given, else atop-serve's defaults (and ATOP_* variables) hold.
serve: serve-install
	@if [ ! -d "$(MODEL_REPOSITORY)" ]; then \
	  echo "No model repository at $(MODEL_REPOSITORY): 'make export' rebuilds the default one from $(ZOO);" >&2; \
	  echo "serve your own with atop-export ... --repository DIR, then make serve MODEL_REPOSITORY=DIR" >&2; \
	  exit 2; fi
	$(UV) run --no-sync atop-serve --model-repository $(MODEL_REPOSITORY) $(if $(HOST),--host $(HOST)) \
	    $(if $(PORT),--port $(PORT)) $(if $(HTTP_PORT),--http-port $(HTTP_PORT)) \
	    $(if $(METRICS_PORT),--metrics-port $(METRICS_PORT))

# The bench environment: the same lock with the `bench` group (nvidia-pytriton's tritonserver, py-spy), which
# resolves apart from dev (pytriton needs numpy < 2), so make test and the serving install never pull it.
.venv-bench/.synced: uv.lock pyproject.toml $(wildcard */pyproject.toml) | $(UV)
	UV_PROJECT_ENVIRONMENT=.venv-bench $(UV) sync --frozen --all-packages --no-default-groups --group bench
	touch $@

# atop-serve (S) vs in-process onnxruntime (A) vs NVIDIA Triton (C), interleaved rounds (tests/bench/serving.py):
# ratios, p50/p99, bench.json and bench.png in BENCH_OUT; ~9 minutes on 2 cores (the first run also exports
# the 32 / 256 px test models, a few minutes more). docs/performance.md reads the figures.
BENCH_OUT ?= .data/bench
BENCH_SECONDS ?= 10
bench: install .venv-bench/.synced
	$(RUN) python tests/bench/serving.py --model-repository $(MODEL_REPOSITORY) --images $(DATA) \
	    --triton-python .venv-bench/bin/python --py-spy .venv-bench/bin/py-spy --seconds $(BENCH_SECONDS) \
	    --rounds 2 --out $(BENCH_OUT)

# atop-serve under twice its capacity on loopback (tests/bench/loadtest.py): ~2 minutes; exit 1 on a missed target.
loadtest: install
	$(RUN) python tests/bench/loadtest.py --model-repository $(MODEL_REPOSITORY) --seconds 60

# Coverage-guided fuzzing of the bytes -> images path (tests/fuzz/fuzz_decode.py); the corpus grows across runs.
FUZZ_SECONDS ?= 600
fuzz: install
	mkdir -p .data/fuzz/corpus
	$(RUN) python tests/fuzz/fuzz_decode.py .data/fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=.data/fuzz/

# Build the serving image with podman, run it, classify CIFAR-10 through it, SIGTERM it (a few minutes).
container-test: install
	RUN="$(RUN)" bash deploy/container-test.sh

clean:
	rm -rf .venv .venv-bench .tools .pytest_cache .ruff_cache
