#!/usr/bin/env bash
# The GPU measurement of docs/gpu.md: a GPT-2-small-shaped teacher
# (random, transformers) distilled into a memory-layer student on wgpu
# (Vulkan), and PyTorch training GPT-2 small on the same GPU.
#
# Run from the repository root on a machine with an NVIDIA GPU, PyTorch and
# transformers, after placing in .gpu/: the release binary of the example
# (`cargo build --release --example distill_gpt2`, stripped and xz-compressed
# as distill_gpt2.xz) and, where the machine has no Vulkan loader, the Debian
# packages libvulkan1 libglvnd0 libegl1 libgl1 libglx0 libgles2 libopengl0
# (`apt-get download ...`).
# PROFILE=1 adds --profile (the device synchronised at each phase of a step;
# the phase table in the log and the report). PROFILE_STEPS=N adds, after the
# main run, a second run of N steps with --profile (log: profile.log), so the
# main run's tokens/s are measured without the synchronisations.
# F16_STEPS=N adds a run of N steps with --precision f16 (f16 matrix products,
# f32 master weights; log: f16.log), against PyTorch's bf16 autocast.
# TORCH_SHAPES (e.g. 8x256) limits PyTorch's shapes; timeouts: TORCH_TIMEOUT,
# DISTILL_TIMEOUT, PROFILE_TIMEOUT, F16_TIMEOUT (seconds).
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
timeout "${DISTILL_TIMEOUT:-600}" /tmp/distill_gpt2 --teacher /tmp/teacher --corpus assets/data/tinyshakespeare.txt \
  --device wgpu --steps "${STEPS:-300}" --batch 8 --seq 256 --run-dir /tmp/gpu-run --checkpoint-every 100000 \
  --eval-windows 32 ${PROFILE:+--profile} 2>&1 | while IFS= read -r l; do echo "+$(( $(date +%s) - t0 ))s $l"; done | tee "$OUT/distill.log"
cp /tmp/gpu-run/report.md /tmp/gpu-run/metrics.csv "$OUT/" 2>/dev/null
if [ -n "${PROFILE_STEPS:-}" ]; then
  timeout "${PROFILE_TIMEOUT:-120}" /tmp/distill_gpt2 --teacher /tmp/teacher --corpus assets/data/tinyshakespeare.txt \
    --device wgpu --steps "$PROFILE_STEPS" --batch 8 --seq 256 --run-dir /tmp/gpu-profile --checkpoint-every 100000 \
    --eval-windows 8 --profile 2>&1 | while IFS= read -r l; do echo "+$(( $(date +%s) - t0 ))s $l"; done | tee "$OUT/profile.log"
  cp /tmp/gpu-profile/report.md "$OUT/profile-report.md" 2>/dev/null
fi
if [ -n "${F16_STEPS:-}" ]; then
  timeout "${F16_TIMEOUT:-300}" /tmp/distill_gpt2 --teacher /tmp/teacher --corpus assets/data/tinyshakespeare.txt \
    --device wgpu --steps "$F16_STEPS" --batch 8 --seq 256 --run-dir /tmp/gpu-f16 --checkpoint-every 100000 \
    --eval-windows 8 --precision f16 2>&1 | while IFS= read -r l; do echo "+$(( $(date +%s) - t0 ))s $l"; done | tee "$OUT/f16.log"
  cp /tmp/gpu-f16/report.md "$OUT/f16-report.md" 2>/dev/null
fi
