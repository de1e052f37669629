// BOFT: the whole butterfly in one kernel per direction, and the batched Cayley transform.
//
// Notation (lyfast/functional/boft.py): m stages of n = O / b blocks of size b; stage i (T = 2^i,
// k = T·b/2) maps block j = c·T + t, row u = 2a + x to channel c·2k + x·k + t·b/2 + a, and applies
//   h'[ch(j, u)] = Σ_v R[i][j][u][v] · h[ch(j, v)].
// Every stage mixes channels only inside chunks of L = 2^(m-1)·b consecutive channels, so one thread block
// owns a tile of `tr` rows × one chunk, keeps it in shared memory (fp32) and runs all m stages there: the
// activation is read once and written once, whatever m is.
//
// Thread mapping inside a stage: item (jl, a) = (block in chunk, row pair a < b/2) computes the two outputs
// u = 2a and 2a+1 of block jl for all tile rows. Both outputs read the same b inputs, which sit in two runs of
// b/2 consecutive channels; the two coefficients M[u][v], M[u+1][v] are one float2 of the block stored
// transposed (Mt[v][u]), so a stage reads its matrices with 8-byte loads that are contiguous across the lanes
// of one block. Forward passes Rᵀ-blocks (M = R); backward passes R itself (M = Rᵀ), so one routine does both.
//
// Cost (not measured: no GPU was available when this was written). At an SDXL width of 1280 with b = 10,
// m = 8, a row costs m·O·b = 102,400 FMAs forward against 5 KB of bf16 traffic, ~40 FLOP/B: on fp32 CUDA
// cores (~20 FLOP/B of HBM bandwidth on an H100) that is compute-bound at about twice the memory time, and
// the inner loop issues one shared-memory load per two FMAs. The backward adds m·L·b read-modify-writes per
// row tile to its block's dR partial (L = chunk width; plain loads/stores, see the backward) and replays
// (m−C)(m−C+1)/2 stages per tile when only C < m stage inputs fit as checkpoints. Tensor cores (b padded to
// 16) and a cluster/DSMEM reduction of dR are the next steps.
#include <algorithm>

#include "common.cuh"

namespace lyfast {
namespace {

constexpr int kThreads = 256;
// Shared memory allows at most two blocks per SM; telling ptxas so lets it keep the accumulators in
// registers (with the default bound it capped itself below 64 and spilled).
constexpr int kMinBlocks = 2;
constexpr int kMaxRows = 8;  // rows per tile (register accumulators per item: 2·kMaxRows)

// ---------------------------------------------------------------------------------------------------------
// Stage helpers (all threads of the block call them; callers synchronize between stages).
// ---------------------------------------------------------------------------------------------------------
struct StageGeom {
  int half, T, k;
  __device__ StageGeom(int stage, int b) : half(b / 2), T(1 << stage), k((1 << stage) * (b / 2)) {}
  // First channel (in the chunk) of block jl's row pairs; outputs of pair a are base + a and base + k + a.
  __device__ int base(int jl, int b) const { return (jl / T) * (T * b) + (jl % T) * half; }
};

// dst[r][ch(j,u)] = Σ_v M[j][u][v] · src[r][ch(j,v)] for every block of the chunk; `mt` = &Mt[block 0 of chunk].
__device__ void apply_stage(const float* __restrict__ mt, const float* src, float* dst, int stage, int b, int L,
                            int tr) {
  const StageGeom g(stage, b);
  const int items = L / 2;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int jl = it / g.half, a = it - jl * g.half;
    const int base = g.base(jl, b);
    const float* mj = mt + static_cast<size_t>(jl) * b * b + 2 * a;
    float acc0[kMaxRows], acc1[kMaxRows];
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) acc0[r] = acc1[r] = 0.f;
    for (int y = 0; y < 2; ++y) {
      for (int bp = 0; bp < g.half; ++bp) {
        const float2 w = __ldg(reinterpret_cast<const float2*>(mj + (2 * bp + y) * b));
        const int c = base + y * g.k + bp;
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          if (r < tr) {
            const float h = src[r * L + c];
            acc0[r] = fmaf(w.x, h, acc0[r]);
            acc1[r] = fmaf(w.y, h, acc1[r]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < tr) {
        dst[r * L + base + a] = acc0[r];
        dst[r * L + base + g.k + a] = acc1[r];
      }
    }
  }
}

// dR[j][u][v] (+)= Σ_r g[r][ch(j,u)] · h[r][ch(j,v)] over this tile's rows, `=` on the block's first tile;
// `dr` = &dR[block 0 of chunk] in the block's own partial. Each element has one owner thread, the same one on
// every tile of the block (items depend on threadIdx.x and the stage only), so plain loads and stores suffice.
__device__ void accumulate_dr(float* dr, const float* g, const float* h, int stage, int b, int L, int tr,
                              bool first) {
  const StageGeom geo(stage, b);
  const int items = L / 2;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int jl = it / geo.half, a = it - jl * geo.half;
    const int base = geo.base(jl, b);
    float g0[kMaxRows], g1[kMaxRows];
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      g0[r] = r < tr ? g[r * L + base + a] : 0.f;
      g1[r] = r < tr ? g[r * L + base + geo.k + a] : 0.f;
    }
    float* d0 = dr + (static_cast<size_t>(jl) * b + 2 * a) * b;
    float* d1 = d0 + b;
    for (int y = 0; y < 2; ++y) {
      for (int bp = 0; bp < geo.half; ++bp) {
        const int c = base + y * geo.k + bp;
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          if (r < tr) {
            const float hv = h[r * L + c];
            s0 = fmaf(g0[r], hv, s0);
            s1 = fmaf(g1[r], hv, s1);
          }
        }
        float* p0 = d0 + 2 * bp + y;
        float* p1 = d1 + 2 * bp + y;
        *p0 = first ? s0 : *p0 + s0;
        *p1 = first ? s1 : *p1 + s1;
      }
    }
  }
}

// Global offset of tile element (r, cl) of chunk `chunk`, or -1 past the last row. Rows (batch·spatial) are
// below 2^31 (checked by the launchers), so the row split is a 32-bit division: a 64-bit one is a called
// subroutine whose register saves ptxas reports as spills.
struct Tile {
  uint32_t row0, rows, spatial;
  int64_t channels;
  int64_t chunk0;  // first channel of the chunk
  __device__ int64_t offset(int r, int cl) const {
    const uint32_t row = row0 + r;
    if (row >= rows) return -1;
    const uint32_t bt = row / spatial, s = row - bt * spatial;
    return (static_cast<int64_t>(bt) * channels + chunk0 + cl) * spatial + s;
  }
};

// Visit the tile's (r, cl) pairs so that consecutive threads touch consecutive addresses: channels fastest
// for linear layers (spatial == 1), rows (= pixels) fastest for convs.
template <typename F>
__device__ void for_tile(const Tile& t, int tr, int L, F f) {
  const int n = tr * L;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    int r, cl;
    if (t.spatial == 1) {
      r = idx / L;
      cl = idx - r * L;
    } else {
      cl = idx / tr;
      r = idx - cl * tr;
    }
    f(r, cl, t.offset(r, cl));
  }
}

template <typename T>
__device__ void load_tile(const T* __restrict__ src, float* dst, const Tile& t, int tr, int L) {
  for_tile(t, tr, L, [&](int r, int cl, int64_t off) { dst[r * L + cl] = off >= 0 ? to_f32(src[off]) : 0.f; });
}

// ---------------------------------------------------------------------------------------------------------
// Forward: out = rescale ⊙ B_{m-1}(⋯B_0(z)).
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) boft_fwd_kernel(const T* __restrict__ z, T* __restrict__ out,
                                                            const float* __restrict__ rt,
                                                            const float* __restrict__ rescale, BoftShape s,
                                                            int L, int tr) {
  extern __shared__ float smem[];
  const int tl = tr * L;  // buffers: smem[0, tl) and smem[tl, 2·tl)
  const int chunk = blockIdx.y;
  const int nbc = L / s.b;  // blocks per chunk
  const Tile tile{blockIdx.x * tr, static_cast<uint32_t>(s.batch * s.spatial), static_cast<uint32_t>(s.spatial),
                  s.channels, static_cast<int64_t>(chunk) * L};
  load_tile(z, smem, tile, tr, L);
  __syncthreads();
  int cur = 0;
  for (int i = 0; i < s.m; ++i) {
    const float* mt = rt + (static_cast<size_t>(i) * s.nblocks + static_cast<size_t>(chunk) * nbc) * s.b * s.b;
    apply_stage(mt, smem + cur * tl, smem + (cur ^ 1) * tl, i, s.b, L, tr);
    __syncthreads();
    cur ^= 1;
  }
  const float* h = smem + cur * tl;
  for_tile(tile, tr, L, [&](int r, int cl, int64_t off) {
    if (off < 0) return;
    const float sc = rescale != nullptr ? rescale[tile.chunk0 + cl] : 1.f;
    out[off] = from_f32<T>(h[r * L + cl] * sc);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward. With g_m = grad ⊙ rescale and g_i = B_iᵀ g_{i+1}:
//   dz = g_0,  dR_i[j] = Σ_rows g_{i+1}[ch(j,·)] ⊗ h_i[ch(j,·)],  drescale = Σ_rows grad ⊙ h_m.
// Stage inputs h_i are recomputed from z in the tile: h_0..h_{C-1} are kept as checkpoints (C as many as the
// shared memory holds, up to m) and h_i for i >= C is replayed from h_{C-1}. Three more buffers (the pool)
// hold g (ping-pong) and the replay.
// Block (x, chunk) takes the row tiles x, x + gridDim.x, … of its chunk and sums their dR and drescale in a
// fixed order into its own fp32 partial: dR + x·|dR| and drescale + x·channels (written, not accumulated, on
// its first tile, so the buffer needs no zeroing). With gridDim.x == 1 the partial is the result; otherwise
// sum_partials adds the gridDim.x partials in index order. No atomics: dR is bit-reproducible run to run.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    boft_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ z, const float* __restrict__ r,
                    const float* __restrict__ rt, const float* __restrict__ rescale, T* __restrict__ dz,
                    float* __restrict__ dr, float* __restrict__ drescale, BoftShape s, int L, int tr, int ckpts) {
  extern __shared__ float smem[];
  const int tl = tr * L;
  float* ckpt = smem;               // ckpts buffers: h_0 .. h_{ckpts-1}
  float* pool = smem + ckpts * tl;  // 3 buffers
  auto pbuf = [&](int p) { return pool + p * tl; };
  const int chunk = blockIdx.y;
  const int nbc = L / s.b;
  const size_t bb = static_cast<size_t>(s.b) * s.b;
  const size_t chunk_off = static_cast<size_t>(chunk) * nbc * bb;
  auto stage_off = [&](int i) { return static_cast<size_t>(i) * s.nblocks * bb + chunk_off; };
  const uint32_t rows = static_cast<uint32_t>(s.batch * s.spatial);
  const uint32_t ntiles = (rows + tr - 1) / tr;
  float* const drp = dr != nullptr ? dr + blockIdx.x * (static_cast<size_t>(s.m) * s.nblocks * bb) : nullptr;
  float* const dsp = drescale != nullptr ? drescale + blockIdx.x * static_cast<size_t>(s.channels) : nullptr;
  const bool need_dz = dz != nullptr;
  for (uint32_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const bool first = t == blockIdx.x;
    const Tile tile{t * tr, rows, static_cast<uint32_t>(s.spatial), s.channels, static_cast<int64_t>(chunk) * L};

    load_tile(z, ckpt, tile, tr, L);
    __syncthreads();
    for (int i = 0; i + 1 < ckpts; ++i) {
      apply_stage(rt + stage_off(i), ckpt + i * tl, ckpt + (i + 1) * tl, i, s.b, L, tr);
      __syncthreads();
    }

    // g_m = grad ⊙ rescale into pool[0]; drescale needs h_m, replayed into pool[1]/pool[2].
    int gp = 0;
    load_tile(grad, pbuf(gp), tile, tr, L);
    if (dsp != nullptr) {
      const float* src = ckpt + (ckpts - 1) * tl;
      int p = 1;
      for (int i = ckpts - 1; i < s.m; ++i) {
        __syncthreads();
        apply_stage(rt + stage_off(i), src, pbuf(p), i, s.b, L, tr);
        src = pbuf(p);
        p = 3 - p;  // 1 <-> 2
      }
      __syncthreads();
      const float* g = pbuf(gp);
      for (int cl = threadIdx.x; cl < L; cl += blockDim.x) {
        float acc = 0.f;
        for (int rr = 0; rr < tr; ++rr) acc = fmaf(g[rr * L + cl], src[rr * L + cl], acc);
        float* dst = dsp + tile.chunk0 + cl;
        *dst = first ? acc : *dst + acc;
      }
    }
    __syncthreads();
    if (rescale != nullptr) {
      float* g = pbuf(gp);
      for (int idx = threadIdx.x; idx < tl; idx += blockDim.x) g[idx] *= rescale[tile.chunk0 + idx % L];
      __syncthreads();
    }

    for (int i = s.m - 1; i >= 0; --i) {
      // h_i: a checkpoint, or replayed from the last checkpoint through the two pool buffers g does not use.
      const float* h;
      int hp = -1;  // pool index holding h_i, if any
      if (i < ckpts) {
        h = ckpt + i * tl;
      } else {
        const int f0 = (gp + 1) % 3, f1 = (gp + 2) % 3;
        const float* src = ckpt + (ckpts - 1) * tl;
        int p = f0;
        for (int st = ckpts - 1; st < i; ++st) {
          apply_stage(rt + stage_off(st), src, pbuf(p), st, s.b, L, tr);
          __syncthreads();
          src = pbuf(p);
          hp = p;
          p = (p == f0) ? f1 : f0;
        }
        h = src;
      }
      if (drp != nullptr) accumulate_dr(drp + stage_off(i), pbuf(gp), h, i, s.b, L, tr, first);
      if (i > 0 || need_dz) {
        int np = (gp + 1) % 3;
        if (np == hp) np = (gp + 2) % 3;
        apply_stage(r + stage_off(i), pbuf(gp), pbuf(np), i, s.b, L, tr);
        gp = np;
      }
      __syncthreads();
    }
    if (need_dz) {
      const float* g = pbuf(gp);
      for_tile(tile, tr, L, [&](int rr, int cl, int64_t off) {
        if (off >= 0) dz[off] = from_f32<T>(g[rr * L + cl]);
      });
    }
    __syncthreads();  // the next tile overwrites every buffer (pool[0] may still be read for dz above)
  }
}

// out[e] = Σ_{p < parts} partial[p·n + e], p in index order (fp32): the second stage of the dR/drescale sum.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* __restrict__ partial, int parts,
                                                                int64_t n, float* __restrict__ out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int p = 0; p < parts; ++p) acc += partial[p * n + e];
    out[e] = acc;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Cayley: R = (I + Q)(I − Q)⁻¹ = solve(I − Q, I + Q) (the two factors commute), one matrix per block,
// Gauss–Jordan on [I − Q | I + Q] in shared memory with partial pivoting, fp32.
// ---------------------------------------------------------------------------------------------------------
constexpr int kCayleyThreads = 128;

__global__ void __launch_bounds__(kCayleyThreads) cayley_fwd_kernel(const float* __restrict__ q,
                                                                    float* __restrict__ r, int b) {
  extern __shared__ float smem[];
  const int w = 2 * b;  // augmented row width
  float* M = smem;
  float* fac = smem + b * w;
  __shared__ int pivot_row;
  const size_t off = static_cast<size_t>(blockIdx.x) * b * b;
  for (int idx = threadIdx.x; idx < b * b; idx += blockDim.x) {
    const int i = idx / b, j = idx - i * b;
    const float qv = q[off + idx], e = (i == j) ? 1.f : 0.f;
    M[i * w + j] = e - qv;
    M[i * w + b + j] = e + qv;
  }
  __syncthreads();
  for (int k = 0; k < b; ++k) {
    if (threadIdx.x < 32) {  // pivot: largest |M[i][k]|, i >= k (first index on ties)
      float best = -1.f;
      int bi = k;
      for (int i = k + threadIdx.x; i < b; i += 32) {
        const float v = fabsf(M[i * w + k]);
        if (v > best) {
          best = v;
          bi = i;
        }
      }
      for (int d = 16; d > 0; d >>= 1) {
        const float ob = __shfl_down_sync(0xffffffffu, best, d);
        const int oi = __shfl_down_sync(0xffffffffu, bi, d);
        if (ob > best || (ob == best && oi < bi)) {
          best = ob;
          bi = oi;
        }
      }
      if (threadIdx.x == 0) pivot_row = bi;
    }
    __syncthreads();
    const int p = pivot_row;
    if (p != k) {  // columns < k are zero in both rows
      for (int j = k + threadIdx.x; j < w; j += blockDim.x) {
        const float t = M[k * w + j];
        M[k * w + j] = M[p * w + j];
        M[p * w + j] = t;
      }
      __syncthreads();
    }
    for (int i = threadIdx.x; i < b; i += blockDim.x) fac[i] = M[i * w + k];
    __syncthreads();
    const float inv = 1.f / fac[k];
    for (int j = k + threadIdx.x; j < w; j += blockDim.x) M[k * w + j] *= inv;
    __syncthreads();
    const int cols = w - k;
    for (int idx = threadIdx.x; idx < b * cols; idx += blockDim.x) {
      const int i = idx / cols, j = k + (idx - i * cols);
      if (i != k) M[i * w + j] = fmaf(-fac[i], M[k * w + j], M[i * w + j]);
    }
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < b * b; idx += blockDim.x) {
    const int i = idx / b, j = idx - i * b;
    r[off + idx] = M[i * w + b + j];
  }
}

// dQ = ½ (I + R)ᵀ · dR · (I + R)ᵀ   (from dR = 2 (I−Q)⁻¹ dQ (I−Q)⁻¹ and (I−Q)⁻¹ = (I + R)/2).
__global__ void __launch_bounds__(kCayleyThreads) cayley_bwd_kernel(const float* __restrict__ r,
                                                                    const float* __restrict__ grad,
                                                                    float* __restrict__ dq, int b) {
  extern __shared__ float smem[];
  const int bb = b * b;
  float* P = smem;       // (I + R)ᵀ
  float* G = smem + bb;  // dR
  float* U = smem + 2 * bb;
  const size_t off = static_cast<size_t>(blockIdx.x) * bb;
  for (int idx = threadIdx.x; idx < bb; idx += blockDim.x) {
    const int i = idx / b, j = idx - i * b;
    P[j * b + i] = r[off + idx] + (i == j ? 1.f : 0.f);
    G[idx] = grad[off + idx];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < bb; idx += blockDim.x) {  // U = P · G
    const int i = idx / b, j = idx - i * b;
    float acc = 0.f;
    for (int t = 0; t < b; ++t) acc = fmaf(P[i * b + t], G[t * b + j], acc);
    U[idx] = acc;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < bb; idx += blockDim.x) {  // dQ = ½ U · P
    const int i = idx / b, j = idx - i * b;
    float acc = 0.f;
    for (int t = 0; t < b; ++t) acc = fmaf(U[i * b + t], P[t * b + j], acc);
    dq[off + idx] = 0.5f * acc;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Plans.
// ---------------------------------------------------------------------------------------------------------
int chunk_of(const BoftShape& s) { return (1 << (s.m - 1)) * s.b; }

// Largest tile height in {8, 4, 2, 1} whose `buffers` fp32 row-buffers fit `budget`, not above the row count.
int pick_rows(int64_t rows, int64_t L, int buffers, int64_t budget) {
  int tr = kMaxRows;
  while (tr > 1 && (static_cast<int64_t>(buffers) * tr * L * 4 > budget || tr / 2 >= rows)) tr /= 2;
  return tr;
}

void check_shape(const BoftShape& s) {
  LYFAST_CHECK(s.batch * s.spatial < (int64_t{1} << 31), "BOFT input has 2^31 or more rows");
  LYFAST_CHECK(s.b >= 2 && s.b % 2 == 0, "BOFT block size must be even");
  LYFAST_CHECK(s.m >= 1 && s.m <= 30 && (int64_t{1} << (s.m - 1)) <= s.nblocks,
               "BOFT needs 1 <= m and 2^(m-1) <= number of blocks");
  LYFAST_CHECK((s.nblocks & (s.nblocks - 1)) == 0, "BOFT block count must be a power of two");
  LYFAST_CHECK(static_cast<int64_t>(s.nblocks) * s.b == s.channels, "BOFT blocks do not cover the channels");
}

// Partials of the backward's dR and drescale stay below this many bytes: within an H100/H200's 50 MB L2 (and
// most of an A100's 40 MB), where the per-tile read-modify-writes land, and small beside the activations.
constexpr int64_t kPartialBytes = 32ll << 20;

// The backward's launch: rows per tile, checkpoints, shared memory and the number of row groups (gridDim.x),
// each with its own dR/drescale partial. Groups fill the GPU once (resident blocks / chunks) within
// kPartialBytes and never exceed the row tiles; without a reduction to do, every tile is a group.
struct BwdPlan {
  int tr, ckpts;
  size_t smem;
  int64_t tiles, groups, partial_floats;  // partial_floats: one group's dR + drescale floats
  int64_t workspace() const { return groups > 1 ? groups * partial_floats : 0; }
};

BwdPlan plan_backward(DType dtype, const BoftShape& s, bool need_r, bool need_rescale) {
  check_shape(s);
  const int64_t rows = s.batch * s.spatial;
  const int L = chunk_of(s);
  const int64_t budget = smem_optin(current_device());
  BwdPlan p{};
  // Rows per tile first (each tile adds m·L·b read-modify-writes to its partial, so taller tiles cut them),
  // then as many checkpoints as the rest of the shared memory holds (each one saves a replay of the stages
  // above it).
  p.tr = pick_rows(rows, L, 4, budget);
  const int64_t per_buf = static_cast<int64_t>(p.tr) * L * 4;
  LYFAST_CHECK(4 * per_buf <= budget, "BOFT chunk too large for shared memory");
  p.ckpts = static_cast<int>(std::min<int64_t>(s.m, budget / per_buf - 3));
  p.smem = static_cast<size_t>(p.ckpts + 3) * per_buf;
  p.tiles = (rows + p.tr - 1) / p.tr;
  p.partial_floats = (need_r ? int64_t{s.m} * s.nblocks * s.b * s.b : 0) + (need_rescale ? s.channels : 0);
  if (p.partial_floats == 0) {
    p.groups = p.tiles;
    return p;
  }
  const int64_t chunks = s.channels / L;
  const int64_t resident = LYFAST_DISPATCH_FLOAT(dtype, "boft_backward", [&] {
    return resident_blocks(boft_bwd_kernel<scalar_t>, kThreads, p.smem);
  });
  const int64_t fill = (resident + chunks - 1) / chunks;
  const int64_t fit = kPartialBytes / (4 * p.partial_floats);
  p.groups = std::max<int64_t>(1, std::min({p.tiles, fill, fit}));
  return p;
}

void sum_partials(const float* partial, int64_t parts, int64_t n, float* out, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  sum_partials_kernel<<<grid, kThreads, 0, stream>>>(partial, static_cast<int>(parts), n, out);
  LYFAST_LAUNCH_CHECK();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Launchers.
// ---------------------------------------------------------------------------------------------------------
void boft_forward(DType dtype, const void* z, void* out, const float* rt, const float* rescale, const BoftShape& s,
                  cudaStream_t stream) {
  check_shape(s);
  const int64_t rows = s.batch * s.spatial;
  if (rows == 0) return;
  const int L = chunk_of(s);
  const int64_t optin = smem_optin(current_device());
  // Soft budget: two fp32 buffers; ~96 KiB lets two blocks share an H100/A100 SM. Larger chunks use it all.
  const int64_t soft = std::min<int64_t>(optin, 96 * 1024);
  const int tr = pick_rows(rows, L, 2, 2LL * L * 4 <= soft ? soft : optin);
  const size_t smem = 2ull * tr * L * sizeof(float);
  LYFAST_CHECK(static_cast<int64_t>(smem) <= optin, "BOFT chunk too large for shared memory");
  const dim3 grid(static_cast<unsigned>((rows + tr - 1) / tr), static_cast<unsigned>(s.channels / L));
  LYFAST_DISPATCH_FLOAT(dtype, "boft_forward", [&] {
    auto kernel = boft_fwd_kernel<scalar_t>;
    set_smem(kernel, smem);
    kernel<<<grid, kThreads, smem, stream>>>(static_cast<const scalar_t*>(z), static_cast<scalar_t*>(out), rt,
                                             rescale, s, L, tr);
    LYFAST_LAUNCH_CHECK();
  });
}

int64_t boft_backward_workspace(DType dtype, const BoftShape& s, bool need_r, bool need_rescale) {
  if (s.batch * s.spatial == 0) return 0;
  return plan_backward(dtype, s, need_r, need_rescale).workspace();
}

void boft_backward(DType dtype, const void* grad, const void* z, const float* r, const float* rt,
                   const float* rescale, void* dz, float* dr, float* drescale, float* workspace, const BoftShape& s,
                   cudaStream_t stream) {
  check_shape(s);
  if (s.batch * s.spatial == 0) return;
  const BwdPlan p = plan_backward(dtype, s, dr != nullptr, drescale != nullptr);
  LYFAST_CHECK(p.groups == 1 || p.partial_floats == 0 || workspace != nullptr,
               "BOFT backward needs the workspace of boft_backward_workspace()");
  // One group writes dR/drescale directly; several write their partials to the workspace ([group][dR], then
  // [group][drescale]) and sum_partials adds them in group order.
  const bool direct = p.groups == 1 || p.partial_floats == 0;
  const int64_t n_r = dr != nullptr ? int64_t{s.m} * s.nblocks * s.b * s.b : 0;
  float* const part_r = direct || dr == nullptr ? dr : workspace;
  float* const part_s = direct || drescale == nullptr ? drescale : workspace + p.groups * n_r;
  const dim3 grid(static_cast<unsigned>(p.groups), static_cast<unsigned>(s.channels / chunk_of(s)));
  LYFAST_DISPATCH_FLOAT(dtype, "boft_backward", [&] {
    auto kernel = boft_bwd_kernel<scalar_t>;
    set_smem(kernel, p.smem);
    kernel<<<grid, kThreads, p.smem, stream>>>(static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(z),
                                               r, rt, rescale, static_cast<scalar_t*>(dz), part_r, part_s, s,
                                               chunk_of(s), p.tr, p.ckpts);
    LYFAST_LAUNCH_CHECK();
  });
  if (direct) return;
  if (dr != nullptr) sum_partials(part_r, p.groups, n_r, dr, stream);
  if (drescale != nullptr) sum_partials(part_s, p.groups, s.channels, drescale, stream);
}

void cayley_forward(const float* q, float* r, int64_t count, int b, cudaStream_t stream) {
  LYFAST_CHECK(b >= 1 && b <= 64, "Cayley kernel takes blocks of size 1..64");
  if (count == 0) return;
  LYFAST_CHECK(count <= 0x7fffffff, "too many Cayley blocks");
  const size_t smem = (2ull * b * b + b) * sizeof(float);  // ≤ 33 KiB
  cayley_fwd_kernel<<<static_cast<unsigned>(count), kCayleyThreads, smem, stream>>>(q, r, b);
  LYFAST_LAUNCH_CHECK();
}

void cayley_backward(const float* r, const float* grad, float* dq, int64_t count, int b, cudaStream_t stream) {
  LYFAST_CHECK(b >= 1 && b <= 64, "Cayley kernel takes blocks of size 1..64");
  if (count == 0) return;
  LYFAST_CHECK(count <= 0x7fffffff, "too many Cayley blocks");
  const size_t smem = 3ull * b * b * sizeof(float);  // ≤ 48 KiB
  cayley_bwd_kernel<<<static_cast<unsigned>(count), kCayleyThreads, smem, stream>>>(r, grad, dq, b);
  LYFAST_LAUNCH_CHECK();
}

}  // namespace lyfast
