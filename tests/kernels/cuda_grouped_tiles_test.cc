// The row-tile scheduling of the CUDA grouped GEMM (kernels/cuda/grouped_tiles.h),
// on the host: every row of every group is computed by exactly one tile, empty
// groups get none, tiles past the total map to nothing, and the grid bound
// that the launch computes from max_rows alone always covers the real tiles.
#include "kernels/cuda/grouped_tiles.h"

#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace joule::kernels::cuda {
namespace {

// Offsets of `groups` groups with random sizes in [0, max_group_rows]; about a
// third of the groups are empty.
std::vector<int64_t> RandomOffsets(int groups, int64_t max_group_rows, std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> rows(0, max_group_rows);
  std::uniform_int_distribution<int> empty(0, 2);
  std::vector<int64_t> offsets(groups + 1, 0);
  for (int g = 0; g < groups; ++g) {
    offsets[g + 1] = offsets[g] + (empty(rng) == 0 ? 0 : rows(rng));
  }
  return offsets;
}

// Walks every tile index the grid launches for `max_rows` and checks the
// coverage of the real rows.
void CheckCoverage(const std::vector<int64_t>& offsets, int bm, int64_t max_rows) {
  const int groups = static_cast<int>(offsets.size()) - 1;
  const int64_t total = offsets.back();
  ASSERT_LE(total, max_rows);
  const int64_t bound = RowTileBound(max_rows, groups, bm);
  std::vector<int> covered(total, 0);
  std::vector<int> tiles_of_group(groups, 0);
  int64_t real_tiles = 0;
  bool past_end = false;
  for (int64_t tile = 0; tile < bound; ++tile) {
    const RowTile t = FindRowTile(offsets.data(), groups, bm, tile);
    if (t.group < 0) {
      past_end = true;
      continue;
    }
    // Real tiles come first, then only empty ones: the kernel's early exit
    // leaves no gap.
    ASSERT_FALSE(past_end) << "tile " << tile << " maps to a group after an empty tile";
    ++real_tiles;
    ++tiles_of_group[t.group];
    ASSERT_LT(t.group, groups);
    ASSERT_GE(t.row_begin, offsets[t.group]) << "tile " << tile;
    ASSERT_LE(t.row_end, offsets[t.group + 1]) << "tile " << tile;
    ASSERT_LT(t.row_begin, t.row_end) << "tile " << tile << " has no rows";
    ASSERT_LE(t.row_end - t.row_begin, bm) << "tile " << tile;
    for (int64_t r = t.row_begin; r < t.row_end; ++r) ++covered[r];
  }
  for (int64_t r = 0; r < total; ++r) {
    ASSERT_EQ(covered[r], 1) << "row " << r << " (bm=" << bm << ")";
  }
  for (int g = 0; g < groups; ++g) {
    const int64_t rows = offsets[g + 1] - offsets[g];
    EXPECT_EQ(tiles_of_group[g], RowTilesInGroup(rows, bm)) << "group " << g;
    if (rows == 0) {
      EXPECT_EQ(tiles_of_group[g], 0) << "empty group " << g;
    }
  }
  // Tiles past the bound (none are launched) also map to nothing.
  EXPECT_LT(FindRowTile(offsets.data(), groups, bm, bound).group, 0);
  EXPECT_LT(FindRowTile(offsets.data(), groups, bm, real_tiles).group, 0);
}

TEST(GroupedTiles, TilesPerGroup) {
  EXPECT_EQ(RowTilesInGroup(0, 16), 0);
  EXPECT_EQ(RowTilesInGroup(-3, 16), 0);
  EXPECT_EQ(RowTilesInGroup(1, 16), 1);
  EXPECT_EQ(RowTilesInGroup(16, 16), 1);
  EXPECT_EQ(RowTilesInGroup(17, 16), 2);
  EXPECT_EQ(RowTilesInGroup(128, 64), 2);
}

TEST(GroupedTiles, TileHeightFollowsRowsPerGroup) {
  EXPECT_EQ(RowTileHeight(8, 8), kDecodeTileRows);    // one token, top-8 of 8 local experts
  EXPECT_EQ(RowTileHeight(128, 8), kDecodeTileRows);  // 16 rows per group on average
  EXPECT_EQ(RowTileHeight(129, 8), kPrefillTileRows);
  EXPECT_EQ(RowTileHeight(4096, 128), kPrefillTileRows);
}

TEST(GroupedTiles, BoundAddsOnePartialTilePerGroup) {
  EXPECT_EQ(RowTileBound(0, 0, 16), 0);
  EXPECT_EQ(RowTileBound(0, 8, 16), 8);
  EXPECT_EQ(RowTileBound(33, 4, 16), 3 + 4);
  // Worst case it must cover: every group one row past a whole tile.
  const std::vector<int64_t> offsets = {0, 17, 34, 51};
  EXPECT_EQ(RowTilesInGroup(17, 16) * 3, 6);
  EXPECT_GE(RowTileBound(offsets.back(), 3, 16), 6);
  CheckCoverage(offsets, 16, offsets.back());
}

TEST(GroupedTiles, FindsTheTileRows) {
  // Groups of 3, 0, 20 and 1 rows with 16-row tiles: tiles
  // 0 -> g0 [0, 3), 1 -> g2 [3, 19), 2 -> g2 [19, 23), 3 -> g3 [23, 24).
  const std::vector<int64_t> offsets = {0, 3, 3, 23, 24};
  const struct {
    int64_t tile;
    int group;
    int64_t begin, end;
  } want[] = {{0, 0, 0, 3}, {1, 2, 3, 19}, {2, 2, 19, 23}, {3, 3, 23, 24}, {4, -1, 0, 0}};
  for (const auto& w : want) {
    const RowTile t = FindRowTile(offsets.data(), 4, 16, w.tile);
    EXPECT_EQ(t.group, w.group) << "tile " << w.tile;
    EXPECT_EQ(t.row_begin, w.begin) << "tile " << w.tile;
    EXPECT_EQ(t.row_end, w.end) << "tile " << w.tile;
  }
}

TEST(GroupedTiles, AllGroupsEmpty) {
  const std::vector<int64_t> offsets(9, 0);
  for (int64_t tile = 0; tile < RowTileBound(64, 8, 16); ++tile) {
    EXPECT_LT(FindRowTile(offsets.data(), 8, 16, tile).group, 0) << "tile " << tile;
  }
}

TEST(GroupedTiles, RandomOffsetsAreCoveredExactlyOnce) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int groups = std::uniform_int_distribution<int>(1, 300)(rng);
    const int64_t max_group_rows = trial % 2 == 0 ? 9 : 300;  // decode-like, prefill-like
    const std::vector<int64_t> offsets = RandomOffsets(groups, max_group_rows, rng);
    // A launch bound from the real total, and a looser one (tokens * top_k
    // before some rows went to other ranks).
    const int64_t slack = std::uniform_int_distribution<int64_t>(0, 500)(rng);
    for (int bm : {1, 16, 64, 7}) {
      SCOPED_TRACE(testing::Message() << "trial " << trial << " groups " << groups << " bm " << bm);
      CheckCoverage(offsets, bm, offsets.back());
      CheckCoverage(offsets, bm, offsets.back() + slack);
    }
  }
}

}  // namespace
}  // namespace joule::kernels::cuda
