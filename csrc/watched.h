// What python/turbokernels/ops/_library.watched() tests, from C++: whether something that is not a tensor argument
// must see every op call (a function or dispatch mode, a functorch transform, torch.jit tracing, the profiler).
// torch.compile's and forward AD's flags live in Python: the Python callers of the one-call entries that use this
// (attention_usual, linear_usual) test those first.
#pragma once

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/profiler/orchestration/observer.h>

namespace turbokernels {

inline bool watched_cxx() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) || torch::jit::tracer::isTracing() ||
         torch::profiler::impl::profilerEnabled();
}

}  // namespace turbokernels
