// A small SIMT emulator that lets a host C++ compiler run kernels/lcas.cu on the CPU, so that
// CPU-only CI executes the kernel's own code (index maths, warp reductions, shared-memory
// layout, barriers) against the references. It is not a CUDA implementation: each CUDA thread
// of a block is a fiber (ucontext) on the calling OS thread, blocks run one after another,
// __syncthreads is a block-wide barrier and a warp shuffle is a 32-lane exchange between two
// warp barriers; a fiber runs until it reaches a barrier, then the next one runs. A shuffle
// reached by only part of a warp, or a barrier skipped by some threads, stops the program with
// "deadlock" (undefined behaviour on a GPU). What it cannot check: memory coalescing, register
// limits, the fp16 conversion instruction and anything else architecture-specific.
#pragma once

#define CINEMAE_LCAS_EMULATE 1

#include <ucontext.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cinemae_emu {

constexpr std::size_t kFiberStack = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  bool done = false;
  int wait = 0;  // 0 running, 1 warp barrier, 2 block barrier
  unsigned wait_gen = 0;
};

struct Block {
  Block(int threads, std::size_t smem_bytes)
      : fibers(threads),
        warp_arrived(threads / 32, 0),
        warp_gen(threads / 32, 0),
        slots(threads / 32),
        smem(smem_bytes + 16) {
    // Garbage, so that a read of shared memory before it is written shows up in the results.
    std::memset(smem.data(), 0x7f, smem.size());
  }
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  std::vector<int> warp_arrived;
  std::vector<unsigned> warp_gen;
  int block_arrived = 0;
  unsigned block_gen = 0;
  std::vector<std::array<std::uint64_t, 32>> slots;
  std::vector<unsigned char> smem;
  const std::function<void()>* body = nullptr;
};

inline thread_local Block* tl_block = nullptr;

inline void wait_at(int kind, int members, int& arrived, unsigned& gen) {
  Block& b = *tl_block;
  if (++arrived == members) {  // the last to arrive releases the others
    arrived = 0;
    ++gen;
    return;
  }
  Fiber& f = b.fibers[b.current];
  f.wait = kind;
  f.wait_gen = gen;
  swapcontext(&f.ctx, &b.scheduler);  // resumed once gen has moved on
  f.wait = 0;
}

inline void warp_barrier() {
  Block& b = *tl_block;
  const int w = b.current / 32;
  wait_at(1, 32, b.warp_arrived[w], b.warp_gen[w]);
}

inline void fiber_entry() {
  Block& b = *tl_block;
  (*b.body)();
  b.fibers[b.current].done = true;
}  // returns to uc_link, the scheduler

}  // namespace cinemae_emu

#define LCAS_DECLARE_SMEM(name) unsigned char* name = cinemae_emu::tl_block->smem.data()

inline void __syncthreads() {
  cinemae_emu::Block& b = *cinemae_emu::tl_block;
  cinemae_emu::wait_at(2, static_cast<int>(b.fibers.size()), b.block_arrived, b.block_gen);
}

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffle of a wide type");
  cinemae_emu::Block& b = *cinemae_emu::tl_block;
  const int warp = b.current / 32;
  const int lane = b.current % 32;
  std::memcpy(&b.slots[warp][lane], &v, sizeof(T));
  cinemae_emu::warp_barrier();
  T r;
  std::memcpy(&r, &b.slots[warp][lane ^ lane_mask], sizeof(T));
  cinemae_emu::warp_barrier();
  return r;
}

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

// IEEE binary16 bits -> float (all cases: zero, subnormal, normal, inf, NaN).
inline float cinemae_emu_half_to_float(unsigned short h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
    if (sign) f = -f;
    return f;
  }
  std::uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

namespace cinemae_emu {

inline void run_block(int bi, int grid, int threads, std::size_t smem_bytes,
                      const std::function<void()>& body) {
  Block blk(threads, smem_bytes);
  blk.body = &body;
  tl_block = &blk;
  blockIdx.x = static_cast<unsigned>(bi);
  blockDim.x = static_cast<unsigned>(threads);
  gridDim.x = static_cast<unsigned>(grid);
  for (Fiber& f : blk.fibers) {
    f.stack.reset(new char[kFiberStack]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = &blk.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    int alive = 0, ran = 0;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = blk.fibers[t];
      if (f.done) continue;
      ++alive;
      if (f.wait == 1 && blk.warp_gen[t / 32] == f.wait_gen) continue;
      if (f.wait == 2 && blk.block_gen == f.wait_gen) continue;
      blk.current = t;
      threadIdx.x = static_cast<unsigned>(t);
      swapcontext(&blk.scheduler, &f.ctx);
      ++ran;
    }
    if (alive == 0) break;
    if (ran == 0) {
      std::fprintf(stderr,
                   "cuda_emulation: deadlock in block %d (a barrier or shuffle that not every "
                   "thread reaches)\n",
                   bi);
      std::abort();
    }
  }
  tl_block = nullptr;
}

// Run body() as a grid of `grid` blocks of `threads` threads (a multiple of 32) with
// `smem_bytes` of dynamic shared memory; blocks run one after another on the calling thread.
inline void launch(int grid, int threads, std::size_t smem_bytes,
                   const std::function<void()>& body) {
  for (int bi = 0; bi < grid; ++bi) run_block(bi, grid, threads, smem_bytes, body);
}

}  // namespace cinemae_emu
