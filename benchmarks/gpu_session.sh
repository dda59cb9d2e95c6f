#!/usr/bin/env bash
# The GPU measurements, in phases that each fit one 10-minute command on a rented GPU machine.
#
#   bash benchmarks/gpu_session.sh checks     # cuda_checks.py: every CUDA path against its CPU reference
#   bash benchmarks/gpu_session.sh gpt        # GPT-2 small, compiled: loss path x attention kernel
#   bash benchmarks/gpu_session.sh gpt-eager  # the same, eager, at two micro-batches
#   bash benchmarks/gpu_session.sh sft        # eager, 58% of the targets ignored: the fused head over kept ones
#   bash benchmarks/gpu_session.sh w2v        # word2vec: triton and torch engines, speed and quality
#   bash benchmarks/gpu_session.sh ppo        # PPO at the gpu preset's shapes: rollouts, then the LM head's paths
#
# Each phase writes its log (and the word2vec JSON) to $OUT, or to ./gpu-out when OUT is unset.
#
# What the machine may lack, carried in benchmarks/data/ (ignored by git):
#   wheels/    Python packages that lmpipe imports and the machine's image lacks (on the H100 image of 2026-11:
#              duckdb and zstandard; numba, torch and triton are there), for its Python (3.12), made here with
#                pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#                    -d benchmarks/data/wheels duckdb==2.0.0 zstandard==0.25.0
#              (about 30 MB); installed into /tmp/pydeps on first use
#   corpus_en_large.train.txt.xz, eval/  the w2v phase's corpus (xz -6: 26 MB) and gensim's evaluation files
# Together with the repository these stay under the 64 MiB that one command may carry.
set -uo pipefail

phase=${1:?usage: bash benchmarks/gpu_session.sh checks|gpt|gpt-eager|sft|w2v|ppo}
out=${OUT:-gpu-out}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
data=$here/benchmarks/data
py=${PYTHON:-python3}

if ! "$py" -c "import duckdb, zstandard, numba" 2>/dev/null; then
  if [ ! -d /tmp/pydeps ] && compgen -G "$data/wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pydeps "$data"/wheels/*.whl || exit 2
  fi
  [ -d /tmp/pydeps ] && export PYTHONPATH=/tmp/pydeps${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}
cd "$here" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/$phase.log"

case $phase in
  checks)
    "$py" benchmarks/cuda_checks.py ;;
  gpt)  # about 4 x (1 min of compilation + 10 s timed)
    "$py" benchmarks/gpt_gpu_bench.py --variants compiled --batch 32 --rounds 5 --coordinate-descent \
      --loss-chunk 0,8192 --sdpa default,cudnn ;;
  gpt-eager)
    "$py" benchmarks/gpt_gpu_bench.py --variants eager --batch 16,32 --rounds 5 --loss-chunk 0,4096,8192 \
      --sdpa default,cudnn,flash ;;
  sft)  # the fused head over the response tokens only, as the sft stage trains it (eager)
    "$py" benchmarks/gpt_gpu_bench.py --variants eager --batch 16 --rounds 3 --ignored 0.58 \
      --loss-chunk 0,8192,8192s ;;
  w2v)
    corpus=$data/corpus_en_large.train.txt
    if [ ! -f "$corpus" ] && [ -f "$corpus.xz" ]; then xz -dk "$corpus.xz"; fi
    [ -f "$corpus" ] || { echo "gpu_session: $corpus(.xz) is missing" >&2; exit 2; }
    "$py" benchmarks/word2vec_gpu_bench.py "$corpus" --eval-dir "$data/eval" --epochs 5 --engines triton torch \
      --streams 2048 4096 16384 --json "$out/word2vec_gpu_bench.json" ;;
  ppo)  # rollout sampling (eager vs CUDA graph), then full logits vs the fused head: time and peak memory
    "$py" benchmarks/ppo_rollout_bench.py cuda && \
      "$py" benchmarks/ppo_head_bench.py --shape gpt2 --device cuda --chunks 0,1024,4096 --rounds 2 ;;
  *)
    echo "gpu_session: unknown phase $phase (checks, gpt, gpt-eager, sft, w2v, ppo)" >&2; exit 2 ;;
esac 2>&1 | tee -a "$out/$phase.log"
exit "${PIPESTATUS[0]}"
