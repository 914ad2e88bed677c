// The host-testable arithmetic of the CUDA paged attention kernels
// (kernels/cuda/attention_math.h): sequence lookup, visible keys, split-K
// ranges, the workspace layout, merging online-softmax states and BF16
// rounding. Runs on every CI host; the kernels call these same functions.
#include "kernels/cuda/attention_math.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace joule::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------
// FindSequence
// ---------------------------------------------------------------------------

TEST(FindSequenceTest, SkipsSequencesWithoutQueriesAndRowsOutsideAll) {
  // Sequence 1 has no queries; rows 9.. are graph padding.
  const std::vector<int32_t> query_start = {0, 3, 3, 4, 9};
  const int num_seqs = 4;
  const std::vector<int> want = {0, 0, 0, 2, 3, 3, 3, 3, 3};
  for (int64_t row = 0; row < 9; ++row) {
    EXPECT_EQ(FindSequence(query_start.data(), num_seqs, row), want[row]) << "row " << row;
  }
  EXPECT_EQ(FindSequence(query_start.data(), num_seqs, 9), -1);
  EXPECT_EQ(FindSequence(query_start.data(), num_seqs, 1000), -1);
  EXPECT_EQ(FindSequence(query_start.data(), num_seqs, -1), -1);
}

TEST(FindSequenceTest, RowsBeforeANonZeroFirstStartAndNoSequences) {
  const std::vector<int32_t> query_start = {2, 5};
  EXPECT_EQ(FindSequence(query_start.data(), 1, 1), -1);
  EXPECT_EQ(FindSequence(query_start.data(), 1, 2), 0);
  EXPECT_EQ(FindSequence(query_start.data(), 1, 4), 0);
  EXPECT_EQ(FindSequence(query_start.data(), 1, 5), -1);
  EXPECT_EQ(FindSequence(query_start.data(), 0, 0), -1);
}

TEST(FindSequenceTest, AgreesWithALinearScanOnRandomBatches) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int num_seqs = 1 + static_cast<int>(rng() % 40);
    std::vector<int32_t> query_start = {static_cast<int32_t>(rng() % 3)};
    for (int s = 0; s < num_seqs; ++s) {
      const int q_len = rng() % 3 == 0 ? 0 : static_cast<int>(rng() % 9);  // many empty ones
      query_start.push_back(query_start.back() + q_len);
    }
    for (int64_t row = 0; row < query_start.back() + 2; ++row) {
      int want = -1;
      for (int s = 0; s < num_seqs; ++s) {
        if (query_start[s] <= row && row < query_start[s + 1]) want = s;
      }
      ASSERT_EQ(FindSequence(query_start.data(), num_seqs, row), want)
          << "trial " << trial << " row " << row;
    }
  }
}

// ---------------------------------------------------------------------------
// VisibleKeys
// ---------------------------------------------------------------------------

constexpr int64_t kNoCapacityLimit = int64_t{1} << 40;

TEST(VisibleKeysTest, DecodePrefillChunkAndWindow) {
  KeyRange r = VisibleKeys(10, 1, 0, 0, kNoCapacityLimit);  // decode at position 9
  EXPECT_EQ(r.begin, 0);
  EXPECT_EQ(r.end, 10);
  r = VisibleKeys(20, 5, 0, 0, kNoCapacityLimit);  // first query of a chunk: position 15
  EXPECT_EQ(r.begin, 0);
  EXPECT_EQ(r.end, 16);
  r = VisibleKeys(20, 5, 4, 0, kNoCapacityLimit);
  EXPECT_EQ(r.end, 20);
  r = VisibleKeys(20, 1, 0, 7, kNoCapacityLimit);  // the last 7 keys: 13..19
  EXPECT_EQ(r.begin, 13);
  EXPECT_EQ(r.end, 20);
  r = VisibleKeys(5, 5, 2, 7, kNoCapacityLimit);  // window longer than the prefix
  EXPECT_EQ(r.begin, 0);
  EXPECT_EQ(r.end, 3);
}

TEST(VisibleKeysTest, NoKeyIsAnEmptyRangeNeverANegativeOne) {
  EXPECT_EQ(VisibleKeys(0, 1, 0, 0, kNoCapacityLimit).size(), 0);  // padding sequence
  EXPECT_EQ(VisibleKeys(0, 1, 0, 4, kNoCapacityLimit).size(), 0);
  EXPECT_EQ(VisibleKeys(2, 6, 0, 0, kNoCapacityLimit).size(), 0);  // q_len > context_len
  EXPECT_EQ(VisibleKeys(2, 6, 0, 3, kNoCapacityLimit).size(), 0);
  EXPECT_EQ(VisibleKeys(10, 1, 0, 0, 0).size(), 0);
}

TEST(VisibleKeysTest, EndIsClampedToTheBlockTableCapacity) {
  const KeyRange r = VisibleKeys(100, 1, 0, 0, 64);
  EXPECT_EQ(r.begin, 0);
  EXPECT_EQ(r.end, 64);
}

// Against the definition: key j is visible when j <= position, it is within the
// window, and the block table has room for it.
TEST(VisibleKeysTest, MatchesTheDefinitionKeyByKey) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 3000; ++trial) {
    const int64_t context_len = rng() % 50;
    const int64_t q_len = 1 + rng() % 8;
    const int64_t i = rng() % q_len;
    const int window = rng() % 2 == 0 ? 0 : static_cast<int>(1 + rng() % 20);
    const int64_t capacity = rng() % 4 == 0 ? static_cast<int64_t>(rng() % 60) : kNoCapacityLimit;
    const KeyRange r = VisibleKeys(context_len, q_len, i, window, capacity);
    ASSERT_LE(r.begin, r.end);
    const int64_t position = context_len - q_len + i;
    for (int64_t j = -2; j < 70; ++j) {
      const bool want = j >= 0 && j <= position && (window == 0 || j > position - window) &&
                        j < capacity;
      const bool got = j >= r.begin && j < r.end;
      ASSERT_EQ(got, want) << "ctx " << context_len << " q_len " << q_len << " i " << i
                           << " window " << window << " capacity " << capacity << " key " << j;
    }
  }
}

// ---------------------------------------------------------------------------
// Split count, split ranges, workspace layout
// ---------------------------------------------------------------------------

TEST(NumAttentionSplitsTest, SplitsOnlyFewRowsWithLongContexts) {
  EXPECT_EQ(NumAttentionSplits(1, 32, kMinKeysPerSplit), 1);  // short context
  EXPECT_EQ(NumAttentionSplits(4096, 32, 100000), 1);         // prefill: rows enough
  EXPECT_EQ(NumAttentionSplits(0, 32, 100000), 1);
  EXPECT_EQ(NumAttentionSplits(1, 32, 4096), 16);  // one decode row: 4096 / 256 keys
  EXPECT_EQ(NumAttentionSplits(1, 32, 1 << 20), kMaxAttentionSplits);
  // 64 decode rows x 32 heads = 2048 head rows: two splits reach the target.
  EXPECT_EQ(NumAttentionSplits(64, 32, 1 << 20), 2);
}

TEST(NumAttentionSplitsTest, BoundedAndMonotone) {
  for (int64_t tokens : {1, 2, 3, 7, 16, 100, 1000}) {
    for (int heads : {1, 8, 32, 64}) {
      int previous = 1;
      for (int64_t ctx = 0; ctx < 40000; ctx += 97) {
        const int splits = NumAttentionSplits(tokens, heads, ctx);
        ASSERT_GE(splits, 1);
        ASSERT_LE(splits, kMaxAttentionSplits);
        // Never so many splits that one gets fewer than kMinKeysPerSplit of
        // the longest context (short rows may still leave splits empty).
        ASSERT_LE(splits, std::max<int64_t>(1, (ctx + kMinKeysPerSplit - 1) / kMinKeysPerSplit));
        ASSERT_GE(splits, previous) << "longer contexts never split less";
        ASSERT_LE(splits, NumAttentionSplits(tokens > 1 ? tokens - 1 : 1, heads, ctx))
            << "more rows never split more";
        previous = splits;
      }
    }
  }
}

TEST(SplitKeysTest, SplitsCoverEveryKeyExactlyOnceInOrder) {
  for (int64_t begin : {0, 5, 4093}) {
    for (int64_t n = 0; n <= 130; ++n) {
      const KeyRange keys{begin, begin + n};
      for (int splits = 1; splits <= kMaxAttentionSplits; ++splits) {
        int64_t next = keys.begin;
        for (int s = 0; s < splits; ++s) {
          const KeyRange part = SplitKeys(keys, s, splits);
          ASSERT_EQ(part.begin, next) << "n " << n << " splits " << splits << " split " << s;
          ASSERT_GE(part.size(), n / splits);      // balanced: floor or ceil of n / splits
          ASSERT_LE(part.size(), (n + splits - 1) / splits);
          next = part.end;
        }
        ASSERT_EQ(next, keys.end) << "n " << n << " splits " << splits;
      }
    }
  }
}

TEST(SplitKeysTest, FewerKeysThanSplitsLeavesEmptySplits) {
  const KeyRange keys{10, 13};
  int empty = 0;
  for (int s = 0; s < 8; ++s) empty += SplitKeys(keys, s, 8).size() == 0 ? 1 : 0;
  EXPECT_EQ(empty, 5);
  EXPECT_EQ(SplitKeys(KeyRange{}, 3, 8).size(), 0);
}

TEST(AttentionWorkspaceLayoutTest, RegionsFollowEachOtherAndMatchTheSplitCount) {
  const AttentionWorkspaceLayout none = MakeAttentionWorkspaceLayout(4096, 32, 128, 100000);
  EXPECT_EQ(none.num_splits, 1);
  EXPECT_EQ(none.bytes, 0u);

  const int64_t tokens = 3;
  const int heads = 8, head_dim = 128;
  const AttentionWorkspaceLayout layout = MakeAttentionWorkspaceLayout(tokens, heads, head_dim, 5000);
  const int splits = NumAttentionSplits(tokens, heads, 5000);
  ASSERT_GT(splits, 1);
  EXPECT_EQ(layout.num_splits, splits);
  const int64_t partials = tokens * heads * splits;
  EXPECT_EQ(layout.out_offset, 0);
  EXPECT_EQ(layout.max_offset, partials * head_dim);
  EXPECT_EQ(layout.sum_offset, layout.max_offset + partials);
  EXPECT_EQ(layout.bytes, static_cast<size_t>(partials * (head_dim + 2)) * sizeof(float));
}

// ---------------------------------------------------------------------------
// Online softmax: merging split states equals one softmax over all keys
// ---------------------------------------------------------------------------

constexpr int kDims = 4;

struct State {
  SoftmaxState s;
  std::vector<float> acc = std::vector<float>(kDims, 0.f);
};

// A split's state as the kernel builds it: tiles of 32 keys, each merged into
// the running state under the new max.
State SplitState(const std::vector<float>& scores, const std::vector<float>& values, int64_t begin,
                 int64_t end) {
  State st;
  for (int64_t tile = begin; tile < end; tile += 32) {
    const int64_t tile_end = std::min(end, tile + 32);
    float tile_max = -INFINITY;
    for (int64_t j = tile; j < tile_end; ++j) tile_max = fmaxf(tile_max, scores[j]);
    const float new_max = fmaxf(st.s.m, tile_max);
    const float rescale = MergeWeight(st.s.m, new_max);
    float tile_sum = 0.f;
    for (float& a : st.acc) a *= rescale;
    for (int64_t j = tile; j < tile_end; ++j) {
      const float prob = expf(scores[j] - new_max);
      tile_sum += prob;
      for (int d = 0; d < kDims; ++d) st.acc[d] += prob * values[j * kDims + d];
    }
    st.s.l = st.s.l * rescale + tile_sum;
    st.s.m = new_max;
  }
  return st;
}

void Merge(State& into, const State& from) {
  MergeSoftmaxState(into.s, into.acc.data(), from.s, from.acc.data(), kDims);
}

std::vector<double> OnePassSoftmax(const std::vector<float>& scores, const std::vector<float>& values) {
  double mx = -INFINITY;
  for (float s : scores) mx = std::max(mx, static_cast<double>(s));
  double sum = 0.0;
  std::vector<double> out(kDims, 0.0);
  for (size_t j = 0; j < scores.size(); ++j) {
    const double p = std::exp(scores[j] - mx);
    sum += p;
    for (int d = 0; d < kDims; ++d) out[d] += p * values[j * kDims + d];
  }
  for (double& o : out) o /= sum;
  return out;
}

// Random cut points (repeats make empty splits) into consecutive ranges.
std::vector<int64_t> RandomCuts(int64_t n, int parts, std::mt19937& rng) {
  std::vector<int64_t> cuts = {0, n};
  for (int i = 1; i < parts; ++i) cuts.push_back(static_cast<int64_t>(rng() % (n + 1)));
  std::sort(cuts.begin(), cuts.end());
  return cuts;
}

void ExpectOutputNear(const State& st, const std::vector<double>& want, const char* how) {
  for (int d = 0; d < kDims; ++d) {
    // F32 exp and sums over <= 2000 terms of magnitude <= 1 stay within about
    // 2e-7 here; 2e-6 leaves room, while a wrong rescale is off by O(0.1).
    EXPECT_NEAR(FinalizeSoftmax(st.acc[d], st.s.l), want[d], 2e-6) << how << " dim " << d;
  }
}

TEST(MergeSoftmaxStateTest, AnyGroupingOfSplitsEqualsOneSoftmaxInDouble) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 2000);
    // Large score ranges overflow expf unless every step subtracts the max.
    const float spread = trial % 3 == 0 ? 500.f : 20.f;
    std::uniform_real_distribution<float> score_dist(-spread, spread), value_dist(-1.f, 1.f);
    std::vector<float> scores(n), values(n * kDims);
    for (float& s : scores) s = score_dist(rng);
    for (float& v : values) v = value_dist(rng);
    const std::vector<double> want = OnePassSoftmax(scores, values);

    const std::vector<int64_t> cuts = RandomCuts(n, 1 + static_cast<int>(rng() % 12), rng);
    std::vector<State> splits;
    for (size_t c = 0; c + 1 < cuts.size(); ++c) {
      splits.push_back(SplitState(scores, values, cuts[c], cuts[c + 1]));
    }

    State forward;  // in split order, as CombineSplitsKernel does
    for (const State& st : splits) Merge(forward, st);
    ExpectOutputNear(forward, want, "forward");

    State backward;
    for (auto it = splits.rbegin(); it != splits.rend(); ++it) Merge(backward, *it);
    ExpectOutputNear(backward, want, "backward");

    std::vector<State> level = splits;  // pairwise tree
    while (level.size() > 1) {
      std::vector<State> next;
      for (size_t i = 0; i + 1 < level.size(); i += 2) {
        next.push_back(level[i]);
        Merge(next.back(), level[i + 1]);
      }
      if (level.size() % 2 == 1) next.push_back(level.back());
      level = next;
    }
    ExpectOutputNear(level[0], want, "tree");
    ASSERT_FALSE(HasFailure()) << "trial " << trial << " n " << n;
  }
}

TEST(MergeSoftmaxStateTest, EmptyStatesMergeToAZeroOutputWithoutNaN) {
  State total;
  const State empty;
  Merge(total, empty);
  Merge(total, empty);
  EXPECT_EQ(total.s.m, -INFINITY);
  EXPECT_EQ(total.s.l, 0.f);
  for (int d = 0; d < kDims; ++d) {
    EXPECT_EQ(total.acc[d], 0.f);
    EXPECT_EQ(FinalizeSoftmax(total.acc[d], total.s.l), 0.f);
  }
}

TEST(MergeSoftmaxStateTest, AnEmptySplitLeavesAStateUnchanged) {
  const std::vector<float> scores = {0.5f, -2.f, 3.f};
  const std::vector<float> values = {1, 2, 3, 4, -1, -2, -3, -4, 0.5f, 0.25f, 0.125f, 0};
  const State filled = SplitState(scores, values, 0, 3);
  for (bool empty_first : {true, false}) {
    State merged = empty_first ? State{} : filled;
    Merge(merged, empty_first ? filled : State{});
    EXPECT_EQ(merged.s.m, filled.s.m);
    EXPECT_EQ(merged.s.l, filled.s.l);
    EXPECT_EQ(merged.acc, filled.acc);
  }
}

TEST(FinalizeSoftmaxTest, NoKeyGivesZeroAndABadSumStaysVisible) {
  EXPECT_EQ(FinalizeSoftmax(0.f, 0.f), 0.f);
  EXPECT_FLOAT_EQ(FinalizeSoftmax(3.f, 2.f), 1.5f);
  EXPECT_TRUE(std::isnan(FinalizeSoftmax(1.f, NAN)));
}

// ---------------------------------------------------------------------------
// BF16 rounding of cache rows
// ---------------------------------------------------------------------------

uint16_t Bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return Bf16BitsFromF32Bits(bits);
}

bool Bf16IsNaN(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x007fu) != 0; }

TEST(Bf16BitsFromF32BitsTest, RoundsToNearestEven) {
  EXPECT_EQ(Bf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16BitsFromF32Bits(0x3f808000u), 0x3f80);  // tie, even stays
  EXPECT_EQ(Bf16BitsFromF32Bits(0x3f818000u), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(Bf16BitsFromF32Bits(0x3f808001u), 0x3f81);  // above the tie
  EXPECT_EQ(Bf16BitsFromF32Bits(0x3f807fffu), 0x3f80);  // below the tie
  EXPECT_EQ(Bf16BitsFromF32Bits(0xbf818000u), 0xbf82);  // negative, same rule
  EXPECT_EQ(Bf16(-0.0f), 0x8000);
  EXPECT_EQ(Bf16BitsFromF32Bits(0x7f7fffffu), 0x7f80);  // largest float rounds to inf
  EXPECT_EQ(Bf16(INFINITY), 0x7f80);
  EXPECT_EQ(Bf16(-INFINITY), 0xff80);
}

TEST(Bf16BitsFromF32BitsTest, NaNStaysNaNWithItsSign) {
  EXPECT_TRUE(Bf16IsNaN(Bf16(NAN)));
  // Payload only in the low bits: plain rounding would carry it into infinity.
  EXPECT_TRUE(Bf16IsNaN(Bf16BitsFromF32Bits(0x7f800001u)));
  EXPECT_TRUE(Bf16IsNaN(Bf16BitsFromF32Bits(0x7fffffffu)));
  const uint16_t negative = Bf16BitsFromF32Bits(0xff800001u);
  EXPECT_TRUE(Bf16IsNaN(negative));
  EXPECT_EQ(negative & 0x8000u, 0x8000u);
}

}  // namespace
}  // namespace joule::kernels::cuda
