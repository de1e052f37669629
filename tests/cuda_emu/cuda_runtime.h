// CPU emulation of the slice of the CUDA runtime that csrc/*.cu uses, for tests/test_cuda_emulated.py.
//
// A launch runs its thread blocks one after another (in grid order, or a seeded permutation of it to stand in
// for a GPU's scheduling: results that depend on block order then differ between seeds); each block runs as blockDim.x std::threads that share
// one shared-memory buffer and meet at a real barrier in __syncthreads(). So the kernels' index math,
// tiling plans, barrier placement and atomics execute as written, in fp32 on the CPU. Not emulated: warps
// as lock-step units (only __shfl_down_sync, with all 32 lanes), the GPU memory model beyond barriers,
// timing. A barrier that not every thread reaches (a deadlock on the GPU) fails the launch after a timeout.
// The test rewrites `k<<<g, b, s, st>>>(args)` into `::emu::launch(k, g, b, s, st, args)` and
// `extern __shared__ T name[];` into `T* name = ::emu::dynamic_smem<T>();` before compiling.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time: a function-static is shared by one block's threads

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
  float x, y;
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {

struct Config {
  int smem_optin = 227 * 1024;  // an H100's opt-in limit
  int sms = 2;
  int blocks_per_sm = 1;
  int barrier_timeout_s = 30;
  unsigned block_order_seed = 0;  // 0: blocks in grid order; else a permutation drawn from this seed
};
inline Config& config() {
  static Config c;
  return c;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline std::map<const void*, int>& smem_limits() {
  static std::map<const void*, int> m;
  return m;
}

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(config().barrier_timeout_s), [&] { return gen_ != gen; }))
      throw std::runtime_error("emulated barrier timed out: not every thread reached it");
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

struct Block {
  Barrier bar;
  std::vector<std::unique_ptr<Barrier>> warp_bars;
  std::vector<std::array<uint64_t, 32>> lanes;
  std::vector<double> smem;  // 8-byte aligned storage
  Block(int threads, size_t smem_bytes) : bar(threads), lanes((threads + 31) / 32), smem(smem_bytes / 8 + 1) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warp_bars.emplace_back(new Barrier(std::min(32, threads - 32 * w)));
  }
};
inline thread_local Block* tls_block = nullptr;

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(tls_block->smem.data());
}

}  // namespace emu

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() { emu::tls_block->bar.wait(); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

template <typename T>
inline T __shfl_down_sync(unsigned, T v, int delta) {
  static_assert(sizeof(T) <= 8, "shuffle of a wide type");
  emu::Block& b = *emu::tls_block;
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  std::memcpy(&b.lanes[w][lane], &v, sizeof(T));
  b.warp_bars[w]->wait();
  T out = v;
  if (lane + delta < 32) std::memcpy(&out, &b.lanes[w][lane + delta], sizeof(T));
  b.warp_bars[w]->wait();
  return out;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument (emulated: dynamic shared memory above the kernel's limit)";
    default:
      return "unspecified launch failure (emulated)";
  }
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::config().smem_optin : emu::config().sms;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute, int v) {
  if (v > emu::config().smem_optin) return cudaErrorInvalidValue;
  emu::smem_limits()[reinterpret_cast<const void*>(f)] = v;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) {
  *n = emu::config().blocks_per_sm;
  return cudaSuccess;
}

namespace emu {

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  auto it = smem_limits().find(reinterpret_cast<const void*>(kernel));
  const size_t limit = it == smem_limits().end() ? 48 * 1024 : static_cast<size_t>(it->second);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (smem > limit || threads > 1024 || threads < 1) {
    last_error() = cudaErrorInvalidValue;
    return;
  }
  const std::tuple<P...> params(std::forward<A>(args)...);
  std::vector<uint64_t> order(uint64_t{grid.x} * grid.y * grid.z);
  std::iota(order.begin(), order.end(), uint64_t{0});
  if (config().block_order_seed != 0) {
    std::shuffle(order.begin(), order.end(), std::mt19937(config().block_order_seed));
  }
  for (const uint64_t linear : order) {
    const unsigned bx = linear % grid.x, by = (linear / grid.x) % grid.y, bz = linear / (uint64_t{grid.x} * grid.y);
    Block b(threads, smem);
    std::atomic<bool> failed{false};
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        threadIdx = dim3(t);
        blockIdx = dim3(bx, by, bz);
        blockDim = block;
        gridDim = grid;
        tls_block = &b;
        try {
          std::apply(kernel, params);
        } catch (...) {
          failed = true;
        }
      });
    for (auto& th : pool) th.join();
    if (failed) {
      last_error() = cudaErrorLaunchFailure;
      return;
    }
  }
}

}  // namespace emu
