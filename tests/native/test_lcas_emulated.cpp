// CPU test: kernels/lcas.cu run under the SIMT emulator against the double-precision C++
// reference. Exercises single-pass and two-pass modes, fp32 and fp16 pred, pixel and norm-pix
// targets, K = 0, 1, 2, 4, 8, and several block sizes. Exit 0 on success, 1 on failure.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "lcas_reference.h"

extern "C" int cinemae_lcas_stats_emulated(const float* image, const void* pred, int pred_is_fp16,
                                           const unsigned char* visible, int B, int K, int H,
                                           int W, int P, float lambda, int norm_pix,
                                           float* stats_out, float* map_out, int threads,
                                           int force_two_pass);

int main() {
  const float sentinel = -12345.f;
  int failures = 0, runs = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (const lcasref::Case& c : lcasref::default_cases(/*small=*/true)) {
    const lcasref::Data d = lcasref::make_data(c);
    std::vector<double> ref_stats, ref_map;
    lcasref::reference(c, d, ref_stats, ref_map);
    const void* pred = c.fp16 ? static_cast<const void*>(d.pred16.data())
                              : static_cast<const void*>(d.pred.data());
    struct Mode {
      int threads, two_pass;
    };
    for (Mode m : {Mode{0, 0}, Mode{64, 1}, Mode{32, 0}}) {
      std::vector<float> stats(static_cast<std::size_t>(c.B) * 3, sentinel);
      std::vector<float> map(static_cast<std::size_t>(c.B) * c.K * c.L(), sentinel);
      const int rc = cinemae_lcas_stats_emulated(
          d.image.data(), pred, c.fp16, d.visible.data(), c.B, c.K, c.H, c.W, c.P, c.lam,
          c.norm_pix, stats.data(), map.data(), m.threads, m.two_pass);
      const lcasref::Comparison r = lcasref::compare(c, stats, map, ref_stats, ref_map, sentinel);
      const bool ok = rc == 0 && r.all_written && r.nan_pattern_ok && r.max_rel_stats <= 1e-4 &&
                      r.max_rel_map <= 1e-4;
      ++runs;
      failures += ok ? 0 : 1;
      std::printf("%-4s %-24s threads=%-7s two_pass=%d  max rel err stats %.2e map %.2e%s%s\n",
                  ok ? "ok" : "FAIL", c.name.c_str(),
                  m.threads ? std::to_string(m.threads).c_str() : "default", m.two_pass,
                  r.max_rel_stats, r.max_rel_map, r.all_written ? "" : "  (unwritten output)",
                  r.nan_pattern_ok ? "" : "  (NaN pattern differs)");
    }
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d passed, %d failed (emulated kernel vs C++ reference, %.1f s)\n", runs - failures,
              failures, secs);
  return failures ? 1 : 0;
}
