// The maths of the native LSTM kernels (see lstm_core.h), in Eigen.
//
// This is the one file compiled for the CPU the library is built on (the
// flag sets are in _build.py); everything else is framework glue compiled for
// the generic target. tests/test_native_targets.py compiles it for other
// CPUs (compile only) so that a break on a CPU we do not run on shows up.

#include "lstm_core.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "Eigen/Core"

// AVX512-BF16's vdpbf16ps: 16 float32 sums, each gaining two products of
// bfloat16 pairs, per instruction (Intel from Cooper Lake and Sapphire
// Rapids, AMD from Zen 4). Without it, `Options::bf16_products` keeps
// float32 products.
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define KERAS_LSTM_AVX512_BF16 1
#include <immintrin.h>
#endif

namespace keras_lstm {
namespace {

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<Matrix>;
using ConstMatrixMap = Eigen::Map<const Matrix>;
using Array = Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ArrayMap = Eigen::Map<Array>;
using ConstArrayMap = Eigen::Map<const Array>;
using Row = Eigen::Array<float, 1, Eigen::Dynamic>;
using RowMap = Eigen::Map<Row>;
using ConstRowMap = Eigen::Map<const Row>;

// A batch of at most this many rows projects every step's input first (one
// product over the whole sequence), so that its steps multiply by U alone.
constexpr int64_t kMaxRowsForGemv = 4;

// ---------------------------------------------------------------------------
// The steps' float32 products, with the weights packed once per call.
//
// Eigen's matrix product packs both operands at every call, so each step of
// a sequence would pack the whole weight matrix again: a fixed cost that a
// step of a few rows (a short batch, or the rows still running in a masked
// one) pays in full. Here B is packed once per call into panels of kPanel
// columns, each (K, kPanel), and blocks of up to kBlockRowsF32 rows of A pass
// over a panel while it is in cache, their sums in registers. The vectors
// are Eigen's packets (AVX-512, AVX, SSE or NEON: what the build targets)
// and its fused multiply-add.

using Packet = Eigen::internal::packet_traits<float>::type;
constexpr int kLanes = Eigen::internal::unpacket_traits<Packet>::size;
// Six rows by four vectors (24 sums, four B vectors and a broadcast) where
// there are 32 vector registers, six by two where there are 16.
constexpr int kPanelVectors = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 4 : 2;
constexpr int kPanel = kPanelVectors * kLanes;
constexpr int kBlockRowsF32 = 6;

// B (K, N) in panels, or with `transposed` the transpose of a (N, K) row-major
// matrix (dz U^T reads U that way); a last partial panel is padded with zeros.
class PackedF32 {
 public:
  void Pack(const float* b, int64_t K, int64_t N, bool transposed) {
    k_ = K;
    n_ = N;
    data_.assign(((N + kPanel - 1) / kPanel) * K * kPanel, 0.f);
    // Each source row read in order: B's rows, or the transposed matrix's.
    if (transposed) {
      // In tiles of 16 k's, so that both the rows read and the rows written stay in cache.
      for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
        float* panel = data_.data() + n0 * K;
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
          for (int64_t n = n0; n < std::min<int64_t>(n0 + kPanel, N); ++n) {
            for (int64_t k = k0; k < std::min<int64_t>(k0 + 16, K); ++k) {
              panel[k * kPanel + (n - n0)] = b[n * K + k];
            }
          }
        }
      }
      return;
    }
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
        const float* row = b + k * N + n0;
        float* to = data_.data() + n0 * K + k * kPanel;  // panel n0 / kPanel, row k
        std::copy(row, row + std::min<int64_t>(kPanel, N - n0), to);
      }
    }
  }
  int64_t k() const { return k_; }
  int64_t n() const { return n_; }
  const float* panel(int64_t p) const { return data_.data() + p * k_ * kPanel; }

 private:
  int64_t k_ = 0, n_ = 0;
  std::vector<float> data_;
};

// C (MR rows, `width` <= kPanel columns, row stride ldc) += A (MR, K) times
// one panel of B.
template <int MR>
void PanelBlock(const float* a, int64_t lda, const float* panel, int64_t K, float* c, int64_t ldc,
                int64_t width) {
  using Eigen::internal::pmadd;
  using Eigen::internal::pset1;
  using Eigen::internal::ploadu;
  using Eigen::internal::pstoreu;
  // A partial panel's sums go through `tile`, whose columns past `width` are unused.
  float tile[MR * kPanel];
  float* out = c;
  int64_t stride = ldc;
  if (width < kPanel) {
    for (int m = 0; m < MR; ++m) {
      std::copy(c + m * ldc, c + m * ldc + width, tile + m * kPanel);
    }
    out = tile;
    stride = kPanel;
  }
  Packet acc[MR][kPanelVectors];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < kPanelVectors; ++j) {
      acc[m][j] = ploadu<Packet>(out + m * stride + j * kLanes);
    }
  }
  for (int64_t k = 0; k < K; ++k, panel += kPanel) {
    Packet b[kPanelVectors];
    for (int j = 0; j < kPanelVectors; ++j) {
      b[j] = ploadu<Packet>(panel + j * kLanes);
      // Held in a register: GCC would rather fold the load into every row's
      // multiply-add, loading each vector of the panel MR times.
      EIGEN_OPTIMIZATION_BARRIER(b[j]);
    }
    for (int m = 0; m < MR; ++m) {
      const Packet broadcast = pset1<Packet>(a[m * lda + k]);
      for (int j = 0; j < kPanelVectors; ++j) acc[m][j] = pmadd(broadcast, b[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < kPanelVectors; ++j) pstoreu(out + m * stride + j * kLanes, acc[m][j]);
  }
  if (width < kPanel) {
    for (int m = 0; m < MR; ++m) {
      std::copy(tile + m * kPanel, tile + m * kPanel + width, c + m * ldc);
    }
  }
}

using PanelBlockFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t,
                              int64_t);
constexpr PanelBlockFn kPanelBlocks[kBlockRowsF32] = {PanelBlock<1>, PanelBlock<2>, PanelBlock<3>,
                                                      PanelBlock<4>, PanelBlock<5>, PanelBlock<6>};

// C (M, B.n(), row stride ldc) += A (M, B.k(), row stride lda) B. Panels
// outside, so that one panel stays in cache while every row block passes it.
void PackedProduct(const float* a, int64_t lda, int64_t M, const PackedF32& b, float* c,
                   int64_t ldc) {
  for (int64_t n0 = 0, p = 0; n0 < b.n(); n0 += kPanel, ++p) {
    const int64_t width = std::min<int64_t>(b.n() - n0, kPanel);
    for (int64_t m = 0; m < M; m += kBlockRowsF32) {
      const int64_t rows = std::min<int64_t>(M - m, kBlockRowsF32);
      kPanelBlocks[rows - 1](a + m * lda, lda, b.panel(p), b.k(), c + m * ldc + n0, ldc, width);
    }
  }
}

// sigmoid(x) = 1 / (1 + e^-x), computed as (1 + tanh(x / 2)) / 2: one
// vectorised tanh instead of an exp and a division.
template <typename T>
auto Sigmoid(const T& x) {
  return 0.5f + 0.5f * (0.5f * x).tanh();
}

// Layer norm without gain or shift of one row of `width` values, into
// `normalised`: (v - mean) / sqrt(variance + eps); returns 1 / sqrt(variance + eps).
float Normalise(const float* v, int64_t width, float* normalised) {
  ConstRowMap row(v, width);
  RowMap out(normalised, width);
  out = row - row.mean();
  const float inverse_deviation = 1.f / std::sqrt(out.square().mean() + kLayerNormEpsilon);
  out *= inverse_deviation;
  return inverse_deviation;
}

// Normalise's backward pass, in place: `d`, the gradient of its output (the
// normalised row `n`, inverse deviation `inv`), becomes that of its input.
void NormaliseGrad(RowMap d, const ConstRowMap& n, float inv) {
  const float mean = d.mean(), mean_along_n = (d * n).mean();
  d = inv * (d - mean - n * mean_along_n);
}

// How many of a block's `rows` run a step: up to the last one the step's
// mask `m` (the block's first entry, or null: no mask) keeps; the rows after
// it are all masked (lstm_core.h, "Skipped rows").
int64_t RunningRows(const float* m, int64_t rows) {
  if (!m) return rows;
  while (rows > 0 && m[rows - 1] == 0.f) --rows;
  return rows;
}

// One row's pointwise step with the options on (see ForwardRows): the
// pre-activations `z` (G H) become the activations kept, and c and h are
// written from c_prev. With layer norm, `norm` is the row's Forward::norms
// entry (LayerNorm), which gets the normalised C and its inverse deviation.
void PointwiseWithOptions(const Options& options, int64_t H, float* z, const float* c_prev,
                          float* c, float* h, float* norm) {
  const bool cifg = options.cifg;
  const float* peephole = options.peephole;
  ConstRowMap cp(c_prev, H);
  RowMap f(z + (cifg ? 0 : H), H), g(z + (cifg ? H : 2 * H), H), o(z + (cifg ? 2 * H : 3 * H), H);
  RowMap c_new(c, H), h_new(h, H);
  if (peephole) f += ConstRowMap(peephole + H, H) * cp;
  f = Sigmoid(f);
  g = g.tanh();
  if (cifg) {
    c_new = f * cp + (1.f - f) * g;
  } else {
    RowMap i(z, H);
    if (peephole) i += ConstRowMap(peephole, H) * cp;
    i = Sigmoid(i);
    c_new = f * cp + i * g;
  }
  if (options.cell_clip > 0.f) c_new = c_new.max(-options.cell_clip).min(options.cell_clip);
  if (peephole) o += ConstRowMap(peephole + 2 * H, H) * c_new;
  o = Sigmoid(o);
  if (!options.layer_norm) {
    h_new = o * c_new.tanh();
    return;
  }
  // h = o * tanh(LN(C) γc + βc); the C carried on stays as it is.
  const LayerNorm ln{options.gates() * H, H};
  float* c_hat = norm + ln.kC();
  norm[ln.kDeviations() + 2] = Normalise(c, H, c_hat);
  const float* gains = options.layer_norm;
  h_new = o * (ConstRowMap(gains + ln.kC(), H) * ConstRowMap(c_hat, H) +
               ConstRowMap(gains + ln.kShift(), H))
                  .tanh();
}

// One row's gradient step with the options on (see BackwardRows): from dh
// and dc (of h_t and C_t) and the kept activations `gates`, writes dz (which
// may be `gates` itself) and replaces dc with the gradient of C_{t-1}. With
// layer norm, `norm` is the row's Forward::norms entry, `d_input` and
// `d_recurrent` get the gradients of the row's x W and h U, and `d_gains`
// (if not null) accumulates those of [γx, γh, γc, βc].
void PointwiseGradWithOptions(const Options& options, int64_t H, const float* gates,
                              const float* c_now, const float* c_prev, const float* dh, float* dc,
                              float* dz, const float* norm, float* d_input, float* d_recurrent,
                              float* d_gains) {
  const bool cifg = options.cifg;
  const float* peephole = options.peephole;
  ConstRowMap f(gates + (cifg ? 0 : H), H), g(gates + (cifg ? H : 2 * H), H),
      o(gates + (cifg ? 2 * H : 3 * H), H), c(c_now, H), cp(c_prev, H), dhr(dh, H);
  RowMap dcr(dc, H);
  const Row i = cifg ? Row(1.f - f) : Row(ConstRowMap(gates, H));
  const float* layer_norm = options.layer_norm;
  const int64_t G = options.gates() * H;
  const LayerNorm ln{G, H};
  Row tanh_c, dct;
  if (!layer_norm) {
    tanh_c = c.tanh();
    dct = dcr + dhr * o * (1.f - tanh_c.square());
  } else {
    // h = o * tanh(n), n = LN(C) γc + βc: back through n to C.
    const ConstRowMap c_hat(norm + ln.kC(), H), gain(layer_norm + ln.kC(), H),
        shift(layer_norm + ln.kShift(), H);
    tanh_c = (gain * c_hat + shift).tanh();
    const Row dn = dhr * o * (1.f - tanh_c.square());
    if (d_gains) {
      RowMap(d_gains + ln.kC(), H) += dn * c_hat;
      RowMap(d_gains + ln.kShift(), H) += dn;
    }
    dct = dn * gain;
    NormaliseGrad(RowMap(dct.data(), H), c_hat, norm[ln.kDeviations() + 2]);
    dct += dcr;
  }
  const Row dz_o = dhr * tanh_c * o * (1.f - o);
  if (peephole) dct += dz_o * ConstRowMap(peephole + 2 * H, H);
  // The clip passes no gradient where it clipped.
  if (options.cell_clip > 0.f) dct = (c.abs() < options.cell_clip).select(dct, 0.f);
  // With cifg, C = f C_{t-1} + (1 - f) g, so dC/df = C_{t-1} - g.
  const Row dz_f = dct * (cifg ? Row(cp - g) : Row(cp)) * f * (1.f - f);
  const Row dz_g = dct * i * (1.f - g.square());
  const Row dz_i = cifg ? Row() : Row(dct * g * i * (1.f - i));
  dcr = dct * f;
  if (peephole) {
    dcr += dz_f * ConstRowMap(peephole + H, H);
    if (!cifg) dcr += dz_i * ConstRowMap(peephole, H);
  }
  float* out = dz;
  if (!cifg) {
    RowMap(out, H) = dz_i;
    out += H;
  }
  RowMap(out, H) = dz_f;
  RowMap(out + H, H) = dz_g;
  RowMap(out + 2 * H, H) = dz_o;
  if (layer_norm) {
    // z = LN(x W) γx + LN(h U) γh + b: back through each norm to its product.
    const ConstRowMap dz_row(dz, G), xw_hat(norm + ln.kX(), G), hu_hat(norm + ln.kH(), G);
    if (d_gains) {
      RowMap(d_gains + ln.kX(), G) += dz_row * xw_hat;
      RowMap(d_gains + ln.kH(), G) += dz_row * hu_hat;
    }
    const float* deviations = norm + ln.kDeviations();
    RowMap dx_row(d_input, G), dh_row(d_recurrent, G);
    dx_row = dz_row * ConstRowMap(layer_norm + ln.kX(), G);
    NormaliseGrad(dx_row, xw_hat, deviations[0]);
    dh_row = dz_row * ConstRowMap(layer_norm + ln.kH(), G);
    NormaliseGrad(dh_row, hu_hat, deviations[1]);
  }
}

// Zoneout of `rows` rows at `at` (their first row's index in (T, B)):
// state = d * previous + (1 - d) * state, in place; d is the mask's or the rate.
void MixZoneout(const Zoneout& zoneout, int64_t at, int64_t rows, int64_t width,
                const float* previous, float* state) {
  ArrayMap now(state, rows, width);
  ConstArrayMap before(previous, rows, width);
  if (zoneout.mask) {
    ConstArrayMap d(zoneout.mask + at * width, rows, width);
    now = d * before + (1.f - d) * now;
  } else {
    now = zoneout.rate * before + (1.f - zoneout.rate) * now;
  }
}

// The backward of MixZoneout: `carry` gets d * grad (what flows to the
// previous state) and `grad` becomes (1 - d) * grad (what flows to the
// computed one).
void SplitZoneoutGrad(const Zoneout& zoneout, int64_t at, int64_t rows, int64_t width,
                      float* grad, float* carry) {
  ArrayMap g(grad, rows, width), to_previous(carry, rows, width);
  if (zoneout.mask) {
    ConstArrayMap d(zoneout.mask + at * width, rows, width);
    to_previous = d * g;
    g *= 1.f - d;
  } else {
    to_previous = zoneout.rate * g;
    g *= 1.f - zoneout.rate;
  }
}


#if KERAS_LSTM_AVX512_BF16
// ---------------------------------------------------------------------------
// Matrix products with bfloat16 operands and float32 sums (Options::bf16_products).
//
// C (M, N) += A (M, K) B (K, N). vdpbf16ps multiplies pairs along K: lane n
// of `acc += dot(a, b)` gains a[0] b[0][n] + a[1] b[1][n]. So B is packed
// once per call as (K/2 pairs, N rounded up to 16, 2): for each pair of rows
// k, k+1 and column n the two values side by side; a row of A is converted
// each step and its pairs broadcast. An odd K gets a zero row and column.

using Bf16 = uint16_t;

// float32 to bfloat16, rounding to nearest even (as vcvtne2ps2bf16 does); a
// NaN stays a NaN (the rounding would carry some into infinity or zero).
inline Bf16 ToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<Bf16>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<Bf16>(bits >> 16);
}

// `rows` rows of `count` floats (row stride `stride`) to bfloat16 rows of
// `count` rounded up to even (a zero after an odd count).
void ToBf16Rows(const float* src, int64_t rows, int64_t count, int64_t stride, Bf16* dst) {
  const int64_t padded = (count + 1) & ~int64_t{1};
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * stride;
    Bf16* out = dst + r * padded;
    int64_t k = 0;
    for (; k + 32 <= count; k += 32) {
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + k + 16), _mm512_loadu_ps(in + k));
      _mm512_storeu_si512(out + k, reinterpret_cast<const __m512i&>(pair));
    }
    for (; k < count; ++k) out[k] = ToBf16(in[k]);
    if (padded > count) out[count] = 0;
  }
}

// B packed for Bf16Product: (K, N) row-major, or with `transposed` the
// transpose of a (N, K) row-major matrix (dz U^T reads U that way).
class PackedBf16 {
 public:
  void Pack(const float* b, int64_t K, int64_t N, bool transposed) {
    k_ = K;
    n_ = N;
    pairs_ = (K + 1) / 2;
    columns_ = (N + 15) / 16 * 16;
    data_.assign(pairs_ * columns_ * 2, 0);
    // Each source row read in order: B's rows, or the transposed matrix's.
    if (transposed) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < K; ++k) At(k, n) = ToBf16(b[n * K + k]);
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t n = 0; n < N; ++n) At(k, n) = ToBf16(b[k * N + n]);
      }
    }
  }
  int64_t k() const { return k_; }
  int64_t n() const { return n_; }
  int64_t pairs() const { return pairs_; }
  int64_t columns() const { return columns_; }
  const Bf16* data() const { return data_.data(); }

 private:
  Bf16& At(int64_t k, int64_t n) { return data_[((k / 2) * columns_ + n) * 2 + (k & 1)]; }

  int64_t k_ = 0, n_ = 0, pairs_ = 0, columns_ = 0;
  std::vector<Bf16> data_;
};

// One block of MR rows and NV vectors of 16 columns: C += A B, the last
// vector's columns limited by `last` (a partial block at N's end).
template <int MR, int NV>
void Bf16Block(const Bf16* a, int64_t lda, const Bf16* b, int64_t b_stride, int64_t pairs,
               float* c, int64_t ldc, __mmask16 last) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NV; ++j) {
      const float* at = c + m * ldc + 16 * j;
      acc[m][j] = j == NV - 1 ? _mm512_maskz_loadu_ps(last, at) : _mm512_loadu_ps(at);
    }
  }
  for (int64_t p = 0; p < pairs; ++p, b += b_stride) {
    __m512i bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_si512(b + 32 * j);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, a + m * lda + 2 * p, sizeof(pair));
      const __m512i av = _mm512_set1_epi32(pair);
      for (int j = 0; j < NV; ++j) {
        acc[m][j] = _mm512_dpbf16_ps(acc[m][j], reinterpret_cast<const __m512bh&>(av),
                                     reinterpret_cast<const __m512bh&>(bv[j]));
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NV; ++j) {
      float* at = c + m * ldc + 16 * j;
      if (j == NV - 1) {
        _mm512_mask_storeu_ps(at, last, acc[m][j]);
      } else {
        _mm512_storeu_ps(at, acc[m][j]);
      }
    }
  }
}

// Six rows by four vectors (24 accumulators, four B vectors and a broadcast:
// 29 of the 32 registers) is the largest block that stays in registers.
constexpr int kBlockRows = 6, kBlockVectors = 4;
using Bf16BlockFn = void (*)(const Bf16*, int64_t, const Bf16*, int64_t, int64_t, float*, int64_t,
                             __mmask16);

template <int MR>
constexpr Bf16BlockFn kBlocksOfRows[kBlockVectors] = {Bf16Block<MR, 1>, Bf16Block<MR, 2>,
                                                      Bf16Block<MR, 3>, Bf16Block<MR, 4>};

Bf16BlockFn BlockFor(int rows, int vectors) {
  switch (rows) {
    case 1: return kBlocksOfRows<1>[vectors - 1];
    case 2: return kBlocksOfRows<2>[vectors - 1];
    case 3: return kBlocksOfRows<3>[vectors - 1];
    case 4: return kBlocksOfRows<4>[vectors - 1];
    case 5: return kBlocksOfRows<5>[vectors - 1];
    default: return kBlocksOfRows<6>[vectors - 1];
  }
}

// C (M, B.n(), row stride ldc) += A B, A being M bfloat16 rows of B.k()
// rounded up to even (ToBf16Rows). Column blocks outside, so that one block
// of B stays in cache while every row block passes it.
void Bf16Product(const Bf16* a, int64_t M, const PackedBf16& b, float* c, int64_t ldc) {
  const int64_t lda = 2 * b.pairs(), N = b.n();
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kBlockVectors) {
    const int64_t width = std::min<int64_t>(N - n0, 16 * kBlockVectors);
    const int vectors = static_cast<int>((width + 15) / 16);
    const int tail = static_cast<int>(width - 16 * (vectors - 1));
    const __mmask16 last = static_cast<__mmask16>((1u << tail) - 1u);
    const Bf16* panel = b.data() + n0 * 2;
    for (int64_t m = 0; m < M; m += kBlockRows) {
      const int rows = static_cast<int>(std::min<int64_t>(M - m, kBlockRows));
      BlockFor(rows, vectors)(a + m * lda, lda, panel, b.columns() * 2, b.pairs(), c + m * ldc + n0,
                              ldc, last);
    }
  }
}

constexpr char kBf16Instructions[] = "avx512_bf16";

// One row block's step products with bfloat16 operands: B packed once, A
// converted at each product.
class Bf16Products {
 public:
  // B (K, N), or the transpose of a (N, K) matrix; A of up to `rows` rows.
  Bf16Products(const float* b, int64_t K, int64_t N, bool transposed, int64_t rows) {
    b_.Pack(b, K, N, transposed);
    a_.resize(rows * 2 * b_.pairs());
  }
  // C (rows, N; row stride ldc) += A (rows, K; row stride lda) B.
  void MultiplyInto(const float* a, int64_t lda, int64_t rows, float* c, int64_t ldc) {
    ToBf16Rows(a, rows, b_.k(), lda, a_.data());
    Bf16Product(a_.data(), rows, b_, c, ldc);
  }

 private:
  PackedBf16 b_;
  std::vector<Bf16> a_;
};
#else
constexpr char kBf16Instructions[] = "";

// Never made: without the instructions every product is float32.
class Bf16Products {
 public:
  Bf16Products(const float*, int64_t, int64_t, bool, int64_t) {}
  void MultiplyInto(const float*, int64_t, int64_t, float*, int64_t) {}
};
#endif  // KERAS_LSTM_AVX512_BF16

// Whether the step products run in bfloat16: asked for, with the
// instructions here, and not a batch of a few rows (whose vector-matrix
// products stay float32). Decided for the whole batch, so that every row
// block of a call agrees, however many threads split it.
bool UseBf16Products(const Options& options, int64_t batch) {
  return options.bf16_products && kBf16Instructions[0] != '\0' && batch > kMaxRowsForGemv;
}

// A weight matrix every step of a call multiplies by, packed once for the
// call: float32, or bfloat16 operands (UseBf16Products).
class StepWeights {
 public:
  // B (K, N), or the transpose of a (N, K) matrix; A of up to `rows` rows,
  // in `steps` products.
  StepWeights(const float* b, int64_t K, int64_t N, bool transposed, int64_t rows, int64_t steps,
              bool bf16)
      : b_(b), k_(K), n_(N), transposed_(transposed) {
    if (bf16) {
      bf16_.emplace(b, K, N, transposed, rows);
    } else if (steps >= kMinStepsToPack) {
      f32_.emplace();
      f32_->Pack(b, K, N, transposed);
    }
  }
  // out (+)= a B, `a` out.rows() rows of K floats with row stride `lda`.
  void MultiplyInto(MatrixMap out, const float* a, int64_t lda, bool accumulate) {
    if (!accumulate) out.setZero();
    if (bf16_) {
      bf16_->MultiplyInto(a, lda, out.rows(), out.data(), out.cols());
    } else if (f32_) {
      PackedProduct(a, lda, out.rows(), *f32_, out.data(), out.cols());
    } else {
      const Eigen::Map<const Matrix, 0, Eigen::OuterStride<>> rows(a, out.rows(), k_,
                                                                   Eigen::OuterStride<>(lda));
      if (transposed_) {
        EigenProduct(out, rows, ConstMatrixMap(b_, n_, k_).transpose());
      } else {
        EigenProduct(out, rows, ConstMatrixMap(b_, k_, n_));
      }
    }
  }

 private:
  // Packing costs about two passes over B: a call of a few steps multiplies
  // by B as it is, with Eigen (which packs it per product, or for a few rows
  // runs vector-matrix products that need no packing).
  static constexpr int64_t kMinStepsToPack = 4;

  template <typename A, typename B>
  static void EigenProduct(MatrixMap out, const A& a, const B& b) {
    if (a.rows() <= kMaxRowsForGemv) {
      for (Eigen::Index r = 0; r < a.rows(); ++r) out.row(r).noalias() += a.row(r) * b;
    } else {
      out.noalias() += a * b;
    }
  }

  const float* b_;
  int64_t k_, n_;
  bool transposed_;
  std::optional<PackedF32> f32_;
  std::optional<Bf16Products> bf16_;
};

// A step's product out (+)= a B, `a` a row-major block of contiguous rows.
template <typename A>
void StepProduct(StepWeights& weights, MatrixMap out, const A& a, bool accumulate) {
  weights.MultiplyInto(out, a.data(), a.cols(), accumulate);
}
}  // namespace

// x_t of the batch's row `row` (wherever x_layout puts it).
inline const float* InputRow(const Forward& a, int64_t t, int64_t row) {
  return a.x + a.x_layout.At(t, row, a.steps, a.batch) * a.input_size;
}

// One step a row block: z = [x_t, h_{t-1}] [W; U] + b as one matrix product
// over the stacked weights `kernels` ((D + R, G H), see StackKernels), then
//   i = sigmoid(z_i)   f = sigmoid(z_f)   g = tanh(z_g)   o = sigmoid(z_o)
//   c = f * c_{t-1} + i * g               h = o * tanh(c)
// or, with an option on, PointwiseWithOptions's step; with a projection,
// h = (o * tanh(c)) W_hr.
void ForwardRows(const Forward& a, const float* kernels, int64_t row_begin,
                        int64_t row_end) {
  const int64_t rows = row_end - row_begin, B = a.batch, D = a.input_size, H = a.units;
  const int64_t G = a.options.gates() * H, R = a.options.hidden(H), K = D + R;
  const bool plain = a.options.plain();
  const float* projection = a.options.projection;
  // With layer norm, x W and h U are two products, each normalised.
  const float* layer_norm = a.options.layer_norm;
  const LayerNorm ln{G, H};
  const int64_t NW = a.options.norms_width(H);
  if (rows <= 0) return;
  const float* recurrent = kernels + D * G;  // U, under W in [W; U]
  // A batch of a few rows (one block): one product projects the inputs of
  // every step first, so that each step's products read U only.
  const bool project_first = !layer_norm && rows == B && rows <= kMaxRowsForGemv;
  // The weights the steps multiply by, packed once: [W; U] for [x_t, h_{t-1}];
  // U alone when the inputs are projected first; with layer norm, U for
  // h_{t-1} and W for x_t apart.
  const bool bf16 = UseBf16Products(a.options, B);
  std::optional<StepWeights> step_weights, input_weights;
  if (layer_norm) {
    step_weights.emplace(recurrent, R, G, /*transposed=*/false, rows, a.steps, bf16);
    input_weights.emplace(kernels, D, G, /*transposed=*/false, rows, a.steps, bf16);
  } else if (project_first) {
    step_weights.emplace(recurrent, R, G, /*transposed=*/false, rows, a.steps, /*bf16=*/false);
  } else {
    step_weights.emplace(kernels, K, G, /*transposed=*/false, rows, a.steps, bf16);
  }
  // W_hr, which turns o * tanh(c) into h.
  std::optional<StepWeights> projection_weights;
  if (projection) {
    projection_weights.emplace(projection, H, R, /*transposed=*/false, rows, a.steps,
                               /*bf16=*/false);
  }
  std::vector<float> projected(project_first && !a.gates ? a.steps * rows * G : 0);
  if (project_first) {
    MatrixMap xz(a.gates ? a.gates : projected.data(), a.steps * rows, G);
    // x in the block's own time-major order, unless it is already.
    const bool gather = !a.x_layout.in_order();
    std::vector<float> x_sorted(gather ? a.steps * rows * D : 0);
    for (int64_t t = 0; gather && t < a.steps; ++t) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* x_row = InputRow(a, t, row_begin + r);
        std::copy(x_row, x_row + D, x_sorted.data() + (t * rows + r) * D);
      }
    }
    xz.noalias() = ConstMatrixMap(gather ? x_sorted.data() : a.x, a.steps * rows, D) *
                   ConstMatrixMap(kernels, D, G);
    if (a.bias) xz.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(a.bias, G);
  }
  // [x_t, h_{t-1}] of this block; z when the gates are not kept; h and c
  // (two of each, this step's and the previous one) when not kept.
  Matrix xh(project_first || layer_norm ? 0 : rows, K);
  // h_{t-1} * r, for the product, with recurrent dropout.
  Matrix h_dropped((project_first || layer_norm) && a.recurrent_mask ? rows : 0, R);
  // With layer norm: x_t in the block's order (unless x is in it), x W and h U apart,
  // and the norms of a step when not kept.
  const bool x_in_order = a.x_layout.in_order();
  Matrix x_sorted(layer_norm && !x_in_order ? rows : 0, D);
  Matrix xw(layer_norm ? rows : 0, G), hu(layer_norm ? rows : 0, G),
      norm_scratch(layer_norm && !a.norms ? rows : 0, NW);
  // o * tanh(c) before the projection W_hr makes it h.
  Matrix unprojected(projection ? rows : 0, H);
  const Zoneout &zoneout_h = a.options.zoneout_h, &zoneout_c = a.options.zoneout_c;
  // The c a step computes, before zoneout mixes in the previous one.
  Matrix c_computed_scratch(zoneout_c.on() && !a.c_computed ? rows : 0, H);
  const ConstArrayMap r(a.recurrent_mask ? a.recurrent_mask + row_begin * R : nullptr,
                        a.recurrent_mask ? rows : 0, R);
  std::vector<float> scratch((a.gates || project_first ? 0 : rows * G) +
                             (a.h_seq ? 0 : 2 * rows * R) + (a.c_seq ? 0 : 2 * rows * H));
  float* z_scratch = scratch.data();
  float* h_scratch = z_scratch + (a.gates || project_first ? 0 : rows * G);
  float* c_scratch = h_scratch + (a.h_seq ? 0 : 2 * rows * R);

  // Without carry_ended, each row's last kept step (-1: none), after which
  // its state is no longer copied along the kept sequences.
  std::vector<int64_t> last_kept(a.mask && !a.carry_ended && (a.h_seq || a.c_seq) ? rows : 0, -1);
  for (int64_t t = 0; t < a.steps && !last_kept.empty(); ++t) {
    const float* m = a.mask + t * B + row_begin;
    for (int64_t r = 0; r < rows; ++r) {
      if (m[r] != 0.f) last_kept[r] = t;
    }
  }
  const float* h_prev = a.h0 + row_begin * R;
  const float* c_prev = a.c0 + row_begin * H;
  int64_t previous_run = rows;
  for (int64_t t = 0; t < a.steps; ++t) {
    const int64_t at = t * B + row_begin;
    float* z = a.gates ? a.gates + at * G : project_first ? projected.data() + at * G : z_scratch;
    float* h = a.h_seq ? a.h_seq + at * R : h_scratch + (t & 1) * rows * R;
    float* c = a.c_seq ? a.c_seq + at * H : c_scratch + (t & 1) * rows * H;
    float* c_new = !zoneout_c.on()  ? c
                   : a.c_computed ? a.c_computed + at * H
                                  : c_computed_scratch.data();
    // Rows [0, run) run this step; the rest only carry h and c on.
    const int64_t run = RunningRows(a.mask ? a.mask + at : nullptr, rows);
    MatrixMap Z(z, run, G);
    float* norm = !layer_norm ? nullptr : a.norms ? a.norms + at * NW : norm_scratch.data();
    if (run == 0) {
      // Every row of the block is masked: nothing to compute.
    } else if (layer_norm) {
      // z = LN(x_t W) γx + LN(h_{t-1} U) γh + b.
      const float* x_t = a.x + at * D;
      if (!x_in_order) {
        for (int64_t r = 0; r < run; ++r) {
          const float* x_row = InputRow(a, t, row_begin + r);
          std::copy(x_row, x_row + D, x_sorted.data() + r * D);
        }
        x_t = x_sorted.data();
      }
      const float* h_in = h_prev;
      if (a.recurrent_mask) {
        ArrayMap(h_dropped.data(), run, R) = ConstArrayMap(h_prev, run, R) * r.topRows(run);
        h_in = h_dropped.data();
      }
      StepProduct(*input_weights, MatrixMap(xw.data(), run, G), ConstMatrixMap(x_t, run, D),
                  /*accumulate=*/false);
      StepProduct(*step_weights, MatrixMap(hu.data(), run, G), ConstMatrixMap(h_in, run, R),
                  /*accumulate=*/false);
      for (int64_t r = 0; r < run; ++r) {
        float* nr = norm + r * NW;
        nr[ln.kDeviations()] = Normalise(xw.data() + r * G, G, nr + ln.kX());
        nr[ln.kDeviations() + 1] = Normalise(hu.data() + r * G, G, nr + ln.kH());
        RowMap zr(z + r * G, G);
        zr = ConstRowMap(layer_norm + ln.kX(), G) * ConstRowMap(nr + ln.kX(), G) +
             ConstRowMap(layer_norm + ln.kH(), G) * ConstRowMap(nr + ln.kH(), G);
        if (a.bias) zr += ConstRowMap(a.bias, G);
      }
    } else if (project_first && a.recurrent_mask) {
      MatrixMap dropped(h_dropped.data(), run, R);
      dropped.array() = ConstArrayMap(h_prev, run, R) * r.topRows(run);
      StepProduct(*step_weights, Z, dropped, /*accumulate=*/true);
    } else if (project_first) {
      StepProduct(*step_weights, Z, ConstMatrixMap(h_prev, run, R), /*accumulate=*/true);
    } else {
      MatrixMap xh_run(xh.data(), run, K);
      if (!x_in_order) {
        for (int64_t r = 0; r < run; ++r) {
          const float* x_row = InputRow(a, t, row_begin + r);
          std::copy(x_row, x_row + D, xh.data() + r * K);
        }
      } else {
        xh_run.leftCols(D) = ConstMatrixMap(a.x + at * D, run, D);
      }
      if (a.recurrent_mask) {
        xh_run.rightCols(R).array() = ConstArrayMap(h_prev, run, R) * r.topRows(run);
      } else {
        xh_run.rightCols(R) = ConstMatrixMap(h_prev, run, R);
      }
      if (a.bias) {
        Z.rowwise() = Eigen::Map<const Eigen::RowVectorXf>(a.bias, G);
      } else {
        Z.setZero();
      }
      StepProduct(*step_weights, Z, xh_run, /*accumulate=*/true);
    }

    // Pre-activations become activations in place: they are what the
    // backward pass needs. With a projection the pointwise pass writes
    // o * tanh(c), which one more product turns into h.
    float* out = projection ? unprojected.data() : h;
    for (int64_t r = 0; r < run; ++r) {
      float* zr = z + r * G;
      if (!plain) {
        PointwiseWithOptions(a.options, H, zr, c_prev + r * H, c_new + r * H, out + r * H,
                             norm ? norm + r * NW : nullptr);
        continue;
      }
      RowMap i(zr, H), f(zr + H, H), g(zr + 2 * H, H), o(zr + 3 * H, H);
      i = Sigmoid(i);
      f = Sigmoid(f);
      g = g.tanh();
      o = Sigmoid(o);
      RowMap c_row(c_new + r * H, H), h_new(out + r * H, H);
      c_row = f * ConstRowMap(c_prev + r * H, H) + i * g;
      h_new = o * c_row.tanh();
    }
    if (projection && run > 0) {
      StepProduct(*projection_weights, MatrixMap(h, run, R),
                  MatrixMap(unprojected.data(), run, H), /*accumulate=*/false);
    }
    if (zoneout_c.on()) {
      std::copy(c_new, c_new + run * H, c);
      MixZoneout(zoneout_c, at, run, H, c_prev, c);
    }
    if (zoneout_h.on()) MixZoneout(zoneout_h, at, run, R, h_prev, h);
    if (a.mask) {
      const float* m = a.mask + at;
      // A state not kept lives in two buffers used in turn: from step 2 on, a
      // row the step before skipped too already holds its state in both.
      const int64_t settled = t >= 2 ? std::max(run, previous_run) : rows;
      const int64_t h_end = a.h_seq ? rows : settled, c_end = a.c_seq ? rows : settled;
      for (int64_t r = 0; r < std::max(h_end, c_end); ++r) {
        if (r >= run || m[r] == 0.f) {
          const bool ended = !last_kept.empty() && t > last_kept[r];
          if (r < h_end && !(ended && a.h_seq)) {
            std::copy(h_prev + r * R, h_prev + (r + 1) * R, h + r * R);
          }
          if (r < c_end && !(ended && a.c_seq)) {
            std::copy(c_prev + r * H, c_prev + (r + 1) * H, c + r * H);
          }
        }
      }
      previous_run = run;
      if (a.fill_skipped && run < rows) {
        // What a skipped row keeps for the gradient, as zeros (lstm_core.h).
        const int64_t skipped = rows - run;
        if (a.gates) std::fill_n(a.gates + (at + run) * G, skipped * G, 0.f);
        if (a.c_computed) std::fill_n(a.c_computed + (at + run) * H, skipped * H, 0.f);
        if (a.norms) std::fill_n(a.norms + (at + run) * NW, skipped * NW, 0.f);
      }
    }
    h_prev = h;
    c_prev = c;
  }
  std::copy(h_prev, h_prev + rows * R, a.h_last + row_begin * R);
  std::copy(c_prev, c_prev + rows * H, a.c_last + row_begin * H);
  // A row that ended before the last step: its state as its last kept step left it.
  for (int64_t r = 0; r < static_cast<int64_t>(last_kept.size()); ++r) {
    const int64_t last = last_kept[r];
    if (last == a.steps - 1) continue;
    const float* h_end = last < 0 ? a.h0 + (row_begin + r) * R
                                  : a.h_seq + ((last * B) + row_begin + r) * R;
    const float* c_end = last < 0 ? a.c0 + (row_begin + r) * H
                                  : a.c_seq + ((last * B) + row_begin + r) * H;
    if (a.h_seq) std::copy(h_end, h_end + R, a.h_last + (row_begin + r) * R);
    if (a.c_seq) std::copy(c_end, c_end + H, a.c_last + (row_begin + r) * H);
  }
}

// Carries dh and dc back through the steps: dz_t from the gates, then
// dh_{t-1} = dz_t U^T and dc_{t-1} = dc_t * f (PointwiseGradWithOptions's
// step with an option on; with a projection the gates see dh W_hr^T, and
// `dh_projected` keeps each step's dh). `dz` may share `gates`'s
// buffer: each row reads a gate before it writes that gate's gradient in
// its place. `db` (G H), if not null, accumulates these rows' bias gradient,
// the sum of their dz over all steps, made while each row is in cache (a
// separate reduction over the (T, B, G H) dz would read it all once more).
void BackwardRows(const Backward& a, int64_t row_begin, int64_t row_end, float* db) {
  const int64_t rows = row_end - row_begin, B = a.batch, H = a.units;
  const int64_t G = a.options.gates() * H, R = a.options.hidden(H);
  const bool plain = a.options.plain();
  const float* projection = a.options.projection;
  const float* layer_norm = a.options.layer_norm;
  const int64_t NW = a.options.norms_width(H);
  // What U multiplied: dh_{t-1} comes from the gradient of h U, dz itself
  // but with layer norm, which puts its norm between the two.
  const float* d_product = layer_norm ? a.d_recurrent : a.dz;
  // The gradients of [γx, γh, γc, βc] follow the bias's in `db`.
  float* d_gains = layer_norm && db ? db + G : nullptr;
  if (rows <= 0) return;
  // dz U^T reads U as the transpose of the (R, G) matrix it is; with a
  // projection, dh W_hr^T reads W_hr (H, R) so.
  StepWeights u_transposed(a.recurrent_kernel, G, R, /*transposed=*/true, rows, a.steps,
                           UseBf16Products(a.options, B));
  std::optional<StepWeights> projection_transposed;
  if (projection) {
    projection_transposed.emplace(projection, R, H, /*transposed=*/true, rows, a.steps,
                                  /*bf16=*/false);
  }
  ArrayMap dh(a.dh0 + row_begin * R, rows, R), dc(a.dc0 + row_begin * H, rows, H);
  if (a.dh_last) {
    dh = ConstArrayMap(a.dh_last + row_begin * R, rows, R);
  } else {
    dh.setZero();
  }
  if (a.dc_last) {
    dc = ConstArrayMap(a.dc_last + row_begin * H, rows, H);
  } else {
    dc.setZero();
  }
  Row dct(H), tanh_c(H), di(H);
  Matrix dh_through_u(a.recurrent_mask ? rows : 0, R);
  // With a projection, the gradient of o * tanh(c): dh W_hr^T.
  Matrix d_unprojected(projection ? rows : 0, H);
  const Zoneout &zoneout_h = a.options.zoneout_h, &zoneout_c = a.options.zoneout_c;
  // With zoneout, the parts of dh and dc that flow straight to the previous state.
  Matrix carry_h(zoneout_h.on() ? rows : 0, R), carry_c(zoneout_c.on() ? rows : 0, H);
  const ConstArrayMap r(a.recurrent_mask ? a.recurrent_mask + row_begin * R : nullptr,
                        a.recurrent_mask ? rows : 0, R);
  for (int64_t t = a.steps - 1; t >= 0; --t) {
    const int64_t at = t * B + row_begin;
    if (a.dh_seq) dh += ConstArrayMap(a.dh_seq + at * R, rows, R);
    if (a.dc_seq) dc += ConstArrayMap(a.dc_seq + at * H, rows, H);
    const float* c_prev = t ? a.c_seq + (at - B) * H : a.c0 + row_begin * H;
    // The c the gates and h read: before zoneout mixed in the previous one.
    const float* c_now = zoneout_c.on() ? a.c_computed + at * H : a.c_seq + at * H;
    const float* m = a.mask ? a.mask + at : nullptr;
    // Rows [0, run) ran this step; the rest carried h and c on, so dh and dc
    // flow on through them unchanged.
    const int64_t run = RunningRows(m, rows);
    if (a.fill_skipped && run < rows) {
      const int64_t skipped = rows - run;
      std::fill_n(a.dz + (at + run) * G, skipped * G, 0.f);
      if (layer_norm) {
        std::fill_n(a.d_input + (at + run) * G, skipped * G, 0.f);
        std::fill_n(a.d_recurrent + (at + run) * G, skipped * G, 0.f);
      }
      if (projection) std::fill_n(a.dh_projected + (at + run) * R, skipped * R, 0.f);
    }
    if (run == 0) continue;
    if (zoneout_h.on()) SplitZoneoutGrad(zoneout_h, at, run, R, dh.data(), carry_h.data());
    if (zoneout_c.on()) SplitZoneoutGrad(zoneout_c, at, run, H, dc.data(), carry_c.data());
    if (projection) {
      MatrixMap dh_step(a.dh_projected + at * R, run, R);
      dh_step = ConstMatrixMap(dh.data(), run, R);
      StepProduct(*projection_transposed, MatrixMap(d_unprojected.data(), run, H), dh_step,
                  /*accumulate=*/false);
    }
    for (int64_t r = 0; r < run; ++r) {
      const float* g = a.gates + (at + r) * G;
      float* dz = a.dz + (at + r) * G;
      RowMap dhr(dh.data() + r * R, R), dcr(dc.data() + r * H, H);
      if (m && m[r] == 0.f) {
        // A masked step passed h and c through: dh and dc flow on unchanged,
        // and the step's gates (and projection) get no gradient.
        std::fill(dz, dz + G, 0.f);
        if (layer_norm) {
          std::fill(a.d_input + (at + r) * G, a.d_input + (at + r + 1) * G, 0.f);
          std::fill(a.d_recurrent + (at + r) * G, a.d_recurrent + (at + r + 1) * G, 0.f);
        }
        if (projection) std::fill(a.dh_projected + (at + r) * R, a.dh_projected + (at + r + 1) * R, 0.f);
        continue;
      }
      // The gradient of o * tanh(c): dh itself, or through the projection.
      ConstRowMap dmr(projection ? d_unprojected.data() + r * H : dhr.data(), H);
      if (!plain) {
        PointwiseGradWithOptions(a.options, H, g, c_now + r * H, c_prev + r * H, dmr.data(),
                                 dcr.data(), dz, layer_norm ? a.norms + (at + r) * NW : nullptr,
                                 layer_norm ? a.d_input + (at + r) * G : nullptr,
                                 layer_norm ? a.d_recurrent + (at + r) * G : nullptr, d_gains);
        if (db) RowMap(db, G) += ConstRowMap(dz, G);
        dhr.setZero();
        continue;
      }
      ConstRowMap i(g, H), f(g + H, H), cand(g + 2 * H, H), o(g + 3 * H, H);
      ConstRowMap c(c_now + r * H, H), cp(c_prev + r * H, H);
      RowMap dz_i(dz, H), dz_f(dz + H, H), dz_g(dz + 2 * H, H), dz_o(dz + 3 * H, H);
      // In this order, each gate is read before its gradient overwrites it.
      tanh_c = c.tanh();
      dct = dcr + dmr * o * (1.f - tanh_c.square());
      dz_o = dmr * tanh_c * o * (1.f - o);
      dcr = dct * f;
      dz_f = dct * cp * f * (1.f - f);
      di = dct * cand * i * (1.f - i);
      dz_g = dct * i * (1.f - cand.square());
      dz_i = di;
      if (db) RowMap(db, G) += ConstRowMap(dz, G);
      // Replaced below by dz U^T, accumulated onto the rows a mask kept.
      dhr.setZero();
    }
    const ConstMatrixMap d_step(d_product + at * G, run, G);
    ArrayMap dh_run(dh.data(), run, R);
    if (!a.recurrent_mask) {
      StepProduct(u_transposed, MatrixMap(dh.data(), run, R), d_step, /*accumulate=*/true);
    } else {
      // h_{t-1} reached U through r: dh_{t-1} = (dz_t U^T) * r. A masked row's
      // dz is zero, so its carried dh gains nothing.
      StepProduct(u_transposed, MatrixMap(dh_through_u.data(), run, R), d_step,
                  /*accumulate=*/false);
      dh_run += ArrayMap(dh_through_u.data(), run, R) * r.topRows(run);
    }
    // Zoneout's direct path to the previous state (a masked row's dh and dc,
    // left as (1 - d) of themselves above, are whole again).
    if (zoneout_h.on()) dh_run += ArrayMap(carry_h.data(), run, R);
    if (zoneout_c.on()) ArrayMap(dc.data(), run, H) += ArrayMap(carry_c.data(), run, H);
  }
}

// The kept steps are gathered a tile at a time, [x_t, h_{t-1}] and the
// gradients side by side, so that each tile is one product with the weights'
// gradients while it is in cache.
void KeptStepGrads(const KeptGrads& a, const int64_t* kept, int64_t n, int64_t begin,
                   int64_t end, float* dkernels) {
  const int64_t B = a.batch, D = a.input_size, R = a.hidden, G = a.width, K = D + R;
  // Where position t B + b is in x and dx.
  const auto in_x = [&](int64_t at) { return a.x_layout.At(at / B, at % B, a.steps, B); };
  if (a.dx) {
    // dx is zero at the steps the mask drops, from the step after the one
    // before this range to its own last step.
    int64_t position = begin == 0 ? 0 : kept[begin - 1] + 1;
    const int64_t last = end == n ? a.steps * B : kept[end - 1] + 1;
    const auto zeros_until = [&](int64_t stop) {
      if (a.x_layout.in_order()) {
        std::fill(a.dx + position * D, a.dx + stop * D, 0.f);
      } else {
        for (int64_t at = position; at < stop; ++at) std::fill_n(a.dx + in_x(at) * D, D, 0.f);
      }
    };
    for (int64_t k = begin; k < end; ++k) {
      zeros_until(kept[k]);
      position = kept[k] + 1;
    }
    zeros_until(last);
  }
  if (end <= begin || (!a.dx && !dkernels)) return;

  constexpr int64_t kTile = 128;
  const bool weights = dkernels != nullptr;
  const bool apart = weights && a.d_recurrent != nullptr && a.d_recurrent != a.d_input;
  const int64_t tile = std::min(kTile, end - begin);
  Matrix xh(weights ? tile : 0, K), d_in(tile, G), d_rec(apart ? tile : 0, G),
      dx(a.dx ? tile : 0, D);
  MatrixMap dwu(dkernels, weights ? K : 0, G);
  const ConstMatrixMap w(a.kernel, D, G);
  for (int64_t first = begin; first < end; first += tile) {
    const int64_t m = std::min(tile, end - first);
    for (int64_t k = 0; k < m; ++k) {
      const int64_t at = kept[first + k], t = at / B, b = at % B;
      std::copy(a.d_input + at * G, a.d_input + (at + 1) * G, d_in.data() + k * G);
      if (!weights) continue;
      const float* h_prev = t > 0 ? a.h_seq + (at - B) * R : a.h0 + b * R;
      float* row = xh.data() + k * K;
      const float* x_row = a.x + in_x(at) * D;
      std::copy(x_row, x_row + D, row);
      if (a.recurrent_mask) {
        RowMap(row + D, R) = ConstRowMap(h_prev, R) * ConstRowMap(a.recurrent_mask + b * R, R);
      } else {
        std::copy(h_prev, h_prev + R, row + D);
      }
      if (apart) std::copy(a.d_recurrent + at * G, a.d_recurrent + (at + 1) * G,
                           d_rec.data() + k * G);
    }
    const auto d_rows = d_in.topRows(m);
    if (weights) {
      const auto rows = xh.topRows(m);
      if (apart) {
        dwu.topRows(D).noalias() += rows.leftCols(D).transpose() * d_rows;
        dwu.bottomRows(R).noalias() += rows.rightCols(R).transpose() * d_rec.topRows(m);
      } else {
        dwu.noalias() += rows.transpose() * d_rows;
      }
    }
    if (a.dx) {
      dx.topRows(m).noalias() = d_rows * w.transpose();
      for (int64_t k = 0; k < m; ++k) {
        std::copy(dx.data() + k * D, dx.data() + (k + 1) * D, a.dx + in_x(kept[first + k]) * D);
      }
    }
  }
}

namespace {
// What a step of n running rows costs, counted in rows at full speed. A
// step reads all the weights however few its rows, so a step of one row
// costs about as much as one of two (through the op at D = 32, H = 128 on
// one core: 3.6-4.1, 4.4, 5.9 and 7.7 us for 1-4 rows, 1.85 us a row from 5).
double StepCost(int64_t rows) {
  constexpr double kFew[] = {0.0, 2.0, 2.4, 3.2, 4.1};
  return rows < 5 ? kFew[rows] : static_cast<double>(rows);
}

}  // namespace

// lstm_core.h says what; the cost model is StepCost's.
void OrderRows(const bool* mask, int64_t steps, int64_t batch, int64_t chunks, int32_t* order,
               int32_t* inverse, float* sorted_mask) {
  std::vector<int64_t> kept(batch, 0);
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t b = 0; b < batch; ++b) kept[b] += mask[t * batch + b];
  }
  std::vector<int32_t> ranked(batch);
  for (int64_t b = 0; b < batch; ++b) ranked[b] = static_cast<int32_t>(b);
  std::stable_sort(ranked.begin(), ranked.end(),
                   [&](int32_t a, int32_t b) { return kept[a] > kept[b]; });
  chunks = std::max<int64_t>(1, std::min(chunks, batch));
  const int64_t per_chunk = (batch + chunks - 1) / chunks;
  std::vector<int64_t> room(chunks), filled(chunks);
  std::vector<double> cost(chunks);
  std::vector<int64_t> block(batch), best_block;
  double best = std::numeric_limits<double>::infinity();
  for (int64_t together = 1; together <= std::min<int64_t>(4, per_chunk); ++together) {
    for (int64_t k = 0; k < chunks; ++k) {
      room[k] = std::max<int64_t>(0, std::min(per_chunk, batch - k * per_chunk));
      filled[k] = 0;
      cost[k] = 0.0;
    }
    for (int64_t i = 0; i < batch; ++i) {
      const double length = static_cast<double>(kept[ranked[i]]);
      int64_t to = -1;
      double to_cost = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        if (filled[k] == room[k] || (i < together && k > 0)) continue;
        const double after = cost[k] + length * (StepCost(filled[k] + 1) - StepCost(filled[k]));
        if (to < 0 || after < to_cost) to = k, to_cost = after;
      }
      block[i] = to;
      cost[to] = to_cost;
      ++filled[to];
    }
    const double slowest = *std::max_element(cost.begin(), cost.end());
    if (slowest < best) best = slowest, best_block = block;
    if (chunks == 1) break;  // one block: one order
  }
  std::fill(filled.begin(), filled.end(), 0);
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t k = best_block[i], position = k * per_chunk + filled[k]++;
    order[position] = ranked[i];
    inverse[ranked[i]] = static_cast<int32_t>(position);
  }
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t p = 0; p < batch; ++p) {
      sorted_mask[t * batch + p] = mask[t * batch + order[p]] ? 1.f : 0.f;
    }
  }
}

int64_t KeptPositions(const float* mask, int64_t positions, int64_t* kept) {
  int64_t n = 0;
  for (int64_t p = 0; p < positions; ++p) {
    if (mask[p] != 0.f) kept[n++] = p;
  }
  return n;
}

void AddUpKeptSums(const KeptGrads& a, const float* sums, int64_t chunks, float* dkernel,
                   float* drecurrent) {
  const int64_t input = a.input_size * a.width, size = (a.input_size + a.hidden) * a.width;
  for (int64_t j = 0; j < size; ++j) {
    float sum = 0.f;
    for (int64_t k = 0; k < chunks; ++k) sum += sums[k * size + j];
    (j < input ? dkernel[j] : drecurrent[j - input]) = sum;
  }
}

}  // namespace keras_lstm

const char* keras_lstm::BfloatProducts() { return kBf16Instructions; }

const char* keras_lstm_bf16_products() { return keras_lstm::BfloatProducts(); }

void keras_lstm_forward_rows(const keras_lstm::Forward* a, const float* kernels, int64_t row_begin,
                             int64_t row_end) {
  keras_lstm::ForwardRows(*a, kernels, row_begin, row_end);
}

void keras_lstm_backward_rows(const keras_lstm::Backward* a, int64_t row_begin, int64_t row_end,
                              float* db) {
  keras_lstm::BackwardRows(*a, row_begin, row_end, db);
}

void keras_lstm_kept_step_grads(const keras_lstm::KeptGrads* a, const int64_t* kept, int64_t n,
                                int64_t begin, int64_t end, float* dkernels) {
  keras_lstm::KeptStepGrads(*a, kept, n, begin, end, dkernels);
}

void keras_lstm_order_rows(const bool* mask, int64_t steps, int64_t batch, int64_t chunks,
                           int32_t* order, int32_t* inverse, float* sorted_mask) {
  keras_lstm::OrderRows(mask, steps, batch, chunks, order, inverse, sorted_mask);
}

int64_t keras_lstm_kept_positions(const float* mask, int64_t positions, int64_t* kept) {
  return keras_lstm::KeptPositions(mask, positions, kept);
}

void keras_lstm_add_up_kept_sums(const keras_lstm::KeptGrads* a, const float* sums, int64_t chunks,
                                 float* dkernel, float* drecurrent) {
  keras_lstm::AddUpKeptSums(*a, sums, chunks, dkernel, drecurrent);
}
