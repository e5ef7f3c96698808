// INT8 W8A8 GEMM on Hopper through CUTLASS 3's warp-specialized TMA kernels (sm90a):
//   out[m, n] = bf16( float(sum_k qx[m, k] * qw[n, k]) * sx[m] * sw[n] + bias[n] )
// qx [M, K] int8 row-major, qw [N, K] int8 (K contiguous: "TN"), sx fp32 [M], sw fp32 [N],
// bias bf16 [N] or null, out bf16 [M, N] row-major. int32 accumulation (exact), the epilogue in
// fp32 in the order written above, so results are bit-identical to plugins/linear_8bit.py's Triton
// kernels and to the reference up to that fp32 rounding.
//
// Why CUTLASS: Triton 3.6's Hopper INT8 GEMM pipelines TMA into wgmma but has no producer /
// consumer warp-group split or ping-pong epilogue, and reached 1,000-1,090 TOPS where cuBLASLt's FP8
// kernels reach 1,250-1,540 at the same tensor-core rate (plugins/notes/gemm_8bit_persistent.md);
// cuBLASLt's own INT8 path (torch._int_mm) is slower still on Hopper. CUTLASS's sm90 kernels have
// that machinery for INT8.
//
// The GELU variant (the up projection of a tanh-GELU MLP whose down projection is INT8 too) ends its
// epilogue with tanh-GELU (CUTLASS's GELU_taylor: the tanh form, tanh.approx.f32) before the bf16
// rounding, and reduces each row's max |GELU| into amax[m] (fp32, atomic max over the row's tiles;
// the caller zeroes it): the down projection's per-token quantization is then one streaming pass
// with no reduction. The warp-specialized epilogue runs under the next tile's main loop, which
// Triton's persistent kernel could not do (plugins/notes/gemm_8bit_persistent.md: +0.35 ms there).
//
// This header is torch-free: each gemm_w8a8_cutlass_<config>.cu instantiates one tile
// configuration (separate translation units compile in parallel), and gemm_w8a8_cutlass.cpp
// registers the torch op that picks one.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "gemm_w8a8_cutlass_api.h"

namespace ditbake_cutlass {

using namespace cute;

template <class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule, bool Gelu>
struct W8A8Gemm {
    using ElementAcc = int32_t;
    using ElementD = cutlass::bfloat16_t;
    using LayoutA = cutlass::layout::RowMajor;     // qx [M, K]
    using LayoutB = cutlass::layout::ColumnMajor;  // qw [N, K] seen as a K x N column-major B
    using LayoutD = cutlass::layout::RowMajor;
    static constexpr int AlignAB = 16;  // int8 elements per 16 bytes (TMA)
    static constexpr int AlignD = 8;    // bf16 elements per 16 bytes
    static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;

    // ((acc * sx[m]) * sw[n]) + bias[n], fp32, rounded once to bf16. A null bias pointer broadcasts 0.
    using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
    using RowScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float>;  // sx: one per m
    using ColScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float>;  // sw: one per n
    using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementD, float>;
    using TimesRow = cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, Round>, Acc, RowScale>;
    using TimesCol = cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, Round>, TimesRow, ColScale>;
    using PlusBias = cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, ElementD, float, Round>, TimesCol, Bias>;
    // GELU variant: (acc * sx * sw + bias) -> GELU -> row abs-max into amax[m] -> bf16
    using PlusBiasF32 = cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, float, float, Round>, TimesCol, Bias>;
    using GeluNode = cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::GELU_taylor, float, float, Round>, PlusBiasF32>;
    using RowAbsMax = cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90ColReduction<cutlass::maximum_absolute_value_reduction, cutlass::maximum,
                                                    cutlass::atomic_maximum, 0, TileShape, float, float, Round>,
        GeluNode>;
    using GeluOut = cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::Identity, ElementD, float, Round>, RowAbsMax>;
    using Epilogue = cute::conditional_t<Gelu, GeluOut, PlusBias>;

    using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
        void, LayoutD, AlignD,  // no C operand
        ElementD, LayoutD, AlignD, EpilogueSchedule, Epilogue>::CollectiveOp;

    using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
        int8_t, LayoutA, AlignAB, int8_t, LayoutB, AlignAB, ElementAcc, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<
            static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
        MainloopSchedule>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<
        Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

    static typename Gemm::Arguments arguments(const W8A8Problem& p) {
        using StrideA = typename Kernel::StrideA;
        using StrideB = typename Kernel::StrideB;
        using StrideD = typename Kernel::StrideD;
        auto stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(p.m, p.k, 1));
        auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(p.n, p.k, 1));
        auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(p.m, p.n, 1));
        typename Gemm::Arguments args{
            cutlass::gemm::GemmUniversalMode::kGemm,
            {p.m, p.n, p.k, 1},
            {static_cast<const int8_t*>(p.qx), stride_a, static_cast<const int8_t*>(p.qw), stride_b},
            {{}, nullptr, stride_d, static_cast<ElementD*>(p.out), stride_d},
        };
        args.hw_info.device_id = p.device;
        args.hw_info.sm_count = p.sm_count;
        // EVT arguments nest as the tree does: {children..., op}
        typename TimesCol::Arguments times_col{
            {                                               // TimesRow
                {},                                         //   acc
                {static_cast<const float*>(p.sx)},          //   sx
                {}},                                        //   multiplies
            {static_cast<const float*>(p.sw)},              // sw
            {}};                                            // multiplies
        typename Bias::Arguments bias{static_cast<const ElementD*>(p.bias), ElementD(0)};  // null: 0
        if constexpr (Gelu) {
            args.epilogue.thread = {
                {                                           // RowAbsMax
                    {                                       //   GeluNode
                        {times_col, bias, {}},              //     PlusBiasF32
                        {}},                                //     GELU
                    {p.amax, 0.f}},                         //   reduction into amax (zeroed by the caller)
                {}};                                        // to bf16
        } else {
            args.epilogue.thread = {times_col, bias, {}};
        }
        return args;
    }

    static W8A8Status workspace_size(const W8A8Problem& p, size_t* bytes) {
        auto args = arguments(p);
        if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return W8A8Status::kUnsupported;
        *bytes = Gemm::get_workspace_size(args);
        return W8A8Status::kOk;
    }

    static W8A8Status run(const W8A8Problem& p, void* workspace, cudaStream_t stream) {
        auto args = arguments(p);
        Gemm gemm;
        if (gemm.can_implement(args) != cutlass::Status::kSuccess) return W8A8Status::kUnsupported;
        if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return W8A8Status::kInitFailed;
        if (gemm.run(stream) != cutlass::Status::kSuccess) return W8A8Status::kLaunchFailed;
        return W8A8Status::kOk;
    }
};

}  // namespace ditbake_cutlass

// One exported pair per configuration, defined in its own translation unit.
#define DITBAKE_W8A8_CONFIG(NAME, TILE, CLUSTER, MAINLOOP, EPILOGUE, GELU)                                 \
    using NAME##_gemm = ditbake_cutlass::W8A8Gemm<TILE, CLUSTER, MAINLOOP, EPILOGUE, GELU>;                  \
    W8A8Status ditbake_w8a8_##NAME##_workspace(const W8A8Problem& p, size_t* bytes) {                       \
        return NAME##_gemm::workspace_size(p, bytes);                                                         \
    }                                                                                                         \
    W8A8Status ditbake_w8a8_##NAME##_run(const W8A8Problem& p, void* workspace, cudaStream_t stream) {     \
        return NAME##_gemm::run(p, workspace, stream);                                                        \
    }
