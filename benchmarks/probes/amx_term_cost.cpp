// What one AMX term and one block epilogue cost on this CPU, outside the
// extension: the tile program's loop (bf16_tile_program.inc) on synthetic
// operands, and where A and B come from.  docs/cpu-backend.md ("Word
// transposes, and what an AMX term costs") has the figures.
//
//   g++ -O2 -mamx-tile -mamx-bf16 -mavx512f -mavx512bw -mavx512vl -mavx512bf16
//       benchmarks/probes/amx_term_cost.cpp -o /tmp/amx_term_cost  &&  /tmp/amx_term_cost
//
// One thread; ns per term (4 TDPBF16PS: a 32 x 32 block, 32 deep) and per block.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

alignas(64) uint8_t a_buf[1 << 24], b_buf[1 << 24];
alignas(64) uint16_t out_buf[1 << 23];

enum class Loads { kNone, kTiles, kTilesAndPrefetch };

// `n` terms; term i reads A at column (i % wrap) of rows lda apart, B block (i % wrap) of 2 KB.
template <Loads L>
__attribute__((noinline)) void terms(int64_t n, int64_t lda, int64_t wrap) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* a = a_buf + (i % wrap) * 64;
    const uint8_t* b = b_buf + (i % wrap) * 2048;
    if (L == Loads::kTilesAndPrefetch) {  // the next term's 32 A lines and 32 B lines into L1
      const uint8_t* na = a_buf + ((i + 1) % wrap) * 64;
      const uint8_t* nb = b_buf + ((i + 1) % wrap) * 2048;
      for (int r = 0; r < 32; ++r) _mm_prefetch(reinterpret_cast<const char*>(na + r * lda), _MM_HINT_T0);
      for (int r = 0; r < 32; ++r) _mm_prefetch(reinterpret_cast<const char*>(nb + r * 64), _MM_HINT_T0);
    }
    if (L != Loads::kNone) {
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + 1024, 64);
      _tile_loadd(4, a, lda);
    }
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
    if (L != Loads::kNone) _tile_loadd(5, a + 16 * lda, lda);
    _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) static float c[32 * 32];
  _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128); _tile_stored(2, c + 512, 128); _tile_stored(3, c + 528, 128);
}

enum class Epilogue { kNone, kTileStores, kStores, kStreams };

// `n` blocks of `t` terms (A and B in L2) into a [4096, 1024] bf16 result (8 MB) whose row tiles cycle
// over `tiles`, each block's epilogue as named.
template <Epilogue E>
__attribute__((noinline)) void blocks(int64_t n, int t, int64_t tiles) {
  alignas(64) float c[32 * 32];
  for (int64_t blk = 0; blk < n; ++blk) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int i = 0; i < t; ++i) {
      const uint8_t* a = a_buf + ((blk * t + i) % 32) * 64;
      const uint8_t* b = b_buf + ((blk * t + i) % 64) * 2048;
      _tile_loadd(6, b, 64); _tile_loadd(7, b + 1024, 64); _tile_loadd(4, a, 2048);
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, a + 16 * 2048, 2048);
      _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    if (E == Epilogue::kNone) continue;
    _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128); _tile_stored(2, c + 512, 128); _tile_stored(3, c + 528, 128);
    if (E == Epilogue::kTileStores) continue;
    uint16_t* o = out_buf + ((blk / 32) % tiles) * 32 * 1024 + (blk % 32) * 32;
    for (int r = 0; r < 32; ++r) {
      const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(c + r * 32 + 16), _mm512_load_ps(c + r * 32));
      if (E == Epilogue::kStreams)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(o + r * 1024), v);
      else
        _mm512_storeu_si512(o + r * 1024, v);
    }
  }
  _mm_sfence();
}

template <class F>
double ns_per(int64_t n, F f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / n;
}

}  // namespace

int main() {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) {
    std::perror("arch_prctl: no AMX tile state for this process");
    return 1;
  }
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
  std::memset(a_buf, 0, sizeof a_buf), std::memset(b_buf, 0, sizeof b_buf), std::memset(out_buf, 0, sizeof out_buf);

  std::printf("ns per term (4 TDPBF16PS):\n");
  const int64_t n = 2000000;
  std::printf("  no loads (the products alone)            %6.1f\n", ns_per(n, [&] { terms<Loads::kNone>(n, 64, 1); }));
  struct { const char* name; int64_t lda, wrap; } where[] = {
      {"A, B in L1 (one term, re-read)", 64, 1},
      {"A rows 2 KB apart, 64 KB; B 128 KB (L2)", 2048, 32},
      {"A rows 8 KB apart, 256 KB; B 256 KB (L2)", 8192, 128},
      {"A rows 2 KB apart; B 3.2 MB (past L2)", 2048, 1600},
  };
  for (const auto& w : where) {
    std::printf("  %-41s %6.1f   next term prefetched: %6.1f\n", w.name,
                ns_per(n, [&] { terms<Loads::kTiles>(n, w.lda, w.wrap); }),
                ns_per(n, [&] { terms<Loads::kTilesAndPrefetch>(n, w.lda, w.wrap); }));
  }
  std::printf("ns per 32 x 32 block (A, B in L2; result 8 MB):\n");
  const int64_t nb = 400000;
  for (int t : {1, 3, 8}) {
    std::printf("  %d terms: no epilogue %6.1f, tile stores %6.1f, + rounding and stores %6.1f, streamed %6.1f\n", t,
                ns_per(nb, [&] { blocks<Epilogue::kNone>(nb, t, 128); }),
                ns_per(nb, [&] { blocks<Epilogue::kTileStores>(nb, t, 128); }),
                ns_per(nb, [&] { blocks<Epilogue::kStores>(nb, t, 128); }),
                ns_per(nb, [&] { blocks<Epilogue::kStreams>(nb, t, 128); }));
  }
  _tile_release();
  return 0;
}
