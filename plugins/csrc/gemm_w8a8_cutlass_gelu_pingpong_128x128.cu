// GELU + row abs-max epilogue (gemm_w8a8_cutlass.cuh). Ping-pong: two consumer warp groups alternate 128 x 128 tiles, one's epilogue under the other's MMAs.
#include "gemm_w8a8_cutlass.cuh"

namespace {
using Tile = cute::Shape<cute::_128, cute::_128, cute::_128>;
using Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;
}  // namespace

DITBAKE_W8A8_CONFIG(gelu_pingpong_128x128, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized, true)
