// ditbake::gemm_w8a8_cutlass as a C++ torch op (CUDA kernel only; the schema, CPU reference and
// fake kernel are registered in plugins/gemm_w8a8_cutlass.py). A C++ kernel is what AOTInductor's
// proxy executor calls from inside an engine without Python.
//
// config: 0 picks by shape (the table in plugins/gemm_w8a8_cutlass.py, measured on the H200), 1..3 names
// one of gemm_w8a8_cutlass_api.h's configurations (benchmarks sweep them).
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
constexpr int64_t kNumConfigs = sizeof(kConfigs) / sizeof(kConfigs[0]);

// Measured choice (plugins/notes/gemm_w8a8_cutlass.md); any configuration is correct for any shape.
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

int64_t auto_config(int64_t m, int64_t n, int64_t k) {
    (void)m;
    (void)k;
    return n >= 4096 ? 1 : 3;
}

at::Tensor gemm_w8a8_cutlass_cuda(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& qw,
                                  const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t config) {
    TORCH_CHECK(qx.dim() == 2 && qw.dim() == 2, "gemm_w8a8_cutlass: qx and qw must be 2-D, got ", qx.sizes(), " and ", qw.sizes());
    TORCH_CHECK(qx.scalar_type() == at::kChar && qw.scalar_type() == at::kChar, "gemm_w8a8_cutlass: qx and qw must be int8");
    const int64_t m = qx.size(0), k = qx.size(1), n = qw.size(0);
    TORCH_CHECK(qw.size(1) == k, "gemm_w8a8_cutlass: qx has K=", k, " but qw has K=", qw.size(1));
    TORCH_CHECK(k % 16 == 0 && n % 8 == 0, "gemm_w8a8_cutlass: needs K % 16 == 0 and N % 8 == 0 (TMA), got K=", k, " N=", n);
    TORCH_CHECK(qx.is_contiguous() && qw.is_contiguous(), "gemm_w8a8_cutlass: qx and qw must be contiguous");
    TORCH_CHECK(sx.scalar_type() == at::kFloat && sx.numel() == m && sx.is_contiguous(), "gemm_w8a8_cutlass: sx must be contiguous fp32 [M]");
    TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == n && w_scale.is_contiguous(),
                "gemm_w8a8_cutlass: w_scale must be contiguous fp32 [N]");
    TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "gemm_w8a8_cutlass: sizes must fit int32");
    const void* bias_ptr = nullptr;
    if (bias.has_value()) {
        TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == n && bias->is_contiguous(),
                    "gemm_w8a8_cutlass: bias must be contiguous bf16 [N]");
        bias_ptr = bias->data_ptr();
    }
    for (const at::Tensor* t : {&qx, &sx, &qw, &w_scale}) {
        TORCH_CHECK(t->is_cuda() && t->device() == qx.device(), "gemm_w8a8_cutlass: every tensor must be on ", qx.device());
    }
    TORCH_CHECK(config >= 0 && config <= kNumConfigs, "gemm_w8a8_cutlass: config must be 0 (auto) .. ", kNumConfigs, ", got ", config);
    const Config& cfg = kConfigs[(config == 0 ? auto_config(m, n, k) : config) - 1];

    c10::cuda::CUDAGuard guard(qx.device());
    at::Tensor out = at::empty({m, n}, qx.options().dtype(at::kBFloat16));
    if (m == 0 || n == 0) return out;
    const int device = qx.get_device();
    W8A8Problem p{qx.data_ptr(), sx.data_ptr(), qw.data_ptr(), w_scale.data_ptr(), bias_ptr, out.data_ptr(),
                  static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), device,
                  sm_count(device)};
    if (k == 0) {  // an empty sum: the bias alone
        out.zero_();
        if (bias.has_value()) out.add_(bias->view({1, n}));
        return out;
    }
    size_t bytes = 0;
    TORCH_CHECK(cfg.workspace(p, &bytes) == W8A8Status::kOk, "gemm_w8a8_cutlass: ", cfg.name, " cannot run M=", m, " N=", n, " K=", k);
    // from torch's allocator on the current stream: capturable in a CUDA graph
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, qx.options().dtype(at::kByte));
    const W8A8Status status = cfg.run(p, bytes ? workspace.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == W8A8Status::kOk, "gemm_w8a8_cutlass: ", cfg.name, " failed (status ", static_cast<int>(status), ")");
    return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ditbake, CUDA, m) {
    m.impl("gemm_w8a8_cutlass", &gemm_w8a8_cutlass_cuda);
}
