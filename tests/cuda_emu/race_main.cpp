// Data-race check of the csrc/ kernels under ThreadSanitizer (the CPU stand-in for compute-sanitizer's
// racecheck): runs every launcher through the emulated runtime on random data, in the plans the tests use.
// A shared-memory race between two threads of a block (a missing __syncthreads) is a TSan report; the
// exit status is then non-zero. Values are not checked here (tests/test_cuda_emulated.py does that).
#include <cstdio>
#include <random>
#include <vector>

#include "common.cuh"

extern "C" void emu_configure(int smem_optin, int sms, int blocks_per_sm);

namespace {
std::mt19937 rng(0);
std::vector<float> random(size_t n) {
  std::normal_distribution<float> d(0.f, 0.3f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

void boft(int64_t batch, int64_t spatial, int m, int n, int b) {
  const int64_t O = int64_t{n} * b, elems = batch * O * spatial;
  auto r = random(size_t(m) * n * b * b), rt = random(r.size()), z = random(elems), g = random(elems),
       s = random(O);
  std::vector<float> out(elems), dz(elems), dr(r.size()), ds(O);
  const lyfast::BoftShape sh{batch, O, spatial, m, n, b};
  lyfast::boft_forward(lyfast::DType::kFloat32, z.data(), out.data(), rt.data(), s.data(), sh, nullptr);
  std::vector<float> ws(lyfast::boft_backward_workspace(lyfast::DType::kFloat32, sh, true, true));
  lyfast::boft_backward(lyfast::DType::kFloat32, g.data(), z.data(), r.data(), rt.data(), s.data(), dz.data(),
                        dr.data(), ds.data(), ws.data(), sh, nullptr);
}

void lokr(int64_t tokens, int out_l, int in_m, int out_k, int in_n) {
  const lyfast::LokrShape sh{tokens, out_l, in_m, out_k, in_n};
  auto x = random(tokens * in_m * in_n), w1 = random(size_t(out_l) * in_m), w2 = random(size_t(out_k) * in_n),
       g = random(tokens * out_l * out_k);
  std::vector<float> y(g.size()), dx(x.size()), dw1(w1.size()), dw2(w2.size());
  lyfast::lokr_forward(lyfast::DType::kFloat32, x.data(), w1.data(), w2.data(), y.data(), 0.5f, sh, nullptr);
  lyfast::lokr_backward(lyfast::DType::kFloat32, g.data(), x.data(), w1.data(), w2.data(), 0.5f, dx.data(),
                        dw1.data(), dw2.data(), sh, nullptr);
}
}  // namespace

int main() {
  try {
    // BOFT: all checkpoints / 2 rows + 2 checkpoints / 1 row + replay of every stage input; a conv layout.
    for (int optin : {227 * 1024, 5 * 2 * 80 * 4, 4 * 1 * 80 * 4}) {
      emu_configure(optin, 2, 1);
      boft(11, 1, 4, 8, 10);
    }
    emu_configure(227 * 1024, 2, 1);
    boft(2, 9, 3, 4, 4);
    boft(41, 1, 3, 4, 4);  // 6 row tiles over 2 row groups: partials carried across tiles, then summed
    {
      auto q = random(3 * 10 * 10);
      std::vector<float> r(q.size()), dq(q.size());
      lyfast::cayley_forward(q.data(), r.data(), 3, 10, nullptr);
      lyfast::cayley_backward(r.data(), q.data(), dq.data(), 3, 10, nullptr);
    }
    // LoKr: 16 tokens per tile over 2 persistent blocks, then 1 token per tile.
    lokr(37, 3, 4, 5, 6);
    emu_configure(4 * (2 * 3 * 4 + 3 * 5 * 6 + 1 * (24 + 15) + 2 * 4 * 5), 2, 1);
    lokr(9, 3, 4, 5, 6);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "launch failed: %s\n", e.what());
    return 1;
  }
  std::puts("race check finished");
  return 0;
}
