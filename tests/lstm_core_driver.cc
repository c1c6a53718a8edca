// Runs the native kernel's maths (lstm_core.cc) on fixed data and prints the
// results, one number a line, so that tests/test_native_targets.py can compare
// builds for different vector widths (SSE, AVX2, AVX-512) on one CPU.
//
// The data fill every case the steps' products split into: 13 rows (row
// blocks of 6, 6 and 1, and 5, 4, 3, 2 rows as a mask trims them), 7 units
// (28 gate columns: a partial panel at every vector width), a mask with right
// padding, holes and an empty row, and with `projection` a projection to 5.
// `short` runs 3 of the 6 steps: too few to pack the weights for. Then the
// kept steps' gradients (KeptStepGrads) from the backward pass's dz.

#include <cstdio>
#include <cstring>
#include <vector>

#include "lstm_core.h"

namespace {

// Deterministic values in [-scale, scale): the same on every build.
std::vector<float> Values(size_t count, unsigned seed, float scale) {
  std::vector<float> out(count);
  unsigned state = seed * 2654435761u + 1u;
  for (float& v : out) {
    state = state * 1664525u + 1013904223u;
    v = scale * (static_cast<float>(state >> 8) / 8388608.f - 1.f);
  }
  return out;
}

void Print(const char* name, const std::vector<float>& values) {
  for (size_t i = 0; i < values.size(); ++i) std::printf("%s %zu %.9g\n", name, i, values[i]);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace keras_lstm;
  const bool projection = argc > 1 && std::strcmp(argv[1], "projection") == 0;
  const bool short_run = argc > 1 && std::strcmp(argv[1], "short") == 0;
  const int64_t T = short_run ? 3 : 6, B = 13, D = 3, H = 7, P = projection ? 5 : H, G = 4 * H;
  const int lengths[B] = {6, 2, 5, 0, 6, 1, 3, 4, 6, 2, 5, 3, 1};
  std::vector<float> mask(T * B);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < B; ++b) mask[t * B + b] = t < lengths[b] ? 1.f : 0.f;
  }
  mask[2 * B + 0] = 0.f;  // holes
  if (T > 4) mask[4 * B + 8] = 0.f;
  const std::vector<float> x = Values(T * B * D, 1, 1.5f), kernel = Values(D * G, 2, 0.5f),
                           recurrent = Values(P * G, 3, 0.5f), bias = Values(G, 4, 0.5f),
                           h0 = Values(B * P, 5, 1.f), c0 = Values(B * H, 6, 1.f),
                           proj = Values(H * P, 7, 0.5f), dh_seq = Values(T * B * P, 8, 1.f);
  std::vector<float> h_seq(T * B * P), c_seq(T * B * H), gates(T * B * G), h_last(B * P),
      c_last(B * H), kernels((D + P) * G);

  Forward f;
  f.steps = T, f.batch = B, f.input_size = D, f.units = H;
  f.x = x.data(), f.kernel = kernel.data(), f.bias = bias.data();
  f.recurrent_kernel = recurrent.data(), f.h0 = h0.data(), f.c0 = c0.data();
  f.mask = mask.data();
  f.h_seq = h_seq.data(), f.c_seq = c_seq.data(), f.gates = gates.data();
  f.h_last = h_last.data(), f.c_last = c_last.data();
  if (projection) f.options.projection = proj.data(), f.options.proj_units = P;
  StackKernels(f, kernels.data());
  ForwardRows(f, kernels.data(), 0, 7);  // two blocks, as two threads would run them
  ForwardRows(f, kernels.data(), 7, B);
  Print("h_seq", h_seq);
  Print("c_last", c_last);

  std::vector<float> dz(T * B * G), dh0(B * P), dc0(B * H), db(G), dh_projected(T * B * P);
  Backward g;
  g.steps = T, g.batch = B, g.units = H;
  g.recurrent_kernel = recurrent.data(), g.c0 = c0.data(), g.mask = mask.data();
  g.options = f.options;
  g.c_seq = c_seq.data(), g.gates = gates.data(), g.dh_seq = dh_seq.data();
  g.dz = dz.data(), g.dh0 = dh0.data(), g.dc0 = dc0.data();
  if (projection) g.dh_projected = dh_projected.data();
  BackwardRows(g, 0, B, db.data());
  Print("dz", dz);
  Print("dh0", dh0);
  Print("dc0", dc0);
  Print("db", db);

  // The kept steps' gradients from dz, split in two ranges as two threads would.
  std::vector<int64_t> kept(T * B);
  const int64_t n = KeptPositions(mask.data(), T * B, kept.data());
  std::vector<float> dx(T * B * D, -1.f), dkernels((D + P) * G, 0.f), second((D + P) * G, 0.f);
  KeptGrads k;
  k.steps = T, k.batch = B, k.input_size = D, k.hidden = P, k.width = G;
  k.x = x.data(), k.kernel = kernel.data(), k.h0 = h0.data(), k.h_seq = h_seq.data();
  k.d_input = dz.data(), k.dx = dx.data();
  KeptStepGrads(k, kept.data(), n, 0, n / 3, dkernels.data());
  KeptStepGrads(k, kept.data(), n, n / 3, n, second.data());
  for (size_t i = 0; i < dkernels.size(); ++i) dkernels[i] += second[i];
  Print("dx", dx);
  Print("dkernels", dkernels);
  return 0;
}
