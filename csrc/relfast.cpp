// The one place where every relfast operator schema is declared.
// Kernels live in csrc/cpu (CPU), csrc/cuda (CUDA) and csrc/composite (device-generic code that
// combines a fused pass with library GEMMs); each registers itself with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

namespace relfast {

bool built_with_cuda() {
#ifdef RELFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(relfast, m) {
  // [P2] rule 5: mean over heads of (grad * attn)^+ ; (B,H,Nq,Nk) x2 -> (B,Nq,Nk).
  m.def("head_mean_grad_attn(Tensor grad, Tensor attn) -> Tensor");
  // [P2] rules 6/7: R + abar @ R (aggregate) or abar @ R ; R (B,N,M), abar (B,N,N).
  m.def("relevance_update(Tensor R, Tensor abar, *, bool aggregate=True) -> Tensor");
  m.def("relevance_update_(Tensor(a!) R, Tensor abar, *, bool aggregate=True) -> ()");
  // Streaming rule 6 on K rows: v + v @ E_h[(grad * attn)^+], one pass over grad and attn.
  m.def("row_relevance_update(Tensor v, Tensor grad, Tensor attn, *, bool aggregate=True) -> Tensor");
  // Streaming rule 6 on K rows straight from a fused attention's q, k, v, output gradient and row
  // log-sum-exp: A = exp(s q k^T + mask - lse) and dA = dO v^T are recomputed tile by tile, never
  // as (N, N) per head. Grouped-query heads (H a multiple of key/value heads), causal and additive
  // or boolean masks (broadcast to (B, H, Nq, Nk)).
  m.def("sdpa_row_relevance_update(Tensor v, Tensor query, Tensor key, Tensor value, Tensor grad_out, "
        "Tensor logsumexp, Tensor? attn_mask=None, *, bool is_causal=False, float? scale=None, "
        "bool aggregate=True) -> Tensor");
  // [P2] rules 8-9 (handle_residual): (R - I) / rowsum(R - I) + I, zero-sum rows -> identity row.
  m.def("normalize_residual(Tensor R) -> Tensor");
  // [P2] rule 10: R_sq + norm(R_ss)^T @ abar @ norm(R_qq).
  m.def("bimodal_update(Tensor R_sq, Tensor R_ss, Tensor abar, Tensor R_qq, *, bool normalize=True) -> Tensor");
  // [P1] Eq. 16: product of row-normalised (E_h A + I) from start_layer to the last layer.
  m.def("rollout(Tensor[] attentions, int start_layer=0) -> Tensor");
  // Build introspection (no tensor arguments: a catch-all kernel).
  m.def("_built_with_cuda() -> bool", &built_with_cuda);
}

}  // namespace relfast

#ifdef RELFAST_PYTHON_MODULE
// The ops register themselves when this library is loaded; Python only needs an importable
// module. A stub PyInit keeps the extension free of pybind11 and of the unstable Python C API.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
