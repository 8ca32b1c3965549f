// kernels/lcas.cu compiled for the CPU under the SIMT emulator (cuda_emulation.h), with a C ABI
// mirroring cinemae_lcas_stats on host pointers. Used by test_lcas_emulated (CTest) and by
// tests/test_kernel.py, which builds it as a shared library and checks it against the numpy
// reference cinemae.runtime.lcas.
#include "cuda_emulation.h"

// clang-format off
#include "../../kernels/lcas.cu"
// clang-format on

extern "C" {

// threads: 0 for the kernel's own block size, or a smaller multiple of 32.
// force_two_pass: run the two-pass mode even where the single-pass working set fits.
// Returns 0, or 1 (cudaErrorInvalidValue) for arguments the launcher refuses.
int cinemae_lcas_stats_emulated(const float* image, const void* pred, int pred_is_fp16,
                                const unsigned char* visible, int B, int K, int H, int W, int P,
                                float lambda, int norm_pix, float* stats_out, float* map_out,
                                int threads, int force_two_pass) {
  cinemae_lcas::Plan plan;
  if (B < 0 || !cinemae_lcas::make_plan(B, K, H, W, P, threads, &plan)) return 1;
  if (B == 0) return 0;
  if (!stats_out || (K > 0 && (!image || !pred || !visible))) return 1;
  if (force_two_pass && plan.single_pass) {
    plan.single_pass = 0;
    plan.smem_bytes = static_cast<int>(
        cinemae_lcas::smem_bytes(K, (H / P) * (W / P), P, plan.threads / 32, 0));
  }
  const int np = norm_pix ? 1 : 0;
  const int sp = plan.single_pass;
  cinemae_emu::launch(B, plan.threads, static_cast<std::size_t>(plan.smem_bytes), [&] {
    if (pred_is_fp16) {
      lcas_stats_f16(image, pred, visible, K, H, W, P, lambda, np, sp, stats_out, map_out);
    } else {
      lcas_stats_f32(image, pred, visible, K, H, W, P, lambda, np, sp, stats_out, map_out);
    }
  });
  return 0;
}

// The launch plan of kernels/lcas.cu (for checking the Python mirror in kernels/loader.py):
// out = {threads, single_pass, smem_bytes}; returns 0, or 1 when the shape is refused.
int cinemae_lcas_plan_emulated(int B, int K, int H, int W, int P, int* out) {
  cinemae_lcas::Plan plan;
  if (!cinemae_lcas::make_plan(B, K, H, W, P, 0, &plan)) return 1;
  out[0] = plan.threads;
  out[1] = plan.single_pass;
  out[2] = plan.smem_bytes;
  return 0;
}

}  // extern "C"
