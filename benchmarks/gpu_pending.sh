#!/usr/bin/env bash
# Every GPU measurement issues 12 and 13 still wait for, in one go (about 15 minutes on an H100).
#
#   OUT=gpu-results bash benchmarks/gpu_pending.sh
#
# Writes one log and one JSON file per measurement into $OUT (default gpu-results); BENCHMARKS.md's
# "Pending on a GPU" section lists the targets each one is checked against. Runs from a source checkout
# (PYTHONPATH=src), as on the device machine, where the package is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH=src
VARIANTS=mha,mla,moe-mla-rope,moe-mla-drope

run() {  # name, command...: keep going when one fails, so one call measures everything it can
    local name=$1
    shift
    echo "== $name: $*"
    "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? ($(tail -n 1 "$OUT/$name.log" | cut -c1-120))"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >>"$OUT/gpu.txt" 2>&1

# issue 13: decode, eager against CUDA graphs in the same process order, then long contexts and a budget
run decode-eager python3 -m moemla bench --device cuda --dtype bfloat16 --variants $VARIANTS --batch 1,16 \
    --context 512 --json
run decode-graph python3 -m moemla bench --device cuda --dtype bfloat16 --variants $VARIANTS --batch 1,16 \
    --context 512 --cuda-graph --json
run decode-compiled-graph python3 -m moemla bench --device cuda --dtype bfloat16 --variants $VARIANTS --batch 1,16 \
    --context 512 --compile --cuda-graph --json
run decode-2048-graph python3 -m moemla bench --device cuda --dtype bfloat16 --variants $VARIANTS --batch 16 \
    --context 2048 --max-seq-len 2048 --cuda-graph --json
run decode-2048-compiled-graph python3 -m moemla bench --device cuda --dtype bfloat16 --variants $VARIANTS \
    --batch 16 --context 2048 --max-seq-len 2048 --compile --cuda-graph --json
run memory-4096 python3 -m moemla bench --device cuda --dtype bfloat16 --variants $VARIANTS --memory 8 \
    --context 4096 --max-seq-len 4096 --new-tokens 32 --cuda-graph --json
run cuda-tests python3 -m pytest -q tests/test_decoder.py tests/test_train.py -k "cuda" -p no:cacheprovider

# issue 12: training throughput, MFU, the HF anchors and the loop's own rate
run train-throughput python3 benchmarks/train_throughput.py --device cuda --dtype bf16 --compile --hf --loop \
    --cases xs:50257,m:50257 --batch 64 --seq 512

echo "logs in $OUT"
