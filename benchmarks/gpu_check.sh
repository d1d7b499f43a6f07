#!/usr/bin/env bash
# One prepared check for a lent GPU machine (H100 / H200), about 8 minutes, each part time-limited, a failed part never
# stopping the others:
#   1. cuda_check     the official fixtures' scores on CUDA (fp32 and bf16 autocast), the fused backward's gradcheck
#   2. pytest_cuda    the test suite's CUDA-marked tests (`pytest -m cuda`: exact scoring against the one-pair
#                     reference, bf16 autocast, our training step = the original-style step, bf16 recall table)
#   3. bench_fp32     exact scoring pairs/s of hsc / sgraf_saf / sgraf_sgr beside the original-style loop, first
#                     stage + re-ranking; bench_layers: training steps of every preset, a training step per layer type
#                     (dense and sparse paths, on full and knn:8 graphs, with and without edge features); peak GPU
#                     memory of each
#   4. bench_bf16     the same exact scoring under bf16 autocast, and bf16 with float32's recall table
#   5. pipeline       train.py (bf16 autocast, the first stage's loss, one epoch), evaluate.py in float32 and in bf16 with
#                     float32's ranking, both with re-ranking, and a search query, all on the GPU
#   6. ddp            train.py and evaluate.py under torchrun with NCCL, world size 1
#   7. coco5k         the COCO-5K-sized evaluation (5,000 x 25,000 pairs), with what time is left
# then benchmarks/gpu_report.py gathers everything into one JSON named after the card, in benchmarks/results/ and $OUT,
# and prints a table. Without CUDA it stops at once with one line (status 2).
#
# Here (the development machine), once, before the call:
#     bash benchmarks/gpu_check.sh prepare
#   -> .whl/      torch_geometric 2.8.1, nltk 3.10.4 and defusedxml wheels (pure Python; the GPU image has torch, numpy,
#                 tqdm, networkx, matplotlib, tensorboard, pytest but no nltk; git-ignored)
#      .gpucarry/ the parts of ../shared the checks read: fixtures/reference (parity) and data/scan_text (real caption
#                 lengths, vocabularies); ../shared does not travel on its own (listed in .git/info/exclude)
# Then through the device tool (one call; about 8 minutes of device time):
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpucarry"], timeout_s=600)
# Files back in $OUT: gpu_check_<card>.json (everything), summary.txt, all.log, and each part's own JSON and log.
#
# A dry run of the logic on a CPU machine (small sizes, the same code paths; nothing is written to
# benchmarks/results/): GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "prepare" ]; then
    set -x
    grep -qx '/.gpucarry/' .git/info/exclude 2>/dev/null || echo '/.gpucarry/' >> .git/info/exclude
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p .whl
    $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl torch_geometric==2.8.1 nltk==3.10.4 defusedxml==0.7.1
    rm -rf .gpucarry && mkdir -p .gpucarry/shared/fixtures .gpucarry/shared/data
    cp -r ../shared/fixtures/reference .gpucarry/shared/fixtures/
    cp -r ../shared/data/scan_text .gpucarry/shared/data/
    du -sh .whl .gpucarry
    ls .whl
    exit 0
fi

PY=${GPU_CHECK_PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}            # cpu + GPU_CHECK_QUICK=1: a dry run of this script's logic on a CPU machine
if [ "${DEV#cuda}" != "$DEV" ] && ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA device here (torch under $PY finds none); run it on a GPU machine, or" \
         "GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 for a dry run of its logic" >&2
    exit 2
fi

set -x
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-470}          # seconds for everything; each part gets min(its limit, what is left - 10)
SLACK=${GPU_CHECK_SLACK:-1}              # each part's limit x SLACK (a dry run on a slow CPU)
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
PARTS="$OUT/parts.tsv"
: > "$SUMMARY"
: > "$PARTS"
export PYTHONUNBUFFERED=1
QUICK=${GPU_CHECK_QUICK:+--quick}
SCALE=${GPU_CHECK_COCO_SCALE:-1}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
rm -rf "$WORK" && mkdir -p "$WORK"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# part NAME LIMIT LOGFILE CMD...: run CMD under `timeout`, log to LOGFILE (appended), record status and seconds
part() {
    local name=$1 limit=$2 log=$3; shift 3
    local remaining; remaining=$(( $(left) - 10 ))
    if [ "$remaining" -lt 20 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "SKIPPED" "0" "0" >> "$PARTS"
        return
    fi
    limit=$(( limit * SLACK ))
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "===== $name (limit ${limit}s): $*" >> "$log"
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local status=OK
    [ $rc -eq 124 ] && status=TIMEOUT
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAIL($rc)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" >> "$PARTS"
    tail -n 25 "$log"
}

# ---- setup: wheels, ../shared
{
    nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    if [ ! -e ../shared ] && [ -d .gpucarry/shared ]; then ln -s "$ROOT/.gpucarry/shared" ../shared; fi
    nproc; free -g
} > "$OUT/all.log" 2>&1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PYTHONPATH
$PY -c "import torch, torch_geometric, nltk, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name()); print('pyg', torch_geometric.__version__, torch_geometric.__file__, 'nltk', nltk.__version__)" >> "$OUT/all.log" 2>&1
cat "$OUT/all.log"
printf '%s\t%s\t%s\t%s\n' "setup" "OK" "$(( $(date +%s) - START ))" "0" >> "$PARTS"

# ---- 1. correctness on CUDA that the suite cannot check without ../shared: parity fixtures, gradcheck
part cuda_check 60 "$OUT/all.log" $PY benchmarks/cuda_check.py --device $DEV --json "$OUT/cuda_check.json"

# ---- 2. the test suite's CUDA-marked tests (skipped, with their reason, on a CPU dry run)
part pytest_cuda 90 "$OUT/pytest_cuda.log" $PY -m pytest -q -p no:cacheprovider -m cuda -rs \
    --continue-on-collection-errors tests

# ---- 3. the benchmark in fp32 (TF32 off): exact scoring beside the original-style loop, first stage + re-ranking;
#         then training steps per preset and per layer type (dense and sparse, with and without edge features), in a
#         part of their own so that a slow one cannot take the other's time; peak memory of each measurement
part bench_fp32 100 "$OUT/all.log" $PY benchmarks/run.py $QUICK --device $DEV --dtype fp32 --repeats 3 \
    --only scoring,baseline,rerank --max_seconds 10 --out "$OUT/bench_fp32.json"
part bench_layers 100 "$OUT/all.log" $PY benchmarks/run.py $QUICK --device $DEV --dtype fp32 --train_steps 3 \
    --only training,layers --layer_edges full,knn:8 --out "$OUT/bench_layers.json"

# ---- 4. the same exact scoring under bf16 autocast, and bf16 with float32's recall table (sgraf_saf)
part bench_bf16 70 "$OUT/all.log" $PY benchmarks/run.py $QUICK --device $DEV --dtype bf16 --repeats 3 \
    --only scoring,bf16 --max_seconds 10 --out "$OUT/bench_bf16.json"

# ---- 5. the command lines on the GPU: train (bf16 autocast, first stage trained), evaluate in float32 and in bf16
#         with float32's ranking (the two recall tables must be equal), re-ranking, a search query
SYN=$WORK/data
RUN=$WORK/run
TRAIN_AMP=bf16; [ "$DEV" = cpu ] && TRAIN_AMP=off
SIZE="--img_dim 2048"; MODEL="--batch_size 128"      # one epoch: 40 steps, then the validation writes model_best.pth
[ -n "$QUICK" ] && SIZE="--img_dim 32 --train 160" && MODEL="--config configs/demo.json --batch_size 32"
part pipeline 90 "$OUT/pipeline.log" bash -c "
    set -ex
    $PY -m hsc_pyg.cli.synthetic --out $SYN/synthetic_precomp $SIZE --overwrite
    $PY train.py $MODEL --data_path $SYN --data_name synthetic_precomp --device $DEV --amp $TRAIN_AMP \
        --vocab_threshold 1 --itc_weight 1 --itc_loss infonce+hinge --num_epochs 1 \
        --val_step 100000 --no_progress --overwrite --model_name $RUN/checkpoint --logger_name $RUN/log
    for amp in off bf16; do
        $PY evaluate.py --model $RUN/checkpoint/model_best.pth --data_path $SYN --data_name synthetic_precomp \
            --split test --device $DEV --amp \$amp --rerank_k 10 --no_progress --json $OUT/evaluate_\$amp.json
    done
    $PY -m hsc_pyg.search --model $RUN/checkpoint/model_best.pth --data_path $SYN --data_name synthetic_precomp \
        --split test --query 'a red cube left of a blue ball' --k 5 --cache $WORK/gallery --rebuild --device $DEV \
        --no_progress --json $OUT/search.json --overwrite"

# ---- 6. DDP with NCCL (gloo on a CPU dry run), world size 1: a few steps, then the evaluation, which must equal the
#         single process's float32 table of the same checkpoint
part ddp 60 "$OUT/ddp.log" bash -c "
    set -ex
    $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py $MODEL --data_path $SYN \
        --data_name synthetic_precomp --device $DEV --vocab_threshold 1 --max_iters 5 \
        --val_step 100000 --no_progress --overwrite --model_name $WORK/ddp/checkpoint --logger_name $WORK/ddp/log
    $PY -m torch.distributed.run --standalone --nproc_per_node 1 evaluate.py --model $RUN/checkpoint/model_best.pth \
        --data_path $SYN --data_name synthetic_precomp --split test --device $DEV --no_progress \
        --json $OUT/evaluate_ddp.json"

# ---- 7. COCO-5K-sized evaluation, full size (5,000 x 25,000 = 125M exact pairs), fp32, with the time that is left
COCO_SCALE=$SCALE; [ -n "$QUICK" ] && COCO_SCALE=0.004
part coco5k 170 "$OUT/all.log" $PY benchmarks/coco5k_eval.py --scale $COCO_SCALE --device $DEV --amp off \
    --preset sgraf_saf --out "$OUT/coco5k.json"

# ---- one JSON named after the card, and the table
set +x
RESULTS_DIR=benchmarks/results; [ "$DEV" = cpu ] && RESULTS_DIR=$OUT
CARD="cpu (dry run)"
[ "$DEV" != cpu ] && CARD=$($PY -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null ||
                              echo "unknown GPU")
$PY benchmarks/gpu_report.py "$OUT" --card "$CARD" --results_dir "$RESULTS_DIR" \
    --wall_s "$(( $(date +%s) - START ))" --budget_s "$BUDGET" >> "$SUMMARY" 2>&1
echo "=================== gpu_check summary ($OUT/summary.txt)"
cat "$SUMMARY"
exit 0
