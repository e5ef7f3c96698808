// The torch-free interface between gemm_w8a8_cutlass.cpp (the torch op) and the CUTLASS
// translation units (one per tile configuration, see gemm_w8a8_cutlass.cuh).
#pragma once

#include <cuda_runtime.h>
#include <cstddef>

struct W8A8Problem {
    const void* qx;    // int8 [M, K], row-major
    const void* sx;    // fp32 [M]
    const void* qw;    // int8 [N, K], row-major
    const void* sw;    // fp32 [N]
    const void* bias;  // bf16 [N] or nullptr
    void* out;         // bf16 [M, N], row-major
    float* amax;       // GELU variants: fp32 [M], zeroed; receives max |GELU| per row (else unused)
    int m, n, k;
    int device, sm_count;
};

enum class W8A8Status : int { kOk = 0, kUnsupported = 1, kInitFailed = 2, kLaunchFailed = 3 };

// Configurations, in the order of the op's `config` argument (1-based; 0 lets the op choose).
#define DITBAKE_W8A8_DECLARE(NAME)                                                                       \
    W8A8Status ditbake_w8a8_##NAME##_workspace(const W8A8Problem& p, size_t* bytes);                     \
    W8A8Status ditbake_w8a8_##NAME##_run(const W8A8Problem& p, void* workspace, cudaStream_t stream);
DITBAKE_W8A8_DECLARE(coop_128x256)
DITBAKE_W8A8_DECLARE(pingpong_128x128)
DITBAKE_W8A8_DECLARE(coop_256x128)
// GELU variants (same numbering from 1, for ditbake::gemm_w8a8_gelu_cutlass)
DITBAKE_W8A8_DECLARE(gelu_coop_128x256)
DITBAKE_W8A8_DECLARE(gelu_pingpong_128x128)
#undef DITBAKE_W8A8_DECLARE
