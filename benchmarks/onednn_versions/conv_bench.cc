// One NHWC convolution on oneDNN, timed: builds against oneDNN 2.x or 3.x (the same version
// switch as bonejax/models/onednn/onednn_conv.cc), so one source measures both libraries.
//
//   conv_bench MODE DTYPE N H W CIN COUT K STRIDE PAD ITERS
//   MODE: fwd (forward_inference) | bwd_d (backward data) | bwd_w (backward weights, f32 grad)
// Prints "<median wall ms> <median process-CPU ms> <impl>" over ITERS calls after one warm-up
// call. The CPU time is what a loaded machine cannot inflate by preempting us: with
// OMP_NUM_THREADS=1 it is the kernel's own time (the wall time then includes waiting). Weights are reordered to the primitive's layout once,
// outside the timed loop (bonejax reorders them per call: a small copy, the same in both).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
static dnnl::stream strm(eng);
static const auto kAlg = dnnl::algorithm::convolution_direct;

using FwdPd = dnnl::convolution_forward::primitive_desc;
using BwdDPd = dnnl::convolution_backward_data::primitive_desc;
using BwdWPd = dnnl::convolution_backward_weights::primitive_desc;

FwdPd MakeFwdPd(dnnl::prop_kind prop, const memory::desc& src, const memory::desc& w,
                const memory::desc& dst, const memory::dims& s, const memory::dims& d,
                const memory::dims& pl, const memory::dims& pr) {
#if DNNL_VERSION_MAJOR >= 3
  return FwdPd(eng, prop, kAlg, src, w, memory::desc(), dst, s, d, pl, pr);
#else
  return FwdPd(dnnl::convolution_forward::desc(prop, kAlg, src, w, memory::desc(), dst, s, d,
                                               pl, pr), eng);
#endif
}
BwdDPd MakeBwdDPd(const memory::desc& dsrc, const memory::desc& w, const memory::desc& ddst,
                  const memory::dims& s, const memory::dims& d, const memory::dims& pl,
                  const memory::dims& pr, const FwdPd& hint) {
#if DNNL_VERSION_MAJOR >= 3
  return BwdDPd(eng, kAlg, dsrc, w, ddst, s, d, pl, pr, hint);
#else
  return BwdDPd(dnnl::convolution_backward_data::desc(kAlg, dsrc, w, ddst, s, d, pl, pr), eng,
                hint);
#endif
}
BwdWPd MakeBwdWPd(const memory::desc& src, const memory::desc& dw, const memory::desc& ddst,
                  const memory::dims& s, const memory::dims& d, const memory::dims& pl,
                  const memory::dims& pr, const FwdPd& hint) {
#if DNNL_VERSION_MAJOR >= 3
  return BwdWPd(eng, kAlg, src, dw, ddst, s, d, pl, pr, hint);
#else
  return BwdWPd(dnnl::convolution_backward_weights::desc(kAlg, src, dw, ddst, s, d, pl, pr),
                eng, hint);
#endif
}

dt MdType(const memory::desc& md) {
#if DNNL_VERSION_MAJOR >= 3
  return md.get_data_type();
#else
  return md.data_type();
#endif
}

memory Filled(const memory::desc& md) {
  // Small finite values (the timing does not depend on them; NaNs or denormals could).
  memory m(md, eng);
  const size_t bytes = md.get_size();
  const bool bf16 = MdType(md) == dt::bf16;
  auto val = [](size_t i) { return float((i * 2654435761u) % 1000) / 1000.f - 0.5f; };
  if (bf16) {
    auto* p = static_cast<uint16_t*>(m.get_data_handle());
    for (size_t i = 0; i < bytes / 2; ++i) {
      float f = val(i);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      p[i] = uint16_t(u >> 16);
    }
  } else {
    auto* p = static_cast<float*>(m.get_data_handle());
    for (size_t i = 0; i < bytes / 4; ++i) p[i] = val(i);
  }
  return m;
}

int main(int argc, char** argv) {
  if (argc != 12) { std::fprintf(stderr, "usage: see source\n"); return 2; }
  std::string mode = argv[1], dtype = argv[2];
  long n = atol(argv[3]), h = atol(argv[4]), w = atol(argv[5]), ci = atol(argv[6]),
       co = atol(argv[7]), k = atol(argv[8]), st = atol(argv[9]), pad = atol(argv[10]);
  int iters = atoi(argv[11]);
  dt t = dtype == "bf16" ? dt::bf16 : dt::f32;
  long oh = (h + 2 * pad - k) / st + 1, ow = (w + 2 * pad - k) / st + 1;
  memory::dims s{st, st}, d{0, 0}, pl{pad, pad}, pr{pad, pad};
  memory::desc src({n, ci, h, w}, t, tag::nhwc), dst({n, co, oh, ow}, t, tag::nhwc);
  memory::desc wany({co, ci, k, k}, t, tag::any), user_w({co, ci, k, k}, t, tag::hwio);
  std::unordered_map<int, memory> args;
  dnnl::primitive prim;
  std::string impl;
  auto fwd = MakeFwdPd(mode == "fwd" ? dnnl::prop_kind::forward_inference
                                     : dnnl::prop_kind::forward_training,
                       src, wany, dst, s, d, pl, pr);
  if (mode == "fwd") {
    memory uw = Filled(user_w), pw(fwd.weights_desc(), eng);
    dnnl::reorder(uw, pw).execute(strm, uw, pw);
    args = {{DNNL_ARG_SRC, Filled(src)}, {DNNL_ARG_WEIGHTS, pw},
            {DNNL_ARG_DST, memory(dst, eng)}};
    prim = dnnl::convolution_forward(fwd);
    impl = fwd.impl_info_str();
  } else if (mode == "bwd_d") {
    auto pd = MakeBwdDPd(src, wany, dst, s, d, pl, pr, fwd);
    memory uw = Filled(user_w), pw(pd.weights_desc(), eng);
    dnnl::reorder(uw, pw).execute(strm, uw, pw);
    args = {{DNNL_ARG_DIFF_DST, Filled(dst)}, {DNNL_ARG_WEIGHTS, pw},
            {DNNL_ARG_DIFF_SRC, memory(src, eng)}};
    prim = dnnl::convolution_backward_data(pd);
    impl = pd.impl_info_str();
  } else {
    auto pd = MakeBwdWPd(src, memory::desc({co, ci, k, k}, dt::f32, tag::any), dst, s, d, pl,
                         pr, fwd);
    args = {{DNNL_ARG_SRC, Filled(src)}, {DNNL_ARG_DIFF_DST, Filled(dst)},
            {DNNL_ARG_DIFF_WEIGHTS, memory(pd.diff_weights_desc(), eng)}};
    prim = dnnl::convolution_backward_weights(pd);
    impl = pd.impl_info_str();
  }
  auto cpu_ms = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  };
  std::vector<double> wall, cpu;
  for (int i = 0; i < iters + 1; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    double c0 = cpu_ms();
    prim.execute(strm, args);
    strm.wait();
    double c1 = cpu_ms();
    double el = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                    .count();
    if (i >= 1) {  // one warm-up call
      wall.push_back(el);
      cpu.push_back(c1 - c0);
    }
  }
  std::sort(wall.begin(), wall.end());
  std::sort(cpu.begin(), cpu.end());
  std::printf("%.4f %.4f %s\n", wall[wall.size() / 2], cpu[cpu.size() / 2], impl.c_str());
  return 0;
}
