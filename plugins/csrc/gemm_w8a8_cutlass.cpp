// ditbake::gemm_w8a8_cutlass as a C++ torch op (CUDA kernel only; the schema, CPU reference and
// fake kernel are registered in plugins/gemm_w8a8_cutlass.py). A C++ kernel is what AOTInductor's
// proxy executor calls from inside an engine without Python.
//
// ditbake::gemm_w8a8_gelu_cutlass: the same product with GELU and each row's max |GELU| in the epilogue
// (gemm_w8a8_cutlass.cuh), returning (bf16 out, fp32 amax [M]).
//
// config: 0 picks by shape (auto_config, measured on the H200), 1.. names one of
// gemm_w8a8_cutlass_api.h's configurations of that op (benchmarks sweep them).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "gemm_w8a8_cutlass_api.h"

namespace {

using WorkspaceFn = W8A8Status (*)(const W8A8Problem&, size_t*);
using RunFn = W8A8Status (*)(const W8A8Problem&, void*, cudaStream_t);

struct Config {
    const char* name;
    WorkspaceFn workspace;
    RunFn run;
};

const Config kConfigs[] = {
    {"coop_128x256", ditbake_w8a8_coop_128x256_workspace, ditbake_w8a8_coop_128x256_run},
    {"pingpong_128x128", ditbake_w8a8_pingpong_128x128_workspace, ditbake_w8a8_pingpong_128x128_run},
    {"coop_256x128", ditbake_w8a8_coop_256x128_workspace, ditbake_w8a8_coop_256x128_run},
};
const Config kGeluConfigs[] = {
    {"gelu_coop_128x256", ditbake_w8a8_gelu_coop_128x256_workspace, ditbake_w8a8_gelu_coop_128x256_run},
    {"gelu_pingpong_128x128", ditbake_w8a8_gelu_pingpong_128x128_workspace, ditbake_w8a8_gelu_pingpong_128x128_run},
};

int sm_count(int device) {
    static int counts[64] = {0};  // per device, read once (a benign race: every writer stores the same value)
    TORCH_CHECK(device >= 0 && device < 64, "gemm_w8a8_cutlass: device index ", device, " out of range");
    if (counts[device] == 0) {
        int sms = 0;
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        counts[device] = sms;
    }
    return counts[device];
}

// Measured choice (H200, M = 32,760; plugins/notes/gemm_w8a8_cutlass.md): ping-pong 128 x 128 at Wan's
// 1536 -> 1536 and 1536 -> 8960, cooperative 128 x 256 for the long-K down projection (8960 -> 1536).
// Any configuration is correct for any shape.
int64_t auto_config(int64_t k) { return k >= 4096 ? 1 : 2; }

// Checks shared by both ops; returns the bias pointer (or null).
const void* check_operands(const char* op, const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& qw,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
    TORCH_CHECK(qx.dim() == 2 && qw.dim() == 2, op, ": qx and qw must be 2-D, got ", qx.sizes(), " and ", qw.sizes());
    TORCH_CHECK(qx.scalar_type() == at::kChar && qw.scalar_type() == at::kChar, op, ": qx and qw must be int8");
    const int64_t m = qx.size(0), k = qx.size(1), n = qw.size(0);
    TORCH_CHECK(qw.size(1) == k, op, ": qx has K=", k, " but qw has K=", qw.size(1));
    TORCH_CHECK(k % 16 == 0 && n % 8 == 0, op, ": needs K % 16 == 0 and N % 8 == 0 (TMA), got K=", k, " N=", n);
    TORCH_CHECK(qx.is_contiguous() && qw.is_contiguous(), op, ": qx and qw must be contiguous");
    TORCH_CHECK(sx.scalar_type() == at::kFloat && sx.numel() == m && sx.is_contiguous(), op, ": sx must be contiguous fp32 [M]");
    TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == n && w_scale.is_contiguous(),
                op, ": w_scale must be contiguous fp32 [N]");
    TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, op, ": sizes must fit int32");
    for (const at::Tensor* t : {&qx, &sx, &qw, &w_scale}) {
        TORCH_CHECK(t->is_cuda() && t->device() == qx.device(), op, ": every tensor must be on ", qx.device());
    }
    if (!bias.has_value()) return nullptr;
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == n && bias->is_contiguous() &&
                bias->device() == qx.device(), op, ": bias must be contiguous bf16 [N] on ", qx.device());
    return bias->data_ptr();
}

void launch(const char* op, const Config& cfg, W8A8Problem& p, const at::Tensor& like) {
    size_t bytes = 0;
    TORCH_CHECK(cfg.workspace(p, &bytes) == W8A8Status::kOk, op, ": ", cfg.name, " cannot run M=", p.m, " N=", p.n, " K=", p.k);
    // from torch's allocator on the current stream: capturable in a CUDA graph
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
    const W8A8Status status = cfg.run(p, bytes ? workspace.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == W8A8Status::kOk, op, ": ", cfg.name, " failed (status ", static_cast<int>(status), ")");
}

W8A8Problem problem(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& qw, const at::Tensor& w_scale,
                    const void* bias, at::Tensor& out, float* amax) {
    const int device = qx.get_device();
    return W8A8Problem{qx.data_ptr(), sx.data_ptr(), qw.data_ptr(), w_scale.data_ptr(), bias, out.data_ptr(), amax,
                       static_cast<int>(qx.size(0)), static_cast<int>(qw.size(0)), static_cast<int>(qx.size(1)),
                       device, sm_count(device)};
}

at::Tensor gemm_w8a8_cutlass_cuda(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& qw,
                                  const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t config) {
    constexpr const char* op = "gemm_w8a8_cutlass";
    const void* bias_ptr = check_operands(op, qx, sx, qw, w_scale, bias);
    constexpr int64_t count = sizeof(kConfigs) / sizeof(kConfigs[0]);
    TORCH_CHECK(config >= 0 && config <= count, op, ": config must be 0 (auto) .. ", count, ", got ", config);
    const int64_t m = qx.size(0), k = qx.size(1), n = qw.size(0);
    c10::cuda::CUDAGuard guard(qx.device());
    at::Tensor out = at::empty({m, n}, qx.options().dtype(at::kBFloat16));
    if (m == 0 || n == 0) return out;
    if (k == 0) {  // an empty sum: the bias alone
        out.zero_();
        if (bias.has_value()) out.add_(bias->view({1, n}));
        return out;
    }
    W8A8Problem p = problem(qx, sx, qw, w_scale, bias_ptr, out, nullptr);
    launch(op, kConfigs[(config == 0 ? auto_config(k) : config) - 1], p, qx);
    return out;
}

std::tuple<at::Tensor, at::Tensor> gemm_w8a8_gelu_cutlass_cuda(const at::Tensor& qx, const at::Tensor& sx,
                                                               const at::Tensor& qw, const at::Tensor& w_scale,
                                                               const std::optional<at::Tensor>& bias, int64_t config) {
    constexpr const char* op = "gemm_w8a8_gelu_cutlass";
    const void* bias_ptr = check_operands(op, qx, sx, qw, w_scale, bias);
    constexpr int64_t count = sizeof(kGeluConfigs) / sizeof(kGeluConfigs[0]);
    TORCH_CHECK(config >= 0 && config <= count, op, ": config must be 0 (auto) .. ", count, ", got ", config);
    const int64_t m = qx.size(0), k = qx.size(1), n = qw.size(0);
    TORCH_CHECK(k > 0, op, ": K must be positive");
    c10::cuda::CUDAGuard guard(qx.device());
    at::Tensor out = at::empty({m, n}, qx.options().dtype(at::kBFloat16));
    at::Tensor amax = at::zeros({m}, qx.options().dtype(at::kFloat));  // the reduction's identity
    if (m == 0 || n == 0) return {out, amax};
    W8A8Problem p = problem(qx, sx, qw, w_scale, bias_ptr, out, amax.data_ptr<float>());
    launch(op, kGeluConfigs[config == 0 ? 1 : config - 1], p, qx);
    return {out, amax};
}

}  // namespace

TORCH_LIBRARY_IMPL(ditbake, CUDA, m) {
    m.impl("gemm_w8a8_cutlass", &gemm_w8a8_cutlass_cuda);
    m.impl("gemm_w8a8_gelu_cutlass", &gemm_w8a8_gelu_cutlass_cuda);
}
