// lyfast CUDA backend: the pieces every kernel file and the binding file share.
//
// The .cu files hold kernels and raw-pointer launchers and include no torch header: they compile in seconds
// with nvcc, and the one torch-facing file (bindings.cpp) does tensor checks, allocation, the device guard and
// the current stream. This header is therefore split: the host part (dtype tag, error checks, launcher
// declarations) is plain C++ that bindings.cpp includes; the device part is compiled by nvcc only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lyfast {

// Storage types of activations. Arithmetic is always fp32; factors and stage matrices are fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

[[noreturn]] inline void fail(const char* file, int line, const std::string& msg) {
  throw std::runtime_error("lyfast CUDA: " + msg + " (" + file + ":" + std::to_string(line) + ")");
}

}  // namespace lyfast

#define LYFAST_CHECK(cond, msg)                                        \
  do {                                                                 \
    if (!(cond)) ::lyfast::fail(__FILE__, __LINE__, std::string(msg)); \
  } while (0)

#define LYFAST_CUDA_CHECK(expr)                                                                         \
  do {                                                                                                  \
    const cudaError_t lyfast_err_ = (expr);                                                             \
    if (lyfast_err_ != cudaSuccess)                                                                     \
      ::lyfast::fail(__FILE__, __LINE__, std::string(#expr) + ": " + cudaGetErrorString(lyfast_err_)); \
  } while (0)

// After every launch: catches bad configurations (too much shared memory, grid too large) at the call site.
#define LYFAST_LAUNCH_CHECK() LYFAST_CUDA_CHECK(cudaGetLastError())

namespace lyfast {

// ---------------------------------------------------------------------------------------------------------
// Launchers (defined in boft.cu / lokr.cu). All pointers are device pointers to contiguous memory; every
// launch goes to `stream` on the current device. Shapes are documented beside the definitions.
// ---------------------------------------------------------------------------------------------------------
// BOFT: Cayley transform of `count` b×b matrices and its backward.
void cayley_forward(const float* q, float* r, int64_t count, int b, cudaStream_t stream);
void cayley_backward(const float* r, const float* grad, float* dq, int64_t count, int b, cudaStream_t stream);

// BOFT butterfly on z viewed as (batch, channels, spatial). `rt` holds every stage block transposed.
struct BoftShape {
  int64_t batch, channels, spatial;
  int m, nblocks, b;
};
void boft_forward(DType dtype, const void* z, void* out, const float* rt, const float* rescale,
                  const BoftShape& shape, cudaStream_t stream);
// Backward: any of dz, dr, drescale may be null (not computed). dr and drescale are written, not
// accumulated, and are bit-reproducible: per-row-group partials summed in a fixed order, no atomics.
// `workspace` holds those partials: boft_backward_workspace(...) floats for the same arguments on the current
// device (0 when one group suffices; then it may be null); bounded by 32 MiB.
int64_t boft_backward_workspace(DType dtype, const BoftShape& shape, bool need_r, bool need_rescale);
void boft_backward(DType dtype, const void* grad, const void* z, const float* r, const float* rt,
                   const float* rescale, void* dz, float* dr, float* drescale, float* workspace,
                   const BoftShape& shape, cudaStream_t stream);

// LoKr: y = scale·vec(W1·X·W2ᵀ) per token.
struct LokrShape {
  int64_t tokens;
  int out_l, in_m, out_k, in_n;
};
void lokr_forward(DType dtype, const void* x, const float* w1, const float* w2, void* y, float scale,
                  const LokrShape& shape, cudaStream_t stream);
void lokr_backward(DType dtype, const void* grad, const void* x, const float* w1, const float* w2, float scale,
                   void* dx, float* dw1, float* dw2, const LokrShape& shape, cudaStream_t stream);

// Shared-memory budget helpers (host).
inline int smem_optin(int device) {
  int v = 0;
  LYFAST_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return v;
}
inline int current_device() {
  int d = 0;
  LYFAST_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

}  // namespace lyfast

// ---------------------------------------------------------------------------------------------------------
// Device part.
// ---------------------------------------------------------------------------------------------------------
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace lyfast {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Blocks of `kernel` the whole device holds at once (SMs × occupancy, at least one per SM).
template <typename Kernel>
inline int64_t resident_blocks(Kernel kernel, int threads, size_t smem) {
  int device = current_device(), sms = 0, per_sm = 0;
  LYFAST_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  LYFAST_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  return int64_t{std::max(per_sm, 1)} * sms;
}

// Allow a kernel more than the default 48 KiB of dynamic shared memory.
template <typename Kernel>
inline void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    LYFAST_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes)));
}

}  // namespace lyfast

// LYFAST_DISPATCH_FLOAT(dtype, "op", [&] { kernel<scalar_t><<<...>>>(...); });
#define LYFAST_DISPATCH_FLOAT(DTYPE, NAME, ...)                                                  \
  [&] {                                                                                          \
    switch (DTYPE) {                                                                             \
      case ::lyfast::DType::kFloat32: {                                                          \
        using scalar_t = float;                                                                  \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case ::lyfast::DType::kFloat16: {                                                          \
        using scalar_t = __half;                                                                 \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case ::lyfast::DType::kBFloat16: {                                                         \
        using scalar_t = __nv_bfloat16;                                                          \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
    }                                                                                            \
    ::lyfast::fail(__FILE__, __LINE__, std::string(NAME) + ": unsupported dtype");              \
  }()
#endif  // __CUDACC__
