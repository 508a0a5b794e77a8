#!/usr/bin/env bash
# Throughput on a GPU: both settings, float32 and bfloat16, batch 16 and the largest
# batch that fits, training step and inference; the figures go to gpu_benchmark/*.json.
#
#   pip install "jax[cuda12]==0.10.2" -r requirements.txt -e . && bash scripts/gpu_benchmark.sh
#
# The fraction of the device's peak is GFLOP/s (from XLA's cost analysis, printed with
# each figure) divided by the peak of the dtype: pass it as PEAK_TFLOPS_F32 and
# PEAK_TFLOPS_BF16 (dense, without sparsity) to have it printed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu_benchmark
mkdir -p "$out"
python - <<'PY'
import jax
print('devices:', jax.devices())
PY

settings=(
  "resnet18 256 configs/synthetic.py"
  "wide_resnet50_2 256 configs/mvtec.py"
)
for setting in "${settings[@]}"; do
  read -r arch size config <<<"$setting"
  for dtype in float32 bfloat16; do
    # Batch 16, then doubling until the device runs out of memory: the last that ran is
    # the largest that fits.
    for batch in 16 32 64 128 256; do
      tag="${arch}_${size}_${dtype}_b${batch}"
      common=(--config "$config" --config.model.backbone="$arch" --config.data.image_size="$size"
              --config.train.dtype="$dtype" --config.train.batch_size="$batch"
              --config.eval.batch_size="$batch" --iters 5 --repeats 3)
      if ! python -m msrd_jax.benchmark train "${common[@]}" --json "$out/train_$tag.json" \
          || ! python -m msrd_jax.benchmark infer "${common[@]}" --json "$out/infer_$tag.json"; then
        echo "$tag: did not fit (or failed); the previous batch is the largest"
        break
      fi
    done
  done
done

python - "$out" <<'PY'
import glob, json, os, sys
peak = {'float32': float(os.environ.get('PEAK_TFLOPS_F32', 0)),
        'bfloat16': float(os.environ.get('PEAK_TFLOPS_BF16', 0))}
print(f'{"what":<12} {"setting":<36} {"images/s":>10} {"ms/image":>9} {"TFLOP/s":>8} {"of peak":>8}')
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.json'))):
  dtype = 'bfloat16' if 'bfloat16' in path else 'float32'
  for f in json.load(open(path)):
    tf = (f['gflops_per_second'] or 0) / 1e3
    share = f'{100 * tf / peak[dtype]:.0f} %' if peak[dtype] else '-'
    setting = f"{f['backbone']} {f['image_size']}px {dtype} b{f['batch']}"
    print(f"{f['what']:<12} {setting:<36} {f['images_per_second']:>10.1f} "
          f"{1e3 / f['images_per_second']:>9.2f} {tf:>8.1f} {share:>8}")
PY
