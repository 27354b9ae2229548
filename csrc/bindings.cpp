// Op schemas (namespace `longcat`) and the Python module `longcat_service._C`.
// Kernels register per backend (cpu/*.cpp, cuda/*.cu); fake (meta) kernels for tracing live in
// longcat_service/ops/_fake.py. Outputs are allocated inside each op with sizes fixed by T, k and E
// only, so no op needs a host sync and all of them can be captured in a CUDA graph.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(longcat, m) {
  m.def("router_topk(Tensor logits, Tensor correction_bias, int top_k, float routed_scaling_factor, "
        "int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def("moe_align(Tensor topk_ids, int num_experts) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("expert_ffn(Tensor hidden, Tensor w13, Tensor w2, Tensor expert_offsets, Tensor sorted_slots, "
        "int top_k, Tensor? active_experts=None, Tensor? num_active=None) -> Tensor");
  m.def("combine(Tensor expert_out, Tensor slot_rows, Tensor topk_weights, Tensor hidden, Tensor zero_weight, "
        "bool add_identity) -> Tensor");
  m.def("dense_gemv(Tensor x, Tensor w) -> Tensor");
  // Block FP8 weights (float8_e4m3fn + fp32 scale per 128 x 128 block), activations in x's / hidden's dtype.
  m.def("dense_gemv_fp8(Tensor x, Tensor w8, Tensor scale) -> Tensor");
  m.def("expert_ffn_fp8(Tensor hidden, Tensor w13, Tensor w13_scale, Tensor w2, Tensor w2_scale, "
        "Tensor expert_offsets, Tensor sorted_slots, int top_k, Tensor? active_experts=None, "
        "Tensor? num_active=None) -> Tensor");
}

#ifdef LONGCAT_WITH_CUDA
static constexpr bool kBuiltWithCuda = true;
#else
static constexpr bool kBuiltWithCuda = false;
#endif

static PyObject* built_with_cuda(PyObject*, PyObject*) {
  if (kBuiltWithCuda) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static PyMethodDef kMethods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "longcat MoE ops (registered as torch.ops.longcat.*)",
                              -1, kMethods};

// Importing the module runs the static TORCH_LIBRARY registrations above.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
