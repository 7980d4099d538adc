// The bf16 block (bf16_tile.h) with AVX512-BF16: VDPBF16PS multiplies a
// broadcast pair of A's bf16 by a B pair row (16 columns x 2) into 16 float
// sums.  For CPUs with AVX512-BF16 but no AMX (Zen 4, Cooper Lake); it reads
// the same packed B as the AMX program.
#include "bf16_tile.h"
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512bf16")
#include <immintrin.h>
#define FTK_BF16_CVT

#include "bf16_store.inc"

namespace ftk_cpu {
namespace {

// H column halves (16 columns each) of rows in groups of 16 / H: 16
// accumulators, H B registers, 1 broadcast.  D: reduction steps per term.
// The next tile's lines of a group's rows (b.prefetch_a) are asked for
// before the group's terms: inside the term loop, the hints' registers
// slowed convs that never prefetch.
template <int H, int D>
void avx512_rows(const Bf16Block& b, float* c) {
  constexpr int kGroupRows = kBf16TileRows / H;
  const int rows = b.row_tiles * kBf16TileRows;
  for (int g = 0; g < rows; g += kGroupRows) {
    if (b.prefetch_a)
      for (int64_t t = 0; t < b.nterms; ++t)
        prefetch_rows(b.prefetch_a + b.terms[t].a_off + g * b.lda, b.lda, kGroupRows, 2 * D);
    __m512 acc[kGroupRows][H];
    for (int i = 0; i < kGroupRows; ++i)
      for (int h = 0; h < H; ++h) acc[i][h] = _mm512_setzero_ps();
    for (int64_t t = 0; t < b.nterms; ++t) {
      const uint8_t* a = b.a + b.terms[t].a_off + g * b.lda;
      const uint8_t* bb = b.b + b.terms[t].b_off;
      for (int p = 0; p < D / 2; ++p) {
        __m512bh bv[H];
        for (int h = 0; h < H; ++h) bv[h] = (__m512bh)_mm512_loadu_si512(bb + h * b.b_half + p * b.ldb);
        for (int i = 0; i < kGroupRows; ++i) {
          int32_t pair;
          __builtin_memcpy(&pair, a + i * b.lda + 4 * p, 4);
          const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
          for (int h = 0; h < H; ++h) acc[i][h] = _mm512_dpbf16_ps(acc[i][h], av, bv[h]);
        }
      }
    }
    for (int i = 0; i < kGroupRows; ++i)
      for (int h = 0; h < H; ++h) _mm512_store_ps(c + (g + i) * kBf16Cols + h * 16, acc[i][h]);
  }
}

void avx512_block(const Bf16Block& b) {
  alignas(64) float c[2 * kBf16TileRows * kBf16Cols];
  const bool two_halves = b.cols > kBf16Cols / 2;
  if (b.depth == kBf16K)
    two_halves ? avx512_rows<2, kBf16K>(b, c) : avx512_rows<1, kBf16K>(b, c);
  else
    two_halves ? avx512_rows<2, kBf16K / 2>(b, c) : avx512_rows<1, kBf16K / 2>(b, c);
  store_rows(c, b.row_tiles * kBf16TileRows, b);
}

void nothing(int) {}
void fence() { _mm_sfence(); }  // the streamed stores of store_rows, before the op's threads join

}  // namespace

const Bf16Kernel& bf16_avx512() {
  static const Bf16Kernel k{"avx512_bf16", nothing, avx512_block, fence, /*streams=*/true};
  return k;
}
}  // namespace ftk_cpu
#pragma GCC pop_options
#else
namespace ftk_cpu {
const Bf16Kernel& bf16_avx512() {  // no block: never supported in this build (bf16_support.cpp)
  static const Bf16Kernel k{"avx512_bf16", nullptr, nullptr, nullptr};
  return k;
}
}  // namespace ftk_cpu
#endif
