// A stand-in libcuda.so.1 for CPU-only tests of kernels/loader.py: it implements the few CUDA
// driver entry points the loader uses (through cuda-python's cuGetProcAddress table) on the host,
// "device" memory being host memory, one fake device of compute capability 9.0, and
// cuLaunchKernel running kernels/lcas.cu under the SIMT emulator (cuda_emulation.h). So the
// loader's whole path (context choice, NVRTC cubin cache, module load, parameter packing, launch
// configuration, copies) runs end to end without a GPU. Checks on the way: the module must be
// the NVRTC CUBIN for sm_90 holding both kernels, and each launch's block size and dynamic shared
// memory must be exactly lcas.cu's own plan. Never installed; tests/test_kernel.py builds it and
// points LD_LIBRARY_PATH at it in a subprocess.
#include "cuda_emulation.h"

// clang-format off
#include "../../kernels/lcas.cu"
// clang-format on

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace {

using CUresult = int;
using CUdeviceptr = unsigned long long;
constexpr CUresult kSuccess = 0, kInvalidValue = 1, kNotInitialized = 3, kInvalidImage = 200,
                   kInvalidContext = 201, kInvalidHandle = 400, kNotFound = 500;

struct Context {
  int device = 0;
};
struct Module {
  bool valid = false;
};
struct Function {
  bool fp16 = false;
};

std::mutex g_mu;
bool g_init = false;
Context g_primary;
std::set<CUdeviceptr> g_allocs;
Function g_f32{false}, g_f16{true};
thread_local std::vector<Context*> t_stack;

bool is_alloc(CUdeviceptr p) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_allocs.upper_bound(p);
  return it != g_allocs.begin() && *std::prev(it) <= p;  // start of an allocation or inside one
}

// ---- the driver API subset -------------------------------------------------------------------

CUresult fake_cuInit(unsigned) {
  g_init = true;
  return kSuccess;
}
CUresult fake_cuDriverGetVersion(int* v) {
  *v = 13000;
  return kSuccess;
}
CUresult fake_cuDeviceGetCount(int* n) {
  if (!g_init) return kNotInitialized;
  *n = 1;
  return kSuccess;
}
CUresult fake_cuDeviceGet(int* dev, int ordinal) {
  if (ordinal != 0) return kInvalidValue;
  *dev = 0;
  return kSuccess;
}
CUresult fake_cuDeviceGetAttribute(int* pi, int attrib, int dev) {
  if (dev != 0) return kInvalidValue;
  if (attrib == 75) *pi = 9;       // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
  else if (attrib == 76) *pi = 0;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
  else return kInvalidValue;
  return kSuccess;
}
CUresult fake_cuDevicePrimaryCtxRetain(Context** ctx, int dev) {
  if (dev != 0) return kInvalidValue;
  *ctx = &g_primary;
  return kSuccess;
}
CUresult fake_cuCtxGetCurrent(Context** ctx) {
  *ctx = t_stack.empty() ? nullptr : t_stack.back();
  return kSuccess;
}
CUresult fake_cuCtxPushCurrent(Context* ctx) {
  if (!ctx) return kInvalidValue;
  t_stack.push_back(ctx);
  return kSuccess;
}
CUresult fake_cuCtxPopCurrent(Context** ctx) {
  if (t_stack.empty()) return kInvalidContext;
  if (ctx) *ctx = t_stack.back();
  t_stack.pop_back();
  return kSuccess;
}
CUresult fake_cuCtxGetDevice(int* dev) {
  if (t_stack.empty()) return kInvalidContext;
  *dev = t_stack.back()->device;
  return kSuccess;
}
CUresult fake_cuCtxSynchronize() { return t_stack.empty() ? kInvalidContext : kSuccess; }
CUresult fake_cuPointerGetAttribute(void* data, int attribute, CUdeviceptr ptr) {
  if (attribute != 9) return kInvalidValue;  // CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL only
  if (!is_alloc(ptr)) return kInvalidValue;
  *static_cast<int*>(data) = 0;
  return kSuccess;
}
CUresult fake_cuMemAlloc(CUdeviceptr* p, size_t n) {
  if (t_stack.empty()) return kInvalidContext;
  void* m = std::malloc(n ? n : 1);
  std::memset(m, 0xa5, n);  // garbage, like fresh device memory
  *p = reinterpret_cast<CUdeviceptr>(m);
  std::lock_guard<std::mutex> lock(g_mu);
  g_allocs.insert(*p);
  return kSuccess;
}
CUresult fake_cuMemFree(CUdeviceptr p) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_allocs.erase(p)) return kInvalidValue;
  std::free(reinterpret_cast<void*>(p));
  return kSuccess;
}
CUresult fake_cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
  if (!is_alloc(dst)) return kInvalidValue;
  std::memcpy(reinterpret_cast<void*>(dst), src, n);
  return kSuccess;
}
CUresult fake_cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
  if (!is_alloc(src)) return kInvalidValue;
  std::memcpy(dst, reinterpret_cast<const void*>(src), n);
  return kSuccess;
}
CUresult fake_cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, void*) {
  return fake_cuMemcpyHtoD(dst, src, n);
}
CUresult fake_cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, void*) {
  return fake_cuMemcpyDtoH(dst, src, n);
}
CUresult fake_cuMemsetD32(CUdeviceptr dst, unsigned v, size_t n) {
  if (!is_alloc(dst)) return kInvalidValue;
  unsigned* p = reinterpret_cast<unsigned*>(dst);
  for (size_t i = 0; i < n; ++i) p[i] = v;
  return kSuccess;
}
CUresult fake_cuStreamCreate(void** s, unsigned) {
  static int token;
  *s = &token;
  return kSuccess;
}
CUresult fake_cuStreamDestroy(void*) { return kSuccess; }
CUresult fake_cuStreamSynchronize(void*) { return kSuccess; }

bool contains(const unsigned char* data, size_t n, const char* what) {
  const size_t m = std::strlen(what);
  for (size_t i = 0; i + m <= n; ++i)
    if (std::memcmp(data + i, what, m) == 0) return true;
  return false;
}

CUresult fake_cuModuleLoadData(Module** mod, const void* image) {
  if (t_stack.empty()) return kInvalidContext;
  const auto* p = static_cast<const unsigned char*>(image);
  if (std::memcmp(p, "\x7f" "ELF", 4) != 0) return kInvalidImage;
  // ELF64 size: the end of the program or section header table, whichever is last
  unsigned long long phoff, shoff;
  unsigned short phentsize, phnum, shentsize, shnum;
  std::memcpy(&phoff, p + 0x20, 8);
  std::memcpy(&shoff, p + 0x28, 8);
  std::memcpy(&phentsize, p + 0x36, 2);
  std::memcpy(&phnum, p + 0x38, 2);
  std::memcpy(&shentsize, p + 0x3a, 2);
  std::memcpy(&shnum, p + 0x3c, 2);
  const size_t n = std::max<size_t>(phoff + static_cast<size_t>(phentsize) * phnum,
                                    shoff + static_cast<size_t>(shentsize) * shnum);
  if (!contains(p, n, "lcas_stats_f32") || !contains(p, n, "lcas_stats_f16") ||
      !contains(p, n, "sm_90"))
    return kInvalidImage;
  *mod = new Module{true};
  return kSuccess;
}
CUresult fake_cuModuleGetFunction(Function** f, Module* mod, const char* name) {
  if (!mod || !mod->valid) return kInvalidHandle;
  if (std::strcmp(name, "lcas_stats_f32") == 0) *f = &g_f32;
  else if (std::strcmp(name, "lcas_stats_f16") == 0) *f = &g_f16;
  else return kNotFound;
  return kSuccess;
}

CUresult fake_cuLaunchKernel(Function* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned smem, void*, void** params,
                        void** extra) {
  if (t_stack.empty()) return kInvalidContext;
  if ((f != &g_f32 && f != &g_f16) || !params || extra) return kInvalidValue;
  const float* image = *static_cast<const float**>(params[0]);
  const void* pred = *static_cast<const void**>(params[1]);
  const unsigned char* visible = *static_cast<const unsigned char**>(params[2]);
  const int K = *static_cast<int*>(params[3]), H = *static_cast<int*>(params[4]),
            W = *static_cast<int*>(params[5]), P = *static_cast<int*>(params[6]);
  const float lam = *static_cast<float*>(params[7]);
  const int norm_pix = *static_cast<int*>(params[8]), single = *static_cast<int*>(params[9]);
  float* stats = *static_cast<float**>(params[10]);
  float* map = *static_cast<float**>(params[11]);
  cinemae_lcas::Plan plan;
  if (!cinemae_lcas::make_plan(static_cast<int>(gx), K, H, W, P, 0, &plan) || gy != 1 || gz != 1 || by != 1 ||
      bz != 1 || static_cast<int>(bx) != plan.threads || single != plan.single_pass ||
      static_cast<int>(smem) != plan.smem_bytes || (norm_pix != 0 && norm_pix != 1)) {
    std::fprintf(stderr, "fake libcuda: launch configuration differs from lcas.cu's plan\n");
    return kInvalidValue;
  }
  if (!is_alloc(reinterpret_cast<CUdeviceptr>(stats)) ||
      (map && !is_alloc(reinterpret_cast<CUdeviceptr>(map))) ||
      (K > 0 && !(is_alloc(reinterpret_cast<CUdeviceptr>(image)) &&
                  is_alloc(reinterpret_cast<CUdeviceptr>(pred)) &&
                  is_alloc(reinterpret_cast<CUdeviceptr>(visible)))))
    return kInvalidValue;
  cinemae_emu::launch(static_cast<int>(gx), plan.threads, static_cast<size_t>(smem), [&] {
    if (f->fp16) {
      lcas_stats_f16(image, pred, visible, K, H, W, P, lam, norm_pix, single, stats, map);
    } else {
      lcas_stats_f32(image, pred, visible, K, H, W, P, lam, norm_pix, single, stats, map);
    }
  });
  return kSuccess;
}

CUresult fake_cuGetErrorName(CUresult e, const char** s) {
  static const std::map<int, const char*> names = {
      {0, "CUDA_SUCCESS"}, {1, "CUDA_ERROR_INVALID_VALUE"}, {3, "CUDA_ERROR_NOT_INITIALIZED"},
      {200, "CUDA_ERROR_INVALID_IMAGE"}, {201, "CUDA_ERROR_INVALID_CONTEXT"},
      {400, "CUDA_ERROR_INVALID_HANDLE"}, {500, "CUDA_ERROR_NOT_FOUND"}};
  auto it = names.find(e);
  *s = it == names.end() ? "CUDA_ERROR_UNKNOWN" : it->second;
  return kSuccess;
}
CUresult fake_cuGetErrorString(CUresult e, const char** s) { return fake_cuGetErrorName(e, s); }

const std::map<std::string, void*>& table() {
  static const std::map<std::string, void*> t = {
#define ENTRY(name) {#name, reinterpret_cast<void*>(&fake_##name)}
      ENTRY(cuInit), ENTRY(cuDriverGetVersion), ENTRY(cuDeviceGetCount), ENTRY(cuDeviceGet),
      ENTRY(cuDeviceGetAttribute), ENTRY(cuDevicePrimaryCtxRetain), ENTRY(cuCtxGetCurrent),
      ENTRY(cuCtxPushCurrent), ENTRY(cuCtxPopCurrent), ENTRY(cuCtxGetDevice),
      ENTRY(cuCtxSynchronize), ENTRY(cuPointerGetAttribute), ENTRY(cuMemAlloc), ENTRY(cuMemFree),
      ENTRY(cuMemcpyHtoD), ENTRY(cuMemcpyDtoH), ENTRY(cuMemcpyHtoDAsync),
      ENTRY(cuMemcpyDtoHAsync), ENTRY(cuMemsetD32), ENTRY(cuStreamCreate),
      ENTRY(cuStreamDestroy), ENTRY(cuStreamSynchronize), ENTRY(cuModuleLoadData),
      ENTRY(cuModuleGetFunction), ENTRY(cuLaunchKernel), ENTRY(cuGetErrorName),
      ENTRY(cuGetErrorString),
#undef ENTRY
  };
  return t;
}

}  // namespace

extern "C" {

// cuda-python resolves every entry point through this (names without _v2 suffixes).
__attribute__((visibility("default"))) int cuGetProcAddress_v2(const char* symbol, void** pfn,
                                                               int, unsigned long long,
                                                               int* status) {
  auto it = table().find(symbol);
  *pfn = it == table().end() ? nullptr : it->second;
  if (status) *status = *pfn ? 0 : 1;  // CU_GET_PROC_ADDRESS_SUCCESS / SYMBOL_NOT_FOUND
  return *pfn ? kSuccess : kNotFound;
}

__attribute__((visibility("default"))) int cuGetProcAddress(const char* symbol, void** pfn,
                                                            int version,
                                                            unsigned long long flags) {
  return cuGetProcAddress_v2(symbol, pfn, version, flags, nullptr);
}

__attribute__((visibility("default"))) int cuDriverGetVersion(int* v) {
  return fake_cuDriverGetVersion(v);
}

}  // extern "C"
