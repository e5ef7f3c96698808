// Cooperative 256 x 128 tile, cluster 1 x 2 multicasts each activation tile: narrow outputs (N = 1536).
#include "gemm_w8a8_cutlass.cuh"

namespace {
using Tile = cute::Shape<cute::_256, cute::_128, cute::_128>;
using Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;
}  // namespace

DITBAKE_W8A8_CONFIG(coop_256x128, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, false)
