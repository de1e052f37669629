// LoKr: y = scale · vec(W1 · X · W2ᵀ) per token, X = the token's input viewed as (in_m, in_n), never building
// kron(W1, W2). W1 (out_l, in_m) and W2 (out_k, in_n) stay in shared memory (fp32) for the whole kernel; a
// persistent grid walks tiles of `tt` tokens, each a pair of small GEMMs batched over the tile:
//   H = X · W2ᵀ   (tt·in_m × out_k)    then    Y = W1 · H   (out_l × tt·out_k).
// Backward, with G the output gradient of a token viewed as (out_l, out_k) and P = W1ᵀ·G:
//   dX = scale · P · W2,   dW2 = scale · Σ_tokens Pᵀ · X,   dW1 = scale · Σ_tokens G · Hᵀ.
// The factor gradients accumulate in shared memory across all tiles of a block and reach global memory once
// per block (fp32 atomicAdd into a zeroed buffer). Layouts in shared memory are chosen so every product is
// one strided GEMM (`smem_gemm`): H and G are kept token-minor ([m][t·out_k + k], [l][t·out_k + k]) and P
// token-major ([(t·in_m + m)][k]).
//
// Cost (not measured: no GPU was available when this was written). For 1280 = 32×40 balanced factors a
// token costs in_m·in_n·out_k + out_l·in_m·out_k = 92,160 FMAs against 5 KB of bf16 traffic, ~37 FLOP/B:
// fp32 CUDA cores make this compute-bound (about twice the memory time at peak; `smem_gemm` issues 8 shared
// loads per 16 FMAs). A Triton kernel on tensor cores is memory-bound here, so parity with it needs
// mma.sync fragments in the two GEMMs.
#include <algorithm>

#include "common.cuh"

namespace lyfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTokens = 16;

// C = A · B with A[i][k] = A[i·a_rs + k·a_cs], B[k][j] = B[k·b_rs + j·b_cs], all in shared memory; each thread
// owns RM×RN outputs (the same ones for the same M, N: accumulating stores need no atomics) and hands each
// to store(i, j, value).
template <int RM, int RN, typename Store>
__device__ __forceinline__ void smem_gemm(int M, int N, int K, const float* A, int a_rs, int a_cs, const float* B,
                                          int b_rs, int b_cs, Store store) {
  const int tiles_n = (N + RN - 1) / RN;
  const int tiles = ((M + RM - 1) / RM) * tiles_n;
  for (int tile = threadIdx.x; tile < tiles; tile += blockDim.x) {
    const int i0 = (tile / tiles_n) * RM, j0 = (tile % tiles_n) * RN;
    float acc[RM][RN];
#pragma unroll
    for (int a = 0; a < RM; ++a)
#pragma unroll
      for (int c = 0; c < RN; ++c) acc[a][c] = 0.f;
    for (int k = 0; k < K; ++k) {
      float av[RM], bv[RN];
#pragma unroll
      for (int a = 0; a < RM; ++a) av[a] = (i0 + a < M) ? A[(i0 + a) * a_rs + k * a_cs] : 0.f;
#pragma unroll
      for (int c = 0; c < RN; ++c) bv[c] = (j0 + c < N) ? B[k * b_rs + (j0 + c) * b_cs] : 0.f;
#pragma unroll
      for (int a = 0; a < RM; ++a)
#pragma unroll
        for (int c = 0; c < RN; ++c) acc[a][c] = fmaf(av[a], bv[c], acc[a][c]);
    }
#pragma unroll
    for (int a = 0; a < RM; ++a)
#pragma unroll
      for (int c = 0; c < RN; ++c)
        if (i0 + a < M && j0 + c < N) store(i0 + a, j0 + c, acc[a][c]);
  }
}

struct Dims {
  int out_l, in_m, out_k, in_n, in, out;
  __host__ __device__ explicit Dims(const LokrShape& s)
      : out_l(s.out_l), in_m(s.in_m), out_k(s.out_k), in_n(s.in_n), in(s.in_m * s.in_n), out(s.out_l * s.out_k) {}
};

// Shared-memory floats of the forward / backward kernels at `tt` tokens per tile.
int64_t fwd_floats(const Dims& d, int tt) {
  return int64_t{d.out_l} * d.in_m + int64_t{d.in_n} * d.out_k + int64_t{tt} * d.in +
         int64_t{tt} * d.in_m * d.out_k;
}
int64_t bwd_floats(const Dims& d, int tt) {
  return 2 * (int64_t{d.out_l} * d.in_m) + 3 * (int64_t{d.out_k} * d.in_n) + int64_t{tt} * (d.in + d.out) +
         2 * (int64_t{tt} * d.in_m * d.out_k);
}

// Load W1 row-major, W2 row-major (optional) and W2ᵀ (optional) into shared memory as fp32.
__device__ void load_factors(const float* __restrict__ w1, const float* __restrict__ w2, float* w1s, float* w2s,
                             float* w2t, const Dims& d) {
  for (int idx = threadIdx.x; idx < d.out_l * d.in_m; idx += blockDim.x) w1s[idx] = w1[idx];
  for (int idx = threadIdx.x; idx < d.out_k * d.in_n; idx += blockDim.x) {
    const float v = w2[idx];
    if (w2s != nullptr) w2s[idx] = v;
    if (w2t != nullptr) {
      const int k = idx / d.in_n, n = idx - k * d.in_n;
      w2t[n * d.out_k + k] = v;
    }
  }
}

template <typename T>
__device__ void load_rows(const T* __restrict__ src, float* dst, int64_t tok0, int64_t tokens, int tt, int width) {
  const int64_t n = int64_t{tt} * width;
  const int64_t left = (tokens - tok0) * width;
  const int64_t avail = left < n ? left : n;
  const T* base = src + tok0 * width;
  for (int64_t idx = threadIdx.x; idx < n; idx += blockDim.x) dst[idx] = idx < avail ? to_f32(base[idx]) : 0.f;
}

// H[m][t·out_k + k] = Σ_n X[t][m][n] · W2[k][n]
__device__ void compute_h(const float* xs, const float* w2t, float* hs, const Dims& d, int tt) {
  const int ld = tt * d.out_k;
  smem_gemm<4, 4>(tt * d.in_m, d.out_k, d.in_n, xs, d.in_n, 1, w2t, d.out_k, 1, [&](int i, int k, float v) {
    const int t = i / d.in_m, m = i - t * d.in_m;
    hs[m * ld + t * d.out_k + k] = v;
  });
}

// ---------------------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) lokr_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w1,
                                                            const float* __restrict__ w2, T* __restrict__ y,
                                                            float scale, LokrShape s, int tt) {
  extern __shared__ float smem[];
  const Dims d(s);
  float* w1s = smem;
  float* w2t = w1s + d.out_l * d.in_m;
  float* xs = w2t + d.in_n * d.out_k;
  float* hs = xs + tt * d.in;
  load_factors(w1, w2, w1s, nullptr, w2t, d);
  const int64_t ntiles = (s.tokens + tt - 1) / tt;
  const int ld = tt * d.out_k;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t tok0 = tile * tt;
    load_rows(x, xs, tok0, s.tokens, tt, d.in);
    __syncthreads();
    compute_h(xs, w2t, hs, d, tt);
    __syncthreads();
    // Y[l][t·out_k + k] = Σ_m W1[l][m] · H[m][t·out_k + k]
    smem_gemm<4, 4>(d.out_l, ld, d.in_m, w1s, d.in_m, 1, hs, ld, 1, [&](int l, int col, float v) {
      const int t = col / d.out_k, k = col - t * d.out_k;
      const int64_t tok = tok0 + t;
      if (tok < s.tokens) y[tok * d.out + l * d.out_k + k] = from_f32<T>(scale * v);
    });
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward. dx == nullptr skips dX; dw1 == nullptr skips both factor gradients.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lokr_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x, const float* __restrict__ w1,
                    const float* __restrict__ w2, T* __restrict__ dx, float* __restrict__ dw1,
                    float* __restrict__ dw2, float scale, LokrShape s, int tt) {
  extern __shared__ float smem[];
  const Dims d(s);
  const bool need_w = dw1 != nullptr;
  const int ld = tt * d.out_k;
  float* w1s = smem;
  float* w2s = w1s + d.out_l * d.in_m;
  float* w2t = w2s + d.out_k * d.in_n;
  float* acc1 = w2t + d.in_n * d.out_k;  // Σ G·Hᵀ   (out_l, in_m)
  float* acc2 = acc1 + d.out_l * d.in_m;  // Σ Pᵀ·X   (out_k, in_n)
  float* xs = acc2 + d.out_k * d.in_n;    // (tt·in_m, in_n)
  float* gs = xs + tt * d.in;             // [l][t·out_k + k]
  float* hs = gs + tt * d.out;            // [m][t·out_k + k]
  float* ps = hs + tt * d.in_m * d.out_k; // [(t·in_m + m)][k]
  load_factors(w1, w2, w1s, w2s, w2t, d);
  for (int idx = threadIdx.x; idx < d.out_l * d.in_m; idx += blockDim.x) acc1[idx] = 0.f;
  for (int idx = threadIdx.x; idx < d.out_k * d.in_n; idx += blockDim.x) acc2[idx] = 0.f;

  const int64_t ntiles = (s.tokens + tt - 1) / tt;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t tok0 = tile * tt;
    if (need_w) load_rows(x, xs, tok0, s.tokens, tt, d.in);
    {  // G, transposed to [l][t·out_k + k]
      const int64_t n = int64_t{tt} * d.out;
      const int64_t left = (s.tokens - tok0) * d.out;
      const int64_t avail = left < n ? left : n;
      const T* base = grad + tok0 * d.out;
      for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
        const int t = idx / d.out, rem = idx - t * d.out;
        const int l = rem / d.out_k, k = rem - l * d.out_k;
        gs[l * ld + t * d.out_k + k] = idx < avail ? to_f32(base[idx]) : 0.f;
      }
    }
    __syncthreads();
    // P[(t, m)][k] = Σ_l W1[l][m] · G[l][t·out_k + k]
    smem_gemm<4, 4>(d.in_m, ld, d.out_l, w1s, 1, d.in_m, gs, ld, 1, [&](int m, int col, float v) {
      const int t = col / d.out_k, k = col - t * d.out_k;
      ps[(t * d.in_m + m) * d.out_k + k] = v;
    });
    if (need_w) compute_h(xs, w2t, hs, d, tt);
    __syncthreads();
    if (dx != nullptr) {  // dX[(t, m)][n] = scale · Σ_k P[(t, m)][k] · W2[k][n]
      const int64_t rows_valid = (s.tokens - tok0) * d.in_m;
      T* base = dx + tok0 * d.in;
      smem_gemm<4, 4>(tt * d.in_m, d.in_n, d.out_k, ps, d.out_k, 1, w2s, d.in_n, 1, [&](int i, int n, float v) {
        if (i < rows_valid) base[int64_t{i} * d.in_n + n] = from_f32<T>(scale * v);
      });
    }
    if (need_w) {
      // acc2[k][n] += Σ_(t,m) P[(t, m)][k] · X[(t, m)][n]
      smem_gemm<4, 4>(d.out_k, d.in_n, tt * d.in_m, ps, 1, d.out_k, xs, d.in_n, 1,
                      [&](int k, int n, float v) { acc2[k * d.in_n + n] += v; });
      // acc1[l][m] += Σ_(t,k) G[l][t·out_k + k] · H[m][t·out_k + k]
      smem_gemm<4, 4>(d.out_l, d.in_m, ld, gs, ld, 1, hs, 1, ld,
                      [&](int l, int m, float v) { acc1[l * d.in_m + m] += v; });
    }
    __syncthreads();
  }
  if (need_w) {
    for (int idx = threadIdx.x; idx < d.out_l * d.in_m; idx += blockDim.x) atomicAdd(dw1 + idx, scale * acc1[idx]);
    for (int idx = threadIdx.x; idx < d.out_k * d.in_n; idx += blockDim.x) atomicAdd(dw2 + idx, scale * acc2[idx]);
  }
}

// Largest tokens-per-tile in {16, 8, 4, 2, 1} within `budget` bytes, not above the token count.
template <typename F>
int pick_tokens(int64_t tokens, int64_t budget, F floats) {
  int tt = kMaxTokens;
  while (tt > 1 && (floats(tt) * 4 > budget || tt / 2 >= tokens)) tt /= 2;
  return tt;
}

template <typename Kernel>
unsigned persistent_grid(Kernel kernel, size_t smem, int64_t ntiles) {
  const int64_t resident = resident_blocks(kernel, kThreads, smem);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ntiles, resident)));
}

void check_shape(const LokrShape& s) {
  LYFAST_CHECK(s.out_l > 0 && s.in_m > 0 && s.out_k > 0 && s.in_n > 0, "LoKr factor dimensions must be positive");
  LYFAST_CHECK(int64_t{s.in_m} * s.in_n < (int64_t{1} << 31) && int64_t{s.out_l} * s.out_k < (int64_t{1} << 31),
               "LoKr layer too wide");
}

}  // namespace

void lokr_forward(DType dtype, const void* x, const float* w1, const float* w2, void* y, float scale,
                  const LokrShape& s, cudaStream_t stream) {
  check_shape(s);
  if (s.tokens == 0) return;
  const Dims d(s);
  const int64_t optin = smem_optin(current_device());
  const int64_t soft = std::min<int64_t>(optin, 96 * 1024);
  auto floats = [&](int tt) { return fwd_floats(d, tt); };
  const int tt = pick_tokens(s.tokens, floats(1) * 4 <= soft ? soft : optin, floats);
  const size_t smem = static_cast<size_t>(floats(tt)) * sizeof(float);
  LYFAST_CHECK(static_cast<int64_t>(smem) <= optin, "LoKr factors too large for shared memory");
  const int64_t ntiles = (s.tokens + tt - 1) / tt;
  LYFAST_DISPATCH_FLOAT(dtype, "lokr_forward", [&] {
    auto kernel = lokr_fwd_kernel<scalar_t>;
    set_smem(kernel, smem);
    const unsigned grid = persistent_grid(kernel, smem, ntiles);
    kernel<<<grid, kThreads, smem, stream>>>(static_cast<const scalar_t*>(x), w1, w2, static_cast<scalar_t*>(y),
                                             scale, s, tt);
    LYFAST_LAUNCH_CHECK();
  });
}

void lokr_backward(DType dtype, const void* grad, const void* x, const float* w1, const float* w2, float scale,
                   void* dx, float* dw1, float* dw2, const LokrShape& s, cudaStream_t stream) {
  check_shape(s);
  LYFAST_CHECK((dw1 == nullptr) == (dw2 == nullptr), "LoKr backward computes both factor gradients or neither");
  if (s.tokens == 0 || (dx == nullptr && dw1 == nullptr)) return;
  const Dims d(s);
  const int64_t optin = smem_optin(current_device());
  auto floats = [&](int tt) { return bwd_floats(d, tt); };
  const int tt = pick_tokens(s.tokens, optin, floats);
  const size_t smem = static_cast<size_t>(floats(tt)) * sizeof(float);
  LYFAST_CHECK(static_cast<int64_t>(smem) <= optin, "LoKr factors too large for shared memory");
  const int64_t ntiles = (s.tokens + tt - 1) / tt;
  LYFAST_DISPATCH_FLOAT(dtype, "lokr_backward", [&] {
    auto kernel = lokr_bwd_kernel<scalar_t>;
    set_smem(kernel, smem);
    const unsigned grid = persistent_grid(kernel, smem, ntiles);
    kernel<<<grid, kThreads, smem, stream>>>(static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(x),
                                             w1, w2, static_cast<scalar_t*>(dx), dw1, dw2, scale, s, tt);
    LYFAST_LAUNCH_CHECK();
  });
}

}  // namespace lyfast
