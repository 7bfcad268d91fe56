#!/usr/bin/env bash
# The GPU measurement of docs/gpu.md: a GPT-2-small-shaped teacher
# (random, transformers) distilled into a memory-layer student on wgpu
# (Vulkan), and PyTorch training GPT-2 small on the same GPU.
#
# Run from the repository root on a machine with an NVIDIA GPU, PyTorch and
# transformers, after placing in .gpu/: the release binary of the example
# (`cargo build --release --no-default-features --features
# sqlite,ipc,any,cli,wgpu-tuned --example distill_gpt2`, stripped and
# xz-compressed as distill_gpt2.xz) and, where the machine has no Vulkan
# loader, the Debian packages libvulkan1 libglvnd0 libegl1 libgl1 libglx0
# libgles2 libopengl0 (`apt-get download ...`).
#
# Runs, each at batch 8 x 256 with its log in $OUT:
# - torch.log: PyTorch, plain training and distillation, f32 and bf16
#   autocast (TORCH_SHAPES, e.g. 8x256, limits the shapes);
# - distill.log: the student, STEPS steps (default 300); PROFILE=1 adds
#   --profile (the device synchronised at each phase of a step);
# - profile.log: PROFILE_STEPS=N adds a run of N steps with --profile, so
#   the main run's tokens/s are measured without the synchronisations;
# - f16.log: F16_STEPS=N adds a run with --precision f16 (f16 matrix
#   products, f32 master weights), against PyTorch's bf16 autocast;
# - exact.log and product.log: PRODUCT_STEPS=N adds two runs of N steps
#   whose every block is a featural memory layer: exact search at 4,092
#   rows per layer, then product keys at PRODUCT_CAPACITY rows per layer
#   (default 65,712: 12 heads x 74 x 74 cells).
# Timeouts (seconds): TORCH_TIMEOUT, DISTILL_TIMEOUT, PROFILE_TIMEOUT,
# F16_TIMEOUT, PRODUCT_TIMEOUT.
set -u
t0=$(date +%s)
for f in .gpu/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export __EGL_VENDOR_LIBRARY_FILENAMES=${__EGL_VENDOR_LIBRARY_FILENAMES:-/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json}
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpu/distill_gpt2.xz'), open('/tmp/distill_gpt2','wb'))" && chmod +x /tmp/distill_gpt2
python3 scripts/gpu/make_teacher.py /tmp/teacher 2>&1 | tail -1
PYTHONUNBUFFERED=1 timeout "${TORCH_TIMEOUT:-120}" python3 scripts/gpu/torch_bench.py 2>&1 | grep -v -i warn | tee "$OUT/torch.log"

# distill NAME TIMEOUT ARGS...: one student run, its log and report in $OUT.
distill() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" /tmp/distill_gpt2 --teacher /tmp/teacher --corpus assets/data/tinyshakespeare.txt \
    --device wgpu --batch 8 --seq 256 --run-dir "/tmp/gpu-$name" --checkpoint-every 100000 "$@" 2>&1 |
    while IFS= read -r l; do echo "+$(( $(date +%s) - t0 ))s $l"; done | tee "$OUT/$name.log"
  cp "/tmp/gpu-$name/report.md" "$OUT/$name-report.md" 2>/dev/null
}
distill distill "${DISTILL_TIMEOUT:-600}" --steps "${STEPS:-300}" --eval-windows 32 ${PROFILE:+--profile}
cp /tmp/gpu-distill/metrics.csv "$OUT/" 2>/dev/null
if [ -n "${PROFILE_STEPS:-}" ]; then
  distill profile "${PROFILE_TIMEOUT:-120}" --steps "$PROFILE_STEPS" --eval-windows 8 --profile
fi
if [ -n "${F16_STEPS:-}" ]; then
  distill f16 "${F16_TIMEOUT:-300}" --steps "$F16_STEPS" --eval-windows 8 --precision f16
fi
if [ -n "${PRODUCT_STEPS:-}" ]; then
  distill exact "${PRODUCT_TIMEOUT:-300}" --steps "$PRODUCT_STEPS" --eval-windows 8 \
    --layers 0-11:featural --capacity 4092
  distill product "${PRODUCT_TIMEOUT:-300}" --steps "$PRODUCT_STEPS" --eval-windows 8 \
    --layers 0-11:product --capacity "${PRODUCT_CAPACITY:-65712}"
fi
