#!/usr/bin/env bash
# One prepared check for a lent GPU machine (H100 / H200): correctness on CUDA, the benchmark in fp32 and bf16, an AMP
# training smoke test through train.py, the COCO-5K-sized evaluation at full size, and the CPU test suite, each part
# time-limited, a failed part never stopping the others, everything under 10 minutes; JSON and logs go to $OUT and a
# table is printed last.
#
# Here (the development machine), once, before the call:
#     bash benchmarks/gpu_check.sh prepare
#   -> .whl/      torch_geometric 2.8.1, nltk 3.10.4 and defusedxml wheels (pure Python; the GPU image has torch, numpy,
#                 tqdm, networkx, matplotlib, tensorboard, pytest but no nltk; git-ignored)
#      .gpucarry/ the parts of ../shared the checks read: fixtures/reference (parity) and data/scan_text (real caption
#                 lengths, vocabularies); ../shared does not travel on its own (listed in .git/info/exclude)
# Then through the device tool (one call; ~9 minutes of device time):
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpucarry", ".devdata"], timeout_s=600)
#   (.devdata is optional: when it holds f8k.tgz, the flickr8k_mini tests of the CPU suite run too.)
# Files back in $OUT: summary.txt, all.log, cuda_check.json, bench_fp32.json, bench_bf16.json, coco5k.json,
# train_amp.log, pytest.log.
set -x
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "prepare" ]; then
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

OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-570}          # seconds for everything; each part gets min(its limit, what is left - 10)
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
PY=${GPU_CHECK_PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}            # cpu + GPU_CHECK_QUICK=1: a dry run of this script's logic on a CPU machine
QUICK=${GPU_CHECK_QUICK:+--quick}
SCALE=${GPU_CHECK_COCO_SCALE:-1}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# part NAME LIMIT LOGFILE CMD...: run CMD under `timeout`, log to LOGFILE (appended), record status and seconds
part() {
    local name=$1 limit=$2 log=$3; shift 3
    local remaining; remaining=$(( $(left) - 10 ))
    if [ "$remaining" -lt 20 ]; then
        printf '%-22s %-8s %6s  %s\n' "$name" "SKIPPED" "-" "no time left" >> "$SUMMARY"
        return
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "===== $name (limit ${limit}s): $*" >> "$log"
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local status=OK
    [ $rc -eq 124 ] && status=TIMEOUT
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAIL($rc)"
    printf '%-22s %-8s %5ss  limit %ss\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" >> "$SUMMARY"
    tail -n 25 "$log"
}

# ---- setup: wheels, ../shared, data for the smoke tests
{
    nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    if [ ! -e ../shared ] && [ -d .gpucarry/shared ]; then ln -s "$ROOT/.gpucarry/shared" ../shared; fi
    if [ -f .devdata/f8k.tgz ] && [ -d ../shared/data ] && [ ! -d ../shared/data/flickr8k_mini_precomp ]; then
        mkdir -p ../shared/data/flickr8k_mini_precomp && tar xzf .devdata/f8k.tgz -C ../shared/data/flickr8k_mini_precomp
    fi
    nproc; free -g
} > "$OUT/all.log" 2>&1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PYTHONPATH
$PY -c "import torch, torch_geometric, nltk, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name()); print('pyg', torch_geometric.__version__, torch_geometric.__file__, 'nltk', nltk.__version__)" >> "$OUT/all.log" 2>&1
cat "$OUT/all.log"
printf '%-22s %-8s %5ss\n' "setup" "done" "$(( $(date +%s) - START ))" >> "$SUMMARY"

# ---- 1. correctness on CUDA: parity fixtures, exactness, training = original-style step, gradcheck, bf16 scores
part cuda_check 90 "$OUT/all.log" $PY benchmarks/cuda_check.py --device $DEV --json "$OUT/cuda_check.json"

# ---- 2. the benchmark in fp32 (TF32 off), every section, measurements in this process
part bench_fp32 150 "$OUT/all.log" $PY benchmarks/run.py $QUICK --device $DEV --dtype fp32 --repeats 5 --train_steps 5 \
    --out "$OUT/bench_fp32.json"

# ---- 3. AMP training smoke test: train.py at full size, bf16 autocast, a dry run then 10 steps (checkpoint written)
SYN=/tmp/gpu_check_data
AMP=bf16; [ "$DEV" = cpu ] && AMP=off
part train_amp 75 "$OUT/train_amp.log" bash -c "
    set -ex
    $PY -m hsc_pyg.cli.synthetic --out $SYN/synthetic_precomp --img_dim 2048 --overwrite
    $PY train.py --data_path $SYN --data_name synthetic_precomp --device $DEV --amp $AMP --vocab_threshold 1 \
        --dry_run --no_progress
    $PY train.py --data_path $SYN --data_name synthetic_precomp --device $DEV --amp $AMP --vocab_threshold 1 \
        --batch_size 128 --max_iters 10 --val_step 100000 --no_progress --overwrite \
        --model_name /tmp/gpu_check_run/checkpoint --logger_name /tmp/gpu_check_run/log
    ls -la /tmp/gpu_check_run/checkpoint"

# ---- 4. the benchmark under bf16 autocast (no original-style baseline: that one is an fp32 comparison)
part bench_bf16 90 "$OUT/all.log" $PY benchmarks/run.py $QUICK --device $DEV --dtype bf16 --repeats 5 --train_steps 5 \
    --only scoring,encoding,training,rerank --out "$OUT/bench_bf16.json"

# ---- 5. COCO-5K-sized evaluation, full size (5,000 x 25,000 = 125M exact pairs), fp32, through the evaluation code
part coco5k_fp32 170 "$OUT/all.log" $PY benchmarks/coco5k_eval.py --scale $SCALE --device $DEV --amp off \
    --preset sgraf_saf --out "$OUT/coco5k.json"

# ---- 6. the test suite (it runs on the CPU; here it checks the GPU image's torch and PyG versions)
part pytest_cpu 150 "$OUT/pytest.log" $PY -m pytest -q -p no:cacheprovider

# ---- table
{
    echo
    echo "=== gpu_check: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(( $(date +%s) - START ))s"
    $PY - "$OUT" <<'EOF' 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as e:  # noqa: BLE001
        return {"_error": str(e)}
sys.path.insert(0, "benchmarks")
import run
for name in ("bench_fp32.json", "bench_bf16.json"):
    rep = load(name)
    if "_error" in rep:
        print(name, "missing:", rep["_error"]); continue
    print(f"--- {name}")
    print(run.table(rep))
cc = load("cuda_check.json")
if "results" in cc:
    bad = [r["check"] for r in cc["results"] if r["ok"] is False]
    print(f"--- cuda_check: {sum(r['ok'] is True for r in cc['results'])} passed, failed: {bad or 'none'}")
co = load("coco5k.json")
if "stages" in co:
    st = co["stages"]
    print(f"--- coco5k {co['images']}x{co['captions']} ({co['preset']}, {co['amp']}): total {co['wall_s']:.1f}s "
          f"(encode {st['encode']['wall_s']:.1f}s, score {st['score']['wall_s']:.1f}s = {st['score']['pairs_per_s']:,.0f} pairs/s), "
          f"peak host RSS {co['peak_rss_mb']:.0f} MB (anonymous {co['peak_anon_mb']:.0f} MB)")
else:
    print("coco5k:", co.get("_error"))
EOF
    grep -E "passed|failed" "$OUT/pytest.log" | tail -1
} >> "$SUMMARY" 2>&1
set +x
echo "=================== gpu_check summary ($OUT/summary.txt)"
cat "$SUMMARY"
exit 0
