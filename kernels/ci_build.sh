#!/usr/bin/env bash
# Native build of the fused LCAS kernel for CI (called by .ci/run; safe to run by hand).
#   nvcc found: configure and build CMakeLists.txt (libcinemae_lcas for sm_75/80/86/89/90 + PTX,
#               test_lcas_native, test_lcas_emulated) in build/kernels and run ctest; without a
#               GPU test_lcas_native reports "Skipped" (exit 77), the CPU emulator test runs.
#   no nvcc:    says so and exits 0 (tests/test_kernel.py still runs the emulator and NVRTC checks).
# Env: CUDACXX (nvcc to use), BUILD_DIR (default build/kernels), JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

nvcc="${CUDACXX:-}"
if [ -z "$nvcc" ]; then
  nvcc="$(command -v nvcc || true)"
fi
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
if [ -z "$nvcc" ]; then
  echo "kernels/ci_build.sh: nvcc not found, skipping the native CUDA build (not an error)"
  exit 0
fi
if ! command -v cmake >/dev/null 2>&1; then
  echo "kernels/ci_build.sh: cmake not found, skipping the native CUDA build (not an error)"
  exit 0
fi

build="${BUILD_DIR:-build/kernels}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
echo "kernels/ci_build.sh: $("$nvcc" --version | tail -n 1), $(cmake --version | head -n 1)"

cmake -S . -B "$build" -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_BUILD_TYPE=Release
t_build=$(date +%s)
cmake --build "$build" -j "$jobs"
t_test=$(date +%s)
ctest --test-dir "$build" --output-on-failure
end=$(date +%s)
echo "kernels/ci_build.sh: configure $((t_build - start)) s, build $((t_test - t_build)) s," \
  "ctest $((end - t_test)) s, total $((end - start)) s"
