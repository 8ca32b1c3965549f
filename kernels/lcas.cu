// cinemae: the fused LCAS-statistics kernel (DESIGN.md section 1 "LCAS", "Summary statistics";
// section 2 "LCAS statistics"). It computes exactly what cinemae.runtime.lcas.lcas_map /
// lcas_stats compute, reading the decoder output where it lies, on the caller's stream.
//
// This one file is compiled three ways:
//   * by nvcc into the shared library cinemae_lcas (CMakeLists.txt), host launcher included;
//   * by NVRTC from cinemae.kernels.loader (__CUDACC_RTC__ defined): device code only;
//   * by a host C++ compiler under a small SIMT emulator (CINEMAE_LCAS_EMULATE defined,
//     tests/native/cuda_emulation.h) so that CPU-only CI executes this exact kernel code.
//
// Design: one thread block per image, all K runs inside it, so no workspace, no atomics and one
// launch. Warps take patches round robin; a warp holds one target patch in registers (element
// d = lane + 32*j, so pred rows are read fully coalesced) and
//   1. standardises it per patch when norm_pix (two-pass, unbiased variance, + 1e-6),
//   2. if the patch is visible in any run: per-channel mean and M2 of the patch (two-pass) are
//      merged (Chan et al.) into per-warp, per-run context accumulators,
//   3. for every run where it is masked: per-channel residual sums R_c = sum_d (t - pred)^2.
// After a block barrier the context variances sigma2_k,c = M2/n + 1e-2 are final and
//   LCAS = 0.5 * (sum_c R_c / sigma2_c) / D + 0.5 * mean_c log sigma2_c + lambda * sum_c R_c / D
// (the same as 0.5 * mean_d(r^2/sigma2 + log sigma2) + lambda * mean_d r^2, D = P*P*3).
// LCAS values are merged (Welford / Chan, fp64: a few hundred updates per image) into per-warp,
// per-run (n, mean, M2), then per run, then per image: s1 = sqrt(M2/N), s2 = mean,
// s3 = population std of the run means.
// Single-pass mode keeps R for all (k, i) in shared memory (12*K*L bytes) and reads each image
// element once; when that does not fit, two-pass mode re-reads the target patches instead.
// A table in shared memory maps patch element d to its image offset (no divisions per element).
// Every reduction has a fixed order, so results are deterministic. Degenerate masks the numpy
// reference turns into NaN stay finite here: a run with no visible patch uses sigma2 = 1e-2, a
// run with no masked patch is left out of s3.

#if !defined(__CUDACC_RTC__) && !defined(CINEMAE_LCAS_EMULATE)
#define CINEMAE_LCAS_HOST_LAUNCHER 1
#include <cuda_runtime.h>

#include "lcas.h"
#endif

#ifndef LCAS_DECLARE_SMEM
#define LCAS_DECLARE_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#define LCAS_FULL_MASK 0xffffffffu

namespace cinemae_lcas {

constexpr float kSigma2Floor = 1e-2f;  // runtime/lcas.py SIGMA2_FLOOR
constexpr float kNormPixEps = 1e-6f;   // runtime/lcas.py NORM_PIX_EPS

// ---------------------------------------------------------------------------------------------
// device helpers

__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
#if defined(CINEMAE_LCAS_EMULATE)
  return cinemae_emu_half_to_float(h);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

__device__ __forceinline__ float load_elem(const float* __restrict__ p, int d) { return p[d]; }

__device__ __forceinline__ float load_elem(const unsigned short* __restrict__ p, int d) {
  return half_bits_to_float(p[d]);
}

// Sum over the warp; every lane gets the same bits (each butterfly step adds a commutative
// pair, so partners compute identical values).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LCAS_FULL_MASK, v, o);
  return v;
}

// Lane-local register element j holds d = lane + 32*j, whose channel is d % 3 =
// (lane % 3 + 2*(j % 3)) % 3. Per lane, sums are kept by "phase" j % 3; this maps the three
// phase values to channel order. For each c0 = lane % 3 the map is a transposition, so the
// same call maps channel order back to phase order.
__device__ __forceinline__ void phase_channel_swap(int c0, float& a0, float& a1, float& a2) {
  const float x0 = a0, x1 = a1, x2 = a2;
  if (c0 == 0) {
    a1 = x2;
    a2 = x1;
  } else if (c0 == 1) {
    a0 = x1;
    a1 = x0;
  } else {
    a0 = x2;
    a2 = x0;
  }
}

// Chan et al. merge of (nb, mb, m2b) into (na, ma, m2a): fp32 for the context statistics,
// fp64 for the LCAS values' (few) accumulators, so that s3, a small difference of run means, keeps
// its relative accuracy.
template <typename F>
__device__ __forceinline__ void chan_merge(F& na, F& ma, F& m2a, F nb, F mb, F m2b) {
  if (nb <= F(0)) return;
  if (na <= F(0)) {
    na = nb;
    ma = mb;
    m2a = m2b;
    return;
  }
  const F n = na + nb;
  const F delta = mb - ma;
  const F f = nb / n;
  ma += delta * f;
  m2a += m2b + delta * delta * na * f;
  na = n;
}

// Target patch i of one image into registers: t[j] = target element d = lane + 32*j (0 past D),
// standardised per patch when norm_pix (MAE: unbiased variance + 1e-6).
// offs[d] is the offset of patch element d from the patch's top-left pixel in channel 0.
template <int MAXJ>
__device__ __forceinline__ void load_target(const float* __restrict__ img_b,
                                            const int* __restrict__ offs, int W, int P, int gw,
                                            int i, int D, int lane, int norm_pix,
                                            float (&t)[MAXJ]) {
  const int gy = i / gw;
  const int gx = i - gy * gw;
  const float* __restrict__ base = img_b + (long long)gy * P * W + (long long)gx * P;
#pragma unroll
  for (int j = 0; j < MAXJ; ++j) {
    const int d = lane + 32 * j;
    t[j] = d < D ? base[offs[d]] : 0.f;
  }
  if (norm_pix) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) s += t[j];  // zero past D
    const float mean = warp_sum(s) / (float)D;
    float q = 0.f;
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) {
      if (lane + 32 * j < D) {
        const float e = t[j] - mean;
        q += e * e;
      }
    }
    const float var = warp_sum(q) / (float)(D - 1);
    const float inv = 1.f / sqrtf(var + kNormPixEps);
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) {
      if (lane + 32 * j < D) t[j] = (t[j] - mean) * inv;
    }
  }
}

// Per-channel mean and M2 of the patch in registers (two-pass); every lane gets the results.
template <int MAXJ>
__device__ __forceinline__ void patch_channel_stats(const float (&t)[MAXJ], int D, int lane,
                                                    int c0, float npp, float (&m)[3],
                                                    float (&m2)[3]) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f;
#pragma unroll
  for (int j = 0; j < MAXJ; ++j) {
    if (lane + 32 * j < D) {
      if (j % 3 == 0) {
        a0 += t[j];
      } else if (j % 3 == 1) {
        a1 += t[j];
      } else {
        a2 += t[j];
      }
    }
  }
  phase_channel_swap(c0, a0, a1, a2);
  m[0] = warp_sum(a0) / npp;
  m[1] = warp_sum(a1) / npp;
  m[2] = warp_sum(a2) / npp;
  float p0 = m[0], p1 = m[1], p2 = m[2];
  phase_channel_swap(c0, p0, p1, p2);  // channel order -> phase order
  float b0 = 0.f, b1 = 0.f, b2 = 0.f;
#pragma unroll
  for (int j = 0; j < MAXJ; ++j) {
    if (lane + 32 * j < D) {
      if (j % 3 == 0) {
        const float e = t[j] - p0;
        b0 += e * e;
      } else if (j % 3 == 1) {
        const float e = t[j] - p1;
        b1 += e * e;
      } else {
        const float e = t[j] - p2;
        b2 += e * e;
      }
    }
  }
  phase_channel_swap(c0, b0, b1, b2);
  m2[0] = warp_sum(b0);
  m2[1] = warp_sum(b1);
  m2[2] = warp_sum(b2);
}

// Per-channel residual sums R_c = sum_{d in c} (t_d - pred_d)^2 for one pred row (one patch of
// one run); every lane gets the results.
template <typename T, int MAXJ>
__device__ __forceinline__ void residual_sums(const T* __restrict__ row, const float (&t)[MAXJ],
                                              int D, int lane, int c0, float (&r2)[3]) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f;
#pragma unroll
  for (int j = 0; j < MAXJ; ++j) {
    const int d = lane + 32 * j;
    if (d < D) {
      const float r = t[j] - load_elem(row, d);
      if (j % 3 == 0) {
        a0 += r * r;
      } else if (j % 3 == 1) {
        a1 += r * r;
      } else {
        a2 += r * r;
      }
    }
  }
  phase_channel_swap(c0, a0, a1, a2);
  r2[0] = warp_sum(a0);
  r2[1] = warp_sum(a1);
  r2[2] = warp_sum(a2);
}

// LCAS from the channel residual sums and the run's (sigma2[3], 0.5 * mean_c log sigma2).
__device__ __forceinline__ float lcas_value(float r0, float r1, float r2, const float* sg,
                                            float fd, float lam) {
  const float dev = 0.5f * ((r0 / sg[0] + r1 / sg[1] + r2 / sg[2]) / fd) + sg[3];
  const float err = (r0 + r1 + r2) / fd;
  return dev + lam * err;
}

// ---------------------------------------------------------------------------------------------
// the kernel body: one block per image b = blockIdx.x

template <typename T, int MAXJ>
__device__ __forceinline__ void lcas_block(const float* __restrict__ image,
                                           const T* __restrict__ pred,
                                           const unsigned char* __restrict__ visible, int K,
                                           int H, int W, int P, float lam, int norm_pix,
                                           int single_pass, float* __restrict__ stats,
                                           float* __restrict__ map) {
  const int b = blockIdx.x;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nw = nthreads >> 5;
  if (K <= 0) {  // no decoder runs: s = (0, 0, 0)
    if (tid < 3) stats[3 * b + tid] = 0.f;
    return;
  }
  const int gw = W / P;
  const int L = (H / P) * gw;
  const int PP = P * P;
  const int D = 3 * PP;
  const float fd = (float)D;
  const float npp = (float)PP;
  const int c0 = lane % 3;

  // Shared memory (layout mirrored by smem_bytes() below and loader.py smem_bytes()):
  LCAS_DECLARE_SMEM(smem_raw);
  double* wrun = reinterpret_cast<double*>(smem_raw);  // [nw][K][3] n, mean, M2 of LCAS
  double* runf = wrun + nw * K * 3;                      // [K][3] the same per run
  float* wctx = reinterpret_cast<float*>(runf + K * 3);  // [nw][K][7] n, mean[3], M2[3] of t
  float* sig = wctx + nw * K * 7;                        // [K][4] sigma2[3], 0.5*mean log
  int* offs = reinterpret_cast<int*>(sig + K * 4);       // [D] image offset of element d
  float* rbuf = reinterpret_cast<float*>(offs + D);      // [K][L][3] R_c (single pass only)
  unsigned char* vis =
      reinterpret_cast<unsigned char*>(rbuf + (single_pass ? 3 * K * L : 0));  // [K][L]

  for (int e = tid; e < K * L; e += nthreads) vis[e] = visible[e] != 0;
  for (int e = tid; e < nw * K * 7; e += nthreads) wctx[e] = 0.f;
  for (int e = tid; e < nw * K * 3; e += nthreads) wrun[e] = 0.0;
  const int plane = H * W;  // 3*H*W < 2^31: checked by the launchers
  for (int d = tid; d < D; d += nthreads) {
    const int pq = d / 3, c = d - 3 * pq, p = pq / P, q = pq - p * P;
    offs[d] = c * plane + p * W + q;
  }
  __syncthreads();

  const float* __restrict__ img_b = image + (long long)b * 3 * plane;
  const T* __restrict__ pred_b = pred + (long long)b * K * L * D;
  float* map_b = map ? map + (long long)b * K * L : nullptr;
  const float qnan = __int_as_float(0x7fc00000);
  float t[MAXJ];

  // Pass 1: context statistics of every patch visible in some run; in single-pass mode also the
  // residual sums of every (run, patch) where the patch is masked.
  for (int i = warp; i < L; i += nw) {
    bool any_vis = false, any_masked = false;
    for (int k = 0; k < K; ++k) {
      if (vis[k * L + i]) {
        any_vis = true;
      } else {
        any_masked = true;
      }
    }
    const bool resid = single_pass && any_masked;
    if (!any_vis && !resid) continue;  // warp-uniform
    load_target<MAXJ>(img_b, offs, W, P, gw, i, D, lane, norm_pix, t);
    if (any_vis) {
      float m[3], m2[3];
      patch_channel_stats<MAXJ>(t, D, lane, c0, npp, m, m2);
      for (int k = lane; k < K; k += 32) {  // lane k % 32 owns run k's accumulators
        if (vis[k * L + i]) {
          float* a = wctx + (warp * K + k) * 7;
          const float n0 = a[0];  // the three channels share the count
          float n = n0;
#pragma unroll
          for (int c = 0; c < 3; ++c) {
            n = n0;
            chan_merge(n, a[1 + c], a[4 + c], npp, m[c], m2[c]);
          }
          a[0] = n;
        }
      }
    }
    if (resid) {
      for (int k = 0; k < K; ++k) {
        if (vis[k * L + i]) continue;  // warp-uniform
        float r2[3];
        residual_sums<T, MAXJ>(pred_b + ((long long)k * L + i) * D, t, D, lane, c0, r2);
        if (lane == (k & 31)) {
          float* r = rbuf + (k * L + i) * 3;
          r[0] = r2[0];
          r[1] = r2[1];
          r[2] = r2[2];
        }
      }
    }
  }
  __syncthreads();

  // Context variance per run and channel: merge the warps in order.
  for (int k = tid; k < K; k += nthreads) {
    float n = 0.f, mean[3] = {0.f, 0.f, 0.f}, m2[3] = {0.f, 0.f, 0.f};
    for (int w = 0; w < nw; ++w) {
      const float* a = wctx + (w * K + k) * 7;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        float nn = n;
        chan_merge(nn, mean[c], m2[c], a[0], a[1 + c], a[4 + c]);
        if (c == 2) n = nn;
      }
    }
    float lg = 0.f;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      const float s2 = (n > 0.f ? m2[c] / n : 0.f) + kSigma2Floor;
      sig[k * 4 + c] = s2;
      lg += logf(s2);
    }
    sig[k * 4 + 3] = 0.5f * (lg / 3.f);
  }
  __syncthreads();

  // Pass 2: LCAS per (run, masked patch), the map, per-warp per-run Welford accumulators.
  for (int i = warp; i < L; i += nw) {
    if (single_pass) {
      for (int k = lane; k < K; k += 32) {
        if (vis[k * L + i]) {
          if (map_b) map_b[(long long)k * L + i] = qnan;
          continue;
        }
        const float* r = rbuf + (k * L + i) * 3;
        const float x = lcas_value(r[0], r[1], r[2], sig + k * 4, fd, lam);
        double* a = wrun + (warp * K + k) * 3;
        chan_merge(a[0], a[1], a[2], 1.0, (double)x, 0.0);
        if (map_b) map_b[(long long)k * L + i] = x;
      }
    } else {
      bool any_masked = false;
      for (int k = 0; k < K; ++k) any_masked = any_masked || !vis[k * L + i];
      if (any_masked) load_target<MAXJ>(img_b, offs, W, P, gw, i, D, lane, norm_pix, t);
      for (int k = 0; k < K; ++k) {
        const bool owner = lane == (k & 31);
        if (vis[k * L + i]) {  // warp-uniform
          if (owner && map_b) map_b[(long long)k * L + i] = qnan;
          continue;
        }
        float r2[3];
        residual_sums<T, MAXJ>(pred_b + ((long long)k * L + i) * D, t, D, lane, c0, r2);
        if (owner) {
          const float x = lcas_value(r2[0], r2[1], r2[2], sig + k * 4, fd, lam);
          double* a = wrun + (warp * K + k) * 3;
          chan_merge(a[0], a[1], a[2], 1.0, (double)x, 0.0);
          if (map_b) map_b[(long long)k * L + i] = x;
        }
      }
    }
  }
  __syncthreads();

  // Per run: merge the warps in order.
  for (int k = tid; k < K; k += nthreads) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int w = 0; w < nw; ++w) {
      const double* a = wrun + (w * K + k) * 3;
      chan_merge(n, mean, m2, a[0], a[1], a[2]);
    }
    runf[k * 3 + 0] = n;
    runf[k * 3 + 1] = mean;
    runf[k * 3 + 2] = m2;
  }
  __syncthreads();

  if (tid == 0) {
    double n = 0.0, mean = 0.0, m2 = 0.0, msum = 0.0;
    int runs = 0;
    for (int k = 0; k < K; ++k) {
      const double* r = runf + k * 3;
      chan_merge(n, mean, m2, r[0], r[1], r[2]);
      if (r[0] > 0.0) {
        msum += r[1];
        ++runs;
      }
    }
    double s3 = 0.0;
    if (runs > 1) {  // population std over runs of the run means (0 for a single run)
      const double mm = msum / runs;
      double v = 0.0;
      for (int k = 0; k < K; ++k) {
        const double* r = runf + k * 3;
        if (r[0] > 0.0) {
          const double e = r[1] - mm;
          v += e * e;
        }
      }
      s3 = sqrt(v / runs);
    }
    stats[3 * b + 0] = n > 0.0 ? (float)sqrt(m2 / n) : 0.f;
    stats[3 * b + 1] = n > 0.0 ? (float)mean : 0.f;
    stats[3 * b + 2] = (float)s3;
  }
}

}  // namespace cinemae_lcas

// ---------------------------------------------------------------------------------------------
// kernels (C names, looked up by the NVRTC loader), one per pred type. MAXJ = 24 registers of
// target per lane hold a whole patch up to P = 16 (3*16*16 = 768 = 24*32 elements). Larger
// patches (no MAE checkpoint uses them) are refused by the launchers; the numpy reference
// handles them. Blocks of up to 512 threads, so at most 128 registers per thread.

#define CINEMAE_LCAS_KERNEL(NAME, T, MAXJ, THREADS, MINBLOCKS)                                 \
  extern "C" __global__ void __launch_bounds__(THREADS, MINBLOCKS)                             \
      NAME(const float* __restrict__ image, const void* __restrict__ pred,                     \
           const unsigned char* __restrict__ visible, int K, int H, int W, int P, float lam,    \
           int norm_pix, int single_pass, float* __restrict__ stats, float* __restrict__ map) { \
    cinemae_lcas::lcas_block<T, MAXJ>(image, static_cast<const T*>(pred), visible, K, H, W, P, \
                                      lam, norm_pix, single_pass, stats, map);                  \
  }

CINEMAE_LCAS_KERNEL(lcas_stats_f32, float, 24, 512, 1)
CINEMAE_LCAS_KERNEL(lcas_stats_f16, unsigned short, 24, 512, 1)

// ---------------------------------------------------------------------------------------------
// launch planning (host side; mirrored by kernels/loader.py: _plan, _smem_bytes)

#if !defined(__CUDACC_RTC__)
namespace cinemae_lcas {

constexpr int kSmemLimit = 48 * 1024;  // dynamic shared memory every GPU allows without opt-in
constexpr int kMaxPatch = 16;          // MAXJ = 24 above
constexpr int kMaxThreads = 512;       // __launch_bounds__ above
// Small batches get 16 warps per image (one image per SM at most, so more warps shorten the
// block's latency); large ones 8, so that two blocks share an SM.

struct Plan {
  int threads;      // threads per block (a multiple of 32)
  int single_pass;  // 1: keep residual sums in shared memory
  int smem_bytes;   // dynamic shared memory per block
};

inline long long smem_bytes(int K, int L, int P, int warps, int single_pass) {
  const long long kl = (long long)K * L;
  const long long doubles = (long long)warps * K * 3 + (long long)K * 3;
  const long long words = (long long)warps * K * 7 + (long long)K * 4 + 3LL * P * P +
                          (single_pass ? 3 * kl : 0);
  return 8 * doubles + 4 * words + kl;
}

constexpr int kSmallBatch = 128;

// threads = 0 picks the block size for batch B; the emulator passes other multiples of 32.
inline bool make_plan(int B, int K, int H, int W, int P, int threads, Plan* plan) {
  if (K < 0 || P <= 0 || P > kMaxPatch || H <= 0 || W <= 0 || H % P != 0 || W % P != 0 ||
      3LL * H * W > 0x7fffffffLL) {
    return false;
  }
  if (threads == 0) threads = B <= kSmallBatch ? 512 : 256;
  if (threads < 32 || threads > kMaxThreads || threads % 32 != 0) return false;
  const int L = (H / P) * (W / P);
  const int warps = threads / 32;
  plan->threads = threads;
  if (K == 0) {
    plan->single_pass = 0;
    plan->smem_bytes = 0;
    return true;
  }
  if (smem_bytes(K, L, P, warps, 1) <= kSmemLimit) {
    plan->single_pass = 1;
  } else if (smem_bytes(K, L, P, warps, 0) <= kSmemLimit) {
    plan->single_pass = 0;
  } else {
    return false;
  }
  plan->smem_bytes = (int)smem_bytes(K, L, P, warps, plan->single_pass);
  return true;
}

}  // namespace cinemae_lcas
#endif  // !__CUDACC_RTC__

// ---------------------------------------------------------------------------------------------
// C ABI launcher (kernels/lcas.h), nvcc builds only

#if defined(CINEMAE_LCAS_HOST_LAUNCHER)
extern "C" CINEMAE_LCAS_API int cinemae_lcas_abi_version(void) { return CINEMAE_LCAS_ABI_VERSION; }

extern "C" CINEMAE_LCAS_API int cinemae_lcas_stats(const float* image, const void* pred,
                                                   int pred_dtype, const unsigned char* visible,
                                                   int B, int K, int H, int W, int P,
                                                   float lambda, int norm_pix, float* stats_out,
                                                   float* map_out, void* stream) {
  cinemae_lcas::Plan plan;
  if (B < 0 || !cinemae_lcas::make_plan(B, K, H, W, P, 0, &plan)) return cudaErrorInvalidValue;
  if (pred_dtype != CINEMAE_LCAS_PRED_F32 && pred_dtype != CINEMAE_LCAS_PRED_F16) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  if (!stats_out || (K > 0 && (!image || !pred || !visible))) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(B));
  const dim3 block(static_cast<unsigned>(plan.threads));
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  const int np = norm_pix ? 1 : 0;
  if (pred_dtype == CINEMAE_LCAS_PRED_F16) {
    lcas_stats_f16<<<grid, block, smem, s>>>(image, pred, visible, K, H, W, P, lambda, np,
                                             plan.single_pass, stats_out, map_out);
  } else {
    lcas_stats_f32<<<grid, block, smem, s>>>(image, pred, visible, K, H, W, P, lambda, np,
                                             plan.single_pass, stats_out, map_out);
  }
  return static_cast<int>(cudaGetLastError());
}
#endif  // CINEMAE_LCAS_HOST_LAUNCHER
