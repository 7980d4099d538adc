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

constexpr int kGroupRows = 8;  // 16 accumulators, 2 B registers, 1 broadcast

void avx512_block(const Bf16Block& b) {
  const int rows = b.row_tiles * kBf16TileRows;
  alignas(64) float c[2 * kBf16TileRows * kBf16Cols];
  for (int g = 0; g < rows; g += kGroupRows) {
    __m512 acc[kGroupRows][2];
    for (int i = 0; i < kGroupRows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t t = 0; t < b.nterms; ++t) {
      const uint8_t* a = b.a + b.terms[t].a_off + g * b.lda;
      const uint8_t* bb = b.b + b.terms[t].b_off;
      for (int p = 0; p < kBf16K / 2; ++p) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bb + p * b.ldb);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bb + b.b_half + p * b.ldb);
        for (int i = 0; i < kGroupRows; ++i) {
          int32_t pair;
          __builtin_memcpy(&pair, a + i * b.lda + 4 * p, 4);
          const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
        }
      }
    }
    for (int i = 0; i < kGroupRows; ++i) {
      _mm512_store_ps(c + (g + i) * kBf16Cols, acc[i][0]);
      _mm512_store_ps(c + (g + i) * kBf16Cols + 16, acc[i][1]);
    }
  }
  store_rows(c, rows, b);
}

void nothing() {}
void fence() { _mm_sfence(); }  // the streamed stores of store_rows, before the op's threads join

}  // namespace

const Bf16Kernel& bf16_avx512() {
  static const Bf16Kernel k{"avx512_bf16", nothing, avx512_block, fence};
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
