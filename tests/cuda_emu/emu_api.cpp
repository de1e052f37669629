// C entry points over the csrc/ launchers for ctypes (tests/test_cuda_emulated.py). Returns 0 on success,
// else 1 with the message in emu_last_error().
#include <string>
#include <vector>

#include "common.cuh"

namespace {
std::string g_error;

template <typename F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}
lyfast::DType dt(int d) { return static_cast<lyfast::DType>(d); }
}  // namespace

extern "C" {

const char* emu_last_error() { return g_error.c_str(); }

void emu_configure(int smem_optin, int sms, int blocks_per_sm) {
  emu::config().smem_optin = smem_optin;
  emu::config().sms = sms;
  emu::config().blocks_per_sm = blocks_per_sm;
  emu::config().block_order_seed = 0;
  emu::smem_limits().clear();
}

// Run the blocks of later launches in a seeded random order (0: grid order), as a GPU may schedule them.
void emu_block_order(unsigned seed) { emu::config().block_order_seed = seed; }

int emu_cayley_forward(const float* q, float* r, int64_t count, int b) {
  return guarded([&] { lyfast::cayley_forward(q, r, count, b, nullptr); });
}

int emu_cayley_backward(const float* r, const float* grad, float* dq, int64_t count, int b) {
  return guarded([&] { lyfast::cayley_backward(r, grad, dq, count, b, nullptr); });
}

int emu_boft_forward(int dtype, const void* z, void* out, const float* rt, const float* rescale, int64_t batch,
                     int64_t channels, int64_t spatial, int m, int n, int b) {
  const lyfast::BoftShape s{batch, channels, spatial, m, n, b};
  return guarded([&] { lyfast::boft_forward(dt(dtype), z, out, rt, rescale, s, nullptr); });
}

int emu_boft_backward(int dtype, const void* grad, const void* z, const float* r, const float* rt,
                      const float* rescale, void* dz, float* dr, float* drescale, int64_t batch, int64_t channels,
                      int64_t spatial, int m, int n, int b) {
  const lyfast::BoftShape s{batch, channels, spatial, m, n, b};
  return guarded([&] {
    std::vector<float> ws(lyfast::boft_backward_workspace(dt(dtype), s, dr != nullptr, drescale != nullptr));
    lyfast::boft_backward(dt(dtype), grad, z, r, rt, rescale, dz, dr, drescale, ws.empty() ? nullptr : ws.data(), s,
                          nullptr);
  });
}

int emu_lokr_forward(int dtype, const void* x, const float* w1, const float* w2, void* y, float scale,
                     int64_t tokens, int out_l, int in_m, int out_k, int in_n) {
  const lyfast::LokrShape s{tokens, out_l, in_m, out_k, in_n};
  return guarded([&] { lyfast::lokr_forward(dt(dtype), x, w1, w2, y, scale, s, nullptr); });
}

int emu_lokr_backward(int dtype, const void* grad, const void* x, const float* w1, const float* w2, float scale,
                      void* dx, float* dw1, float* dw2, int64_t tokens, int out_l, int in_m, int out_k, int in_n) {
  const lyfast::LokrShape s{tokens, out_l, in_m, out_k, in_n};
  return guarded([&] { lyfast::lokr_backward(dt(dtype), grad, x, w1, w2, scale, dx, dw1, dw2, s, nullptr); });
}

}  // extern "C"
