// Row-tile scheduling of the grouped GEMM on CUDA (kernels/cuda/grouped_gemm.cu),
// as plain arithmetic usable from the host (tests) and the device (the kernel).
//
// Each group (expert) owns the rows [row_offsets[g], row_offsets[g + 1]) and
// is cut into row tiles of bm rows; the last tile of a group may be partial,
// an empty group has none. Tiles are numbered group after group. The offsets
// live on the device, so the grid is sized from host values only:
// RowTileBound(max_rows, num_groups, bm) tiles, of which those past the real
// total map to no group and do nothing.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JOULE_HD __host__ __device__
#else
#define JOULE_HD
#endif

namespace joule::kernels::cuda {

// The rows of one row tile: [row_begin, row_end) of group `group`; group -1
// (and an empty range) when the tile index lies past every group's tiles.
struct RowTile {
  int group = -1;
  int64_t row_begin = 0;
  int64_t row_end = 0;
};

// Tile heights: 16 rows for decode (1-8 rows per expert: less wasted MMA work,
// more CTAs streaming weights), 64 for prefill (fewer re-reads of the weights).
inline constexpr int kDecodeTileRows = 16;
inline constexpr int kPrefillTileRows = 64;

// The tile height for a launch bounded by max_rows: decode while the groups
// average at most kDecodeTileRows rows.
JOULE_HD inline int RowTileHeight(int64_t max_rows, int num_groups) {
  return max_rows <= int64_t{kDecodeTileRows} * num_groups ? kDecodeTileRows : kPrefillTileRows;
}

// Row tiles of a group with `rows` rows (0 for an empty or malformed group).
JOULE_HD inline int64_t RowTilesInGroup(int64_t rows, int bm) {
  return rows <= 0 ? 0 : (rows + bm - 1) / bm;
}

// Upper bound on the row tiles of any offsets with row_offsets[num_groups] <=
// max_rows: sum_g ceil(r_g / bm) <= sum_g (floor(r_g / bm) + 1)
// <= floor(total / bm) + num_groups, since every group adds at most one partial tile.
JOULE_HD inline int64_t RowTileBound(int64_t max_rows, int num_groups, int bm) {
  return RowTilesInGroup(max_rows, bm) + (num_groups > 0 ? num_groups : 0);
}

// Whether linear tile `tile` belongs to the group with rows [begin, end), whose
// first tile has index tiles_before; if so, fills *out with that tile's rows.
JOULE_HD inline bool TileInGroup(int64_t tile, int64_t tiles_before, int group, int64_t begin,
                                 int64_t end, int bm, RowTile* out) {
  const int64_t local = tile - tiles_before;
  if (local < 0 || local >= RowTilesInGroup(end - begin, bm)) return false;
  out->group = group;
  out->row_begin = begin + local * bm;
  const int64_t tile_end = out->row_begin + bm;
  out->row_end = tile_end < end ? tile_end : end;
  return true;
}

// Serial form of the kernel's lookup (which scans the groups block-wide):
// the tile's rows, or group -1 past the last tile. row_offsets has num_groups + 1 entries.
JOULE_HD inline RowTile FindRowTile(const int64_t* row_offsets, int num_groups, int bm,
                                    int64_t tile) {
  RowTile found;
  int64_t tiles_before = 0;
  for (int g = 0; g < num_groups; ++g) {
    const int64_t begin = row_offsets[g];
    const int64_t end = row_offsets[g + 1];
    if (TileInGroup(tile, tiles_before, g, begin, end, bm, &found)) return found;
    tiles_before += RowTilesInGroup(end - begin, bm);
  }
  return RowTile{};
}

}  // namespace joule::kernels::cuda
