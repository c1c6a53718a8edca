// Whole-sequence LSTM ops for the TensorFlow CPU runtime.
//
// KerasLstmSequence runs the forward pass, input projection included: each
// step is one (rows, D + R) x (D + R, G H) matrix product and one fused
// pointwise pass (lstm_core.h names the sizes), so x W + b of a step is made
// while it is in cache instead of as a (T, B, G H) tensor. KerasLstmSequenceGrad carries the gradient back
// through the steps and returns the gradient of the pre-activations, dz,
// and the bias gradient db, from which the caller makes dx, dW and dU as
// large matrix products over all steps; with a mask, KerasLstmKeptGrads makes
// them from the steps the mask keeps alone (and KerasLstmKeptInputGrad dx),
// and KerasLstmRowOrder the order a masked batch's rows run in. Of the cell options the kernel
// covers, cifg and cell_clip are attributes; the peephole and projection
// weights and zoneout's masks are inputs (empty when off) and zoneout's rates
// attributes (and `bf16_products`, bfloat16 operands for the steps' products);
// with zoneout of C the forward op also returns the C each step
// computed (`c_computed`), and with a projection the gradient op each step's
// dh, for W_hr's gradient. Layer norm's gains are one more input; the forward
// op then also returns the normalised values (`norms`), and the gradient op
// the gradients of x W and h U (from which dx, dW and dU are made) and of
// the gains. The maths lives in
// lstm_core.cc; this file adapts it to
// TensorFlow: shapes, outputs, and the worker threads the batch is split
// across. It is compiled for the generic target (lstm_core.h says why).

#include <algorithm>
#include <functional>
#include <vector>

#include "lstm_core.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/blocking_counter.h"
#include "tensorflow/core/platform/threadpool.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;

// Fewer rows than this per thread costs more in scheduling than it saves.
constexpr int64_t kMinRowsPerChunk = 4;

// Kept steps (KerasLstmKeptGrads) fewer than this per thread: one thread.
constexpr int64_t kMinKeptPerChunk = 256;

// How many chunks ForEachChunk cuts `rows` into.
int64_t NumChunks(OpKernelContext* ctx, int64_t rows, int64_t min_per_chunk = kMinRowsPerChunk) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  return std::max<int64_t>(1, std::min<int64_t>(workers->num_threads, rows / min_per_chunk));
}

// Runs work(chunk, row_begin, row_end) over [0, rows) on the op's CPU worker
// pool, chunk numbering the NumChunks(ctx, rows, min_per_chunk) chunks.
void ForEachChunk(OpKernelContext* ctx, int64_t rows,
                  const std::function<void(int64_t, int64_t, int64_t)>& work,
                  int64_t min_per_chunk = kMinRowsPerChunk) {
  const int64_t chunks = NumChunks(ctx, rows, min_per_chunk);
  if (chunks == 1) {
    work(0, 0, rows);
    return;
  }
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  tensorflow::BlockingCounter pending(chunks - 1);
  for (int64_t k = 1; k < chunks; ++k) {
    const int64_t begin = std::min(rows, k * per_chunk), end = std::min(rows, begin + per_chunk);
    ctx->device()->tensorflow_cpu_worker_threads()->workers->Schedule([&, k, begin, end] {
      work(k, begin, end);
      pending.DecrementCount();
    });
  }
  work(0, 0, std::min(rows, per_chunk));
  pending.Wait();
}

const float* DataOrNull(const Tensor& tensor) {
  return tensor.NumElements() ? tensor.flat<float>().data() : nullptr;
}

float* DataOrNull(Tensor* tensor) {
  return tensor->NumElements() ? tensor->flat<float>().data() : nullptr;
}

// `x_rows` is empty or a row of x for each of the batch's rows: the order
// the kernel runs them in (lstm_core.h's InputLayout::rows).
void ReadXRows(OpKernelContext* ctx, const Tensor& x_rows, int64_t batch, const int32_t** rows) {
  *rows = nullptr;
  if (x_rows.NumElements() == 0) return;
  OP_REQUIRES(ctx, x_rows.shape() == TensorShape({batch}),
              InvalidArgument("x_rows must be empty or (batch,), got ",
                              x_rows.shape().DebugString()));
  const int32_t* given = x_rows.flat<int32_t>().data();
  for (int64_t b = 0; b < batch; ++b) {
    OP_REQUIRES(ctx, given[b] >= 0 && given[b] < batch,
                InvalidArgument("x_rows[", b, "] = ", given[b], " is not a row of x"));
  }
  *rows = given;
}

// How the ops find x's steps (lstm_core.h's InputLayout), from their
// attributes; ReadXRows adds the rows.
tensorflow::Status ReadLayout(OpKernelConstruction* ctx, keras_lstm::InputLayout* layout) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("x_batch_major", &layout->batch_major));
  TF_RETURN_IF_ERROR(ctx->GetAttr("x_reversed", &layout->reversed));
  return absl::OkStatus();
}

// x's steps T, rows B and features D, whichever of its first two axes is time.
void ReadInputSizes(OpKernelContext* ctx, const Tensor& x, const keras_lstm::InputLayout& layout,
                    int64_t* steps, int64_t* batch, int64_t* features) {
  OP_REQUIRES(ctx, x.dims() == 3,
              InvalidArgument(layout.batch_major ? "x must be (batch, T, D), got "
                                                 : "x must be (T, batch, D), got ",
                              x.shape().DebugString()));
  *steps = x.dim_size(layout.batch_major ? 1 : 0);
  *batch = x.dim_size(layout.batch_major ? 0 : 1);
  *features = x.dim_size(2);
}

// The options (lstm_core.h) from the ops' attributes; WithWeights adds their inputs.
tensorflow::Status ReadOptions(OpKernelConstruction* ctx, keras_lstm::Options* options) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("cifg", &options->cifg));
  TF_RETURN_IF_ERROR(ctx->GetAttr("cell_clip", &options->cell_clip));
  TF_RETURN_IF_ERROR(ctx->GetAttr("zoneout_h_rate", &options->zoneout_h.rate));
  TF_RETURN_IF_ERROR(ctx->GetAttr("zoneout_c_rate", &options->zoneout_c.rate));
  TF_RETURN_IF_ERROR(ctx->GetAttr("bf16_products", &options->bf16_products));
  return absl::OkStatus();
}

// Checks the shapes the two ops share; the options' sizes come from them:
// H from c0, R (h's width) from h0, P from `projection`.
void CheckStates(OpKernelContext* ctx, const keras_lstm::Options& options, const Tensor& u,
                 const Tensor& h0, const Tensor& c0, const Tensor& mask,
                 const Tensor& recurrent_mask, const Tensor& peephole,
                 const Tensor& projection, int64_t steps, int64_t batch) {
  OP_REQUIRES(ctx, c0.dims() == 2 && c0.dim_size(0) == batch,
              InvalidArgument("c0 must be (batch, H), got ", c0.shape().DebugString()));
  const int64_t units = c0.dim_size(1);
  const bool projecting = projection.NumElements() > 0;
  OP_REQUIRES(ctx, !projecting || (projection.dims() == 2 && projection.dim_size(0) == units),
              InvalidArgument("projection must be empty or (H, P), got ",
                              projection.shape().DebugString()));
  const int64_t hidden = projecting ? projection.dim_size(1) : units;
  OP_REQUIRES(ctx, u.shape() == TensorShape({hidden, options.gates() * units}),
              InvalidArgument("recurrent_kernel must be (", hidden, ", ", options.gates() * units,
                              "), got ", u.shape().DebugString()));
  OP_REQUIRES(ctx, h0.shape() == TensorShape({batch, hidden}),
              InvalidArgument("h0 must be (batch, ", hidden, "), got ",
                              h0.shape().DebugString()));
  OP_REQUIRES(ctx, mask.NumElements() == 0 || mask.shape() == TensorShape({steps, batch}),
              InvalidArgument("mask must be empty or (T, batch), got ",
                              mask.shape().DebugString()));
  OP_REQUIRES(ctx, recurrent_mask.NumElements() == 0 || recurrent_mask.shape() == h0.shape(),
              InvalidArgument("recurrent_mask must be empty or shaped as h0, got ",
                              recurrent_mask.shape().DebugString()));
  OP_REQUIRES(ctx, peephole.NumElements() == 0 || peephole.shape() == TensorShape({3, units}),
              InvalidArgument("peephole must be empty or (3, H), got ",
                              peephole.shape().DebugString()));
}

// The options with the weights and zoneout masks the ops take as inputs.
keras_lstm::Options WithWeights(keras_lstm::Options options, const Tensor& peephole,
                                const Tensor& projection, const Tensor& zoneout_h,
                                const Tensor& zoneout_c, const Tensor& layer_norm) {
  options.peephole = DataOrNull(peephole);
  options.layer_norm = DataOrNull(layer_norm);
  options.projection = DataOrNull(projection);
  options.proj_units = projection.NumElements() ? projection.dim_size(1) : 0;
  options.zoneout_h.mask = DataOrNull(zoneout_h);
  options.zoneout_c.mask = DataOrNull(zoneout_c);
  return options;
}

// Layer norm's gains and shift [γx, γh, γc, βc] are empty or (2 G H + 2 H).
void CheckLayerNorm(OpKernelContext* ctx, const Tensor& layer_norm, int64_t width, int64_t units) {
  const int64_t size = 2 * width + 2 * units;
  OP_REQUIRES(ctx, layer_norm.NumElements() == 0 || layer_norm.shape() == TensorShape({size}),
              InvalidArgument("layer_norm must be empty or (2GH + 2H,) = (", size, ",), got ",
                              layer_norm.shape().DebugString()));
}

// A zoneout mask is empty or one value a step, row and unit of its state.
void CheckZoneout(OpKernelContext* ctx, const char* name, const Tensor& mask, int64_t steps,
                  int64_t batch, int64_t width) {
  OP_REQUIRES(ctx, mask.NumElements() == 0 || mask.shape() == TensorShape({steps, batch, width}),
              InvalidArgument(name, " must be empty or (T, batch, ", width, "), got ",
                              mask.shape().DebugString()));
}

class LstmSequenceOp : public OpKernel {
 public:
  explicit LstmSequenceOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("keep_for_gradient", &keep_for_gradient_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("return_sequences", &return_sequences_));
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, &options_));
    OP_REQUIRES_OK(ctx, ReadLayout(ctx, &layout_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& u = ctx->input(3);
    const Tensor& h0 = ctx->input(4);
    const Tensor& c0 = ctx->input(5);
    const Tensor& mask = ctx->input(6);
    const Tensor& recurrent_mask = ctx->input(7);
    const Tensor& peephole = ctx->input(8);
    const Tensor& projection = ctx->input(9);
    const Tensor& zoneout_h = ctx->input(10);
    const Tensor& zoneout_c = ctx->input(11);
    const Tensor& layer_norm = ctx->input(12);
    int64_t steps, batch, features;
    ReadInputSizes(ctx, x, layout_, &steps, &batch, &features);
    if (!ctx->status().ok()) return;
    keras_lstm::InputLayout x_layout = layout_;
    ReadXRows(ctx, ctx->input(13), batch, &x_layout.rows);
    if (!ctx->status().ok()) return;
    CheckStates(ctx, options_, u, h0, c0, mask, recurrent_mask, peephole, projection, steps,
                batch);
    if (!ctx->status().ok()) return;
    const int64_t units = c0.dim_size(1), hidden = h0.dim_size(1);
    CheckZoneout(ctx, "zoneout_h", zoneout_h, steps, batch, hidden);
    CheckZoneout(ctx, "zoneout_c", zoneout_c, steps, batch, units);
    if (!ctx->status().ok()) return;
    const int64_t gates = options_.gates() * units;
    CheckLayerNorm(ctx, layer_norm, gates, units);
    if (!ctx->status().ok()) return;
    const keras_lstm::Options options =
        WithWeights(options_, peephole, projection, zoneout_h, zoneout_c, layer_norm);
    OP_REQUIRES(ctx, kernel.shape() == TensorShape({features, gates}),
                InvalidArgument("kernel must be (D, ", options_.gates(), "H), got ",
                                kernel.shape().DebugString()));
    OP_REQUIRES(ctx, bias.NumElements() == 0 || bias.shape() == TensorShape({gates}),
                InvalidArgument("bias must be empty or (", options_.gates(), "H), got ",
                                bias.shape().DebugString()));

    // What the gradient needs is kept only when asked for; an output that is
    // not kept is an empty tensor.
    const bool keep = keep_for_gradient_;
    const TensorShape states({steps, batch, units}), hs({steps, batch, hidden}), none({0});
    Tensor *h_out, *c_out, *gates_out, *h_last_out, *c_last_out, *c_computed_out, *norms_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, keep || return_sequences_ ? hs : none, &h_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, keep ? states : none, &c_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            2, keep ? TensorShape({steps, batch, gates}) : none, &gates_out));
    // The final state as its own (batch, R) and (batch, H) tensors: a loss that
    // reads only these sends back a (batch, ·) gradient, not a (T, batch, ·) one.
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, h0.shape(), &h_last_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, c0.shape(), &c_last_out));
    // With zoneout of C, the c each step computed, which the gradient reads.
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, keep && options.zoneout_c.on() ? states : none,
                                             &c_computed_out));
    // With layer norm, what its gradient reads (lstm_core.h's Forward::norms).
    const int64_t norms_width = options.norms_width(units);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            6, keep && options.layer_norm
                                   ? TensorShape({steps, batch, norms_width})
                                   : none,
                            &norms_out));
    if (batch == 0) return;
    if (steps == 0) {
      h_last_out->flat<float>() = h0.flat<float>();
      c_last_out->flat<float>() = c0.flat<float>();
      return;
    }

    keras_lstm::Forward args;
    args.steps = steps;
    args.batch = batch;
    args.input_size = features;
    args.units = units;
    args.x = x.flat<float>().data();
    args.x_layout = x_layout;
    args.kernel = kernel.flat<float>().data();
    args.bias = DataOrNull(bias);
    args.recurrent_kernel = u.flat<float>().data();
    args.h0 = h0.flat<float>().data();
    args.c0 = c0.flat<float>().data();
    args.mask = DataOrNull(mask);
    args.recurrent_mask = DataOrNull(recurrent_mask);
    args.options = options;
    // The gradient reads the kept values at the steps the mask keeps only
    // (and the state at the step before each).
    args.fill_skipped = false;
    args.carry_ended = return_sequences_;
    args.h_seq = DataOrNull(h_out);
    args.c_seq = DataOrNull(c_out);
    args.c_computed = DataOrNull(c_computed_out);
    args.norms = DataOrNull(norms_out);
    args.gates = DataOrNull(gates_out);
    args.h_last = h_last_out->flat<float>().data();
    args.c_last = c_last_out->flat<float>().data();
    std::vector<float> kernels((features + hidden) * gates);
    keras_lstm::StackKernels(args, kernels.data());
    ForEachChunk(ctx, batch, [&](int64_t, int64_t begin, int64_t end) {
      keras_lstm::ForwardRows(args, kernels.data(), begin, end);
    });
  }

 private:
  bool keep_for_gradient_ = true;
  bool return_sequences_ = true;
  keras_lstm::Options options_;
  keras_lstm::InputLayout layout_;  // without the rows, an input
};

class LstmSequenceGradOp : public OpKernel {
 public:
  explicit LstmSequenceGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, &options_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& u = ctx->input(0);
    const Tensor& h0 = ctx->input(1);
    const Tensor& c0 = ctx->input(2);
    const Tensor& mask = ctx->input(3);
    const Tensor& c_seq = ctx->input(4);
    const Tensor& gates = ctx->input(5);
    const Tensor& dh_seq = ctx->input(6);
    const Tensor& dc_seq = ctx->input(7);
    const Tensor& dh_last = ctx->input(8);
    const Tensor& dc_last = ctx->input(9);
    const Tensor& recurrent_mask = ctx->input(10);
    const Tensor& peephole = ctx->input(11);
    const Tensor& projection = ctx->input(12);
    const Tensor& zoneout_h = ctx->input(13);
    const Tensor& zoneout_c = ctx->input(14);
    const Tensor& c_computed = ctx->input(15);
    const Tensor& layer_norm = ctx->input(16);
    const Tensor& norms = ctx->input(17);
    OP_REQUIRES(ctx, gates.dims() == 3,
                InvalidArgument("gates must be (T, batch, GH), got ", gates.shape().DebugString()));
    const int64_t steps = gates.dim_size(0), batch = gates.dim_size(1);
    CheckStates(ctx, options_, u, h0, c0, mask, recurrent_mask, peephole, projection, steps,
                batch);
    if (!ctx->status().ok()) return;
    const int64_t units = c0.dim_size(1), hidden = h0.dim_size(1);
    const int64_t width = options_.gates() * units;
    const TensorShape states({steps, batch, units}), hs({steps, batch, hidden});
    CheckZoneout(ctx, "zoneout_h", zoneout_h, steps, batch, hidden);
    CheckZoneout(ctx, "zoneout_c", zoneout_c, steps, batch, units);
    if (!ctx->status().ok()) return;
    CheckLayerNorm(ctx, layer_norm, width, units);
    if (!ctx->status().ok()) return;
    const keras_lstm::Options options =
        WithWeights(options_, peephole, projection, zoneout_h, zoneout_c, layer_norm);
    const int64_t norms_width = options.norms_width(units);
    OP_REQUIRES(ctx,
                !options.layer_norm ||
                    norms.shape() == TensorShape({steps, batch, norms_width}),
                InvalidArgument("norms must be (T, batch, ", norms_width,
                                ") with layer_norm, got ", norms.shape().DebugString()));
    OP_REQUIRES(ctx, !options.zoneout_c.on() || c_computed.shape() == states,
                InvalidArgument("c_computed must be (T, batch, H) with zoneout of C, got ",
                                c_computed.shape().DebugString()));
    OP_REQUIRES(ctx, gates.dim_size(2) == width && c_seq.shape() == states &&
                         (dh_seq.NumElements() == 0 || dh_seq.shape() == hs) &&
                         (dc_seq.NumElements() == 0 || dc_seq.shape() == states) &&
                         (dh_last.NumElements() == 0 || dh_last.shape() == h0.shape()) &&
                         (dc_last.NumElements() == 0 || dc_last.shape() == c0.shape()),
                InvalidArgument("inconsistent shapes in the LSTM sequence gradient"));

    Tensor *dz_out, *dh0_out, *dc0_out, *db_out, *dh_projected_out, *d_input_out,
        *d_recurrent_out, *d_layer_norm_out;
    // dz takes over the gates' buffer when nothing else holds it.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({5}, 0, gates.shape(), &dz_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &dh0_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, c0.shape(), &dc0_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({width}), &db_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, projection.NumElements() ? hs : TensorShape({0}),
                                             &dh_projected_out));
    // With layer norm: the gradients of each step's x W and h U, and of
    // [γx, γh, γc, βc].
    const TensorShape products = options.layer_norm ? gates.shape() : TensorShape({0});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, products, &d_input_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(6, products, &d_recurrent_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(7, layer_norm.shape(), &d_layer_norm_out));
    auto db = db_out->flat<float>();
    auto d_layer_norm = d_layer_norm_out->flat<float>();
    db.setZero();
    d_layer_norm.setZero();
    if (batch == 0) return;

    keras_lstm::Backward args;
    args.steps = steps;
    args.batch = batch;
    args.units = units;
    args.recurrent_kernel = u.flat<float>().data();
    args.c0 = c0.flat<float>().data();
    args.mask = DataOrNull(mask);
    args.recurrent_mask = DataOrNull(recurrent_mask);
    args.options = options;
    // Its caller reads dz, d_input, d_recurrent and dh_projected at the steps
    // the mask keeps only.
    args.fill_skipped = false;
    args.dh_projected = DataOrNull(dh_projected_out);
    args.c_seq = c_seq.flat<float>().data();
    args.c_computed = options.zoneout_c.on() ? c_computed.flat<float>().data() : nullptr;
    args.norms = options.layer_norm ? norms.flat<float>().data() : nullptr;
    args.d_input = DataOrNull(d_input_out);
    args.d_recurrent = DataOrNull(d_recurrent_out);
    args.gates = gates.flat<float>().data();
    args.dh_seq = DataOrNull(dh_seq);
    args.dc_seq = DataOrNull(dc_seq);
    args.dh_last = DataOrNull(dh_last);
    args.dc_last = DataOrNull(dc_last);
    args.dz = dz_out->flat<float>().data();
    args.dh0 = dh0_out->flat<float>().data();
    args.dc0 = dc0_out->flat<float>().data();
    // Each chunk sums its own rows' bias gradient (and layer norm's); then
    // the chunks' sums add up.
    const int64_t chunks = NumChunks(ctx, batch);
    const int64_t sums = width + layer_norm.NumElements();
    std::vector<float> db_chunks(chunks * sums, 0.f);
    ForEachChunk(ctx, batch, [&](int64_t chunk, int64_t begin, int64_t end) {
      keras_lstm::BackwardRows(args, begin, end, db_chunks.data() + chunk * sums);
    });
    for (int64_t k = 0; k < chunks; ++k) {
      for (int64_t j = 0; j < width; ++j) db(j) += db_chunks[k * sums + j];
      for (int64_t j = width; j < sums; ++j) d_layer_norm(j - width) += db_chunks[k * sums + j];
    }
  }

 private:
  keras_lstm::Options options_;
};

// The kept positions of a (T, B) mask (lstm_core.h's KeptPositions) and the
// size of x they index, with the checks the two kept-step ops share.
struct KeptInputs {
  int64_t steps = 0, batch = 0, features = 0, n = 0;
  keras_lstm::InputLayout x_layout;
  std::vector<int64_t> kept;

  // False (with the context's status set) where a shape is wrong.
  bool Read(OpKernelContext* ctx, const keras_lstm::InputLayout& layout, const Tensor& x,
            const Tensor& kernel, const Tensor& mask, const Tensor& d_input,
            const Tensor& x_rows) {
    ReadInputSizes(ctx, x, layout, &steps, &batch, &features);
    if (!ctx->status().ok()) return false;
    x_layout = layout;
    ReadXRows(ctx, x_rows, batch, &x_layout.rows);
    if (!ctx->status().ok()) return false;
    if (kernel.dims() != 2 || kernel.dim_size(0) != features) {
      ctx->SetStatus(InvalidArgument("kernel must be (D, GH) = (", features, ", GH), got ",
                                     kernel.shape().DebugString()));
      return false;
    }
    if (mask.shape() != TensorShape({steps, batch}) ||
        d_input.shape() != TensorShape({steps, batch, kernel.dim_size(1)})) {
      ctx->SetStatus(InvalidArgument("mask must be (T, batch) and d_input (T, batch, GH), got ",
                                     mask.shape().DebugString(), " and ",
                                     d_input.shape().DebugString()));
      return false;
    }
    kept.resize(steps * batch);
    n = steps * batch ? keras_lstm::KeptPositions(mask.flat<float>().data(), steps * batch,
                                                  kept.data())
                      : 0;
    return true;
  }
};

// The weights' gradients from the steps the mask keeps (lstm_core.h's
// KeptGrads), the kept steps split evenly across the worker threads. With
// `x_rows`, x_batch_major and x_reversed, x is read as the forward op reads it.
class LstmKeptGradsOp : public OpKernel {
 public:
  explicit LstmKeptGradsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadLayout(ctx, &layout_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& h0 = ctx->input(2);
    const Tensor& h_seq = ctx->input(3);
    const Tensor& mask = ctx->input(4);
    const Tensor& recurrent_mask = ctx->input(5);
    const Tensor& d_input = ctx->input(6);
    const Tensor& d_recurrent = ctx->input(7);
    KeptInputs in;
    if (!in.Read(ctx, layout_, x, kernel, mask, d_input, ctx->input(8))) return;
    OP_REQUIRES(ctx, h0.dims() == 2 && h0.dim_size(0) == in.batch,
                InvalidArgument("h0 must be (batch, R), got ", h0.shape().DebugString()));
    const int64_t hidden = h0.dim_size(1), width = kernel.dim_size(1);
    OP_REQUIRES(
        ctx,
        h_seq.shape() == TensorShape({in.steps, in.batch, hidden}) &&
            (d_recurrent.NumElements() == 0 || d_recurrent.shape() == d_input.shape()) &&
            (recurrent_mask.NumElements() == 0 || recurrent_mask.shape() == h0.shape()),
        InvalidArgument("inconsistent shapes in the LSTM's kept-step gradients"));
    Tensor *dkernel_out, *drecurrent_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, kernel.shape(), &dkernel_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({hidden, width}), &drecurrent_out));

    keras_lstm::KeptGrads args;
    args.steps = in.steps;
    args.batch = in.batch;
    args.input_size = in.features;
    args.hidden = hidden;
    args.width = width;
    args.x = DataOrNull(x);
    args.x_layout = in.x_layout;
    args.kernel = DataOrNull(kernel);
    args.h0 = DataOrNull(h0);
    args.h_seq = DataOrNull(h_seq);
    args.recurrent_mask = DataOrNull(recurrent_mask);
    args.d_input = DataOrNull(d_input);
    args.d_recurrent = DataOrNull(d_recurrent);
    const int64_t size = (in.features + hidden) * width;
    const int64_t chunks = NumChunks(ctx, in.n, kMinKeptPerChunk);
    std::vector<float> sums(chunks * size, 0.f);
    ForEachChunk(
        ctx, in.n,
        [&](int64_t chunk, int64_t begin, int64_t end) {
          keras_lstm::KeptStepGrads(args, in.kept.data(), in.n, begin, end,
                                    sums.data() + chunk * size);
        },
        kMinKeptPerChunk);
    keras_lstm::AddUpKeptSums(args, sums.data(), chunks, DataOrNull(dkernel_out),
                              DataOrNull(drecurrent_out));
  }

 private:
  keras_lstm::InputLayout layout_;  // without the rows, an input
};

// dx from the steps the mask keeps: d_input W^T there, zeros elsewhere, in
// x's layout. An op of its own, so that a graph that needs no dx (a layer
// reading the model's inputs) never makes it.
class LstmKeptInputGradOp : public OpKernel {
 public:
  explicit LstmKeptInputGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadLayout(ctx, &layout_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& mask = ctx->input(2);
    const Tensor& d_input = ctx->input(3);
    KeptInputs in;
    if (!in.Read(ctx, layout_, x, kernel, mask, d_input, ctx->input(4))) return;
    Tensor* dx_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx_out));

    keras_lstm::KeptGrads args;
    args.steps = in.steps;
    args.batch = in.batch;
    args.input_size = in.features;
    args.width = kernel.dim_size(1);
    args.x_layout = in.x_layout;
    args.kernel = DataOrNull(kernel);
    args.d_input = DataOrNull(d_input);
    args.dx = DataOrNull(dx_out);
    ForEachChunk(
        ctx, in.n,
        [&](int64_t, int64_t begin, int64_t end) {
          keras_lstm::KeptStepGrads(args, in.kept.data(), in.n, begin, end, nullptr);
        },
        kMinKeptPerChunk);
  }

 private:
  keras_lstm::InputLayout layout_;  // without the rows, an input
};

// The order a masked batch's rows run in, its inverse, and the mask in that
// order, for the blocks ForEachChunk splits the batch into here
// (lstm_core.h's OrderRows).
class LstmRowOrderOp : public OpKernel {
 public:
  explicit LstmRowOrderOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& mask = ctx->input(0);
    OP_REQUIRES(ctx, mask.dims() == 2,
                InvalidArgument("mask must be (T, batch), got ", mask.shape().DebugString()));
    const int64_t steps = mask.dim_size(0), batch = mask.dim_size(1);
    Tensor *order, *inverse, *sorted_mask;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch}), &order));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({batch}), &inverse));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, mask.shape(), &sorted_mask));
    keras_lstm::OrderRows(mask.flat<bool>().data(), steps, batch, NumChunks(ctx, batch),
                          order->flat<int32_t>().data(), inverse->flat<int32_t>().data(),
                          sorted_mask->flat<float>().data());
  }
};

// Whether an optional input is known, while tracing, to be the empty (0,)
// tensor that means "absent" (a given one may have sizes still unknown).
bool IsAbsent(tensorflow::shape_inference::InferenceContext* c,
              tensorflow::shape_inference::ShapeHandle input) {
  return c->RankKnown(input) && c->Rank(input) == 1 && c->ValueKnown(c->Dim(input, 0)) &&
         c->Value(c->Dim(input, 0)) == 0;
}

}  // namespace

REGISTER_OP("KerasLstmSequence")
    .Input("x: float")
    .Input("kernel: float")
    .Input("bias: float")
    .Input("recurrent_kernel: float")
    .Input("h0: float")
    .Input("c0: float")
    .Input("mask: float")
    .Input("recurrent_mask: float")
    .Input("peephole: float")
    .Input("projection: float")
    .Input("zoneout_h: float")
    .Input("zoneout_c: float")
    .Input("layer_norm: float")
    .Input("x_rows: int32")
    .Attr("x_batch_major: bool = false")
    .Attr("x_reversed: bool = false")
    .Attr("keep_for_gradient: bool = true")
    .Attr("return_sequences: bool = true")
    .Attr("cifg: bool = false")
    .Attr("cell_clip: float = 0")
    .Attr("zoneout_h_rate: float = 0")
    .Attr("zoneout_c_rate: float = 0")
    .Attr("bf16_products: bool = false")
    .Output("h: float")
    .Output("c: float")
    .Output("gates: float")
    .Output("h_last: float")
    .Output("c_last: float")
    .Output("c_computed: float")
    .Output("norms: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      bool keep, sequences, cifg;
      TF_RETURN_IF_ERROR(c->GetAttr("keep_for_gradient", &keep));
      TF_RETURN_IF_ERROR(c->GetAttr("return_sequences", &sequences));
      TF_RETURN_IF_ERROR(c->GetAttr("cifg", &cifg));
      bool batch_major;
      TF_RETURN_IF_ERROR(c->GetAttr("x_batch_major", &batch_major));
      // x's (T, batch, D), whichever way round it comes.
      auto x = c->input(0);
      if (batch_major && c->RankKnown(x)) {
        TF_RETURN_IF_ERROR(c->WithRank(x, 3, &x));
        x = c->MakeShape({c->Dim(x, 1), c->Dim(x, 0), c->Dim(x, 2)});
      }
      auto units = c->Dim(c->input(5), 1), hidden = c->Dim(c->input(4), 1);
      tensorflow::shape_inference::ShapeHandle states, hs, gates;
      TF_RETURN_IF_ERROR(c->ReplaceDim(x, 2, units, &states));
      TF_RETURN_IF_ERROR(c->ReplaceDim(x, 2, hidden, &hs));
      tensorflow::shape_inference::DimensionHandle width;
      TF_RETURN_IF_ERROR(c->Multiply(units, cifg ? 3 : 4, &width));
      TF_RETURN_IF_ERROR(c->ReplaceDim(x, 2, width, &gates));
      auto none = c->MakeShape({0});
      c->set_output(0, keep || sequences ? hs : none);
      c->set_output(1, keep ? states : none);
      c->set_output(2, keep ? gates : none);
      c->set_output(3, c->input(4));
      c->set_output(4, c->input(5));
      // (T, batch, H) when kept with zoneout of C (a rate, or a mask: anything but
      // the empty (0,) tensor), else empty.
      float zoneout_c_rate;
      TF_RETURN_IF_ERROR(c->GetAttr("zoneout_c_rate", &zoneout_c_rate));
      const bool zoneout_c = zoneout_c_rate > 0.f || !IsAbsent(c, c->input(11));
      c->set_output(5, keep && zoneout_c ? states : none);
      // (T, batch, 2 G H + H + 3) when kept with layer norm, else empty.
      if (!keep || IsAbsent(c, c->input(12))) {
        c->set_output(6, none);
      } else {
        tensorflow::shape_inference::DimensionHandle norms_width, plus_units;
        tensorflow::shape_inference::DimensionHandle twice;
        TF_RETURN_IF_ERROR(c->Multiply(width, 2, &twice));
        TF_RETURN_IF_ERROR(c->Add(twice, units, &plus_units));
        TF_RETURN_IF_ERROR(c->Add(plus_units, 3, &norms_width));
        tensorflow::shape_inference::ShapeHandle norms;
        TF_RETURN_IF_ERROR(c->ReplaceDim(x, 2, norms_width, &norms));
        c->set_output(6, norms);
      }
      return absl::OkStatus();
    });

REGISTER_OP("KerasLstmSequenceGrad")
    .Input("recurrent_kernel: float")
    .Input("h0: float")
    .Input("c0: float")
    .Input("mask: float")
    .Input("c: float")
    .Input("gates: float")
    .Input("dh: float")
    .Input("dc: float")
    .Input("dh_last: float")
    .Input("dc_last: float")
    .Input("recurrent_mask: float")
    .Input("peephole: float")
    .Input("projection: float")
    .Input("zoneout_h: float")
    .Input("zoneout_c: float")
    .Input("c_computed: float")
    .Input("layer_norm: float")
    .Input("norms: float")
    .Attr("cifg: bool = false")
    .Attr("cell_clip: float = 0")
    .Attr("zoneout_h_rate: float = 0")
    .Attr("zoneout_c_rate: float = 0")
    .Attr("bf16_products: bool = false")
    .Output("dz: float")
    .Output("dh0: float")
    .Output("dc0: float")
    .Output("db: float")
    .Output("dh_projected: float")
    .Output("d_input: float")
    .Output("d_recurrent: float")
    .Output("d_layer_norm: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(5));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(2));
      bool cifg;
      TF_RETURN_IF_ERROR(c->GetAttr("cifg", &cifg));
      tensorflow::shape_inference::DimensionHandle width;
      TF_RETURN_IF_ERROR(c->Multiply(c->Dim(c->input(2), 1), cifg ? 3 : 4, &width));
      c->set_output(3, c->Vector(width));
      // (T, batch, P) with a projection, else empty: known only from the input's size.
      c->set_output(4, c->UnknownShape());
      // (T, batch, G H) twice with layer norm (anything but the empty (0,)
      // tensor), else empty; and layer_norm's own shape.
      const bool ln_absent = IsAbsent(c, c->input(16));
      c->set_output(5, ln_absent ? c->MakeShape({0}) : c->input(5));
      c->set_output(6, ln_absent ? c->MakeShape({0}) : c->input(5));
      c->set_output(7, c->input(16));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("KerasLstmSequence").Device(tensorflow::DEVICE_CPU), LstmSequenceOp);
REGISTER_KERNEL_BUILDER(Name("KerasLstmSequenceGrad").Device(tensorflow::DEVICE_CPU),
                        LstmSequenceGradOp);

REGISTER_OP("KerasLstmKeptGrads")
    .Input("x: float")
    .Input("kernel: float")
    .Input("h0: float")
    .Input("h: float")
    .Input("mask: float")
    .Input("recurrent_mask: float")
    .Input("d_input: float")
    .Input("d_recurrent: float")
    .Input("x_rows: int32")
    .Attr("x_batch_major: bool = false")
    .Attr("x_reversed: bool = false")
    .Output("dkernel: float")
    .Output("drecurrent: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->Matrix(c->Dim(c->input(2), 1), c->Dim(c->input(1), 1)));
      return absl::OkStatus();
    });

REGISTER_OP("KerasLstmKeptInputGrad")
    .Input("x: float")
    .Input("kernel: float")
    .Input("mask: float")
    .Input("d_input: float")
    .Input("x_rows: int32")
    .Attr("x_batch_major: bool = false")
    .Attr("x_reversed: bool = false")
    .Output("dx: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

REGISTER_OP("KerasLstmRowOrder")
    .Input("mask: bool")
    .Output("order: int32")
    .Output("inverse: int32")
    .Output("sorted_mask: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle mask;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &mask));
      c->set_output(0, c->Vector(c->Dim(mask, 1)));
      c->set_output(1, c->Vector(c->Dim(mask, 1)));
      c->set_output(2, mask);
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("KerasLstmRowOrder").Device(tensorflow::DEVICE_CPU), LstmRowOrderOp);
REGISTER_KERNEL_BUILDER(Name("KerasLstmKeptGrads").Device(tensorflow::DEVICE_CPU),
                        LstmKeptGradsOp);
REGISTER_KERNEL_BUILDER(Name("KerasLstmKeptInputGrad").Device(tensorflow::DEVICE_CPU),
                        LstmKeptInputGradOp);
