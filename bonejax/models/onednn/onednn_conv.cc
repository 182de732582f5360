// oneDNN 2D convolutions as XLA FFI handlers (CPU): forward, backward-data, backward-weights.
//
// Layouts are JAX's: activations NHWC, kernels HWIO (KH, KW, Cin/groups, Cout, the output
// channels grouped group-major as lax.conv_general_dilated's feature_group_count expects).
// oneDNN reads and writes the activations in place (NHWC is a layout its brgemm/jit kernels
// take directly); kernels are reordered to the primitive's preferred layout on each call (a
// small copy next to the convolution; XLA's FFI gives a handler no per-executable state), or,
// where the caller asks (`cache_weights`: the inference graph, whose kernels do not change
// between calls), kept reordered next to a copy of the kernel they came from and reused while
// the kernel passed in is byte-for-byte that copy (`PackedKernel`). A bf16 convolution also
// takes a float32 kernel (training's float32 master weights): the reorder converts it, and
// backward-weights writes a float32 gradient, so neither the cast nor its transpose runs in XLA.
//
// Every call is described by one int64 attribute array `conf`:
//   [stride_h, stride_w, dil_h, dil_w, pad_top, pad_bottom, pad_left, pad_right, groups,
//    relu, has_bias, has_sum, cache_weights]
// (dilations as JAX counts them: 1 = none). Primitives are built once per (shapes, dtypes,
// conf) and cached. Calls are serialised by one mutex: oneDNN's OpenMP team already uses every
// core, and two teams started from two XLA worker threads would oversubscribe them.
//
// Built by bonejax/models/onednn/build.py (g++ -O2 -shared against jax.ffi.include_dir() and
// oneDNN 3.x from pip's onednn-devel-cpu-gomp, or Debian's libdnnl-dev 2.6): the few calls
// whose API changed between 2.x and 3.x go through the version-switch helpers below.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

constexpr int kConfSize = 13;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

std::mutex& CallMutex() {
  static std::mutex mu;
  return mu;
}

bool ToDnnl(ffi::DataType t, memory::data_type* out) {
  switch (t) {
    case ffi::DataType::F32: *out = memory::data_type::f32; return true;
    case ffi::DataType::BF16: *out = memory::data_type::bf16; return true;
    default: return false;
  }
}

struct Conf {
  memory::dims strides, dilates, pad_l, pad_r;
  int64_t groups = 1;
  bool relu = false, bias = false, sum = false, cache_weights = false;
};

ffi::Error ParseConf(ffi::Span<const int64_t> c, Conf* conf) {
  if (c.size() != kConfSize) return ffi::Error::InvalidArgument("conf must have 13 entries");
  conf->strides = {c[0], c[1]};
  conf->dilates = {c[2] - 1, c[3] - 1};  // oneDNN counts dilation from 0
  conf->pad_l = {c[4], c[6]};
  conf->pad_r = {c[5], c[7]};
  conf->groups = c[8];
  conf->relu = c[9] != 0;
  conf->bias = c[10] != 0;
  conf->sum = c[11] != 0;
  conf->cache_weights = c[12] != 0;
  if (conf->groups < 1) return ffi::Error::InvalidArgument("groups must be >= 1");
  return ffi::Error::Success();
}

// NHWC activations: logical dims {N, C, H, W}.
memory::desc ActDesc(ffi::AnyBuffer::Dimensions d, memory::data_type t) {
  return memory::desc({d[0], d[3], d[1], d[2]}, t, memory::format_tag::nhwc);
}

// HWIO kernels with the output channels group-major: logical dims {O, I, KH, KW} or
// {G, O/G, I, KH, KW}, strides of the JAX array.
memory::desc WeightDesc(ffi::AnyBuffer::Dimensions d, int64_t groups, memory::data_type t) {
  const int64_t kh = d[0], kw = d[1], ci = d[2], co = d[3];
  if (groups == 1)
    return memory::desc({co, ci, kh, kw}, t, memory::dims{1, co, kw * ci * co, ci * co});
  const int64_t og = co / groups;
  return memory::desc({groups, og, ci, kh, kw}, t,
                      memory::dims{og, 1, co, kw * ci * co, ci * co});
}

// ---- oneDNN 2.x / 3.x switch. v3 removed the operation descriptors (a primitive descriptor
// is built directly, engine first), dropped post_ops::append_eltwise's scale, and renamed
// memory::desc's queries; nothing else this file uses differs.
using FwdPd = dnnl::convolution_forward::primitive_desc;
using BwdDataPd = dnnl::convolution_backward_data::primitive_desc;
using BwdWeightsPd = dnnl::convolution_backward_weights::primitive_desc;

memory::dims MdDims(const memory::desc& md) {
#if DNNL_VERSION_MAJOR >= 3
  return md.get_dims();
#else
  return md.dims();
#endif
}

memory::data_type MdType(const memory::desc& md) {
#if DNNL_VERSION_MAJOR >= 3
  return md.get_data_type();
#else
  return md.data_type();
#endif
}

void AppendEltwise(dnnl::post_ops& ops, dnnl::algorithm alg, float alpha, float beta) {
#if DNNL_VERSION_MAJOR >= 3
  ops.append_eltwise(alg, alpha, beta);
#else
  ops.append_eltwise(1.f, alg, alpha, beta);
#endif
}

FwdPd MakeFwdPd(dnnl::prop_kind prop, const memory::desc& src, const memory::desc& w,
                const memory::desc& bias, const memory::desc& dst, const Conf& conf,
                const dnnl::primitive_attr& attr) {
#if DNNL_VERSION_MAJOR >= 3
  return FwdPd(Engine(), prop, dnnl::algorithm::convolution_direct, src, w, bias, dst,
               conf.strides, conf.dilates, conf.pad_l, conf.pad_r, attr);
#else
  dnnl::convolution_forward::desc d(prop, dnnl::algorithm::convolution_direct, src, w, bias,
                                    dst, conf.strides, conf.dilates, conf.pad_l, conf.pad_r);
  return FwdPd(d, attr, Engine());
#endif
}

BwdDataPd MakeBwdDataPd(const memory::desc& dsrc, const memory::desc& w,
                        const memory::desc& ddst, const Conf& conf,
                        const dnnl::primitive_attr& attr, const FwdPd& hint) {
#if DNNL_VERSION_MAJOR >= 3
  return BwdDataPd(Engine(), dnnl::algorithm::convolution_direct, dsrc, w, ddst, conf.strides,
                   conf.dilates, conf.pad_l, conf.pad_r, hint, attr);
#else
  dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, dsrc, w, ddst,
                                          conf.strides, conf.dilates, conf.pad_l, conf.pad_r);
  return BwdDataPd(d, attr, Engine(), hint);
#endif
}

BwdWeightsPd MakeBwdWeightsPd(const memory::desc& src, const memory::desc& dw,
                              const memory::desc& ddst, const Conf& conf,
                              const dnnl::primitive_attr& attr, const FwdPd& hint) {
#if DNNL_VERSION_MAJOR >= 3
  return BwdWeightsPd(Engine(), dnnl::algorithm::convolution_direct, src, dw, ddst,
                      conf.strides, conf.dilates, conf.pad_l, conf.pad_r, hint, attr);
#else
  dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, src, dw,
                                             ddst, conf.strides, conf.dilates, conf.pad_l,
                                             conf.pad_r);
  return BwdWeightsPd(d, attr, Engine(), hint);
#endif
}
// ---- end of the version switch.

memory::desc AnyLike(const memory::desc& md) {
  return memory::desc(MdDims(md), MdType(md), memory::format_tag::any);
}

// The primitive's kernel: `md`'s dims in the compute dtype `t`, any layout. A float32 kernel
// passed to a bf16 convolution (a bf16 model's float32 master weights) is converted by the
// reorder into this layout, one pass instead of XLA's convert and then the reorder.
memory::desc AnyKernel(const memory::desc& md, memory::data_type t) {
  return memory::desc(MdDims(md), t, memory::format_tag::any);
}

std::string Key(const char* op, std::initializer_list<ffi::AnyBuffer::Dimensions> dims,
                std::initializer_list<int> types, ffi::Span<const int64_t> conf) {
  std::ostringstream s;
  s << op;
  for (auto d : dims) {
    s << '|';
    for (auto v : d) s << v << ',';
  }
  s << '|';
  for (int t : types) s << t << ',';
  s << '|';
  for (auto v : conf) s << v << ',';
  return s.str();
}

// Per-primitive time split, collected only when $BONEJAX_ONEDNN_PROFILE is set (read once):
// the kernel reorder, the residual copy and the primitive itself, in seconds, per call site
// shape (benchmarks/cpu_forward_profile.py reads them through bonejax_onednn_profile).
struct Times {
  int64_t calls = 0;
  double reorder = 0, copy = 0, exec = 0;
};

bool Profiling() {
  static const bool on = [] {
    const char* v = std::getenv("BONEJAX_ONEDNN_PROFILE");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A kernel kept in the primitive's layout, with the bytes of the kernel it was made from.
struct PackedKernel {
  const void* from = nullptr;  // where that kernel was (which slot to try first)
  std::vector<char> source, packed;
};

constexpr size_t kPackedSlots = 8;  // kernels of one primitive shape kept (layers sharing it)

// One cached primitive with its kernel reorder and scratch buffers (used under CallMutex).
struct Entry {
  dnnl::primitive prim;
  memory::desc user_w, prim_w;  // the kernel as JAX holds it / as the primitive wants it
  dnnl::primitive w_reorder;    // user -> primitive layout (forward, backward-data)
  bool reorder_w = false;
  std::vector<char> w_buf;      // the reordered kernel (or, backward-weights, its gradient)
  memory::desc scratch_md;
  std::vector<char> scratch;
  std::string impl;
  Times times;
  std::vector<PackedKernel> kept;  // cache_weights: up to kPackedSlots kernels
  size_t next_slot = 0;
};

std::unordered_map<std::string, std::unique_ptr<Entry>>& Cache() {
  static std::unordered_map<std::string, std::unique_ptr<Entry>> cache;
  return cache;
}

dnnl::primitive_attr Attr(const Conf& conf) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::post_ops ops;
  if (conf.sum) ops.append_sum(1.f);
  if (conf.relu) AppendEltwise(ops, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (conf.sum || conf.relu) attr.set_post_ops(ops);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardPd(const memory::desc& src,
                                                    const memory::desc& w,
                                                    const memory::desc& dst, bool bias,
                                                    const Conf& conf, bool training) {
  memory::desc bias_md = bias ? memory::desc({MdDims(dst)[1]}, memory::data_type::f32,
                                             memory::format_tag::a)
                              : memory::desc();
  return MakeFwdPd(
      training ? dnnl::prop_kind::forward_training : dnnl::prop_kind::forward_inference, src,
      AnyKernel(w, MdType(src)), bias_md, dst, conf, Attr(conf));
}

void PrepareWeights(Entry* e, const memory::desc& user_w, const memory::desc& prim_w) {
  e->user_w = user_w;
  e->prim_w = prim_w;
  e->reorder_w = user_w != prim_w;
  if (e->reorder_w) {
    e->w_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user_w, Engine(),
                                                               prim_w));
    e->w_buf.resize(prim_w.get_size());
  }
}

void* ScratchPtr(Entry* e) { return e->scratch.empty() ? nullptr : e->scratch.data(); }

// The user kernel in the primitive's layout (reordered into e->w_buf when they differ).
memory KernelFor(Entry* e, void* user_ptr) {
  memory user(e->user_w, Engine(), user_ptr);
  if (!e->reorder_w) return user;
  memory prim(e->prim_w, Engine(), e->w_buf.data());
  const double t0 = Profiling() ? Now() : 0;
  e->w_reorder.execute(Stream(), {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, prim}});
  if (Profiling()) {
    Stream().wait();
    e->times.reorder += Now() - t0;
  }
  return prim;
}

// The kernel at `user_ptr` in the primitive's layout, reused from e->kept when a kept kernel's
// source bytes equal it (the pointer only says where to look first: equality is checked on the
// whole kernel, so a buffer reused for other weights is reordered again, never misread).
memory KeptKernelFor(Entry* e, void* user_ptr) {
  if (!e->reorder_w) return memory(e->user_w, Engine(), user_ptr);
  const size_t n = e->user_w.get_size();
  const double t0 = Profiling() ? Now() : 0;
  PackedKernel* hit = nullptr;
  for (auto& k : e->kept)
    if (k.from == user_ptr && std::memcmp(k.source.data(), user_ptr, n) == 0) hit = &k;
  if (hit == nullptr)
    for (auto& k : e->kept)
      if (k.from != user_ptr && std::memcmp(k.source.data(), user_ptr, n) == 0) hit = &k;
  if (hit == nullptr) {
    if (e->kept.size() < kPackedSlots) {
      e->kept.emplace_back();
      hit = &e->kept.back();
    } else {
      hit = &e->kept[e->next_slot];
      e->next_slot = (e->next_slot + 1) % kPackedSlots;
    }
    hit->source.assign(static_cast<const char*>(user_ptr),
                       static_cast<const char*>(user_ptr) + n);
    hit->packed.resize(e->prim_w.get_size());
    memory user(e->user_w, Engine(), user_ptr);
    memory prim(e->prim_w, Engine(), hit->packed.data());
    e->w_reorder.execute(Stream(), {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, prim}});
    Stream().wait();
  }
  hit->from = user_ptr;
  if (Profiling()) e->times.reorder += Now() - t0;
  return memory(e->prim_w, Engine(), hit->packed.data());
}

// Runs the primitive, timing it when profiling.
void Execute(Entry* e, const std::unordered_map<int, memory>& args) {
  const double t0 = Profiling() ? Now() : 0;
  e->prim.execute(Stream(), args);
  Stream().wait();
  if (Profiling()) {
    e->times.exec += Now() - t0;
    e->times.calls += 1;
  }
}

ffi::Error Failed(const char* what, const std::exception& ex) {
  return ffi::Error::Internal(std::string("oneDNN ") + what + ": " + ex.what());
}

// ---------------------------------------------------------------------------------------------

ffi::Error ConvForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                       ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Span<const int64_t> conf_attr) {
  Conf conf;
  if (auto err = ParseConf(conf_attr, &conf); !err.success()) return err;
  memory::data_type tx, tw, ty;
  if (!ToDnnl(x.element_type(), &tx) || !ToDnnl(w.element_type(), &tw) ||
      !ToDnnl(y->element_type(), &ty))
    return ffi::Error::InvalidArgument("oneDNN conv: float32 or bfloat16 operands only");
  std::lock_guard<std::mutex> lock(CallMutex());
  try {
    const std::string key = Key("fwd", {x.dimensions(), w.dimensions(), y->dimensions()},
                                {int(tx), int(tw), int(ty)}, conf_attr);
    auto& slot = Cache()[key];
    if (!slot) {
      auto e = std::make_unique<Entry>();
      memory::desc src = ActDesc(x.dimensions(), tx), dst = ActDesc(y->dimensions(), ty);
      memory::desc uw = WeightDesc(w.dimensions(), conf.groups, tw);
      auto pd = ForwardPd(src, uw, dst, conf.bias, conf, /*training=*/false);
      PrepareWeights(e.get(), uw, pd.weights_desc());
      e->scratch_md = pd.scratchpad_desc();
      e->scratch.resize(e->scratch_md.get_size());
      e->impl = pd.impl_info_str();
      e->prim = dnnl::convolution_forward(pd);
      slot = std::move(e);
    }
    Entry* e = slot.get();
    memory src(ActDesc(x.dimensions(), tx), Engine(), x.untyped_data());
    memory dst(ActDesc(y->dimensions(), ty), Engine(), y->untyped_data());
    if (conf.sum && residual.untyped_data() != y->untyped_data()) {
      // Without buffer aliasing the residual must be copied to the output first.
      const double t0 = Profiling() ? Now() : 0;
      std::memcpy(y->untyped_data(), residual.untyped_data(), y->size_bytes());
      if (Profiling()) e->times.copy += Now() - t0;
    }
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src},
                                         {DNNL_ARG_WEIGHTS,
                                          conf.cache_weights
                                              ? KeptKernelFor(e, w.untyped_data())
                                              : KernelFor(e, w.untyped_data())},
                                         {DNNL_ARG_DST, dst}};
    if (conf.bias)
      args.emplace(DNNL_ARG_BIAS, memory(memory::desc({y->dimensions()[3]},
                                                      memory::data_type::f32,
                                                      memory::format_tag::a),
                                         Engine(), bias.untyped_data()));
    if (!e->scratch.empty())
      args.emplace(DNNL_ARG_SCRATCHPAD, memory(e->scratch_md, Engine(), ScratchPtr(e)));
    Execute(e, args);
  } catch (const std::exception& ex) {
    return Failed("convolution forward", ex);
  }
  return ffi::Error::Success();
}

// dx = conv_backward_data(dy, w): shapes of x come from the result.
ffi::Error ConvBackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                            ffi::Span<const int64_t> conf_attr) {
  Conf conf;
  if (auto err = ParseConf(conf_attr, &conf); !err.success()) return err;
  memory::data_type tdy, tw, tdx;
  if (!ToDnnl(dy.element_type(), &tdy) || !ToDnnl(w.element_type(), &tw) ||
      !ToDnnl(dx->element_type(), &tdx))
    return ffi::Error::InvalidArgument("oneDNN conv: float32 or bfloat16 operands only");
  std::lock_guard<std::mutex> lock(CallMutex());
  try {
    const std::string key = Key("bwd_d", {dy.dimensions(), w.dimensions(), dx->dimensions()},
                                {int(tdy), int(tw), int(tdx)}, conf_attr);
    auto& slot = Cache()[key];
    if (!slot) {
      auto e = std::make_unique<Entry>();
      memory::desc dsrc = ActDesc(dx->dimensions(), tdx), ddst = ActDesc(dy.dimensions(), tdy);
      memory::desc uw = WeightDesc(w.dimensions(), conf.groups, tw);
      Conf plain = conf;
      plain.relu = plain.sum = false;
      // The forward hint: the same convolution in the backward pass's dtypes.
      auto hint = ForwardPd(ActDesc(dx->dimensions(), tdy), uw, ddst, false, plain, true);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      auto pd = MakeBwdDataPd(dsrc, AnyKernel(uw, tdy), ddst, conf, attr, hint);
      PrepareWeights(e.get(), uw, pd.weights_desc());
      e->scratch_md = pd.scratchpad_desc();
      e->scratch.resize(e->scratch_md.get_size());
      e->impl = pd.impl_info_str();
      e->prim = dnnl::convolution_backward_data(pd);
      slot = std::move(e);
    }
    Entry* e = slot.get();
    std::unordered_map<int, memory> args{
        {DNNL_ARG_DIFF_DST, memory(ActDesc(dy.dimensions(), tdy), Engine(), dy.untyped_data())},
        {DNNL_ARG_WEIGHTS, KernelFor(e, w.untyped_data())},
        {DNNL_ARG_DIFF_SRC, memory(ActDesc(dx->dimensions(), tdx), Engine(),
                                   dx->untyped_data())}};
    if (!e->scratch.empty())
      args.emplace(DNNL_ARG_SCRATCHPAD, memory(e->scratch_md, Engine(), ScratchPtr(e)));
    Execute(e, args);
  } catch (const std::exception& ex) {
    return Failed("convolution backward-data", ex);
  }
  return ffi::Error::Success();
}

// dw = conv_backward_weights(x, dy), written in HWIO (the kernel's JAX layout).
ffi::Error ConvBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::Result<ffi::AnyBuffer> dw,
                               ffi::Span<const int64_t> conf_attr) {
  Conf conf;
  if (auto err = ParseConf(conf_attr, &conf); !err.success()) return err;
  memory::data_type tx, tdy, tdw;
  if (!ToDnnl(x.element_type(), &tx) || !ToDnnl(dy.element_type(), &tdy) ||
      !ToDnnl(dw->element_type(), &tdw))
    return ffi::Error::InvalidArgument("oneDNN conv: float32 or bfloat16 operands only");
  std::lock_guard<std::mutex> lock(CallMutex());
  try {
    const std::string key = Key("bwd_w", {x.dimensions(), dy.dimensions(), dw->dimensions()},
                                {int(tx), int(tdy), int(tdw)}, conf_attr);
    auto& slot = Cache()[key];
    if (!slot) {
      auto e = std::make_unique<Entry>();
      memory::desc src = ActDesc(x.dimensions(), tx), ddst = ActDesc(dy.dimensions(), tdy);
      memory::desc uw = WeightDesc(dw->dimensions(), conf.groups, tdw);
      Conf plain = conf;
      plain.relu = plain.sum = false;
      auto hint = ForwardPd(src, WeightDesc(dw->dimensions(), conf.groups, tx),
                            ActDesc(dy.dimensions(), tdy), false, plain, true);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      auto pd = MakeBwdWeightsPd(src, AnyLike(uw), ddst, conf, attr, hint);
      e->user_w = uw;
      e->prim_w = pd.diff_weights_desc();
      e->reorder_w = e->user_w != e->prim_w;
      if (e->reorder_w) {  // primitive layout -> HWIO after the call
        e->w_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e->prim_w,
                                                                   Engine(), e->user_w));
        e->w_buf.resize(e->prim_w.get_size());
      }
      e->scratch_md = pd.scratchpad_desc();
      e->scratch.resize(e->scratch_md.get_size());
      e->impl = pd.impl_info_str();
      e->prim = dnnl::convolution_backward_weights(pd);
      slot = std::move(e);
    }
    Entry* e = slot.get();
    memory user(e->user_w, Engine(), dw->untyped_data());
    memory prim = e->reorder_w ? memory(e->prim_w, Engine(), e->w_buf.data()) : user;
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, memory(ActDesc(x.dimensions(), tx), Engine(), x.untyped_data())},
        {DNNL_ARG_DIFF_DST, memory(ActDesc(dy.dimensions(), tdy), Engine(), dy.untyped_data())},
        {DNNL_ARG_DIFF_WEIGHTS, prim}};
    if (!e->scratch.empty())
      args.emplace(DNNL_ARG_SCRATCHPAD, memory(e->scratch_md, Engine(), ScratchPtr(e)));
    Execute(e, args);  // timed and counted as the other handlers' primitives
    if (e->reorder_w) {
      const double t0 = Profiling() ? Now() : 0;
      e->w_reorder.execute(Stream(), {{DNNL_ARG_FROM, prim}, {DNNL_ARG_TO, user}});
      Stream().wait();
      if (Profiling()) e->times.reorder += Now() - t0;
    }
  } catch (const std::exception& ex) {
    return Failed("convolution backward-weights", ex);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BonejaxOnednnConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("conf"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BonejaxOnednnConvBackwardData, ConvBackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("conf"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BonejaxOnednnConvBackwardWeights, ConvBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("conf"));

// Checks a forward convolution of these shapes can be built (Python's planner asks before it
// chooses oneDNN for a layer, so that a shape oneDNN refuses falls back to XLA at trace time,
// not as a failed call). Returns 0 on success, else writes the reason into `msg`.
extern "C" int bonejax_onednn_probe(const int64_t* xdims, const int64_t* wdims,
                                    const int64_t* ydims, int dtype_bf16, int out_bf16,
                                    const int64_t* conf_attr, int with_backward, char* msg,
                                    int msg_len) {
  try {
    Conf conf;
    auto err = ParseConf(ffi::Span<const int64_t>(conf_attr, kConfSize), &conf);
    if (!err.success()) throw std::runtime_error("bad conf");
    auto t = dtype_bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    auto to = out_bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    ffi::AnyBuffer::Dimensions xd(xdims, 4), wd(wdims, 4), yd(ydims, 4);
    memory::desc src = ActDesc(xd, t), dst = ActDesc(yd, to), uw = WeightDesc(wd, conf.groups, t);
    std::lock_guard<std::mutex> lock(CallMutex());
    auto pd = ForwardPd(src, uw, dst, conf.bias, conf, false);
    std::string impl = pd.impl_info_str();
    if (with_backward) {
      Conf plain = conf;
      plain.relu = plain.sum = false;
      auto hint = ForwardPd(src, uw, ActDesc(yd, t), false, plain, true);
      auto pdd = MakeBwdDataPd(src, AnyLike(uw), ActDesc(yd, t), conf, dnnl::primitive_attr(),
                               hint);
      auto pdw = MakeBwdWeightsPd(src, AnyLike(WeightDesc(wd, conf.groups,
                                                          memory::data_type::f32)),
                                  ActDesc(yd, t), conf, dnnl::primitive_attr(), hint);
      impl += std::string(" / ") + pdd.impl_info_str() + " / " + pdw.impl_info_str();
    }
    std::snprintf(msg, msg_len, "%s", impl.c_str());
    return 0;
  } catch (const std::exception& ex) {
    std::snprintf(msg, msg_len, "%s", ex.what());
    return 1;
  }
}

// The times collected under $BONEJAX_ONEDNN_PROFILE, one line per cached primitive:
// "key<TAB>calls<TAB>reorder_s<TAB>copy_s<TAB>exec_s<TAB>impl". Writes them into `buf` if they
// fit and returns the size they need (with the terminating zero).
extern "C" int bonejax_onednn_profile(char* buf, int buf_len) {
  std::lock_guard<std::mutex> lock(CallMutex());
  std::ostringstream out;
  for (auto& kv : Cache()) {
    const Entry* e = kv.second.get();
    if (e == nullptr) continue;
    out << kv.first << '\t' << e->times.calls << '\t' << e->times.reorder << '\t'
        << e->times.copy << '\t' << e->times.exec << '\t' << e->impl << '\n';
  }
  const std::string s = out.str();
  if (buf != nullptr && buf_len > int(s.size())) std::memcpy(buf, s.c_str(), s.size() + 1);
  return int(s.size()) + 1;
}

extern "C" void bonejax_onednn_profile_reset() {
  std::lock_guard<std::mutex> lock(CallMutex());
  for (auto& kv : Cache())
    if (kv.second) kv.second->times = Times();
}

// BatchNorm for training: the same engine, stream and call mutex (see the file).
#include "onednn_bnorm.inc"
// Max pooling for training (after onednn_bnorm.inc, whose BnAttr it uses).
#include "onednn_pool.inc"
