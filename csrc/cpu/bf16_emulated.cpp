// The AMX tile program (bf16_tile_program.inc) over a scalar emulation of
// the AMX instructions: eight 1 KB tile registers per thread, shaped as
// bf16_amx.cpp configures them for a depth (rows and bytes per row loaded
// and stored), TDPBF16PS as its pairwise products summed in float32, over
// A's configured bytes per row.  Slow; it exists so the tests prove the tile
// program's tiling and index math on every CPU.
#include <cstring>

#include "bf16_tile.h"

namespace ftk_cpu {
namespace {

struct Tiles {
  static constexpr int kBytes = kBf16TileRows * 64;
  alignas(64) static thread_local uint8_t reg[8][kBytes];
  static thread_local int depth;  // the configuration's (begin)

  static int rows(int t) { return t == 6 || t == 7 ? depth / 2 : kBf16TileRows; }
  static int row_bytes(int t) { return t == 4 || t == 5 ? depth * 2 : 64; }

  template <int t>
  static void zero() {
    std::memset(reg[t], 0, kBytes);
  }
  // Rows and bytes past the configured shape are zero, as AMX's loads leave them.
  template <int t>
  static void load(const void* p, int64_t stride) {
    std::memset(reg[t], 0, kBytes);
    for (int r = 0; r < rows(t); ++r)
      std::memcpy(reg[t] + r * 64, static_cast<const uint8_t*>(p) + r * stride, size_t(row_bytes(t)));
  }
  template <int t>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < rows(t); ++r)
      std::memcpy(static_cast<uint8_t*>(p) + r * stride, reg[t] + r * 64, size_t(row_bytes(t)));
  }
  // C[m][n] += sum over pairs k < A's bytes per row / 4 of A[m][2k] B[k][2n] + A[m][2k+1] B[k][2n+1]
  template <int c, int a, int b>
  static void dp() {
    float* cf = reinterpret_cast<float*>(reg[c]);
    const uint16_t* af = reinterpret_cast<const uint16_t*>(reg[a]);
    const uint16_t* bf = reinterpret_cast<const uint16_t*>(reg[b]);
    const int pairs = row_bytes(a) / 4;
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n) {
        float acc = cf[m * 16 + n];
        for (int k = 0; k < pairs; ++k)
          acc += bf16_widen(af[m * 32 + 2 * k]) * bf16_widen(bf[k * 32 + 2 * n]) +
                 bf16_widen(af[m * 32 + 2 * k + 1]) * bf16_widen(bf[k * 32 + 2 * n + 1]);
        cf[m * 16 + n] = acc;
      }
  }
};
alignas(64) thread_local uint8_t Tiles::reg[8][Tiles::kBytes];
thread_local int Tiles::depth = kBf16K;

}  // namespace
}  // namespace ftk_cpu

#include "bf16_tile_program.inc"

namespace ftk_cpu {
namespace {
void configure(int depth) { Tiles::depth = depth; }
void nothing() {}
}  // namespace

const Bf16Kernel& bf16_emulated() {
  static const Bf16Kernel k{"amx_emulated", configure, tile_block, nothing};
  return k;
}
}  // namespace ftk_cpu
