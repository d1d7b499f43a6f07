#!/usr/bin/env bash
# The explorer's latency and the FAISS first stage at 1,000,000 vectors, measured in a quiet window (issue 32): about
# 4-5 minutes on the 2-vCPU AMD EPYC when nothing else runs, at most 7 (each part has a time limit; a failed or cut
# part never stops the others, and a cut FAISS run keeps the kinds it measured). From the repository root:
#
#     bash benchmarks/serve_quiet.sh
#
# Writes into benchmarks/results/ (each JSON records the load average before and after its run; the log says what ran):
#   serve_load_1client.json   1 client x 100 text searches through the API (Flickr8k-mini test gallery, 200 photos,
#                             k = 10, a 50-shortlist scored exactly), server --parallel 2, OMP_NUM_THREADS=1
#   serve_load.json           8 clients x 200 searches, the same server
#   faiss_first_stage.json    1,000,000 synthetic vectors around 10,000 random centres (spread 1), 200 queries of the
#                             same kind: brute force (20 queries), ivf and ivf_sq8 with 4,096 lists at nprobe 64 / 128
#                             / 256
#   faiss_first_stage_around_real.json   1,000,000 vectors around the 8,000 real Flickr8k image vectors of the model
#                             (spread 0.5, the real vectors' covariance), 200 real test captions as queries: the same
# The indexes are read from FAISS_INDEXES, where the loaded runs of issue 32 kept them (building the four takes ~30
# minutes on a busy machine; a missing one is built and its part then runs out of time), so the build times stay those
# of benchmarks/results/faiss_first_stage_*_loaded.json; query latency and recall are what this script measures.
# Settings (environment): SERVE_MODEL (a Flickr8k-mini model; default the 3-epoch flickr8k_mini_itc model of issue 32),
# FAISS_MODEL (a Flickr8k model for around_real), F8K_DATA (the folder holding flickr8k_precomp), HSC_PYG_CACHE (where
# that model's gallery caches are; they take ~10 minutes to build when missing, so around_real is skipped then),
# FAISS_INDEXES (default /tmp/explorer2/faiss_indexes), PYTHON (default: the project's venv).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/work/main/.venv/bin/python}
SERVE_MODEL=${SERVE_MODEL:-/tmp/explorer2/mini_itc/checkpoint/model_best.pth}
FAISS_MODEL=${FAISS_MODEL:-/tmp/explorer2/f8k_hsc_best.pth}
F8K_DATA=${F8K_DATA:-/work/f8k_data}
export HSC_PYG_CACHE=${HSC_PYG_CACHE:-/tmp/explorer2/hsc_cache}
FAISS_INDEXES=${FAISS_INDEXES:-/tmp/explorer2/faiss_indexes}
export OMP_NUM_THREADS=1
RESULTS=benchmarks/results
LOG=$RESULTS/serve_quiet.log
: > "$LOG"

part() {   # part NAME SECONDS COMMAND...: run with a time limit, log its status, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    echo "   $name: exit $?" | tee -a "$LOG"
}

if [ ! -f "$SERVE_MODEL" ]; then
    echo "SERVE_MODEL=$SERVE_MODEL is not a file; pass a Flickr8k-mini checkpoint: SERVE_MODEL=M.pth bash $0" >&2
    exit 2
fi
part serve_1client 90 "$PYTHON" benchmarks/serve_load.py --model "$SERVE_MODEL" --clients 1 --queries 100 \
    --out $RESULTS/serve_load_1client.json
part serve_8clients 100 "$PYTHON" benchmarks/serve_load.py --model "$SERVE_MODEL" --clients 8 --queries 200 \
    --out $RESULTS/serve_load.json
FAISS=(--kinds brute,ivf,ivf_sq8 --nlist 4096 --nprobe 64,128,256 --queries 200 --brute_queries 20 --build_threads 2
       --index_dir "$FAISS_INDEXES")
part faiss_clusters 110 env OMP_NUM_THREADS=2 "$PYTHON" benchmarks/faiss_first_stage.py --gallery clusters "${FAISS[@]}" \
    --out $RESULTS/faiss_first_stage.json
if [ -f "$FAISS_MODEL" ] && [ -d "$HSC_PYG_CACHE/galleries" ]; then
    part faiss_around_real 110 env OMP_NUM_THREADS=2 "$PYTHON" benchmarks/faiss_first_stage.py --gallery around_real --model "$FAISS_MODEL" \
        --data_path "$F8K_DATA" --data_name flickr8k_precomp --splits train,dev,test --query_split test \
        --spread 0.5 "${FAISS[@]}" --out $RESULTS/faiss_first_stage_around_real.json
else
    echo "== faiss_around_real skipped: FAISS_MODEL=$FAISS_MODEL or its gallery caches in $HSC_PYG_CACHE are missing" \
        | tee -a "$LOG"
fi
"$PYTHON" - <<'EOF' | tee -a "$LOG"
import json, pathlib
for name in ("serve_load_1client", "serve_load", "faiss_first_stage", "faiss_first_stage_around_real"):
    path = pathlib.Path("benchmarks/results") / f"{name}.json"
    if not path.is_file():
        continue
    r = json.loads(path.read_text())
    print(name, r["environment"]["date"], "load before", [round(x, 2) for x in r.get("load_average_1_5_15_before",
          r["environment"]["load_average_1_5_15"])])
    if "latency_ms" in r:
        print("  ", {k: round(v, 1) for k, v in r["latency_ms"].items()}, "failed", r["failed"],
              "req/s", round(r["requests_per_s"], 1), "server CPU ms/req", r.get("server_cpu_ms_per_request"))
    for kind, v in r.get("kinds", {}).items():
        print(f"   {kind:30s} median {v['query_ms']['median']:8.2f} ms  p99 {v['query_ms']['p99']:8.2f} ms  "
              f"recall@50 {v['recall_at_shortlist']:.3f}  build {'-' if v['build_s'] is None else format(v['build_s'], '.0f')} s")
EOF
