#!/usr/bin/env bash
# Throughput on a GPU: both settings, float32 and bfloat16, batch 16 and the largest
# batch that fits, training step and inference; the figures go to gpu_benchmark/*.json.
#
#   pip install "jax[cuda12]==0.10.2" -r requirements.txt -e . && bash scripts/gpu_benchmark.sh
#
# Each figure is printed with its share of two peaks: the largest matrix product's
# GFLOP/s in the same dtype, measured first on this device (`python -m msrd_jax.benchmark
# peak`), and, if given, the datasheet's dense peak in TFLOP/s as PEAK_TFLOPS_F32 and
# PEAK_TFLOPS_BF16. GFLOP/s come from XLA's cost analysis of each compiled program.
#
# The environment can shrink the run (to try the script on a CPU first):
#   SETTINGS="resnet18 64 configs/synthetic.py" BATCHES="2 4" ITERS=1 MATMUL_SIZES=256 \
#     OUT=gpu_benchmark_cpu bash scripts/gpu_benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_benchmark}
iters=${ITERS:-5}
read -r -a batches <<<"${BATCHES:-16 32 64 128 256}"
if [[ -n "${SETTINGS:-}" ]]; then
  mapfile -t settings <<<"$SETTINGS"
else
  settings=(
    "resnet18 256 configs/synthetic.py"
    "wide_resnet50_2 256 configs/mvtec.py"
  )
fi
mkdir -p "$out"
python -m msrd_jax.benchmark peak --dtypes float32 --dtypes bfloat16 --iters "$iters" \
  --repeats 3 --matmul_sizes "${MATMUL_SIZES:-4096,8192,16384}" --json "$out/peak.json"

for setting in "${settings[@]}"; do
  read -r arch size config <<<"$setting"
  for dtype in float32 bfloat16; do
    # Batch 16, then doubling until the device runs out of memory: the last that ran is
    # the largest that fits.
    for batch in "${batches[@]}"; do
      tag="${arch}_${size}_${dtype}_b${batch}"
      common=(--config "$config" --config.model.backbone="$arch" --config.data.image_size="$size"
              --config.train.dtype="$dtype" --config.train.batch_size="$batch"
              --config.eval.batch_size="$batch" --iters "$iters" --repeats 3)
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
out = sys.argv[1]
datasheet = {'float32': float(os.environ.get('PEAK_TFLOPS_F32', 0)),
             'bfloat16': float(os.environ.get('PEAK_TFLOPS_BF16', 0))}
matmul = {}
for f in json.load(open(os.path.join(out, 'peak.json'))):
  matmul[f['backbone']] = max(matmul.get(f['backbone'], 0), f['gflops_per_second'] / 1e3)
print(f'largest matmul, TFLOP/s: {matmul}')
share = lambda tf, peak: f'{100 * tf / peak:.0f} %' if peak else '-'
print(f'{"what":<12} {"setting":<36} {"images/s":>10} {"ms/image":>9} {"TFLOP/s":>8} '
      f'{"of matmul":>9} {"of peak":>8}')
seen = set()
for path in sorted(glob.glob(os.path.join(out, '*.json'))):
  if os.path.basename(path) == 'peak.json':
    continue
  dtype = 'bfloat16' if 'bfloat16' in path else 'float32'
  for f in json.load(open(path)):
    tf = (f['gflops_per_second'] or 0) / 1e3
    setting = f"{f['backbone']} {f['image_size']}px {dtype} b{f['batch']}"
    if (f['what'], setting) in seen:  # every inference run also times batch 1
      continue
    seen.add((f['what'], setting))
    print(f"{f['what']:<12} {setting:<36} {f['images_per_second']:>10.1f} "
          f"{1e3 / f['images_per_second']:>9.2f} {tf:>8.2f} {share(tf, matmul[dtype]):>9} "
          f"{share(tf, datasheet[dtype]):>8}")
PY
