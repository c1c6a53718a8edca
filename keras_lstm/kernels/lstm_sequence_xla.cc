// XLA lowering of the native LSTM ops, for `jit_compile=True` on CPU.
//
// XLA cannot run a TensorFlow op kernel, so under `jit_compile=True` the
// ops KerasLstmSequence, KerasLstmSequenceGrad, KerasLstmKeptGrads,
// KerasLstmKeptInputGrad and KerasLstmRowOrder get XLA kernels here that
// emit one custom call each. The custom-call targets are host functions of
// this library, registered with XLA's custom-call registry under the names
// below; they run the same maths as the TensorFlow kernels: the main
// library's own ForwardRows, BackwardRows, KeptStepGrads and the rest of
// lstm_core.h, whose addresses keras_lstm_xla_init hands this library once
// it is loaded, so the maths is compiled once, for this CPU and optimised
// (the glue is not), and both paths give the same bits.
//
// The static sizes and which optional inputs are present travel in the
// custom call's opaque string, e.g. "T=100 B=64 D=32 H=128 bias=1 mask=0
// sequences=1 keep=1 rmask=0 cifg=0 peep=0 P=0 zh=0 zc=0 bf16=0 ln=0 xrows=0 xbm=0 xrev=0
// clip=0 zhr=0 zcr=0".
// An absent input (no bias, no mask, a gradient that is
// zero) is a 0-element operand, as for the TensorFlow op.
//
// XLA runs a custom call on one of its threads and lends it no others, so the
// batch rows are split across a small pool of our own, started on first use:
// one thread per CPU the process may run on, or TensorFlow's intra-op thread
// setting if that is smaller (passed in by keras_lstm_xla_init).

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <pthread.h>
#include <sched.h>

#include "lstm_core.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/op_kernel.h"
// TensorFlow 2.20 moved the builder here from xla/client/ (2.16 to 2.18).
#if __has_include("xla/hlo/builder/xla_builder.h")
#include "xla/hlo/builder/xla_builder.h"
#else
#include "xla/client/xla_builder.h"
#endif
#include "xla/service/custom_call_status.h"
#include "xla/service/custom_call_target_registry.h"
#include "xla/shape_util.h"

namespace {

constexpr char kForwardTarget[] = "keras_lstm_sequence_forward";
constexpr char kBackwardTarget[] = "keras_lstm_sequence_backward";
constexpr char kKeptGradsTarget[] = "keras_lstm_kept_grads";
constexpr char kKeptInputGradTarget[] = "keras_lstm_kept_input_grad";
constexpr char kRowOrderTarget[] = "keras_lstm_row_order";

// Fewer rows than this per thread costs more in scheduling than it saves.
constexpr int64_t kMinRowsPerChunk = 4;
// Likewise for the kept steps of KerasLstmKeptGrads.
constexpr int64_t kMinKeptPerChunk = 256;

// ---------------------------------------------------------------------------
// Threads

int UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// A fixed set of worker threads fed from one queue. It is never destroyed:
// its threads sleep until the process ends.
class WorkerPool {
 public:
  explicit WorkerPool(int threads) {
    for (int k = 0; k < threads; ++k) std::thread([this] { Serve(); }).detach();
  }

  void Schedule(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
    }
    ready_.notify_one();
  }

 private:
  void Serve() {
    pthread_setname_np(pthread_self(), "keras_lstm_xla");  // as `top -H` and tests see it
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [this] { return !tasks_.empty(); });
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
};

// Set once, right after loading and before any custom call runs, by
// keras_lstm_xla_init below: the maths of the main library, and TensorFlow's
// intra-op thread setting, when one was made (0: none).
keras_lstm::ForwardRowsFn forward_rows = nullptr;
keras_lstm::BackwardRowsFn backward_rows = nullptr;
keras_lstm::KeptStepGradsFn kept_step_grads = nullptr;
keras_lstm::OrderRowsFn order_rows = nullptr;
keras_lstm::KeptPositionsFn kept_positions = nullptr;
keras_lstm::AddUpKeptSumsFn add_up_kept_sums = nullptr;
int intra_op_threads = 0;

int MaxThreads() {
  static const int threads =
      intra_op_threads > 0 ? std::min(intra_op_threads, UsableCpus()) : UsableCpus();
  return threads;
}

WorkerPool& Workers() {
  static WorkerPool* pool = new WorkerPool(MaxThreads() - 1);
  return *pool;
}

// How many chunks ForEachChunk cuts `rows` into.
int64_t NumChunks(int64_t rows, int64_t min_per_chunk = kMinRowsPerChunk) {
  return std::max<int64_t>(1, std::min<int64_t>(MaxThreads(), rows / min_per_chunk));
}

// Runs work(chunk, row_begin, row_end) over [0, rows), in
// NumChunks(rows, min_per_chunk) chunks; the calling thread takes the first.
void ForEachChunk(int64_t rows, const std::function<void(int64_t, int64_t, int64_t)>& work,
                  int64_t min_per_chunk = kMinRowsPerChunk) {
  const int64_t chunks = NumChunks(rows, min_per_chunk);
  if (chunks == 1) {
    work(0, 0, rows);
    return;
  }
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  std::mutex mu;
  std::condition_variable done;
  int64_t pending = chunks - 1;
  for (int64_t k = 1; k < chunks; ++k) {
    const int64_t begin = std::min(rows, k * per_chunk), end = std::min(rows, begin + per_chunk);
    Workers().Schedule([&, k, begin, end] {
      work(k, begin, end);
      std::lock_guard<std::mutex> lock(mu);
      if (--pending == 0) done.notify_one();
    });
  }
  work(0, 0, std::min(rows, per_chunk));
  std::unique_lock<std::mutex> lock(mu);
  done.wait(lock, [&] { return pending == 0; });
}

// ---------------------------------------------------------------------------
// The opaque string: static sizes and flags, as "key=value" words.

struct Sizes {
  long long steps = 0, batch = 0, features = 0, units = 0;
  int bias = 0, mask = 0, sequences = 0, keep = 0, recurrent_mask = 0;
  int x_rows = 0;  // whether the forward op's x_rows is given
  int x_batch_major = 0, x_reversed = 0;  // lstm_core.h's InputLayout
  int dh_seq = 0, dc_seq = 0, dh_last = 0, dc_last = 0;
  int cifg = 0, peephole = 0;
  int bf16_products = 0;  // bfloat16 operands for the steps' products
  int layer_norm = 0;     // whether layer norm's gains and shift are given
  long long proj_units = 0;  // P, with a projection
  int zoneout_h_mask = 0, zoneout_c_mask = 0;  // whether the zoneout masks are given
  // Written with 9 significant digits: every float32 reads back exactly.
  float cell_clip = 0.f, zoneout_h_rate = 0.f, zoneout_c_rate = 0.f;

  int64_t width() const { return (cifg ? 3 : 4) * units; }
  int64_t hidden() const { return proj_units ? proj_units : units; }
  keras_lstm::Options options(const float* peephole_weights, const float* projection_weights,
                              const float* zoneout_h, const float* zoneout_c,
                              const float* layer_norm_weights) const {
    keras_lstm::Options o;
    o.cifg = cifg;
    o.peephole = peephole ? peephole_weights : nullptr;
    o.cell_clip = cell_clip;
    o.projection = proj_units ? projection_weights : nullptr;
    o.proj_units = proj_units;
    o.zoneout_h.mask = zoneout_h_mask ? zoneout_h : nullptr;
    o.zoneout_h.rate = zoneout_h_rate;
    o.zoneout_c.mask = zoneout_c_mask ? zoneout_c : nullptr;
    o.zoneout_c.rate = zoneout_c_rate;
    o.bf16_products = bf16_products;
    o.layer_norm = layer_norm ? layer_norm_weights : nullptr;
    return o;
  }
  bool zoneout_c() const { return zoneout_c_mask || zoneout_c_rate > 0.f; }
  // Whether what a skipped row keeps for the gradient must be zeros (lstm_core.h):
  // the weights' gradients come from the kept steps alone (KerasLstmKeptGrads)
  // but with bfloat16 products, and the peephole's and projection's, which
  // under XLA's static shapes read every step, where they are on.
  bool FillSkipped() const { return bf16_products || peephole || proj_units > 0; }
};

// One format each for writing and reading.
constexpr char kForwardFormat[] =
    "T=%lld B=%lld D=%lld H=%lld bias=%d mask=%d sequences=%d keep=%d rmask=%d cifg=%d peep=%d "
    "P=%lld zh=%d zc=%d bf16=%d ln=%d xrows=%d xbm=%d xrev=%d";
constexpr char kBackwardFormat[] =
    "T=%lld B=%lld H=%lld mask=%d dh=%d dc=%d dh_last=%d dc_last=%d rmask=%d cifg=%d peep=%d "
    "P=%lld zh=%d zc=%d bf16=%d ln=%d";
// The floats end both strings: printf writes doubles, scanf reads floats.
constexpr char kFloatsWrite[] = " clip=%.9g zhr=%.9g zcr=%.9g";
constexpr char kFloatsRead[] = " clip=%g zhr=%g zcr=%g";

void AppendFloats(const Sizes& s, std::string* text) {
  char floats[128];
  std::snprintf(floats, sizeof(floats), kFloatsWrite, static_cast<double>(s.cell_clip),
                static_cast<double>(s.zoneout_h_rate), static_cast<double>(s.zoneout_c_rate));
  *text += floats;
}

// Reads the " clip=... zhr=... zcr=..." that ends `text`; true when it is there.
bool ParseFloats(const std::string& text, Sizes* s) {
  const size_t at = text.find(" clip=");
  return at != std::string::npos &&
         std::sscanf(text.c_str() + at, kFloatsRead, &s->cell_clip, &s->zoneout_h_rate,
                     &s->zoneout_c_rate) == 3;
}

std::string ForwardOpaque(const Sizes& s) {
  char text[256];
  std::snprintf(text, sizeof(text), kForwardFormat, s.steps, s.batch, s.features, s.units, s.bias,
                s.mask, s.sequences, s.keep, s.recurrent_mask, s.cifg, s.peephole, s.proj_units,
                s.zoneout_h_mask, s.zoneout_c_mask, s.bf16_products, s.layer_norm, s.x_rows,
                s.x_batch_major, s.x_reversed);
  std::string opaque(text);
  AppendFloats(s, &opaque);
  return opaque;
}

bool ParseForwardOpaque(const char* opaque, size_t length, Sizes* s) {
  const std::string text(opaque, length);
  return std::sscanf(text.c_str(), kForwardFormat, &s->steps, &s->batch, &s->features, &s->units,
                     &s->bias, &s->mask, &s->sequences, &s->keep, &s->recurrent_mask, &s->cifg,
                     &s->peephole, &s->proj_units, &s->zoneout_h_mask, &s->zoneout_c_mask,
                     &s->bf16_products, &s->layer_norm, &s->x_rows, &s->x_batch_major,
                     &s->x_reversed) == 19 &&
         ParseFloats(text, s);
}

std::string BackwardOpaque(const Sizes& s) {
  char text[256];
  std::snprintf(text, sizeof(text), kBackwardFormat, s.steps, s.batch, s.units, s.mask, s.dh_seq,
                s.dc_seq, s.dh_last, s.dc_last, s.recurrent_mask, s.cifg, s.peephole, s.proj_units,
                s.zoneout_h_mask, s.zoneout_c_mask, s.bf16_products, s.layer_norm);
  std::string opaque(text);
  AppendFloats(s, &opaque);
  return opaque;
}

bool ParseBackwardOpaque(const char* opaque, size_t length, Sizes* s) {
  const std::string text(opaque, length);
  return std::sscanf(text.c_str(), kBackwardFormat, &s->steps, &s->batch, &s->units, &s->mask,
                     &s->dh_seq, &s->dc_seq, &s->dh_last, &s->dc_last, &s->recurrent_mask,
                     &s->cifg, &s->peephole, &s->proj_units, &s->zoneout_h_mask,
                     &s->zoneout_c_mask, &s->bf16_products, &s->layer_norm) == 16 &&
         ParseFloats(text, s);
}

// ---------------------------------------------------------------------------
// Custom-call targets (XLA's API_VERSION_STATUS_RETURNING_UNIFIED): `out` is
// an array of the result buffers (the result is a tuple), `in` the operands'.
// The shapes were checked when the call was built and the opaque string is
// ours, so nothing here can fail (XLA's status setter is not exported by the
// TensorFlow wheel anyway).

void ForwardTarget(void* out, const void** in, const char* opaque, size_t opaque_length,
                   XlaCustomCallStatus* /*status*/) {
  Sizes s;
  if (!ParseForwardOpaque(opaque, opaque_length, &s)) return;
  float** outputs = static_cast<float**>(out);
  const float* const* inputs = reinterpret_cast<const float* const*>(in);
  keras_lstm::Forward args;
  args.steps = s.steps;
  args.batch = s.batch;
  args.input_size = s.features;
  args.units = s.units;
  args.x = inputs[0];
  args.x_layout.rows = s.x_rows ? reinterpret_cast<const int32_t*>(in[13]) : nullptr;
  args.x_layout.batch_major = s.x_batch_major;
  args.x_layout.reversed = s.x_reversed;
  args.kernel = inputs[1];
  args.bias = s.bias ? inputs[2] : nullptr;
  args.recurrent_kernel = inputs[3];
  args.h0 = inputs[4];
  args.c0 = inputs[5];
  args.mask = s.mask ? inputs[6] : nullptr;
  args.recurrent_mask = s.recurrent_mask ? inputs[7] : nullptr;
  args.options = s.options(inputs[8], inputs[9], inputs[10], inputs[11], inputs[12]);
  args.fill_skipped = s.FillSkipped();
  args.carry_ended = s.sequences || s.FillSkipped();
  args.h_seq = s.keep || s.sequences ? outputs[0] : nullptr;
  args.c_seq = s.keep ? outputs[1] : nullptr;
  args.gates = s.keep ? outputs[2] : nullptr;
  args.h_last = outputs[3];
  args.c_last = outputs[4];
  args.c_computed = s.keep && s.zoneout_c() ? outputs[5] : nullptr;
  args.norms = s.keep && s.layer_norm ? outputs[6] : nullptr;
  // With no step, ForwardRows copies h0 and c0 to the final state.
  std::vector<float> kernels((s.features + s.hidden()) * s.width());
  keras_lstm::StackKernels(args, kernels.data());
  ForEachChunk(s.batch, [&](int64_t, int64_t begin, int64_t end) {
    forward_rows(&args, kernels.data(), begin, end);
  });
}

void BackwardTarget(void* out, const void** in, const char* opaque, size_t opaque_length,
                    XlaCustomCallStatus* /*status*/) {
  Sizes s;
  if (!ParseBackwardOpaque(opaque, opaque_length, &s)) return;
  float** outputs = static_cast<float**>(out);
  const float* const* inputs = reinterpret_cast<const float* const*>(in);
  keras_lstm::Backward args;
  args.steps = s.steps;
  args.batch = s.batch;
  args.units = s.units;
  args.recurrent_kernel = inputs[0];
  args.c0 = inputs[2];
  args.mask = s.mask ? inputs[3] : nullptr;
  args.c_seq = inputs[4];
  args.gates = inputs[5];
  args.dh_seq = s.dh_seq ? inputs[6] : nullptr;
  args.dc_seq = s.dc_seq ? inputs[7] : nullptr;
  args.dh_last = s.dh_last ? inputs[8] : nullptr;
  args.dc_last = s.dc_last ? inputs[9] : nullptr;
  args.recurrent_mask = s.recurrent_mask ? inputs[10] : nullptr;
  args.options = s.options(inputs[11], inputs[12], inputs[13], inputs[14], inputs[16]);
  args.fill_skipped = s.FillSkipped();
  args.c_computed = s.zoneout_c() ? inputs[15] : nullptr;
  args.norms = s.layer_norm ? inputs[17] : nullptr;
  args.d_input = s.layer_norm ? outputs[5] : nullptr;
  args.d_recurrent = s.layer_norm ? outputs[6] : nullptr;
  args.dz = outputs[0];
  args.dh0 = outputs[1];
  args.dc0 = outputs[2];
  args.dh_projected = s.proj_units ? outputs[4] : nullptr;
  // With no step, BackwardRows passes dh_last and dc_last (or zeros) to dh0 and dc0.
  // Each chunk sums its own rows' bias gradient (and layer norm's); then the
  // chunks' sums add up.
  const int64_t width = s.width(), chunks = NumChunks(s.batch);
  const int64_t sums = width + (s.layer_norm ? 2 * width + 2 * s.units : 0);
  std::vector<float> db_chunks(chunks * sums, 0.f);
  ForEachChunk(s.batch, [&](int64_t chunk, int64_t begin, int64_t end) {
    backward_rows(&args, begin, end, db_chunks.data() + chunk * sums);
  });
  float *db = outputs[3], *d_layer_norm = outputs[7];
  std::fill(db, db + width, 0.f);
  std::fill(d_layer_norm, d_layer_norm + (sums - width), 0.f);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t j = 0; j < width; ++j) db[j] += db_chunks[k * sums + j];
    for (int64_t j = width; j < sums; ++j) d_layer_norm[j - width] += db_chunks[k * sums + j];
  }
}

// Operands x, kernel, h0, h_seq, mask, recurrent_mask, d_input, d_recurrent,
// x_rows; results dkernel, drecurrent (lstm_core.h's KeptGrads).
constexpr char kKeptGradsFormat[] =
    "T=%lld B=%lld D=%lld R=%lld G=%lld rmask=%d apart=%d xrows=%d xbm=%d xrev=%d";

void KeptGradsTarget(void* out, const void** in, const char* opaque, size_t opaque_length,
                     XlaCustomCallStatus* /*status*/) {
  long long steps, batch, features, hidden, width;
  int rmask, apart, x_rows, x_batch_major, x_reversed;
  const std::string text(opaque, opaque_length);
  if (std::sscanf(text.c_str(), kKeptGradsFormat, &steps, &batch, &features, &hidden, &width,
                  &rmask, &apart, &x_rows, &x_batch_major, &x_reversed) != 10) {
    return;
  }
  float** outputs = static_cast<float**>(out);
  const float* const* inputs = reinterpret_cast<const float* const*>(in);
  keras_lstm::KeptGrads args;
  args.steps = steps;
  args.batch = batch;
  args.input_size = features;
  args.hidden = hidden;
  args.width = width;
  args.x = inputs[0];
  args.x_layout.rows = x_rows ? reinterpret_cast<const int32_t*>(in[8]) : nullptr;
  args.x_layout.batch_major = x_batch_major;
  args.x_layout.reversed = x_reversed;
  args.kernel = inputs[1];
  args.h0 = inputs[2];
  args.h_seq = inputs[3];
  args.recurrent_mask = rmask ? inputs[5] : nullptr;
  args.d_input = inputs[6];
  args.d_recurrent = apart ? inputs[7] : nullptr;
  std::vector<int64_t> kept(steps * batch);
  const int64_t n = kept_positions(inputs[4], steps * batch, kept.data());
  const int64_t size = (features + hidden) * width, chunks = NumChunks(n, kMinKeptPerChunk);
  std::vector<float> sums(chunks * size, 0.f);
  ForEachChunk(
      n,
      [&](int64_t chunk, int64_t begin, int64_t end) {
        kept_step_grads(&args, kept.data(), n, begin, end, sums.data() + chunk * size);
      },
      kMinKeptPerChunk);
  add_up_kept_sums(&args, sums.data(), chunks, outputs[0], outputs[1]);
}

// Operands x, kernel, mask, d_input, x_rows; result dx (KerasLstmKeptInputGrad).
constexpr char kKeptInputGradFormat[] = "T=%lld B=%lld D=%lld G=%lld xrows=%d xbm=%d xrev=%d";

void KeptInputGradTarget(void* out, const void** in, const char* opaque, size_t opaque_length,
                         XlaCustomCallStatus* /*status*/) {
  long long steps, batch, features, width;
  int x_rows, x_batch_major, x_reversed;
  const std::string text(opaque, opaque_length);
  if (std::sscanf(text.c_str(), kKeptInputGradFormat, &steps, &batch, &features, &width, &x_rows,
                  &x_batch_major, &x_reversed) != 7) {
    return;
  }
  const float* const* inputs = reinterpret_cast<const float* const*>(in);
  keras_lstm::KeptGrads args;
  args.steps = steps;
  args.batch = batch;
  args.input_size = features;
  args.width = width;
  args.x_layout.rows = x_rows ? reinterpret_cast<const int32_t*>(in[4]) : nullptr;
  args.x_layout.batch_major = x_batch_major;
  args.x_layout.reversed = x_reversed;
  args.kernel = inputs[1];
  args.d_input = inputs[3];
  args.dx = static_cast<float**>(out)[0];
  std::vector<int64_t> kept(steps * batch);
  const int64_t n = kept_positions(inputs[2], steps * batch, kept.data());
  ForEachChunk(
      n,
      [&](int64_t, int64_t begin, int64_t end) {
        kept_step_grads(&args, kept.data(), n, begin, end, nullptr);
      },
      kMinKeptPerChunk);
}

// Operand mask; results order, inverse and sorted_mask (KerasLstmRowOrder).
constexpr char kRowOrderFormat[] = "T=%lld B=%lld";

void RowOrderTarget(void* out, const void** in, const char* opaque, size_t opaque_length,
                    XlaCustomCallStatus* /*status*/) {
  long long steps, batch;
  const std::string text(opaque, opaque_length);
  if (std::sscanf(text.c_str(), kRowOrderFormat, &steps, &batch) != 2) return;
  void** outputs = static_cast<void**>(out);
  order_rows(static_cast<const bool*>(in[0]), steps, batch, NumChunks(batch),
             static_cast<int32_t*>(outputs[0]), static_cast<int32_t*>(outputs[1]),
             static_cast<float*>(outputs[2]));
}

XLA_CPU_REGISTER_CUSTOM_CALL_TARGET_WITH_SYM(kForwardTarget, ForwardTarget);
XLA_CPU_REGISTER_CUSTOM_CALL_TARGET_WITH_SYM(kRowOrderTarget, RowOrderTarget);
XLA_CPU_REGISTER_CUSTOM_CALL_TARGET_WITH_SYM(kKeptGradsTarget, KeptGradsTarget);
XLA_CPU_REGISTER_CUSTOM_CALL_TARGET_WITH_SYM(kKeptInputGradTarget, KeptInputGradTarget);
XLA_CPU_REGISTER_CUSTOM_CALL_TARGET_WITH_SYM(kBackwardTarget, BackwardTarget);

// ---------------------------------------------------------------------------
// XLA kernels: check the static shapes, then emit the custom call.

using tensorflow::TensorShape;
using tensorflow::XlaOpKernel;
using tensorflow::XlaOpKernelContext;
using tensorflow::errors::InvalidArgument;

// A row-major (default layout) float32 shape.
xla::Shape F32(const TensorShape& shape) {
  return xla::ShapeUtil::MakeShape(xla::F32, shape.dim_sizes());
}

// The op's input `k` as a row-major operand shape (float32 but x_rows, int32).
xla::Shape OperandShape(XlaOpKernelContext* ctx, int k) {
  return xla::ShapeUtil::MakeShape(ctx->input_xla_type(k), ctx->InputShape(k).dim_sizes());
}

const TensorShape kNone({0});

// Emits a custom call of `target` with the op's inputs as operands (row-major)
// whose result is the tuple of `outputs` (float32, or as `output_types`
// says), and sets the op's outputs from it.
void EmitCustomCall(
    XlaOpKernelContext* ctx, const char* target, const std::string& opaque,
    const std::vector<TensorShape>& outputs,
    const std::vector<std::pair<xla::ShapeIndex, std::pair<int64_t, xla::ShapeIndex>>>& aliasing =
        {},
    const std::vector<xla::PrimitiveType>& output_types = {}) {
  std::vector<xla::XlaOp> operands;
  std::vector<xla::Shape> operand_shapes;
  for (int k = 0; k < ctx->num_inputs(); ++k) {
    operands.push_back(ctx->Input(k));
    operand_shapes.push_back(OperandShape(ctx, k));
  }
  std::vector<xla::Shape> result_shapes;
  for (size_t k = 0; k < outputs.size(); ++k) {
    const xla::PrimitiveType type = k < output_types.size() ? output_types[k] : xla::F32;
    result_shapes.push_back(xla::ShapeUtil::MakeShape(type, outputs[k].dim_sizes()));
  }
  xla::XlaOp call = xla::CustomCallWithLayout(
      ctx->builder(), target, operands, xla::ShapeUtil::MakeTupleShape(result_shapes),
      operand_shapes, opaque, /*has_side_effect=*/false, aliasing, /*literal=*/nullptr,
      xla::CustomCallSchedule::SCHEDULE_NONE,
      xla::CustomCallApiVersion::API_VERSION_STATUS_RETURNING_UNIFIED);
  for (int k = 0; k < static_cast<int>(outputs.size()); ++k) {
    ctx->SetOutput(k, xla::GetTupleElement(call, k));
  }
}

bool Present(const TensorShape& shape) { return shape.num_elements() > 0; }

// What x must be, by its layout (lstm_core.h's InputLayout), for an error.
const char* ExpectedX(bool batch_major) {
  return batch_major ? "x must be (batch, T, D)" : "x must be (T, batch, D)";
}

// The steps T and batch B of x (of rank 3), time-major or batch-major.
void StepsAndBatch(const TensorShape& x, bool batch_major, int64_t* steps, int64_t* batch) {
  *steps = x.dim_size(batch_major ? 1 : 0);
  *batch = x.dim_size(batch_major ? 0 : 1);
}

// The ops' option attributes (lstm_core.h's Options), into the opaque string's fields.
tensorflow::Status ReadOptions(tensorflow::OpKernelConstruction* ctx, Sizes* s) {
  bool cifg = false;
  TF_RETURN_IF_ERROR(ctx->GetAttr("cifg", &cifg));
  TF_RETURN_IF_ERROR(ctx->GetAttr("cell_clip", &s->cell_clip));
  TF_RETURN_IF_ERROR(ctx->GetAttr("zoneout_h_rate", &s->zoneout_h_rate));
  TF_RETURN_IF_ERROR(ctx->GetAttr("zoneout_c_rate", &s->zoneout_c_rate));
  bool bf16_products = false;
  TF_RETURN_IF_ERROR(ctx->GetAttr("bf16_products", &bf16_products));
  s->cifg = cifg;
  s->bf16_products = bf16_products;
  return absl::OkStatus();
}

// The x_batch_major and x_reversed attributes (lstm_core.h's InputLayout).
tensorflow::Status ReadLayout(tensorflow::OpKernelConstruction* ctx, bool* batch_major,
                              bool* reversed) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("x_batch_major", batch_major));
  return ctx->GetAttr("x_reversed", reversed);
}

class LstmSequenceXlaOp : public XlaOpKernel {
 public:
  explicit LstmSequenceXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("keep_for_gradient", &keep_for_gradient_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("return_sequences", &return_sequences_));
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, &options_));
    bool batch_major, reversed;
    OP_REQUIRES_OK(ctx, ReadLayout(ctx, &batch_major, &reversed));
    options_.x_batch_major = batch_major;
    options_.x_reversed = reversed;
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape x = ctx->InputShape(0), kernel = ctx->InputShape(1),
                      bias = ctx->InputShape(2), u = ctx->InputShape(3),
                      h0 = ctx->InputShape(4), c0 = ctx->InputShape(5),
                      mask = ctx->InputShape(6), recurrent_mask = ctx->InputShape(7),
                      peephole = ctx->InputShape(8), projection = ctx->InputShape(9),
                      zoneout_h = ctx->InputShape(10), zoneout_c = ctx->InputShape(11),
                      layer_norm = ctx->InputShape(12), x_rows = ctx->InputShape(13);
    Sizes s = options_;
    OP_REQUIRES(ctx, x.dims() == 3 && c0.dims() == 2,
                InvalidArgument(ExpectedX(s.x_batch_major), " and c0 (batch, H), got ",
                                x.DebugString(), " and ", c0.DebugString()));
    int64_t steps, batch;
    StepsAndBatch(x, s.x_batch_major, &steps, &batch);
    s.steps = steps;
    s.batch = batch;
    s.features = x.dim_size(2);
    s.units = c0.dim_size(1);
    OP_REQUIRES(ctx, !Present(projection) || (projection.dims() == 2 &&
                                              projection.dim_size(0) == s.units),
                InvalidArgument("projection must be empty or (H, P), got ",
                                projection.DebugString()));
    s.proj_units = Present(projection) ? projection.dim_size(1) : 0;
    const TensorShape states({s.steps, s.batch, s.units}), state({s.batch, s.units}),
        hs({s.steps, s.batch, s.hidden()}), h_state({s.batch, s.hidden()});
    OP_REQUIRES(ctx, u == TensorShape({s.hidden(), s.width()}),
                InvalidArgument("recurrent_kernel must be (R, GH), got ", u.DebugString()));
    s.layer_norm = Present(layer_norm);
    OP_REQUIRES(ctx, !s.layer_norm || layer_norm == TensorShape({2 * s.width() + 2 * s.units}),
                InvalidArgument("layer_norm must be empty or (2GH + 2H), got ",
                                layer_norm.DebugString()));
    OP_REQUIRES(ctx, kernel == TensorShape({s.features, s.width()}),
                InvalidArgument("kernel must be (D, GH), got ", kernel.DebugString()));
    OP_REQUIRES(ctx, !Present(bias) || bias == TensorShape({s.width()}),
                InvalidArgument("bias must be empty or (GH), got ", bias.DebugString()));
    OP_REQUIRES(ctx, !Present(peephole) || peephole == TensorShape({3, s.units}),
                InvalidArgument("peephole must be empty or (3, H), got ", peephole.DebugString()));
    OP_REQUIRES(ctx, h0 == h_state && c0 == state,
                InvalidArgument("h0 must be (batch, R) and c0 (batch, H), got ", h0.DebugString(),
                                " and ", c0.DebugString()));
    OP_REQUIRES(ctx, !Present(mask) || mask == TensorShape({s.steps, s.batch}),
                InvalidArgument("mask must be empty or (T, batch), got ", mask.DebugString()));
    OP_REQUIRES(ctx, !Present(recurrent_mask) || recurrent_mask == h_state,
                InvalidArgument("recurrent_mask must be empty or (batch, R), got ",
                                recurrent_mask.DebugString()));
    OP_REQUIRES(ctx, !Present(x_rows) || x_rows == TensorShape({s.batch}),
                InvalidArgument("x_rows must be empty or (batch,), got ", x_rows.DebugString()));
    s.x_rows = Present(x_rows);
    s.bias = Present(bias);
    s.mask = Present(mask);
    s.recurrent_mask = Present(recurrent_mask);
    OP_REQUIRES(ctx, (!Present(zoneout_h) || zoneout_h == hs) &&
                         (!Present(zoneout_c) || zoneout_c == states),
                InvalidArgument("zoneout masks must be empty or (T, batch, width), got ",
                                zoneout_h.DebugString(), " and ", zoneout_c.DebugString()));
    s.peephole = Present(peephole);
    s.zoneout_h_mask = Present(zoneout_h);
    s.zoneout_c_mask = Present(zoneout_c);
    s.sequences = return_sequences_;
    s.keep = keep_for_gradient_;
    const bool keep = keep_for_gradient_;
    EmitCustomCall(ctx, kForwardTarget, ForwardOpaque(s),
                   {keep || return_sequences_ ? hs : kNone, keep ? states : kNone,
                    keep ? TensorShape({s.steps, s.batch, s.width()}) : kNone, h_state, state,
                    keep && s.zoneout_c() ? states : kNone,
                    keep && s.layer_norm
                        ? TensorShape({s.steps, s.batch, 2 * s.width() + s.units + 3})
                        : kNone});
  }

 private:
  bool keep_for_gradient_ = true;
  bool return_sequences_ = true;
  Sizes options_;
};

class LstmSequenceGradXlaOp : public XlaOpKernel {
 public:
  explicit LstmSequenceGradXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, &options_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape u = ctx->InputShape(0), h0 = ctx->InputShape(1), c0 = ctx->InputShape(2),
                      mask = ctx->InputShape(3), c_seq = ctx->InputShape(4),
                      gates = ctx->InputShape(5), dh_seq = ctx->InputShape(6),
                      dc_seq = ctx->InputShape(7), dh_last = ctx->InputShape(8),
                      dc_last = ctx->InputShape(9), recurrent_mask = ctx->InputShape(10),
                      peephole = ctx->InputShape(11), projection = ctx->InputShape(12),
                      zoneout_h = ctx->InputShape(13), zoneout_c = ctx->InputShape(14),
                      c_computed = ctx->InputShape(15), layer_norm = ctx->InputShape(16),
                      norms = ctx->InputShape(17);
    OP_REQUIRES(ctx, gates.dims() == 3 && c0.dims() == 2,
                InvalidArgument("gates must be (T, batch, GH) and c0 (batch, H), got ",
                                gates.DebugString(), " and ", c0.DebugString()));
    Sizes s = options_;
    s.steps = gates.dim_size(0);
    s.batch = gates.dim_size(1);
    s.units = c0.dim_size(1);
    s.proj_units = Present(projection) && projection.dims() == 2 ? projection.dim_size(1) : 0;
    const TensorShape states({s.steps, s.batch, s.units}), state({s.batch, s.units}),
        hs({s.steps, s.batch, s.hidden()}), h_state({s.batch, s.hidden()});
    OP_REQUIRES(
        ctx,
        u == TensorShape({s.hidden(), s.width()}) && gates.dim_size(2) == s.width() &&
            h0 == h_state && c0 == state && c_seq == states &&
            (!Present(mask) || mask == TensorShape({s.steps, s.batch})) &&
            (!Present(dh_seq) || dh_seq == hs) && (!Present(dc_seq) || dc_seq == states) &&
            (!Present(dh_last) || dh_last == h_state) &&
            (!Present(dc_last) || dc_last == state) &&
            (!Present(recurrent_mask) || recurrent_mask == h_state) &&
            (!Present(peephole) || peephole == TensorShape({3, s.units})) &&
            (!Present(projection) || projection == TensorShape({s.units, s.proj_units})) &&
            (!Present(zoneout_h) || zoneout_h == hs) &&
            (!Present(zoneout_c) || zoneout_c == states),
        InvalidArgument("inconsistent shapes in the LSTM sequence gradient"));
    s.zoneout_h_mask = Present(zoneout_h);
    s.zoneout_c_mask = Present(zoneout_c);
    OP_REQUIRES(ctx, !s.zoneout_c() || c_computed == states,
                InvalidArgument("c_computed must be (T, batch, H) with zoneout of C, got ",
                                c_computed.DebugString()));
    s.layer_norm = Present(layer_norm);
    OP_REQUIRES(ctx,
                !s.layer_norm ||
                    (layer_norm == TensorShape({2 * s.width() + 2 * s.units}) &&
                     norms == TensorShape({s.steps, s.batch, 2 * s.width() + s.units + 3})),
                InvalidArgument("layer_norm must be empty or (2GH + 2H) with norms (T, batch, "
                                "2GH + H + 3), got ",
                                layer_norm.DebugString(), " and ", norms.DebugString()));
    s.mask = Present(mask);
    s.dh_seq = Present(dh_seq);
    s.dc_seq = Present(dc_seq);
    s.dh_last = Present(dh_last);
    s.dc_last = Present(dc_last);
    s.recurrent_mask = Present(recurrent_mask);
    s.peephole = Present(peephole);
    // dz may take over the gates' buffer (BackwardRows reads each step's
    // gates before writing its dz); XLA copies the gates first if they are
    // still needed elsewhere.
    EmitCustomCall(ctx, kBackwardTarget, BackwardOpaque(s),
                   {gates, h_state, state, TensorShape({s.width()}), s.proj_units ? hs : kNone,
                    s.layer_norm ? gates : kNone, s.layer_norm ? gates : kNone, layer_norm},
                   {{xla::ShapeIndex({0}), {5, xla::ShapeIndex({})}}});
  }

 private:
  Sizes options_;
};

class KeptGradsXlaOp : public XlaOpKernel {
 public:
  explicit KeptGradsXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadLayout(ctx, &batch_major_, &reversed_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape x = ctx->InputShape(0), kernel = ctx->InputShape(1),
                      h0 = ctx->InputShape(2), h_seq = ctx->InputShape(3),
                      mask = ctx->InputShape(4), recurrent_mask = ctx->InputShape(5),
                      d_input = ctx->InputShape(6), d_recurrent = ctx->InputShape(7),
                      x_rows = ctx->InputShape(8);
    OP_REQUIRES(ctx, x.dims() == 3 && h0.dims() == 2 && kernel.dims() == 2,
                InvalidArgument(ExpectedX(batch_major_), ", h0 (batch, R) and kernel (D, GH), got ",
                                x.DebugString(), ", ", h0.DebugString(), " and ",
                                kernel.DebugString()));
    int64_t steps, batch;
    StepsAndBatch(x, batch_major_, &steps, &batch);
    const int64_t features = x.dim_size(2), hidden = h0.dim_size(1), width = kernel.dim_size(1);
    const TensorShape products({steps, batch, width});
    OP_REQUIRES(ctx,
                kernel.dim_size(0) == features && h0.dim_size(0) == batch &&
                    h_seq == TensorShape({steps, batch, hidden}) &&
                    mask == TensorShape({steps, batch}) && d_input == products &&
                    (!Present(d_recurrent) || d_recurrent == products) &&
                    (!Present(recurrent_mask) || recurrent_mask == h0) &&
                    (!Present(x_rows) || x_rows == TensorShape({batch})),
                InvalidArgument("inconsistent shapes in the LSTM's kept-step gradients"));
    char opaque[256];
    std::snprintf(opaque, sizeof(opaque), kKeptGradsFormat, static_cast<long long>(steps),
                  static_cast<long long>(batch), static_cast<long long>(features),
                  static_cast<long long>(hidden), static_cast<long long>(width),
                  static_cast<int>(Present(recurrent_mask)), static_cast<int>(Present(d_recurrent)),
                  static_cast<int>(Present(x_rows)), static_cast<int>(batch_major_),
                  static_cast<int>(reversed_));
    EmitCustomCall(ctx, kKeptGradsTarget, opaque, {kernel, TensorShape({hidden, width})});
  }

 private:
  bool batch_major_ = false, reversed_ = false;  // lstm_core.h's InputLayout
};

class KeptInputGradXlaOp : public XlaOpKernel {
 public:
  explicit KeptInputGradXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadLayout(ctx, &batch_major_, &reversed_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape x = ctx->InputShape(0), kernel = ctx->InputShape(1),
                      mask = ctx->InputShape(2), d_input = ctx->InputShape(3),
                      x_rows = ctx->InputShape(4);
    OP_REQUIRES(ctx, x.dims() == 3 && kernel.dims() == 2,
                InvalidArgument(ExpectedX(batch_major_), " and kernel (D, GH), got ",
                                x.DebugString(), " and ", kernel.DebugString()));
    int64_t steps, batch;
    StepsAndBatch(x, batch_major_, &steps, &batch);
    const int64_t features = x.dim_size(2), width = kernel.dim_size(1);
    OP_REQUIRES(ctx,
                kernel.dim_size(0) == features && mask == TensorShape({steps, batch}) &&
                    d_input == TensorShape({steps, batch, width}) &&
                    (!Present(x_rows) || x_rows == TensorShape({batch})),
                InvalidArgument("inconsistent shapes in the LSTM's kept-step input gradient"));
    char opaque[256];
    std::snprintf(opaque, sizeof(opaque), kKeptInputGradFormat, static_cast<long long>(steps),
                  static_cast<long long>(batch), static_cast<long long>(features),
                  static_cast<long long>(width), static_cast<int>(Present(x_rows)),
                  static_cast<int>(batch_major_), static_cast<int>(reversed_));
    EmitCustomCall(ctx, kKeptInputGradTarget, opaque, {x});
  }

 private:
  bool batch_major_ = false, reversed_ = false;  // lstm_core.h's InputLayout
};

class RowOrderXlaOp : public XlaOpKernel {
 public:
  explicit RowOrderXlaOp(tensorflow::OpKernelConstruction* ctx) : XlaOpKernel(ctx) {}

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape mask = ctx->InputShape(0);
    OP_REQUIRES(ctx, mask.dims() == 2,
                InvalidArgument("mask must be (T, batch), got ", mask.DebugString()));
    char opaque[128];
    std::snprintf(opaque, sizeof(opaque), kRowOrderFormat,
                  static_cast<long long>(mask.dim_size(0)),
                  static_cast<long long>(mask.dim_size(1)));
    const TensorShape rows({mask.dim_size(1)});
    EmitCustomCall(ctx, kRowOrderTarget, opaque, {rows, rows, mask}, {},
                   {xla::S32, xla::S32, xla::F32});
  }
};

// Registered straight into TensorFlow's kernel registry for the XLA CPU JIT
// device, not through REGISTER_XLA_OP: XLA turns REGISTER_XLA_OP entries into
// kernels once per process, at its first compilation, so a library loaded
// after that (the usual case: loaded on first use) would be ignored.
REGISTER_KERNEL_BUILDER(Name("KerasLstmSequence").Device(tensorflow::DEVICE_CPU_XLA_JIT),
                        LstmSequenceXlaOp);
REGISTER_KERNEL_BUILDER(Name("KerasLstmSequenceGrad").Device(tensorflow::DEVICE_CPU_XLA_JIT),
                        LstmSequenceGradXlaOp);
REGISTER_KERNEL_BUILDER(Name("KerasLstmKeptGrads").Device(tensorflow::DEVICE_CPU_XLA_JIT),
                        KeptGradsXlaOp);
REGISTER_KERNEL_BUILDER(Name("KerasLstmRowOrder").Device(tensorflow::DEVICE_CPU_XLA_JIT),
                        RowOrderXlaOp);
REGISTER_KERNEL_BUILDER(Name("KerasLstmKeptInputGrad").Device(tensorflow::DEVICE_CPU_XLA_JIT),
                        KeptInputGradXlaOp);

}  // namespace

// Called once from Python after loading, before any custom call runs, with
// the main library's keras_lstm_forward_rows, keras_lstm_backward_rows,
// keras_lstm_kept_step_grads, keras_lstm_order_rows, keras_lstm_kept_positions
// and keras_lstm_add_up_kept_sums.
extern "C" void keras_lstm_xla_init(keras_lstm::ForwardRowsFn forward,
                                    keras_lstm::BackwardRowsFn backward,
                                    keras_lstm::KeptStepGradsFn kept,
                                    keras_lstm::OrderRowsFn order,
                                    keras_lstm::KeptPositionsFn positions,
                                    keras_lstm::AddUpKeptSumsFn add_up, int threads) {
  forward_rows = forward;
  backward_rows = backward;
  kept_step_grads = kept;
  order_rows = order;
  kept_positions = positions;
  add_up_kept_sums = add_up;
  intra_op_threads = threads;
}
