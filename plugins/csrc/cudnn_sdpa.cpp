// cuDNN fused SDPA as C++ torch ops, so that AOTInductor engines can call them without Python.
//
// ditbake::cudnn_sdpa      bf16/fp16 q, k, v [B, H, S, D] -> same dtype, optional diagonal band
// ditbake::cudnn_sdpa_fp8  E4M3 q, k, v + fp32 per-tensor descales and the output scale -> E4M3 out
//
// The schemas, CPU references and fake kernels live in plugins/cudnn_sdpa.py; this file registers
// the CUDA kernels only (TORCH_LIBRARY_IMPL), so a CPU-only install never needs it. Why C++: the
// Python frontend op (plugins/attention_cudnn.py) segfaults when AOTInductor's proxy executor calls
// it back from the engine; a C++ kernel is what that executor is built to call.
//
// Band widths come in ditbake's inclusive convention (query i sees keys i - w_left .. i + w_right;
// a negative width = unbounded) and map to cuDNN's (left bound exclusive: L = w_left + 1; right
// bound inclusive: R = w_right), as plugins/attention_cudnn.py documents.
//
// Graphs are built once per (shapes, strides, dtype, band, scale, device) and cached; executing one
// binds pointers and a workspace from torch's allocator on the current stream, so a call is CUDA
// graph capturable once its graph exists.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

// The frontend resolves cuDNN and NVRTC through dlopen: NVRTC (used by its runtime-compiled
// engines) is not a link dependency of torch's, and cuDNN is the one torch already loaded.
#define NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#include <cudnn_frontend.h>
#include <dlfcn.h>

namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;  // declared by cudnn_frontend_shim.h; set before the first graph
}

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace fe = cudnn_frontend;
using TensorAttr = std::shared_ptr<fe::graph::Tensor_attributes>;

namespace {

struct Built {
    std::shared_ptr<fe::graph::Graph> graph;
    TensorAttr q, k, v, o, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, amax_s, amax_o;
    int64_t workspace = 0;
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Built>> cache;

fe::DataType_t fe_type(at::ScalarType t) {
    switch (t) {
        case at::kBFloat16: return fe::DataType_t::BFLOAT16;
        case at::kHalf: return fe::DataType_t::HALF;
        case at::kFloat8_e4m3fn: return fe::DataType_t::FP8_E4M3;
        case at::kFloat: return fe::DataType_t::FLOAT;
        default: TORCH_CHECK(false, "ditbake cudnn_sdpa: unsupported dtype ", t);
    }
}

std::vector<int64_t> vec(at::IntArrayRef a) { return std::vector<int64_t>(a.begin(), a.end()); }

TensorAttr graph_tensor(fe::graph::Graph& g, const char* name, const at::Tensor& t) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_dim(vec(t.sizes()))
                        .set_stride(vec(t.strides()))
                        .set_data_type(fe_type(t.scalar_type())));
}

TensorAttr scalar_tensor(fe::graph::Graph& g, const char* name) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_dim({1, 1, 1, 1})
                        .set_stride({1, 1, 1, 1})
                        .set_data_type(fe::DataType_t::FLOAT));
}

void check(fe::error_t status, const char* step, const std::string& key) {
    TORCH_CHECK(status.is_good(), "ditbake cudnn_sdpa: cuDNN cannot run this attention (", step, ", ", key,
                "): ", status.get_message(), "; use ditbake::head_attention for this group");
}

std::string key_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   int64_t left, int64_t right, double scale, bool fp8) {
    std::string s = fp8 ? "fp8|" : "16|";
    s += std::to_string(static_cast<int>(q.scalar_type()));
    for (const auto* t : {&q, &k, &v, &out}) {
        for (auto d : t->sizes()) s += "," + std::to_string(d);
        s += "/";
        for (auto d : t->strides()) s += "," + std::to_string(d);
        s += "|";
    }
    uint64_t scale_bits;  // exact: two scales never share a graph
    std::memcpy(&scale_bits, &scale, sizeof(scale_bits));
    s += std::to_string(left) + "," + std::to_string(right) + "|" + std::to_string(scale_bits) + "|" +
         std::to_string(q.get_device());
    return s;
}

// ditbake's inclusive widths -> cuDNN bounds; -1 = no bound on that side
std::pair<int64_t, int64_t> cudnn_bounds(int64_t w_left, int64_t w_right, int64_t seq_kv) {
    int64_t left = (w_left < 0 || w_left >= seq_kv - 1) ? -1 : w_left + 1;
    int64_t right = (w_right < 0 || w_right >= seq_kv - 1) ? -1 : w_right;
    return {left, right};
}

cudnnHandle_t current_handle() {
    static std::once_flag opened;
    std::call_once(opened, [] {
        // the library torch links (already in the process: dlopen returns its handle)
        cudnn_frontend::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_GLOBAL);
    });
    TORCH_CHECK(cudnn_frontend::cudnn_dlhandle != nullptr, "ditbake cudnn_sdpa: cannot dlopen libcudnn.so.9: ", dlerror());
    cudnnHandle_t handle = at::native::getCudnnHandle();
    TORCH_CHECK(cudnnSetStream(handle, c10::cuda::getCurrentCUDAStream()) == CUDNN_STATUS_SUCCESS,
                "ditbake cudnn_sdpa: cudnnSetStream failed");
    return handle;
}

std::shared_ptr<Built> build(cudnnHandle_t handle, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& out, int64_t left, int64_t right, double scale, bool fp8,
                             const std::string& key) {
    auto b = std::make_shared<Built>();
    b->graph = std::make_shared<fe::graph::Graph>();
    auto& g = *b->graph;
    g.set_io_data_type(fe_type(q.scalar_type()))
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    b->q = graph_tensor(g, "Q", q);
    b->k = graph_tensor(g, "K", k);
    b->v = graph_tensor(g, "V", v);
    auto attrs = fe::graph::SDPA_attributes().set_name("ditbake_sdpa").set_generate_stats(false)
                     .set_attn_scale(static_cast<float>(scale));
    if (left >= 0 || right >= 0) attrs.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT);
    if (left >= 0) attrs.set_diagonal_band_left_bound(static_cast<int>(left));
    if (right >= 0) attrs.set_diagonal_band_right_bound(static_cast<int>(right));
    if (fp8) {
        b->descale_q = scalar_tensor(g, "descale_q");
        b->descale_k = scalar_tensor(g, "descale_k");
        b->descale_v = scalar_tensor(g, "descale_v");
        b->descale_s = scalar_tensor(g, "descale_s");
        b->scale_s = scalar_tensor(g, "scale_s");
        b->scale_o = scalar_tensor(g, "scale_o");
        auto outs = g.sdpa_fp8(b->q, b->k, b->v, b->descale_q, b->descale_k, b->descale_v, b->descale_s,
                               b->scale_s, b->scale_o, attrs);
        b->o = outs[0];
        b->amax_s = outs[2];
        b->amax_o = outs[3];
        for (auto& amax : {b->amax_s, b->amax_o}) {
            amax->set_output(true).set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1}).set_data_type(fe::DataType_t::FLOAT);
        }
    } else {
        auto outs = g.sdpa(b->q, b->k, b->v, attrs);
        b->o = outs[0];
    }
    b->o->set_output(true).set_dim(vec(out.sizes())).set_stride(vec(out.strides()))
        .set_data_type(fe_type(out.scalar_type()));
    check(g.validate(), "validate", key);
    check(g.build_operation_graph(handle), "build_operation_graph", key);
    check(g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}), "create_execution_plans", key);
    check(g.check_support(handle), "check_support", key);
    check(g.build_plans(handle), "build_plans", key);
    check(g.get_workspace_size(b->workspace), "get_workspace_size", key);
    return b;
}

std::shared_ptr<Built> get(cudnnHandle_t handle, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& out, int64_t left, int64_t right, double scale, bool fp8) {
    auto key = key_of(q, k, v, out, left, right, scale, fp8);
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    auto built = build(handle, q, k, v, out, left, right, scale, fp8, key);
    cache.emplace(key, built);
    return built;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "ditbake cudnn_sdpa: q, k, v must be [B, H, S, D]");
    TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "ditbake cudnn_sdpa: CUDA tensors expected");
    TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                "ditbake cudnn_sdpa: q, k, v dtypes differ");
    TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1,
                "ditbake cudnn_sdpa: the head dim must have unit stride");
}

void execute(cudnnHandle_t handle, const Built& b, std::unordered_map<TensorAttr, void*>& pack,
             const at::Tensor& like) {
    auto workspace = at::empty({std::max<int64_t>(b.workspace, 1)}, like.options().dtype(at::kByte));
    fe::error_t status = b.graph->execute(handle, pack, workspace.data_ptr());
    TORCH_CHECK(status.is_good(), "ditbake cudnn_sdpa: execute failed: ", status.get_message());
}

at::Tensor cudnn_sdpa_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t w_left,
                           int64_t w_right, double scale) {
    check_qkv(q_in, k_in, v_in);
    c10::cuda::CUDAGuard guard(q_in.device());
    auto q = q_in, k = k_in, v = v_in;
    auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
    auto [left, right] = cudnn_bounds(w_left, w_right, k.size(2));
    auto handle = current_handle();
    auto b = get(handle, q, k, v, out, left, right, scale, false);
    std::unordered_map<TensorAttr, void*> pack = {
        {b->q, q.data_ptr()}, {b->k, k.data_ptr()}, {b->v, v.data_ptr()}, {b->o, out.data_ptr()}};
    execute(handle, *b, pack, q);
    return out;
}

// descale_* are fp32 tensors of one element (x = x8 * descale); scale_o multiplies the output
// before its E4M3 rounding. P is rounded to E4M3 after scaling by 448 (it lies in [0, 1]).
at::Tensor cudnn_sdpa_fp8_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& descale_q, const at::Tensor& descale_k, const at::Tensor& descale_v,
                               const at::Tensor& scale_o, int64_t w_left, int64_t w_right, double scale) {
    check_qkv(q, k, v);
    TORCH_CHECK(q.scalar_type() == at::kFloat8_e4m3fn, "ditbake cudnn_sdpa_fp8: q, k, v must be float8_e4m3fn");
    for (const auto* s : {&descale_q, &descale_k, &descale_v, &scale_o}) {
        TORCH_CHECK(s->scalar_type() == at::kFloat && s->numel() == 1 && s->is_cuda(),
                    "ditbake cudnn_sdpa_fp8: scales must be one-element fp32 CUDA tensors");
    }
    c10::cuda::CUDAGuard guard(q.device());
    auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
    auto f32 = q.options().dtype(at::kFloat);
    auto descale_s = at::full({1, 1, 1, 1}, 1.0f / 448.0f, f32);
    auto scale_s = at::full({1, 1, 1, 1}, 448.0f, f32);
    auto amax_s = at::empty({1, 1, 1, 1}, f32);
    auto amax_o = at::empty({1, 1, 1, 1}, f32);
    auto [left, right] = cudnn_bounds(w_left, w_right, k.size(2));
    auto handle = current_handle();
    auto b = get(handle, q, k, v, out, left, right, scale, true);
    std::unordered_map<TensorAttr, void*> pack = {
        {b->q, q.data_ptr()}, {b->k, k.data_ptr()}, {b->v, v.data_ptr()}, {b->o, out.data_ptr()},
        {b->descale_q, descale_q.data_ptr()}, {b->descale_k, descale_k.data_ptr()},
        {b->descale_v, descale_v.data_ptr()}, {b->descale_s, descale_s.data_ptr()},
        {b->scale_s, scale_s.data_ptr()}, {b->scale_o, scale_o.data_ptr()},
        {b->amax_s, amax_s.data_ptr()}, {b->amax_o, amax_o.data_ptr()}};
    execute(handle, *b, pack, q);
    return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ditbake, CUDA, m) {
    m.impl("cudnn_sdpa", &cudnn_sdpa_cuda);
    m.impl("cudnn_sdpa_fp8", &cudnn_sdpa_fp8_cuda);
}
