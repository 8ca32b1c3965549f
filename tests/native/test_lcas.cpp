// GPU test of the shared library cinemae_lcas (kernels/lcas.cu through its C ABI, lcas.h)
// against the double-precision C++ reference: ViT-L/16 and ViT-H/14 at 224 px, tiny 32-px P=4
// models, B up to 256, K = 0, 1, 2, 4, 8, fp32 and fp16 pred, pixel and norm-pix targets, both
// the single-pass and the two-pass mode. Outputs are pre-filled with a sentinel to check that
// every element is written; the map NaN pattern must match; a second run must give the same
// bits (determinism); the run without a map must give the same stats.
// Exit codes: 0 pass, 1 fail, 77 skipped (no CUDA GPU / driver), as CTest's SKIP_RETURN_CODE.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "lcas.h"
#include "lcas_reference.h"

namespace {

bool check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
  return e == cudaSuccess;
}

template <typename T>
T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  const std::size_t n = std::max<std::size_t>(h.size(), 1) * sizeof(T);
  if (!check(cudaMalloc(&d, n), "cudaMalloc")) std::exit(1);
  if (!h.empty() && !check(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice),
                           "cudaMemcpy H2D"))
    std::exit(1);
  return d;
}

template <typename T>
std::vector<T> download(const T* d, std::size_t n) {
  std::vector<T> h(n);
  if (n && !check(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H"))
    std::exit(1);
  return h;
}

}  // namespace

int main() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    std::printf("SKIP: no CUDA GPU available (%s)\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return 77;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s (sm_%d%d), lcas ABI %d\n", prop.name, prop.major, prop.minor,
              cinemae_lcas_abi_version());

  const float sentinel = -12345.f;
  int failures = 0, runs = 0;
  for (const lcasref::Case& c : lcasref::default_cases(/*small=*/false)) {
    const lcasref::Data d = lcasref::make_data(c);
    std::vector<double> ref_stats, ref_map;
    lcasref::reference(c, d, ref_stats, ref_map);
    float* d_image = upload(d.image);
    void* d_pred = c.fp16 ? static_cast<void*>(upload(d.pred16)) : static_cast<void*>(upload(d.pred));
    unsigned char* d_vis = upload(d.visible);
    const std::size_t ns = static_cast<std::size_t>(c.B) * 3;
    const std::size_t nm = static_cast<std::size_t>(c.B) * c.K * c.L();
    float* d_stats = upload(std::vector<float>(ns, sentinel));
    float* d_map = upload(std::vector<float>(nm, sentinel));

    auto run = [&](float* map_out) {
      const int rc = cinemae_lcas_stats(d_image, d_pred, c.fp16, d_vis, c.B, c.K, c.H, c.W, c.P,
                                        c.lam, c.norm_pix, d_stats, map_out, nullptr);
      const bool ok = rc == 0 && check(cudaDeviceSynchronize(), "kernel");
      if (rc != 0) std::fprintf(stderr, "cinemae_lcas_stats returned %d\n", rc);
      return ok;
    };
    bool ok = run(d_map);
    const std::vector<float> stats = download(d_stats, ns);
    const std::vector<float> map = download(d_map, nm);
    const lcasref::Comparison r = lcasref::compare(c, stats, map, ref_stats, ref_map, sentinel);
    const double tol = 1e-3;  // the reference reads the same fp16 values, so fp16 needs no more
    ok = ok && r.all_written && r.nan_pattern_ok && r.max_rel_stats <= tol && r.max_rel_map <= tol;
    // determinism, and the no-map path
    ok = run(d_map) && ok;
    const bool same_bits =
        std::memcmp(download(d_stats, ns).data(), stats.data(), ns * sizeof(float)) == 0 &&
        std::memcmp(download(d_map, nm).data(), map.data(), nm * sizeof(float)) == 0;
    ok = run(nullptr) && ok;
    const bool same_no_map =
        std::memcmp(download(d_stats, ns).data(), stats.data(), ns * sizeof(float)) == 0;
    ok = ok && same_bits && same_no_map;
    ++runs;
    failures += ok ? 0 : 1;
    std::printf("%-4s %-24s max rel err stats %.2e map %.2e%s%s%s%s\n", ok ? "ok" : "FAIL",
                c.name.c_str(), r.max_rel_stats, r.max_rel_map,
                r.all_written ? "" : "  (unwritten output)",
                r.nan_pattern_ok ? "" : "  (NaN pattern differs)",
                same_bits ? "" : "  (not deterministic)",
                same_no_map ? "" : "  (stats differ without map)");
    cudaFree(d_image);
    cudaFree(d_pred);
    cudaFree(d_vis);
    cudaFree(d_stats);
    cudaFree(d_map);
  }

  // refused shapes: no launch, cudaErrorInvalidValue
  {
    ++runs;
    float dummy = 0;
    const bool ok =
        cinemae_lcas_stats(&dummy, &dummy, 0, nullptr, 1, 2, 224, 224, 32, 1.f, 0, &dummy,
                           nullptr, nullptr) == cudaErrorInvalidValue &&
        cinemae_lcas_stats(&dummy, &dummy, 0, nullptr, 1, 2, 225, 224, 16, 1.f, 0, &dummy,
                           nullptr, nullptr) == cudaErrorInvalidValue &&
        cinemae_lcas_stats(nullptr, nullptr, 0, nullptr, 0, 2, 224, 224, 16, 1.f, 0, nullptr,
                           nullptr, nullptr) == cudaSuccess;
    failures += ok ? 0 : 1;
    std::printf("%-4s refused shapes\n", ok ? "ok" : "FAIL");
  }

  // timing (informational): ViT-L/16, K=2, B=256, fp16 pred
  {
    lcasref::Case c;
    c.B = 256, c.K = 2, c.H = c.W = 224, c.P = 16, c.fp16 = true;
    const std::size_t ni = static_cast<std::size_t>(c.B) * 3 * c.H * c.W;
    const std::size_t np = static_cast<std::size_t>(c.B) * c.K * c.L() * c.D();
    float* d_image = upload(std::vector<float>(ni, 0.5f));
    unsigned short* d_pred = upload(std::vector<unsigned short>(np, 0x3800));  // 0.5
    std::vector<unsigned char> vis(static_cast<std::size_t>(c.K) * c.L(), 0);
    for (int k = 0; k < c.K; ++k)
      for (int i = k; i < c.L(); i += 4) vis[static_cast<std::size_t>(k) * c.L() + i] = 1;
    unsigned char* d_vis = upload(vis);
    float* d_stats = upload(std::vector<float>(static_cast<std::size_t>(c.B) * 3, 0.f));
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (int w = 0; w < 3; ++w)
      cinemae_lcas_stats(d_image, d_pred, 1, d_vis, c.B, c.K, c.H, c.W, c.P, 1.f, 0, d_stats,
                         nullptr, nullptr);
    const int reps = 20;
    cudaEventRecord(a);
    for (int w = 0; w < reps; ++w)
      cinemae_lcas_stats(d_image, d_pred, 1, d_vis, c.B, c.K, c.H, c.W, c.P, 1.f, 0, d_stats,
                         nullptr, nullptr);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    const double bytes = ni * 4.0 + np * 2.0;
    std::printf("time ViT-L/16 K=2 B=256 fp16 pred: %.1f us/launch, %.0f GB/s effective\n",
                1e3 * ms / reps, bytes / (1e-3 * ms / reps) / 1e9);
    cudaFree(d_image);
    cudaFree(d_pred);
    cudaFree(d_vis);
    cudaFree(d_stats);
  }

  std::printf("%d passed, %d failed (GPU kernel vs C++ reference)\n", runs - failures, failures);
  return failures ? 1 : 0;
}
