// The AMX tile program (bf16_tile_program.inc) on the AMX instructions.
// Chosen at run time where the CPU has AMX-BF16 and Linux granted this
// process the tile state (bf16_support.cpp).
#include "bf16_tile.h"
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512vl,avx512bw,avx512bf16")
#include <immintrin.h>
#define FTK_BF16_CVT

namespace ftk_cpu {
namespace {

// The intrinsics take tile numbers as literal tokens (they expand to inline
// assembly naming %tmmN), hence one branch per tile.
#define FTK_TILE_CASE(n, stmt) else if constexpr (t == n) { stmt; }
#define FTK_EACH_TILE(op) \
  if constexpr (false) {} FTK_TILE_CASE(0, op(0)) FTK_TILE_CASE(1, op(1)) FTK_TILE_CASE(2, op(2)) \
  FTK_TILE_CASE(3, op(3)) FTK_TILE_CASE(4, op(4)) FTK_TILE_CASE(5, op(5)) FTK_TILE_CASE(6, op(6)) \
  FTK_TILE_CASE(7, op(7))

struct Tiles {
  template <int t>
  static void zero() {
#define FTK_OP(n) _tile_zero(n)
    FTK_EACH_TILE(FTK_OP)
#undef FTK_OP
  }
  template <int t>
  static void load(const void* p, int64_t stride) {
#define FTK_OP(n) _tile_loadd(n, p, stride)
    FTK_EACH_TILE(FTK_OP)
#undef FTK_OP
  }
  template <int t>
  static void store(void* p, int64_t stride) {
#define FTK_OP(n) _tile_stored(n, p, stride)
    FTK_EACH_TILE(FTK_OP)
#undef FTK_OP
  }
  // The program's four products: C 0-3 from A 4-5 and B 6-7.
  template <int c, int a, int b>
  static void dp() {
    static_assert(c == 2 * (a - 4) + (b - 6), "C tile = 2 * row tile + half");
    if constexpr (c == 0) _tile_dpbf16ps(0, 4, 6);
    else if constexpr (c == 1) _tile_dpbf16ps(1, 4, 7);
    else if constexpr (c == 2) _tile_dpbf16ps(2, 5, 6);
    else _tile_dpbf16ps(3, 5, 7);
  }
};
#undef FTK_EACH_TILE
#undef FTK_TILE_CASE
}  // namespace
}  // namespace ftk_cpu

#include "bf16_tile_program.inc"

namespace ftk_cpu {
namespace {

// Palette 1: C tiles (0-3) 16 rows of 16 floats; A tiles (4-5) 16 rows of
// `depth` bf16, B tiles (6-7) depth / 2 pair rows of 16 columns x 2, so
// that TDPBF16PS sums `depth` reduction steps.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  explicit TileConfig(int depth) {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = t == 4 || t == 5 ? uint16_t(depth * 2) : 64;
      rows[t] = t == 6 || t == 7 ? uint8_t(depth / 2) : kBf16TileRows;
    }
  }
};

void amx_begin(int depth) {
  static const TileConfig deep(kBf16K), shallow(kBf16K / 2);
  _tile_loadconfig(depth == kBf16K ? &deep : &shallow);
}
void amx_end() {  // no fence: this kernel never streams (Bf16Kernel::streams)
  _tile_release();
}

}  // namespace

const Bf16Kernel& bf16_amx() {
  static const Bf16Kernel k{"amx", amx_begin, tile_block, amx_end};
  return k;
}
}  // namespace ftk_cpu
#pragma GCC pop_options
#else
namespace ftk_cpu {
const Bf16Kernel& bf16_amx() {  // no block: never supported in this build (bf16_support.cpp)
  static const Bf16Kernel k{"amx", nullptr, nullptr, nullptr};
  return k;
}
}  // namespace ftk_cpu
#endif
