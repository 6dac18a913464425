#!/usr/bin/env bash
# Every GPU check in one script (issue 13.5), meant to finish in under 8 minutes on one GPU:
#   1. the test suite with CUDA present (the gpu-marked tests run instead of skipping);
#   2. bf16 training of CALM-M and the same-backbone baseline, eager and torch.compile:
#      tokens/s and MFU; generation tokens/s at batch 1 and 32 (benchmarks/gpu_bench.py);
#   3. NCCL data parallelism (DDP, then FSDP) with torchrun on the GPUs present (2 or more);
#   4. the CUDA generation benchmarks of benchmarks/bench_models.py.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (results land in OUT_DIR, default gpu-check/)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
mkdir -p "$out"
export OMP_NUM_THREADS=4 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
status=0

echo "== 1. tests with CUDA (gpu-marked tests run)"
timeout 240 python -m pytest -q -p no:cacheprovider tests/likelihood_free tests/calm_models \
    2>&1 | tail -15 | tee "$out/tests.txt" || status=1

echo "== 2. CALM-M and baseline speed (bf16, eager and compiled)"
timeout 240 python benchmarks/gpu_bench.py --device cuda --json "$out/gpu_bench.json" \
    2>&1 | tail -12 | tee "$out/gpu_bench.txt" || status=1

echo "== 3. NCCL data parallelism on $ngpu GPU(s)"
if [ "$ngpu" -ge 2 ]; then
    for strategy in ddp fsdp; do
        timeout 120 torchrun --standalone --nproc_per_node="$ngpu" -m calm_models.train ar \
            --preset tiny run.steps=20 run.eval_every=0 run.strategy=$strategy \
            run.out_dir="$out/$strategy" --overwrite data.max_train_bytes=500000 \
            data.max_valid_bytes=50000 2>&1 | tail -3 | tee "$out/$strategy.txt" || status=1
    done
else
    echo "one GPU: NCCL data parallelism needs two or more (skipped)" | tee "$out/ddp.txt"
fi

echo "== 4. generation benchmarks on CUDA"
timeout 120 python -m pytest -q -p no:cacheprovider benchmarks/bench_models.py -k "generation" \
    --benchmark-json="$out/bench_models.json" 2>&1 | tail -5 | tee "$out/bench_models.txt" || status=1
exit $status
