// The torch-facing side of the CUDA backend: CUDA kernels for the `lyfast::cuda_*` ops.
//
// The schemas, fake kernels, CPU reference kernels and autograd formulas live in Python
// (lyfast/cuda_ops.py), so they exist and are testable without this library; this file only adds the CUDA
// implementations (TORCH_LIBRARY_IMPL). Each op checks its inputs, makes them contiguous, sets the device
// guard, takes the current stream and calls a raw-pointer launcher from boft.cu / lokr.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common.cuh"

namespace {

using at::Tensor;

lyfast::DType storage_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return lyfast::DType::kFloat32;
    case at::kHalf:
      return lyfast::DType::kFloat16;
    case at::kBFloat16:
      return lyfast::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "lyfast CUDA: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lyfast CUDA: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "lyfast CUDA: ", name, " is on ", t.device(), ", expected ",
              like.device());
}

// Contiguous fp32 with a 16-byte aligned start (the kernels read stage matrices as float2).
Tensor fp32_contiguous(const Tensor& t) {
  Tensor c = t.to(at::kFloat).contiguous();
  if (reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

Tensor empty_like_none(const Tensor& like) { return at::empty({0}, like.options()); }

// ---------------------------------------------------------------------------------------------------------
// BOFT
// ---------------------------------------------------------------------------------------------------------
Tensor cuda_cayley(const Tensor& q) {
  TORCH_CHECK(q.dim() >= 2 && q.size(-1) == q.size(-2), "lyfast CUDA: cayley takes (..., b, b), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat, "lyfast CUDA: cayley computes in float32, got ", q.scalar_type());
  check_cuda(q, q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor qc = q.contiguous();
  Tensor r = at::empty_like(qc);
  const int b = static_cast<int>(q.size(-1));
  lyfast::cayley_forward(qc.data_ptr<float>(), r.data_ptr<float>(), b == 0 ? 0 : qc.numel() / (b * b), b,
                         stream_of(q));
  return r;
}

Tensor cuda_cayley_bwd(const Tensor& r, const Tensor& grad) {
  TORCH_CHECK(r.sizes() == grad.sizes(), "lyfast CUDA: cayley_bwd shapes differ: ", r.sizes(), " vs ", grad.sizes());
  TORCH_CHECK(r.scalar_type() == at::kFloat, "lyfast CUDA: cayley_bwd computes in float32");
  check_cuda(r, r, "r");
  check_cuda(grad, r, "grad");
  const c10::cuda::CUDAGuard guard(r.device());
  const Tensor rc = r.contiguous(), gc = grad.to(at::kFloat).contiguous();
  Tensor dq = at::empty_like(rc);
  const int b = static_cast<int>(r.size(-1));
  lyfast::cayley_backward(rc.data_ptr<float>(), gc.data_ptr<float>(), dq.data_ptr<float>(),
                          b == 0 ? 0 : rc.numel() / (b * b), b, stream_of(r));
  return dq;
}

lyfast::BoftShape boft_shape(const Tensor& z, const Tensor& r) {
  TORCH_CHECK(z.dim() == 3, "lyfast CUDA: boft takes z as (batch, channels, spatial), got ", z.sizes());
  TORCH_CHECK(r.dim() == 4 && r.size(2) == r.size(3), "lyfast CUDA: boft stage matrices must be (m, n, b, b), got ",
              r.sizes());
  TORCH_CHECK(r.scalar_type() == at::kFloat, "lyfast CUDA: boft stage matrices must be float32, got ",
              r.scalar_type());
  TORCH_CHECK(r.size(1) * r.size(2) == z.size(1), "lyfast CUDA: blocks ", r.sizes(), " do not cover ", z.size(1),
              " channels");
  return lyfast::BoftShape{z.size(0), z.size(1), z.size(2), static_cast<int>(r.size(0)),
                           static_cast<int>(r.size(1)), static_cast<int>(r.size(2))};
}

std::optional<Tensor> rescale_fp32(const std::optional<Tensor>& rescale, const Tensor& z) {
  if (!rescale.has_value()) return std::nullopt;
  check_cuda(*rescale, z, "rescale");
  TORCH_CHECK(rescale->numel() == z.size(1), "lyfast CUDA: rescale has ", rescale->numel(), " elements for ",
              z.size(1), " channels");
  return fp32_contiguous(*rescale);
}

Tensor cuda_boft_fwd(const Tensor& z, const Tensor& r, const std::optional<Tensor>& rescale) {
  const lyfast::BoftShape shape = boft_shape(z, r);
  const lyfast::DType dtype = storage_dtype(z, "z");
  check_cuda(z, z, "z");
  check_cuda(r, z, "r");
  const c10::cuda::CUDAGuard guard(z.device());
  const Tensor zc = z.contiguous();
  const Tensor rt = fp32_contiguous(r.transpose(-1, -2));
  const std::optional<Tensor> sc = rescale_fp32(rescale, z);
  Tensor out = at::empty_like(zc);
  lyfast::boft_forward(dtype, zc.data_ptr(), out.data_ptr(), rt.data_ptr<float>(),
                       sc ? sc->data_ptr<float>() : nullptr, shape, stream_of(z));
  return out;
}

std::tuple<Tensor, Tensor, Tensor> cuda_boft_bwd(const Tensor& grad, const Tensor& z, const Tensor& r,
                                                 const std::optional<Tensor>& rescale, bool need_z, bool need_r,
                                                 bool need_rescale) {
  const lyfast::BoftShape shape = boft_shape(z, r);
  const lyfast::DType dtype = storage_dtype(z, "z");
  TORCH_CHECK(grad.sizes() == z.sizes(), "lyfast CUDA: grad ", grad.sizes(), " does not match z ", z.sizes());
  TORCH_CHECK(!need_rescale || rescale.has_value(), "lyfast CUDA: need_rescale without rescale");
  check_cuda(z, z, "z");
  check_cuda(grad, z, "grad");
  check_cuda(r, z, "r");
  const c10::cuda::CUDAGuard guard(z.device());
  const Tensor zc = z.contiguous(), gc = grad.to(z.scalar_type()).contiguous();
  const Tensor rc = fp32_contiguous(r), rt = fp32_contiguous(r.transpose(-1, -2));
  const std::optional<Tensor> sc = rescale_fp32(rescale, z);
  // The kernels write every element of dr and ds, except with no rows (then they are the zero sums).
  const bool no_rows = z.size(0) * z.size(2) == 0;
  const at::TensorOptions fp32 = z.options().dtype(at::kFloat);
  Tensor dz = need_z ? at::empty_like(zc) : empty_like_none(z);
  Tensor dr = need_r ? (no_rows ? at::zeros(r.sizes(), fp32) : at::empty(r.sizes(), fp32)) : empty_like_none(r);
  Tensor ds = need_rescale ? (no_rows ? at::zeros({z.size(1)}, fp32) : at::empty({z.size(1)}, fp32)) : Tensor();
  if (need_z || need_r || need_rescale) {
    // dR/drescale partials per row group (≤ 32 MiB, from the caching allocator), summed in a fixed order.
    Tensor workspace = at::empty({lyfast::boft_backward_workspace(dtype, shape, need_r, need_rescale)}, fp32);
    lyfast::boft_backward(dtype, gc.data_ptr(), zc.data_ptr(), rc.data_ptr<float>(), rt.data_ptr<float>(),
                          sc ? sc->data_ptr<float>() : nullptr, need_z ? dz.data_ptr() : nullptr,
                          need_r ? dr.data_ptr<float>() : nullptr, need_rescale ? ds.data_ptr<float>() : nullptr,
                          workspace.numel() > 0 ? workspace.data_ptr<float>() : nullptr, shape, stream_of(z));
  }
  Tensor ds_out = need_rescale ? ds.reshape(rescale->sizes()).to(rescale->scalar_type())
                               : (rescale.has_value() ? empty_like_none(*rescale) : empty_like_none(r));
  return {dz, dr, ds_out};
}

// ---------------------------------------------------------------------------------------------------------
// LoKr
// ---------------------------------------------------------------------------------------------------------
lyfast::LokrShape lokr_shape(const Tensor& x, const Tensor& w1, const Tensor& w2) {
  TORCH_CHECK(w1.dim() == 2 && w2.dim() == 2, "lyfast CUDA: lokr factors must be 2-D, got ", w1.sizes(), " and ",
              w2.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w1.size(1) * w2.size(1), "lyfast CUDA: input width ", x.size(-1),
              " != ", w1.size(1), "·", w2.size(1));
  const int64_t tokens = x.size(-1) == 0 ? 0 : x.numel() / x.size(-1);
  return lyfast::LokrShape{tokens, static_cast<int>(w1.size(0)), static_cast<int>(w1.size(1)),
                           static_cast<int>(w2.size(0)), static_cast<int>(w2.size(1))};
}

std::vector<int64_t> out_sizes(const Tensor& x, int64_t width) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = width;
  return s;
}

Tensor cuda_lokr_fwd(const Tensor& x, const Tensor& w1, const Tensor& w2, double scale) {
  const lyfast::LokrShape shape = lokr_shape(x, w1, w2);
  const lyfast::DType dtype = storage_dtype(x, "x");
  check_cuda(x, x, "x");
  check_cuda(w1, x, "w1");
  check_cuda(w2, x, "w2");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), w1c = fp32_contiguous(w1), w2c = fp32_contiguous(w2);
  Tensor y = at::empty(out_sizes(x, w1.size(0) * w2.size(0)), x.options());
  lyfast::lokr_forward(dtype, xc.data_ptr(), w1c.data_ptr<float>(), w2c.data_ptr<float>(), y.data_ptr(),
                       static_cast<float>(scale), shape, stream_of(x));
  return y;
}

std::tuple<Tensor, Tensor, Tensor> cuda_lokr_bwd(const Tensor& grad, const Tensor& x, const Tensor& w1,
                                                 const Tensor& w2, double scale, bool need_x, bool need_w) {
  const lyfast::LokrShape shape = lokr_shape(x, w1, w2);
  const lyfast::DType dtype = storage_dtype(x, "x");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_sizes(x, w1.size(0) * w2.size(0))), "lyfast CUDA: grad ",
              grad.sizes(), " does not match the output of x ", x.sizes());
  check_cuda(x, x, "x");
  check_cuda(grad, x, "grad");
  check_cuda(w1, x, "w1");
  check_cuda(w2, x, "w2");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), gc = grad.to(x.scalar_type()).contiguous();
  const Tensor w1c = fp32_contiguous(w1), w2c = fp32_contiguous(w2);
  Tensor dx = need_x ? at::empty_like(xc) : empty_like_none(x);
  Tensor dw1 = need_w ? at::zeros(w1.sizes(), w1.options().dtype(at::kFloat)) : empty_like_none(w1);
  Tensor dw2 = need_w ? at::zeros(w2.sizes(), w2.options().dtype(at::kFloat)) : empty_like_none(w2);
  if (need_x || need_w) {
    lyfast::lokr_backward(dtype, gc.data_ptr(), xc.data_ptr(), w1c.data_ptr<float>(), w2c.data_ptr<float>(),
                          static_cast<float>(scale), need_x ? dx.data_ptr() : nullptr,
                          need_w ? dw1.data_ptr<float>() : nullptr, need_w ? dw2.data_ptr<float>() : nullptr, shape,
                          stream_of(x));
  }
  if (need_w) {
    dw1 = dw1.to(w1.scalar_type());
    dw2 = dw2.to(w2.scalar_type());
  }
  return {dx, dw1, dw2};
}

}  // namespace

TORCH_LIBRARY_IMPL(lyfast, CUDA, m) {
  m.impl("cuda_cayley", &cuda_cayley);
  m.impl("cuda_cayley_bwd", &cuda_cayley_bwd);
  m.impl("cuda_boft_fwd", &cuda_boft_fwd);
  m.impl("cuda_boft_bwd", &cuda_boft_bwd);
  m.impl("cuda_lokr_fwd", &cuda_lokr_fwd);
  m.impl("cuda_lokr_bwd", &cuda_lokr_bwd);
}
