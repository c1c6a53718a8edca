// The interface of the native LSTM maths, free of any framework and of Eigen.
//
// `ForwardRows` and `BackwardRows` run batch rows [row_begin, row_end) of a
// whole sequence. Rows never interact, so callers split the batch into
// contiguous chunks, one per thread, and each chunk runs its whole time loop
// without synchronisation. The TensorFlow ops (lstm_sequence.cc) and the XLA
// custom calls (lstm_sequence_xla.cc) both call them.
//
// The maths itself is lstm_core.cc, the only file compiled for the CPU it
// runs on (-march=native and friends); the framework glue around it is
// compiled for the generic target, so only that one file differs between
// CPUs. The XLA library does not compile the maths again: it calls the main
// library's copy through the two extern "C" entry points below, whose
// addresses it is given when it is loaded.
//
// Layouts are row-major and time-major: x is (T, B, D), sequences of states
// are (T, B, H), gates are (T, B, G H) with G = 4 gates in Keras's order
// input, forget, candidate, output, or G = 3 (forget, candidate, output) with
// `Options::cifg`. h has R features: H, or P with a projection
// (`Options::projection`), so h0, h_seq and U's rows are R wide while c stays
// H wide. A mask value of 0 at (t, b) keeps row b's previous h and c
// (Keras's rule). A null pointer means "absent": no bias, no mask, an output
// that is not kept, or a gradient that is zero.
//
// Skipped rows: at each step, the rows of a block after the last one the
// mask keeps are all masked, so the step's products and pointwise pass stop
// at that row; the rows after it only carry h and c on (and, backward, dh
// and dc). Callers that order rows by their number of unmasked steps make
// the running rows a prefix at every step for a right-padded mask (and for
// its mirror), so such a batch costs its real steps. What a skipped row's
// step would have kept for the gradient (gates, norms, c_computed; backward:
// dz, d_input, d_recurrent, dh_projected) is zeros with `fill_skipped`, else
// left unwritten for callers that read only the steps the mask keeps.

#ifndef KERAS_LSTM_KERNELS_LSTM_CORE_H_
#define KERAS_LSTM_KERNELS_LSTM_CORE_H_

#include <algorithm>
#include <cstdint>

namespace keras_lstm {

// Zoneout of one state: the new state is d * previous + (1 - d) * computed,
// with d a 0/1 mask a step (training) or the rate itself (inference).
struct Zoneout {
  const float* mask = nullptr;  // (T, B, width) of 0 and 1, or null: d = rate
  float rate = 0.f;

  bool on() const { return mask || rate > 0.f; }
};

// The cell options the kernel computes (GatedLSTMCell's `peephole`, `cifg`,
// `cell_clip`, `proj_units`, `zoneout_h` and `zoneout_c`); all off is the
// standard LSTM.
struct Options {
  bool cifg = false;                  // i = 1 - f: the kernels hold 3 gates
  const float* peephole = nullptr;    // (3, H): w_i, w_f, w_o (w_i unused with cifg), or null
  float cell_clip = 0.f;              // > 0: C is clipped to [-cell_clip, cell_clip]
  const float* projection = nullptr;  // (H, P): h = (o * tanh(C)) W_hr, or null
  int64_t proj_units = 0;             // P, with a projection
  Zoneout zoneout_h;                  // of h (R wide)
  Zoneout zoneout_c;                  // of C (H wide)
  // The steps' products [x, h] [W; U] (forward) and dz U^T (backward) with
  // bfloat16 operands and float32 sums, where this build has the
  // instructions (BfloatProducts()); the state, the gates and every sum stay
  // float32. Ignored (float32 products) elsewhere and for a batch of at most
  // 4 rows, whose products are vector-matrix ones.
  bool bf16_products = false;
  // Layer normalisation: (2 G H + 2 H) gains and shift [γx, γh, γc, βc]
  // (offsets LayerNorm::kX, kH, kC, and kC + H), or null. Then
  // z = LN(x W) γx + LN(h U) γh + b, x W and h U two products a step, and h
  // reads LN(C) γc + βc; each norm is over its features, with
  // kLayerNormEpsilon in the variance.
  const float* layer_norm = nullptr;

  int64_t gates() const { return cifg ? 3 : 4; }
  // R, the width of h: P with a projection, else H.
  int64_t hidden(int64_t units) const { return projection ? proj_units : units; }
  bool plain() const { return !cifg && !peephole && cell_clip <= 0.f && !layer_norm; }
  // With layer_norm, what a step keeps of a row for the gradient (see Forward::norms).
  int64_t norms_width(int64_t units) const {
    return layer_norm ? (2 * gates() + 1) * units + 3 : 0;
  }
};

// options.LAYER_NORM_EPSILON, which GatedLSTMCell's layer norm uses.
constexpr float kLayerNormEpsilon = 1e-3f;

// Where layer norm's values sit for G gate values and H units: the gains
// [γx, γh, γc, βc] of Options::layer_norm, a row of Forward::norms (x W, h U
// and C normalised, then the three inverse deviations), and the gradients of
// the gains share the first three offsets.
struct LayerNorm {
  int64_t G, H;
  int64_t kX() const { return 0; }
  int64_t kH() const { return G; }
  int64_t kC() const { return 2 * G; }
  int64_t kShift() const { return 2 * G + H; }        // βc, in the gains
  int64_t kDeviations() const { return 2 * G + H; }   // inv_x, inv_h, inv_c, in a norms row
};

// Where x holds each step of each of the kernel's rows (and dx, which has
// x's layout). By default x is time-major (T, B, D) in the kernel's own
// order. `rows` (B), or null: the kernel's row b reads x's row rows[b] (x
// stays in its caller's order while the kernel runs the rows sorted; see
// "Skipped rows"). `batch_major`: x is (B, T, D), as Keras hands a sequence
// over, so that nobody transposes it first. `reversed`: the kernel's step t
// is x's step T - 1 - t (a layer that runs its sequence backwards).
struct InputLayout {
  const int32_t* rows = nullptr;
  bool batch_major = false;
  bool reversed = false;

  // Whether x is time-major in the kernel's order: step t of row b is x's row t B + b.
  bool in_order() const { return !rows && !batch_major && !reversed; }
  // The row of x (D values) that holds step t of the kernel's row b, of T steps and B rows.
  int64_t At(int64_t t, int64_t b, int64_t T, int64_t B) const {
    const int64_t step = reversed ? T - 1 - t : t, row = rows ? rows[b] : b;
    return batch_major ? row * T + step : step * B + row;
  }
};

struct Forward {
  int64_t steps = 0, batch = 0, input_size = 0, units = 0;
  const float* x = nullptr;                 // (T, B, D), or as x_layout says
  InputLayout x_layout;
  const float* kernel = nullptr;            // (D, G H)
  const float* bias = nullptr;              // (G H), or null
  const float* recurrent_kernel = nullptr;  // (R, G H)
  const float* h0 = nullptr;                // (B, R)
  const float* c0 = nullptr;                // (B, H)
  const float* mask = nullptr;              // (T, B), or null
  const float* recurrent_mask = nullptr;    // (B, R), or null: see ForwardRows
  Options options;
  float* h_seq = nullptr;                   // (T, B, R), or null: not kept
  float* c_seq = nullptr;                   // (T, B, H), or null: not kept
  // With zoneout of C, the cell state each step computed before zoneout
  // mixed in the previous one (T, B, H), which the gates and h read; null:
  // not kept.
  float* c_computed = nullptr;
  float* gates = nullptr;                   // (T, B, G H) activations, or null: not kept
  // With layer_norm, (T, B, 2 G H + H + 3): each step's normalised x W, h U
  // and C, then their three inverse deviations (LayerNorm); null: not kept.
  float* norms = nullptr;
  float* h_last = nullptr;                  // (B, R)
  float* c_last = nullptr;                  // (B, H)
  bool fill_skipped = true;                 // zeros where a skipped row keeps nothing (above)
  // Whether h_seq and c_seq carry a row's state on after the last step the
  // mask keeps of it; if not, they are left unwritten there (the final state
  // still reaches h_last and c_last), for callers that read them only at the
  // steps before a kept one.
  bool carry_ended = true;
};

// [W; U]: the input and recurrent kernels stacked, (D + R, G H), so that a
// step's projection is one matrix product.
inline void StackKernels(const Forward& a, float* kernels) {
  const int64_t G = a.options.gates() * a.units, R = a.options.hidden(a.units);
  std::copy(a.kernel, a.kernel + a.input_size * G, kernels);
  std::copy(a.recurrent_kernel, a.recurrent_kernel + R * G, kernels + a.input_size * G);
}

struct Backward {
  int64_t steps = 0, batch = 0, units = 0;
  const float* recurrent_kernel = nullptr;  // (R, G H)
  const float* c0 = nullptr;                // (B, H)
  const float* mask = nullptr;              // (T, B), or null
  const float* recurrent_mask = nullptr;    // (B, R), or null: as in Forward
  Options options;                          // as in Forward
  const float* c_seq = nullptr;             // (T, B, H)
  const float* c_computed = nullptr;        // (T, B, H) with zoneout of C: as in Forward
  const float* norms = nullptr;             // with layer_norm: as Forward kept them
  const float* gates = nullptr;             // (T, B, G H) activations
  const float* dh_seq = nullptr;            // (T, B, R), or null: zero
  const float* dc_seq = nullptr;            // (T, B, H), or null: zero
  const float* dh_last = nullptr;           // (B, R), or null: zero
  const float* dc_last = nullptr;           // (B, H), or null: zero
  float* dz = nullptr;                      // (T, B, G H): gradient of the pre-activations
  float* dh0 = nullptr;                     // (B, R)
  float* dc0 = nullptr;                     // (B, H)
  // With a projection: the whole gradient of each step's h (T, B, P), zero
  // where a mask kept h, from which the caller makes W_hr's gradient.
  float* dh_projected = nullptr;
  // With layer_norm: the gradients of each step's x W and h U (T, B, G H),
  // from which dx and W's gradient, and dh_{t-1} and U's, are made.
  float* d_input = nullptr;
  float* d_recurrent = nullptr;
  bool fill_skipped = true;                 // as in Forward
};

// One step a row block: z = [x_t, h_{t-1}] [W; U] + b as one matrix product
// over the stacked weights `kernels` ((D + R, G H), see StackKernels), then
//   i = sigmoid(z_i)   f = sigmoid(z_f)   g = tanh(z_g)   o = sigmoid(z_o)
//   c = f * c_{t-1} + i * g               h = o * tanh(c)
// With a `recurrent_mask` r (recurrent dropout: one mask per sequence, scaled
// by 1 / (1 - rate)), h_{t-1} * r takes h_{t-1}'s place in the product.
// The options: `cifg` makes i = 1 - f; `peephole` adds w_i * c_{t-1} to z_i,
// w_f * c_{t-1} to z_f and w_o * c to z_o; `cell_clip` clips c before the
// output gate and h read it; `projection` makes h = (o * tanh(c)) W_hr, one
// more product a step; zoneout then mixes the previous h and c into the new
// ones (the gates and h read the c computed before that mix); `layer_norm`
// makes x W and h U two products, each normalised, and h read LN(c). The
// gates kept are the activations i, f, g, o (f, g, o with cifg), the
// pre-activations' peephole terms included.
void ForwardRows(const Forward& a, const float* kernels, int64_t row_begin, int64_t row_end);

// Carries dh and dc back through the steps: dz_t from the gates, then
// dh_{t-1} = dz_t U^T (times r with a recurrent mask) and dc_{t-1} = dc_t * f
// (plus the peephole terms; with a projection, dh reaches the gates as
// dh W_hr^T). `dz` may share `gates`'s buffer. `db` (G H), if not null,
// accumulates these rows' bias gradient. The peephole weights' gradients
// are sums of dz times c over the steps, and W_hr's the product of
// o * tanh(c) and `dh_projected` over all steps, which the caller makes.
// With layer_norm, `db` is (G H + 2 G H + 2 H): the bias gradient, then those
// of [γx, γh, γc, βc] (the layout of Options::layer_norm).
void BackwardRows(const Backward& a, int64_t row_begin, int64_t row_end, float* db = nullptr);

// The input's and the weights' gradients from the steps a mask keeps alone:
// dx_t = d_input_t W^T, and [dW; dU] = sum over kept steps of
// [x_t, h_{t-1}]^T [d_input_t, d_recurrent_t] (x_t with d_input, h_{t-1}
// with d_recurrent; both are dz but with layer norm). A step the mask drops
// adds nothing to either weight and its dx is zero, so a right-padded batch
// pays for its real steps only, under XLA too, where shapes are static.
struct KeptGrads {
  int64_t steps = 0, batch = 0, input_size = 0, hidden = 0, width = 0;  // T, B, D, R, G H
  const float* x = nullptr;               // (T, B, D), or as x_layout says
  InputLayout x_layout;                   // as in Forward, for x and dx
  const float* kernel = nullptr;          // W (D, G H)
  const float* h0 = nullptr;              // (B, R)
  const float* h_seq = nullptr;           // (T, B, R): h after each step
  const float* recurrent_mask = nullptr;  // (B, R), or null: U saw h_{t-1} * r
  const float* d_input = nullptr;         // (T, B, G H)
  const float* d_recurrent = nullptr;     // (T, B, G H), or null: d_input
  float* dx = nullptr;                    // (T, B, D), or as x_layout says; null: not made
};

// The order a masked batch's rows run in (order[p] = the batch's row at the
// kernel's position p; inverse its inverse) and the mask (T, B) in that
// order as the kernel reads it (sorted_mask, 0 and 1), for a batch the ops split into
// `chunks` contiguous blocks of ceil(B / chunks) rows, one a thread
// (ForEachChunk). Each block holds its rows longest first (by the steps
// `mask` (T, B) keeps), so that for a right-padded mask, and for its mirror,
// the running rows are a prefix of the block at every step ("Skipped
// rows"). Which rows share a block decides only the cost, the time of the
// slowest block: rows join the blocks longest first, each the one it makes
// least costly (StepCost in lstm_core.cc over the steps it runs), after the
// `m` longest went to the first block together (a few long rows running side
// by side cost less than each alone); of m = 1..4 the cheapest slowest block
// wins.
void OrderRows(const bool* mask, int64_t steps, int64_t batch, int64_t chunks, int32_t* order,
               int32_t* inverse, float* sorted_mask);

// The positions t B + b of the steps `mask` (T, B) keeps, in order, into
// `kept` (room for T B); returns how many.
int64_t KeptPositions(const float* mask, int64_t positions, int64_t* kept);

// Adds up the `chunks` partial [dW; dU] sums ((D + R, G H) each, one a
// thread's range of KeptStepGrads) into dW (D, G H) and dU (R, G H).
void AddUpKeptSums(const KeptGrads& a, const float* sums, int64_t chunks, float* dkernel,
                   float* drecurrent);

// KeptGrads over kept[begin, end) of the `n` kept positions: adds their
// [dW; dU] to `dkernels` ((D + R, G H)) and writes dx from the position
// after kept[begin - 1] (0 for the first) up to kept[end - 1] (T B for the
// last), zeros at the dropped ones. Callers split [0, n) into ranges, one a
// thread, each with its own `dkernels` to add up after. A null `dkernels`
// leaves the weights' gradients out (then x, h0, h_seq and d_recurrent go
// unread), a null `a.dx` the input's: the two can be asked for apart, so
// that a graph that needs no dx never makes it.
void KeptStepGrads(const KeptGrads& a, const int64_t* kept, int64_t n, int64_t begin,
                   int64_t end, float* dkernels);

// The instructions this build runs bfloat16 products with ("avx512_bf16"),
// or "" where it has none and `Options::bf16_products` keeps float32.
const char* BfloatProducts();

// The functions above as C symbols of the main library, for the XLA one.
using ForwardRowsFn = void (*)(const Forward*, const float*, int64_t, int64_t);
using BackwardRowsFn = void (*)(const Backward*, int64_t, int64_t, float*);
using KeptStepGradsFn = void (*)(const KeptGrads*, const int64_t*, int64_t, int64_t, int64_t,
                                 float*);
using OrderRowsFn = void (*)(const bool*, int64_t, int64_t, int64_t, int32_t*, int32_t*,
                             float*);
using KeptPositionsFn = int64_t (*)(const float*, int64_t, int64_t*);
using AddUpKeptSumsFn = void (*)(const KeptGrads*, const float*, int64_t, float*, float*);

}  // namespace keras_lstm

extern "C" {
const char* keras_lstm_bf16_products();
void keras_lstm_forward_rows(const keras_lstm::Forward* a, const float* kernels, int64_t row_begin,
                             int64_t row_end);
void keras_lstm_backward_rows(const keras_lstm::Backward* a, int64_t row_begin, int64_t row_end,
                              float* db);
void keras_lstm_kept_step_grads(const keras_lstm::KeptGrads* a, const int64_t* kept, int64_t n,
                                int64_t begin, int64_t end, float* dkernels);
void keras_lstm_order_rows(const bool* mask, int64_t steps, int64_t batch, int64_t chunks,
                           int32_t* order, int32_t* inverse, float* sorted_mask);
int64_t keras_lstm_kept_positions(const float* mask, int64_t positions, int64_t* kept);
void keras_lstm_add_up_kept_sums(const keras_lstm::KeptGrads* a, const float* sums, int64_t chunks,
                                 float* dkernel, float* drecurrent);
}

#endif  // KERAS_LSTM_KERNELS_LSTM_CORE_H_
