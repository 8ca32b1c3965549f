// Plain C++ (double precision) implementation of the LCAS formulas of DESIGN.md section 1
// ("LCAS", "Summary statistics"), written straight from the definitions and independent of the
// kernel's algorithm, plus random test cases and a comparison helper. Shared by the GPU test
// (test_lcas.cu) and the CPU emulator test (test_lcas_emulated.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace lcasref {

inline std::uint16_t float_to_half_bits(float f) {  // round to nearest even
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const int fexp = static_cast<int>((x >> 23) & 0xffu);
  std::uint32_t man = x & 0x7fffffu;
  if (fexp == 0xff) return static_cast<std::uint16_t>(sign | 0x7c00u | (man ? 0x200u : 0u));
  const int exp = fexp - 127 + 15;
  if (exp >= 31) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<std::uint16_t>(sign);
    man |= 0x800000u;
    const int shift = 14 - exp;
    std::uint32_t h = man >> shift;
    const std::uint32_t rem = man & ((1u << shift) - 1u);
    const std::uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (h & 1u))) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }
  std::uint32_t h = sign | (static_cast<std::uint32_t>(exp) << 10) | (man >> 13);
  const std::uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(h);
}

inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
    return sign ? -f : f;
  }
  const std::uint32_t bits =
      exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Case {
  std::string name;
  int B = 1, K = 2, H = 32, W = 32, P = 4;
  bool fp16 = false;
  bool norm_pix = false;
  float lam = 1.0f;
  bool flat = false;  // near-uniform images (exercises the 1e-2 variance floor)
  unsigned seed = 0;

  int L() const { return (H / P) * (W / P); }
  int D() const { return 3 * P * P; }
};

struct Data {
  std::vector<float> image;           // [B,3,H,W]
  std::vector<float> pred;            // [B*K,L,D] as float (the fp16 values when fp16)
  std::vector<std::uint16_t> pred16;  // [B*K,L,D] half bits (fp16 cases)
  std::vector<unsigned char> visible; // [K,L]
};

// Masks as DESIGN.md draws them: n_keep = int(L * 0.25) random visible patches per run.
inline Data make_data(const Case& c) {
  std::mt19937 rng(c.seed * 7919u + 17u);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int L = c.L(), D = c.D(), P = c.P;
  Data d;
  d.image.resize(static_cast<std::size_t>(c.B) * 3 * c.H * c.W);
  for (auto& v : d.image) v = c.flat ? 0.3f + 1e-3f * normal(rng) : normal(rng);
  const int n_keep = static_cast<int>(L * (1.0 - 0.75));
  d.visible.assign(static_cast<std::size_t>(c.K) * L, 0);
  std::vector<int> perm(L);
  for (int k = 0; k < c.K; ++k) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < n_keep; ++j) d.visible[static_cast<std::size_t>(k) * L + perm[j]] = 1;
  }
  // pred = patchified image + noise, so residuals look like a decoder's
  d.pred.resize(static_cast<std::size_t>(c.B) * c.K * L * D);
  const int gw = c.W / P;
  for (int b = 0; b < c.B; ++b)
    for (int k = 0; k < c.K; ++k)
      for (int i = 0; i < L; ++i)
        for (int e = 0; e < D; ++e) {
          const int pq = e / 3, ch = e % 3, p = pq / P, q = pq % P;
          const int y = (i / gw) * P + p, x = (i % gw) * P + q;
          const float t = d.image[((static_cast<std::size_t>(b) * 3 + ch) * c.H + y) * c.W + x];
          d.pred[((static_cast<std::size_t>(b) * c.K + k) * L + i) * D + e] =
              (c.norm_pix ? 0.f : 0.8f * t) + 0.5f * normal(rng);
        }
  if (c.fp16) {
    d.pred16.resize(d.pred.size());
    for (std::size_t j = 0; j < d.pred.size(); ++j) {
      d.pred16[j] = float_to_half_bits(d.pred[j]);
      d.pred[j] = half_bits_to_float(d.pred16[j]);
    }
  }
  return d;
}

// stats [B,3], map [B,K,L] (NaN at visible patches), all in double.
inline void reference(const Case& c, const Data& d, std::vector<double>& stats,
                      std::vector<double>& map) {
  const int B = c.B, K = c.K, H = c.H, W = c.W, P = c.P, L = c.L(), D = c.D(), gw = W / P;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  stats.assign(static_cast<std::size_t>(B) * 3, 0.0);
  map.assign(static_cast<std::size_t>(B) * K * L, nan);
  if (K == 0) return;
  std::vector<double> t(static_cast<std::size_t>(L) * D);
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < L; ++i) {  // patchify (channel-last) and norm-pix
      double* ti = &t[static_cast<std::size_t>(i) * D];
      for (int e = 0; e < D; ++e) {
        const int pq = e / 3, ch = e % 3, p = pq / P, q = pq % P;
        const int y = (i / gw) * P + p, x = (i % gw) * P + q;
        ti[e] = d.image[((static_cast<std::size_t>(b) * 3 + ch) * H + y) * W + x];
      }
      if (c.norm_pix) {
        double mean = 0, var = 0;
        for (int e = 0; e < D; ++e) mean += ti[e];
        mean /= D;
        for (int e = 0; e < D; ++e) var += (ti[e] - mean) * (ti[e] - mean);
        var /= (D - 1);
        for (int e = 0; e < D; ++e) ti[e] = (ti[e] - mean) / std::sqrt(var + 1e-6);
      }
    }
    std::vector<std::vector<double>> runs(K);
    for (int k = 0; k < K; ++k) {
      double sigma2[3];
      for (int ch = 0; ch < 3; ++ch) {  // population variance over visible values + floor
        double s = 0;
        long n = 0;
        for (int i = 0; i < L; ++i)
          if (d.visible[static_cast<std::size_t>(k) * L + i])
            for (int e = ch; e < D; e += 3) s += t[static_cast<std::size_t>(i) * D + e], ++n;
        const double mean = s / n;
        double v = 0;
        for (int i = 0; i < L; ++i)
          if (d.visible[static_cast<std::size_t>(k) * L + i])
            for (int e = ch; e < D; e += 3) {
              const double u = t[static_cast<std::size_t>(i) * D + e] - mean;
              v += u * u;
            }
        sigma2[ch] = v / n + 1e-2;
      }
      for (int i = 0; i < L; ++i) {
        if (d.visible[static_cast<std::size_t>(k) * L + i]) continue;
        const float* pr = &d.pred[((static_cast<std::size_t>(b) * K + k) * L + i) * D];
        double dev = 0, err = 0;
        for (int e = 0; e < D; ++e) {
          const double r = t[static_cast<std::size_t>(i) * D + e] - pr[e];
          dev += r * r / sigma2[e % 3] + std::log(sigma2[e % 3]);
          err += r * r;
        }
        const double x = 0.5 * dev / D + c.lam * err / D;
        map[(static_cast<std::size_t>(b) * K + k) * L + i] = x;
        runs[k].push_back(x);
      }
    }
    double n = 0, sum = 0;
    for (auto& r : runs) n += r.size(), sum += std::accumulate(r.begin(), r.end(), 0.0);
    const double mean = sum / n;
    double v = 0;
    for (auto& r : runs)
      for (double x : r) v += (x - mean) * (x - mean);
    std::vector<double> means;
    for (auto& r : runs) means.push_back(std::accumulate(r.begin(), r.end(), 0.0) / r.size());
    const double mm = std::accumulate(means.begin(), means.end(), 0.0) / K;
    double vm = 0;
    for (double m : means) vm += (m - mm) * (m - mm);
    stats[b * 3 + 0] = std::sqrt(v / n);
    stats[b * 3 + 1] = mean;
    stats[b * 3 + 2] = K > 1 ? std::sqrt(vm / K) : 0.0;
  }
}

// The cases every native test runs (shapes of DESIGN.md: ViT-L/16 and ViT-H/14 at 224 px,
// tiny 32-px P=4, and a P=8 224-px case whose K=8 working set needs the two-pass mode).
inline std::vector<Case> default_cases(bool small) {
  std::vector<Case> cs;
  auto add = [&](const char* name, int B, int K, int HW, int P, bool fp16, bool np, bool flat) {
    Case c;
    c.name = name;
    c.B = B, c.K = K, c.H = HW, c.W = HW, c.P = P, c.fp16 = fp16, c.norm_pix = np, c.flat = flat;
    c.lam = np ? 0.5f : 1.0f;
    c.seed = static_cast<unsigned>(cs.size());
    cs.push_back(c);
  };
  add("tiny-k2-f32", 3, 2, 32, 4, false, false, false);
  add("tiny-k8-f16-normpix", 2, 8, 32, 4, true, true, false);
  add("tiny-k1-f32", 2, 1, 32, 4, false, false, false);
  add("tiny-k0", 2, 0, 32, 4, false, false, false);
  add("tiny-k4-flat", 2, 4, 32, 4, false, false, true);
  if (small) {
    add("p16-k2-f16", 1, 2, 64, 16, true, false, false);
    add("p14-k2-f32-normpix", 1, 2, 56, 14, false, true, false);
    return cs;
  }
  add("vitl16-k2-f32", 4, 2, 224, 16, false, false, false);
  add("vitl16-k8-f16-normpix", 2, 8, 224, 16, true, true, false);
  add("vith14-k4-f32-normpix", 2, 4, 224, 14, false, true, false);
  add("vith14-k2-f16", 3, 2, 224, 14, true, false, false);
  add("p8-224-k8-f32-twopass", 2, 8, 224, 8, false, false, false);
  add("tiny-k2-f32-b256", 256, 2, 32, 4, false, false, false);
  return cs;
}

struct Comparison {
  double max_rel_stats = 0, max_rel_map = 0;
  bool nan_pattern_ok = true, all_written = true;
};

// got_* are the kernel's outputs (float); sentinel marks elements never written.
inline Comparison compare(const Case& c, const std::vector<float>& got_stats,
                          const std::vector<float>& got_map, const std::vector<double>& ref_stats,
                          const std::vector<double>& ref_map, float sentinel) {
  Comparison r;
  double scale = 0;  // stats of one image: relative to the image's largest |s|
  for (int b = 0; b < c.B; ++b) {
    double s = 0;
    for (int j = 0; j < 3; ++j) s = std::max(s, std::fabs(ref_stats[b * 3 + j]));
    for (int j = 0; j < 3; ++j) {
      const float g = got_stats[b * 3 + j];
      if (g == sentinel) r.all_written = false;
      const double e = std::fabs(g - ref_stats[b * 3 + j]);
      const double den = std::max(std::fabs(ref_stats[b * 3 + j]), 1e-6 * std::max(s, 1.0));
      if (!(e <= 1e300)) r.max_rel_stats = INFINITY;  // NaN
      else r.max_rel_stats = std::max(r.max_rel_stats, e / den);
    }
  }
  for (std::size_t j = 0; j < ref_map.size(); ++j) scale = std::max(scale, std::isnan(ref_map[j]) ? 0.0 : std::fabs(ref_map[j]));
  for (std::size_t j = 0; j < got_map.size(); ++j) {
    const float g = got_map[j];
    if (g == sentinel) r.all_written = false;
    if (std::isnan(ref_map[j]) != std::isnan(g)) {
      r.nan_pattern_ok = false;
      continue;
    }
    if (std::isnan(g)) continue;
    const double e = std::fabs(g - ref_map[j]);
    r.max_rel_map = std::max(r.max_rel_map, e / std::max(std::fabs(ref_map[j]), 1e-3 * scale));
  }
  return r;
}

}  // namespace lcasref
