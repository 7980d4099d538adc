// The bf16 operands' transposing copies, shared by the linear and conv
// ops: 16-bit elements (copy_tile) and 32-bit words, a word being one VNNI
// pair of bf16 (transpose_words).  Both go through SSE2 registers where
// they can: element by element, each read or write of a transposing copy
// lands on a line of its own (measured reasons: docs/cpu-backend.md).
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "internal.h"

namespace ftk_cpu {
namespace detail {
namespace {

#if defined(__SSE2__)
// dst[a * da + b] = src[a + b * sb] for a, b < 8.
void transpose8x8(const uint16_t* src, int64_t sb, uint16_t* dst, int64_t da) {
  __m128i r[8], t[8];
  for (int b = 0; b < 8; ++b) r[b] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + b * sb));
  for (int i = 0; i < 4; ++i) {  // pairs of rows interleaved: 16-bit, then 32-bit, then 64-bit units
    t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) {
      r[4 * i + 2 * h] = _mm_unpacklo_epi32(t[4 * i + h], t[4 * i + h + 2]);
      r[4 * i + 2 * h + 1] = _mm_unpackhi_epi32(t[4 * i + h], t[4 * i + h + 2]);
    }
  for (int a = 0; a < 4; ++a) {  // r[a] holds columns 2a, 2a + 1 of rows 0-3, r[a + 4] of rows 4-7
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * a * da), _mm_unpacklo_epi64(r[a], r[a + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * a + 1) * da), _mm_unpackhi_epi64(r[a], r[a + 4]));
  }
}
#endif

// dst[c * ldd + r] = the word (two bf16) at src + r * lds + 2 c, for r < 4, c < 4.
#if defined(__SSE2__)
inline void transpose4x4_words(const uint16_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
  __m128i r[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * lds));
  const __m128i lo01 = _mm_unpacklo_epi32(r[0], r[1]), hi01 = _mm_unpackhi_epi32(r[0], r[1]);
  const __m128i lo23 = _mm_unpacklo_epi32(r[2], r[3]), hi23 = _mm_unpackhi_epi32(r[2], r[3]);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi64(lo01, lo23));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + ldd), _mm_unpackhi_epi64(lo01, lo23));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * ldd), _mm_unpacklo_epi64(hi01, hi23));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 3 * ldd), _mm_unpackhi_epi64(hi01, hi23));
}
#endif

inline uint32_t word_at(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);  // 2-byte aligned only
  return w;
}

}  // namespace

// dst[a * da + b] = src[a * sa + b * sb] for a < na, b < nb (both <= 32).
// Unit sa (NCHW planes, channels-last grad_out), both sides >= 8: 8 x 8
// blocks transposed in SSE2 registers, straight from src to dst (through a
// tile, element by element, the copy had taken half of a strided NCHW
// conv's forward on the EPYC: GCC made the unit-stride loads a memcpy call
// per 32 elements).  Other strides: through a tile in L1 (copied straight
// across, each read from a line of its own, measured 15% slower).  aten's
// copies of transposing views run element by element through strided
// iterators: an NCHW input made channels-last took 5.7 ms for 10 MB of bf16.
void copy_tile(const uint16_t* src, int64_t sa, int64_t sb, uint16_t* dst, int64_t da, int64_t na, int64_t nb) {
  if (sb == 1) {
    for (int64_t a = 0; a < na; ++a) std::memcpy(dst + a * da, src + a * sa, nb * 2);
    return;
  }
#if defined(__SSE2__)
  if (sa == 1 && na >= 8 && nb >= 8) {  // the last block of each side overlaps the one before it
    for (int64_t b0 = 0; b0 < nb; b0 += 8)
      for (int64_t a0 = 0; a0 < na; a0 += 8) {
        const int64_t a = std::min(a0, na - 8), b = std::min(b0, nb - 8);
        transpose8x8(src + a + b * sb, sb, dst + a * da + b, da);
      }
    return;
  }
#endif
  uint16_t tile[kCopyTile][kCopyTile];  // [b][a]
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t a = 0; a < na; ++a) tile[b][a] = src[a * sa + b * sb];
  for (int64_t a = 0; a < na; ++a)
    for (int64_t b = 0; b < nb; ++b) dst[a * da + b] = tile[b][a];
}

void transpose_words(const uint16_t* src, int64_t lds, uint32_t* dst, int64_t ldd, int64_t rows, int64_t cols) {
  // Tiles of 16 rows by 16 words: the tile's 16 destination lines are written whole while they are in L1.
  constexpr int64_t kSide = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kSide)
    for (int64_t c0 = 0; c0 < cols; c0 += kSide) {
      const int64_t r1 = std::min(rows, r0 + kSide), c1 = std::min(cols, c0 + kSide);
      int64_t r = r0, c = c0;
#if defined(__SSE2__)
      for (; r + 4 <= r1; r += 4)
        for (c = c0; c + 4 <= c1; c += 4) transpose4x4_words(src + r * lds + 2 * c, lds, dst + c * ldd + r, ldd);
      // the ragged edges of the tile: rows [r, r1) of every column, columns [c, c1) of the rows done
      for (int64_t cc = c; cc < c1; ++cc)
        for (int64_t rr = r0; rr < r; ++rr) dst[cc * ldd + rr] = word_at(src + rr * lds + 2 * cc);
#endif
      for (; r < r1; ++r)
        for (int64_t cc = c0; cc < c1; ++cc) dst[cc * ldd + r] = word_at(src + r * lds + 2 * cc);
    }
}

}  // namespace detail
}  // namespace ftk_cpu
