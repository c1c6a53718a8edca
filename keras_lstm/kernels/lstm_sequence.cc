// Whole-sequence LSTM recurrence for the TensorFlow CPU runtime.
//
// The input projection xz = x W + b is computed outside (one large matmul
// over every step), so these kernels only run the part that is truly
// sequential: one (rows, H) x (H, 4H) matmul per step plus one fused
// pointwise pass. Batch rows never interact, so the batch is cut into
// contiguous chunks, one per worker thread, and each chunk runs its whole
// time loop without any synchronisation between steps.
//
// Gate order is Keras's: input, forget, candidate, output.
// A mask value of 0 at (t, b) keeps row b's previous h and c (Keras's rule).

#include <algorithm>
#include <functional>
#include <vector>

#include "Eigen/Core"
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

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<Matrix>;
using ConstMatrixMap = Eigen::Map<const Matrix>;
using ArrayMap = Eigen::Map<Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
using ConstArrayMap =
    Eigen::Map<const Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
using Strided = Eigen::Map<Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
                           0, Eigen::OuterStride<>>;
using ConstStrided =
    Eigen::Map<const Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
               Eigen::OuterStride<>>;

// Fewer rows than this per thread costs more in scheduling than it saves.
constexpr int kMinRowsPerChunk = 4;
// Below this many rows a matrix product repacks the whole weight matrix for
// little work; row-by-row vector-matrix products skip the packing.
constexpr int kMaxRowsForGemv = 4;

// out (+)= a * b for row-major maps, by GEMV when `a` has few rows.
template <typename A, typename B>
void MultiplyInto(MatrixMap out, const A& a, const B& b, bool accumulate) {
  if (a.rows() <= kMaxRowsForGemv) {
    for (Eigen::Index r = 0; r < a.rows(); ++r) {
      if (accumulate) {
        out.row(r).noalias() += a.row(r) * b;
      } else {
        out.row(r).noalias() = a.row(r) * b;
      }
    }
  } else if (accumulate) {
    out.noalias() += a * b;
  } else {
    out.noalias() = a * b;
  }
}

// Runs work(row_begin, row_end) over [0, rows) on the op's CPU worker pool.
void ForEachChunk(OpKernelContext* ctx, int rows, const std::function<void(int, int)>& work) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  int threads = workers->num_threads;
  int chunks = std::max(1, std::min(threads, rows / kMinRowsPerChunk));
  if (chunks == 1) {
    work(0, rows);
    return;
  }
  int per_chunk = (rows + chunks - 1) / chunks;
  tensorflow::BlockingCounter pending(chunks - 1);
  for (int k = 1; k < chunks; ++k) {
    int begin = k * per_chunk, end = std::min(rows, begin + per_chunk);
    workers->workers->Schedule([&, begin, end] {
      if (begin < end) work(begin, end);
      pending.DecrementCount();
    });
  }
  work(0, std::min(rows, per_chunk));
  pending.Wait();
}

void CheckInputs(OpKernelContext* ctx, const Tensor& u, const Tensor& h0, const Tensor& c0,
                 const Tensor& mask, int64_t steps, int64_t batch) {
  int64_t units = u.dim_size(0);
  OP_REQUIRES(ctx, u.dims() == 2 && u.dim_size(1) == 4 * units,
              InvalidArgument("recurrent_kernel must be (H, 4H), got ", u.shape().DebugString()));
  OP_REQUIRES(ctx, h0.shape() == TensorShape({batch, units}),
              InvalidArgument("h0 must be (batch, H), got ", h0.shape().DebugString()));
  OP_REQUIRES(ctx, c0.shape() == TensorShape({batch, units}),
              InvalidArgument("c0 must be (batch, H), got ", c0.shape().DebugString()));
  OP_REQUIRES(ctx,
              mask.NumElements() == 0 || mask.shape() == TensorShape({steps, batch}),
              InvalidArgument("mask must be empty or (T, batch), got ",
                              mask.shape().DebugString()));
}

class LstmSequenceOp : public OpKernel {
 public:
  explicit LstmSequenceOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& xz = ctx->input(0);
    const Tensor& u = ctx->input(1);
    const Tensor& h0 = ctx->input(2);
    const Tensor& c0 = ctx->input(3);
    const Tensor& mask = ctx->input(4);
    OP_REQUIRES(ctx, xz.dims() == 3,
                InvalidArgument("xz must be (T, batch, 4H), got ", xz.shape().DebugString()));
    const int64_t steps = xz.dim_size(0), batch = xz.dim_size(1);
    CheckInputs(ctx, u, h0, c0, mask, steps, batch);
    if (!ctx->status().ok()) return;
    const int64_t units = u.dim_size(0), gates4 = 4 * units;
    OP_REQUIRES(ctx, xz.dim_size(2) == gates4,
                InvalidArgument("xz must have 4H = ", gates4, " features, got ",
                                xz.dim_size(2)));

    Tensor *h_out, *c_out, *gates_out, *h_last_out, *c_last_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {steps, batch, units}, &h_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, {steps, batch, units}, &c_out));
    // The gates take over xz's buffer when nothing else holds it (each step
    // reads its slice of xz before writing the same slice of gates).
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 2, xz.shape(), &gates_out));
    // The final state again, as its own (batch, H) tensors: a loss that reads
    // only these sends back a (batch, H) gradient, not a (T, batch, H) one.
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, h0.shape(), &h_last_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, c0.shape(), &c_last_out));
    if (batch == 0) return;
    if (steps == 0) {
      h_last_out->flat<float>() = h0.flat<float>();
      c_last_out->flat<float>() = c0.flat<float>();
      return;
    }

    const float* xz_p = xz.flat<float>().data();
    const float* mask_p = mask.NumElements() ? mask.flat<float>().data() : nullptr;
    float* h_p = h_out->flat<float>().data();
    float* c_p = c_out->flat<float>().data();
    float* g_p = gates_out->flat<float>().data();
    ConstMatrixMap U(u.flat<float>().data(), units, gates4);
    const float* h0_p = h0.flat<float>().data();
    const float* c0_p = c0.flat<float>().data();
    const int64_t H = units;

    ForEachChunk(ctx, batch, [&](int b0, int b1) {
      const int rows = b1 - b0;
      for (int64_t t = 0; t < steps; ++t) {
        const float* h_prev = t ? h_p + ((t - 1) * batch + b0) * H : h0_p + b0 * H;
        const float* c_prev = t ? c_p + ((t - 1) * batch + b0) * H : c0_p + b0 * H;
        float* z = g_p + (t * batch + b0) * gates4;
        float* h = h_p + (t * batch + b0) * H;
        float* c = c_p + (t * batch + b0) * H;
        MatrixMap Z(z, rows, gates4);
        if (z != xz_p + (t * batch + b0) * gates4) {
          Z = ConstMatrixMap(xz_p + (t * batch + b0) * gates4, rows, gates4);
        }
        MultiplyInto(Z, ConstMatrixMap(h_prev, rows, H), U, /*accumulate=*/true);

        // Pre-activations become activations in place: they are what the
        // backward pass needs.
        Strided i(z, rows, H, Eigen::OuterStride<>(gates4));
        Strided f(z + H, rows, H, Eigen::OuterStride<>(gates4));
        Strided g(z + 2 * H, rows, H, Eigen::OuterStride<>(gates4));
        Strided o(z + 3 * H, rows, H, Eigen::OuterStride<>(gates4));
        i = i.logistic();
        f = f.logistic();
        g = g.tanh();
        o = o.logistic();
        ConstArrayMap cp(c_prev, rows, H);
        ArrayMap C(c, rows, H), Hn(h, rows, H);
        C = f * cp + i * g;
        Hn = o * C.tanh();
        if (mask_p) {
          const float* m = mask_p + t * batch + b0;
          for (int r = 0; r < rows; ++r) {
            if (m[r] == 0.f) {
              std::copy(h_prev + r * H, h_prev + (r + 1) * H, h + r * H);
              std::copy(c_prev + r * H, c_prev + (r + 1) * H, c + r * H);
            }
          }
        }
      }
      const int64_t last = ((steps - 1) * batch + b0) * H;
      std::copy(h_p + last, h_p + last + rows * H, h_last_out->flat<float>().data() + b0 * H);
      std::copy(c_p + last, c_p + last + rows * H, c_last_out->flat<float>().data() + b0 * H);
    });
  }
};

class LstmSequenceGradOp : public OpKernel {
 public:
  explicit LstmSequenceGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

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
    OP_REQUIRES(ctx, gates.dims() == 3,
                InvalidArgument("gates must be (T, batch, 4H), got ", gates.shape().DebugString()));
    const int64_t steps = gates.dim_size(0), batch = gates.dim_size(1);
    CheckInputs(ctx, u, h0, c0, mask, steps, batch);
    if (!ctx->status().ok()) return;
    const int64_t H = u.dim_size(0), gates4 = 4 * H;
    const TensorShape state_seq({steps, batch, H});
    OP_REQUIRES(ctx, gates.dim_size(2) == gates4 && c_seq.shape() == state_seq &&
                         (dh_seq.NumElements() == 0 || dh_seq.shape() == state_seq) &&
                         (dc_seq.NumElements() == 0 || dc_seq.shape() == state_seq) &&
                         (dh_last.NumElements() == 0 || dh_last.shape() == h0.shape()) &&
                         (dc_last.NumElements() == 0 || dc_last.shape() == c0.shape()),
                InvalidArgument("inconsistent shapes in the LSTM sequence gradient"));

    Tensor *dz_out, *dh0_out, *dc0_out;
    // dz takes over the gates' buffer when nothing else holds it: each step
    // reads its slice of gates before its slice of dz is written.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({5}, 0, gates.shape(), &dz_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &dh0_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, c0.shape(), &dc0_out));
    if (batch == 0) return;

    const float* mask_p = mask.NumElements() ? mask.flat<float>().data() : nullptr;
    const float* c_p = c_seq.flat<float>().data();
    const float* g_p = gates.flat<float>().data();
    // An empty gradient means that none reaches those outputs from outside.
    const float* dh_p = dh_seq.NumElements() ? dh_seq.flat<float>().data() : nullptr;
    const float* dc_p = dc_seq.NumElements() ? dc_seq.flat<float>().data() : nullptr;
    const float* dh_last_p = dh_last.NumElements() ? dh_last.flat<float>().data() : nullptr;
    const float* dc_last_p = dc_last.NumElements() ? dc_last.flat<float>().data() : nullptr;
    const float* c0_p = c0.flat<float>().data();
    float* dz_p = dz_out->flat<float>().data();
    float* dh0_p = dh0_out->flat<float>().data();
    float* dc0_p = dc0_out->flat<float>().data();
    ConstMatrixMap U(u.flat<float>().data(), H, gates4);

    ForEachChunk(ctx, batch, [&](int b0, int b1) {
      const int rows = b1 - b0;
      // dh and dc carried from step t + 1 back to step t.
      ArrayMap dh(dh0_p + b0 * H, rows, H), dc(dc0_p + b0 * H, rows, H);
      if (dh_last_p) {
        dh = ConstArrayMap(dh_last_p + b0 * H, rows, H);
      } else {
        dh.setZero();
      }
      if (dc_last_p) {
        dc = ConstArrayMap(dc_last_p + b0 * H, rows, H);
      } else {
        dc.setZero();
      }
      Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> dct(rows, H),
          keep(rows, 1), dz_step(rows, gates4);
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t s = (t * batch + b0) * H, s4 = (t * batch + b0) * gates4;
        if (dh_p) dh += ConstArrayMap(dh_p + s, rows, H);
        if (dc_p) dc += ConstArrayMap(dc_p + s, rows, H);
        const float* g = g_p + s4;
        ConstStrided i(g, rows, H, Eigen::OuterStride<>(gates4));
        ConstStrided f(g + H, rows, H, Eigen::OuterStride<>(gates4));
        ConstStrided cand(g + 2 * H, rows, H, Eigen::OuterStride<>(gates4));
        ConstStrided o(g + 3 * H, rows, H, Eigen::OuterStride<>(gates4));
        ConstArrayMap c(c_p + s, rows, H);
        ConstArrayMap c_prev(t ? c_p + s - batch * H : c0_p + b0 * H, rows, H);
        float* dz = dz_step.data();
        Strided di(dz, rows, H, Eigen::OuterStride<>(gates4));
        Strided df(dz + H, rows, H, Eigen::OuterStride<>(gates4));
        Strided dg(dz + 2 * H, rows, H, Eigen::OuterStride<>(gates4));
        Strided dout(dz + 3 * H, rows, H, Eigen::OuterStride<>(gates4));

        if (mask_p) {
          // Masked rows pass dh and dc straight through and get no gradient.
          const float* m = mask_p + t * batch + b0;
          for (int r = 0; r < rows; ++r) keep(r, 0) = m[r] == 0.f ? 0.f : 1.f;
        }
        auto tanh_c = c.tanh();
        if (mask_p) {
          auto dh_step = dh * keep.replicate(1, H);
          dct = dc * keep.replicate(1, H) + dh_step * o * (1.f - tanh_c.square());
          dout = dh_step * tanh_c * o * (1.f - o);
        } else {
          dct = dc + dh * o * (1.f - tanh_c.square());
          dout = dh * tanh_c * o * (1.f - o);
        }
        di = dct * cand * i * (1.f - i);
        df = dct * c_prev * f * (1.f - f);
        dg = dct * i * (1.f - cand.square());
        if (mask_p) {
          auto pass = (1.f - keep).replicate(1, H);
          dc = dct * f + pass * dc;
          dh = pass * dh;
          MultiplyInto(MatrixMap(dh.data(), rows, H), ConstMatrixMap(dz, rows, gates4),
                       U.transpose(), /*accumulate=*/true);
        } else {
          dc = dct * f;
          MultiplyInto(MatrixMap(dh.data(), rows, H), ConstMatrixMap(dz, rows, gates4),
                       U.transpose(), /*accumulate=*/false);
        }
        std::copy(dz, dz + rows * gates4, dz_p + s4);
      }
    });
  }
};

}  // namespace

REGISTER_OP("KerasLstmSequence")
    .Input("xz: float")
    .Input("recurrent_kernel: float")
    .Input("h0: float")
    .Input("c0: float")
    .Input("mask: float")
    .Output("h: float")
    .Output("c: float")
    .Output("gates: float")
    .Output("h_last: float")
    .Output("c_last: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      auto xz = c->input(0);
      auto units = c->Dim(c->input(1), 0);
      tensorflow::shape_inference::ShapeHandle state;
      TF_RETURN_IF_ERROR(c->ReplaceDim(xz, 2, units, &state));
      c->set_output(0, state);
      c->set_output(1, state);
      c->set_output(2, xz);
      c->set_output(3, c->input(2));
      c->set_output(4, c->input(3));
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
    .Output("dz: float")
    .Output("dh0: float")
    .Output("dc0: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(5));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(2));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("KerasLstmSequence").Device(tensorflow::DEVICE_CPU), LstmSequenceOp);
REGISTER_KERNEL_BUILDER(Name("KerasLstmSequenceGrad").Device(tensorflow::DEVICE_CPU),
                        LstmSequenceGradOp);
