#!/usr/bin/env bash
# Every GPU measurement issues 12 and 13 still wait for, by name, so each device call (at most 600 s) runs a few.
#
#   OUT=gpu-results bash benchmarks/gpu_pending.sh                  # all of them, in the order below
#   OUT=gpu-results bash benchmarks/gpu_pending.sh decode-eager decode-graph cuda-tests
#   bash benchmarks/gpu_pending.sh --list
#
# Suggested device calls, each well under 600 s on an H100 (compiling a step takes tens of seconds per bucket):
#   1. decode-eager decode-graph cuda-tests      2. decode-compiled-graph
#   3. decode-2048-graph decode-2048-compiled-graph memory-4096      4. train-throughput moe-layer
#   5. train-overhead reproduce-plan
# Writes one log per measurement into $OUT (default gpu-results), the JSON rows at its end; BENCHMARKS.md's
# "Pending on a GPU" section lists the targets each one is checked against. Each measurement stops after
# $LIMIT seconds (default 500), so one that hangs cannot use up the call. Runs from a source checkout
# (PYTHONPATH=src), as on the device machine, where the package is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
LIMIT="${LIMIT:-500}"
export PYTHONPATH=src
V=mha,mla,moe-mla-rope,moe-mla-drope
BENCH="python3 -m moemla bench --device cuda --dtype bfloat16 --variants $V --json"

declare -A CMD=(
    # issue 13: decode, eager and CUDA graphs (plain and compiled) at context 512, then long contexts and a budget
    [decode-eager]="$BENCH --batch 1,16 --context 512"
    [decode-graph]="$BENCH --batch 1,16 --context 512 --cuda-graph"
    [decode-compiled-graph]="$BENCH --batch 1,16 --context 512 --compile --cuda-graph"
    [decode-2048-graph]="$BENCH --batch 16 --context 2048 --max-seq-len 2048 --cuda-graph"
    [decode-2048-compiled-graph]="$BENCH --batch 16 --context 2048 --max-seq-len 2048 --compile --cuda-graph"
    [memory-4096]="$BENCH --memory 8 --context 4096 --max-seq-len 4096 --new-tokens 32 --cuda-graph"
    [cuda-tests]="python3 -m pytest -q -p no:cacheprovider tests/test_decoder.py tests/test_train.py -k cuda"
    # issue 12: training throughput, MFU, the HF anchors and the loop's own rate; the MoE layer against the same
    # FLOPs dense and against torchtitan's / Megatron-LM's scatter combine, with a profile of where its time goes
    [moe-layer]="python3 benchmarks/moe_layer.py --device cuda --dtype bf16 --compile --batch 64 --repeats 9 \
--candidates grouped,scatter,dense --profile"
    [train-throughput]="python3 benchmarks/train_throughput.py --device cuda --dtype bf16 --compile --hf --loop \
--cases xs:50257,m:50257 --batch 64 --seq 512"
    # issue 23, §7 question 1: the training-time overhead of every variant over MHA, side by side (EXPERIMENTS.md)
    [train-overhead]="python3 benchmarks/train_throughput.py --device cuda --dtype bf16 --compile --cases xs:50257 \
--batch 64 --seq 512 --variants mha,mla,mla-rope,moe-mha,moe-mla,moe-mla-rope,mha-rope,moe-mha-rope,mla-drope,moe-mla-drope"
    # issue 23: a whole Table 2 at xs, one seed, in one process: must take under 9 minutes (prints the plan first)
    [reproduce-plan]="python3 -m moemla reproduce table2 --preset xs --device cuda --batch-size 64 --seq-len 512 \
--tokens 20000000 --plan"
    # issue 43: vLLM loads the native DeepSeek-V3 export and writes moemla's greedy tokens (skips without vllm)
    [vllm-greedy]="python3 benchmarks/vllm_greedy.py --device cuda --preset tiny --new 32"
)
ORDER=(decode-eager decode-graph cuda-tests decode-compiled-graph decode-2048-graph decode-2048-compiled-graph
    memory-4096 train-throughput moe-layer train-overhead reproduce-plan vllm-greedy)

if [[ "${1:-}" == "--list" ]]; then
    for name in "${ORDER[@]}"; do echo "$name: ${CMD[$name]}"; done
    exit 0
fi
names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
    [[ -n "${CMD[$name]:-}" ]] || { echo "unknown measurement '$name'; see --list" >&2; exit 2; }
done

mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >>"$OUT/gpu.txt" 2>&1
for name in "${names[@]}"; do  # keep going when one fails, so one call measures everything it can
    echo "== $name: ${CMD[$name]}"
    start=$SECONDS
    timeout "$LIMIT" ${CMD[$name]} >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s ($(tail -n 1 "$OUT/$name.log" | cut -c1-120))"
done
echo "logs in $OUT"
