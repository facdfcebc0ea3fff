#!/usr/bin/env bash
# The engine's GPU figures in one prepared run (issue 8's targets and the decoder issue's 7B goal), for a lent
# device machine where nothing is installed: run from the repository root; the results (JSON + markdown
# fragments, named like the ones in benchmarks/results/) go to $OUT, or benchmarks/results without it.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (at most 9 minutes)
#   bash benchmarks/gpu_check.sh --tiny     # a CPU smoke run of the same plumbing (seconds)
#
# Each step has its own time limit, so a step that fails or runs long leaves the others' results.
# python benchmarks/make_report.py then puts the fragments into BENCHMARKS.md (copy them to benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
py="${PYTHON:-python}"  # the interpreter with torch (a venv here: PYTHON=.venv/bin/python)
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0

step() {  # step SECONDS ARGS...: one engine_shapes run under a time limit
  local limit=$1
  shift
  echo "== engine_shapes $*" >&2
  timeout "$limit" "$py" benchmarks/engine_shapes.py --output-dir "$out" "$@" || {
    echo "== failed or timed out ($?): $*" >&2
    status=1
  }
}

if [[ "${1:-}" == "--tiny" ]]; then
  step 300 --device cpu --tiny --suffix _check_tiny
  step 300 --device cpu --shape tiny-llama --sequences 8 --length 32 --batch-size 4 --repeats 1 --reference 0 \
    --suffix _check_tiny_llama
  exit $status
fi

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# An earlier engine to measure as 'before' in the same run (the same card, interleaved): a source tree at
# $GPU_BASELINE (e.g. mkdir .gpu_before && git archive REV hf_ispasp | tar -x -C .gpu_before), described by
# $GPU_BASELINE_LABEL.
before=()
if [[ -n "${GPU_BASELINE:-}" ]]; then
  before=(--baseline-path "$GPU_BASELINE" --baseline-label "${GPU_BASELINE_LABEL:-$GPU_BASELINE}")
fi
# The file names are the ones make_report reads (engine_shapes_gpu, _gpu_large, _gpu_llama7b). Under 9 minutes in
# all, so one device call of at most 10 minutes holds every step. BERT-base with the CPU float64 reference of the
# selection ('same as CPU'); BERT-large without (its CPU reference alone would take minutes).
step 170 --device cuda --shape bert-base --dtype float32 bfloat16 --repeats 2 "${before[@]}" \
  --title "BERT-base shape on one GPU (issue 8: <= 3x fp32, <= 10x bf16)"
step 150 --device cuda --shape bert-large --dtype float32 bfloat16 --repeats 2 --reference 0 --suffix _large \
  --title "BERT-large shape on one GPU (issue 8: <= 3x fp32, <= 10x bf16)"
# the decoder issue's goal: a LLaMA-7B shape in bfloat16, 128 x 2048 calibration tokens, under 2 minutes
step 220 --device cuda --shape llama-7b --dtype bfloat16 --sequences 128 --length 2048 --batch-size 4 \
  --repeats 1 --reference 0 --title "LLaMA-7B shape in bfloat16 on one GPU (128 x 2048 calibration tokens)" \
  --suffix _llama7b
exit $status
