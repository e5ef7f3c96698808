// Cooperative: two consumer warp groups share one 128 x 256 tile; cluster 2 x 1 multicasts each weight tile.
#include "gemm_w8a8_cutlass.cuh"

namespace {
using Tile = cute::Shape<cute::_128, cute::_256, cute::_128>;
using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
}  // namespace

DITBAKE_W8A8_CONFIG(coop_128x256, Tile, Cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, false)
