// One thread block's fp32 accumulator tile, TM x TN, sized to the weight block
// so that blocks of 16 and 32 do not multiply padding: the kernels pick a
// TileShape per call (row_tile / block_tile below).  Operand tiles A [TM][TK]
// and B [TK][TN] are staged in shared memory by the kernels; fp16/bf16 multiply
// on tensor cores (WMMA 16x16x16, fp32 accumulate), fp32 on the CUDA cores.
// This is the only place that multiplies.
//
// Work split over the 128 threads (4 warps): a tile with fewer output
// fragments than warps (16x16, 16x32, 32x16) splits the reduction instead, each
// warp (fp32: each group of threads) summing every KSPLIT-th 16-wide k step
// into its own slice of C; store() adds the slices.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the CUDA backend needs sm_80 or newer (bf16 tensor cores): set TORCH_CUDA_ARCH_LIST, e.g. to 8.0;9.0"
#endif

namespace ftk_cuda {

constexpr int THREADS = 128;  // 4 warps
constexpr int WARPS = THREADS / 32;

constexpr int min_int(int a, int b) { return a < b ? a : b; }
constexpr int max_int(int a, int b) { return a > b ? a : b; }

// Output-tile geometry and the tensor-core warp grid over its 16x16 fragments.
template <int TM_, int TN_>
struct TileShape {
  static constexpr int TM = TM_, TN = TN_;
  static constexpr int FR = TM / 16, FC = TN / 16;                 // fragment rows / columns
  static constexpr int WGR = min_int(FR, WARPS);                     // warp grid over the fragments
  static constexpr int WGC = min_int(FC, WARPS / WGR);
  static constexpr int KSPLIT = WARPS / (WGR * WGC);                 // warps sharing one fragment set
  static constexpr int TK = max_int(32, 16 * KSPLIT);                // reduction step
  static constexpr int A_LD = TK + 8, B_LD = TN + 8, C_LD = TN + 4;  // WMMA: multiples of 8 halves / 4 floats
  static_assert(TM % 16 == 0 && TN % 16 == 0 && TN <= 64 && TM * TN <= 4096, "unsupported tile");
  static_assert(FR % WGR == 0 && FC % WGC == 0 && WARPS % (WGR * WGC) == 0, "warps must tile the fragments");
};

// Tiles over many pixel rows x one chunk of a weight block's output (forward:
// Bo) or input (grad_input: Bi) channels: N sized to the block, M filling the
// 4096 accumulators (fp32: 2048 rows x columns at N = 16, for shared memory).
template <typename T, typename F>
void row_tile(int block, F&& launch) {
  if (block <= 16) {
    launch(TileShape<(sizeof(T) == 4 ? 128 : 256), 16>{});
  } else if (block <= 32) {
    launch(TileShape<128, 32>{});
  } else {
    launch(TileShape<64, 64>{});  // wider blocks: 64-column chunks
  }
}

// grad_blocks' tile: one weight block (or a 64x64 piece of a larger one).
template <typename F>
void block_tile(int bo, int bi, F&& launch) {
  auto with_cols = [&](auto rows) {
    constexpr int TM = decltype(rows)::value;
    if (bi <= 16) {
      launch(TileShape<TM, 16>{});
    } else if (bi <= 32) {
      launch(TileShape<TM, 32>{});
    } else {
      launch(TileShape<TM, 64>{});
    }
  };
  if (bo <= 16) {
    with_cols(std::integral_constant<int, 16>{});
  } else if (bo <= 32) {
    with_cols(std::integral_constant<int, 32>{});
  } else {
    with_cols(std::integral_constant<int, 64>{});
  }
}

// Shared memory of one tile: the operand tiles while multiplying, then (reusing
// the same bytes, after a barrier) the fp32 result, one TM x TN slice per
// reduction split.
template <typename T, typename S, int SLICES>
union alignas(128) TileSmem {
  struct {
    alignas(32) T a[S::TM * S::A_LD];
    alignas(32) T b[S::TK * S::B_LD];
  } in;
  alignas(32) float c[SLICES * S::TM * S::C_LD];
};

// After each slice has stored its partial tile: slice 0 += the others.
template <typename S, int SLICES>
__device__ __forceinline__ void add_slices(float* c) {
  if constexpr (SLICES > 1) {
    __syncthreads();
    for (int e = threadIdx.x; e < S::TM * S::TN; e += THREADS) {
      const int at = (e / S::TN) * S::C_LD + e % S::TN;
      float v = c[at];
#pragma unroll
      for (int s = 1; s < SLICES; ++s) v += c[s * S::TM * S::C_LD + at];
      c[at] = v;
    }
  }
}

// WMMA element type of a c10 storage type
template <typename T> struct WmmaType;
template <> struct WmmaType<c10::Half> { using type = __half; };
template <> struct WmmaType<c10::BFloat16> { using type = __nv_bfloat16; };

// Tensor-core tile: warp w sums k steps w / (WGR * WGC) (mod KSPLIT) into the
// WR x WC fragments at grid cell w % (WGR * WGC).
template <typename T, typename S>
struct TileMma {
  using E = typename WmmaType<T>::type;
  static constexpr int SLICES = S::KSPLIT;
  static constexpr int WR = S::FR / S::WGR, WC = S::FC / S::WGC;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[WR][WC];

  __device__ static int slice() { return (threadIdx.x / 32) / (S::WGR * S::WGC); }
  __device__ static int frag_row0() { return ((threadIdx.x / 32) % (S::WGR * S::WGC)) / S::WGC * WR; }
  __device__ static int frag_col0() { return ((threadIdx.x / 32) % S::WGC) * WC; }

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < WR; ++i)
#pragma unroll
      for (int j = 0; j < WC; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  // acc += A[:, :k_valid] @ B[:k_valid, :]; A and B hold zeros from k_valid up
  // to the next multiple of 16 (the steps past it are skipped).
  __device__ void step(const T* a, const T* b, int k_valid) {
    using namespace nvcuda;
    const E* ae = reinterpret_cast<const E*>(a);
    const E* be = reinterpret_cast<const E*>(b);
    const int r0 = frag_row0(), c0 = frag_col0();
#pragma unroll
    for (int kk = 0; kk < S::TK / (16 * SLICES); ++kk) {
      const int k = (kk * SLICES + slice()) * 16;
      if (k >= k_valid) break;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> fb[WC];
#pragma unroll
      for (int j = 0; j < WC; ++j) wmma::load_matrix_sync(fb[j], be + k * S::B_LD + (c0 + j) * 16, S::B_LD);
#pragma unroll
      for (int i = 0; i < WR; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, ae + (r0 + i) * 16 * S::A_LD + k, S::A_LD);
#pragma unroll
        for (int j = 0; j < WC; ++j) wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
      }
    }
  }

  // The tile into c[row * C_LD + col] (c: SLICES slices); every thread calls it.
  __device__ void store(float* c) {
    float* cs = c + slice() * S::TM * S::C_LD;
    const int r0 = frag_row0(), c0 = frag_col0();
#pragma unroll
    for (int i = 0; i < WR; ++i)
#pragma unroll
      for (int j = 0; j < WC; ++j)
        nvcuda::wmma::store_matrix_sync(cs + (r0 + i) * 16 * S::C_LD + (c0 + j) * 16, acc[i][j], S::C_LD,
                                        nvcuda::wmma::mem_row_major);
    add_slices<S, SLICES>(c);
  }
};

// fp32 tile on CUDA cores: each thread owns 8 rows x 4 columns; the TM*TN/32
// threads of one slice cover the tile, and SLICES = 128 / that of them split k.
template <typename S>
struct TileMma<float, S> {
  static constexpr int GROUP_COLS = S::TN / 4, GROUP = (S::TM / 8) * GROUP_COLS;
  static constexpr int SLICES = THREADS / GROUP;
  static_assert(THREADS % GROUP == 0 && S::TK % SLICES == 0, "fp32 tile: 8x4 outputs per thread");
  float acc[8][4];

  __device__ static int slice() { return threadIdx.x / GROUP; }
  __device__ static int row0() { return (threadIdx.x % GROUP) / GROUP_COLS * 8; }
  __device__ static int col0() { return (threadIdx.x % GROUP_COLS) * 4; }

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }

  __device__ void step(const float* a, const float* b, int k_valid) {
    const int r0 = row0(), c0 = col0();
#pragma unroll 4
    for (int k = slice(); k < k_valid; k += SLICES) {
      float bv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = b[k * S::B_LD + c0 + j];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float av = a[(r0 + i) * S::A_LD + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av, bv[j], acc[i][j]);
      }
    }
  }

  __device__ void store(float* c) {
    float* cs = c + slice() * S::TM * S::C_LD;
    const int r0 = row0(), c0 = col0();
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) cs[(r0 + i) * S::C_LD + c0 + j] = acc[i][j];
    add_slices<S, SLICES>(c);
  }
};

// Compile-time proof that a shape's work split covers every (output element,
// k) pair exactly once, for both multiply paths; checked for each shape the
// kernels instantiate (TileKernel below).
template <typename S>
constexpr bool wmma_split_covers_once() {
  for (int fr = 0; fr < S::FR; ++fr)
    for (int fc = 0; fc < S::FC; ++fc)
      for (int ks = 0; ks < S::TK / 16; ++ks) {
        int owners = 0;
        for (int w = 0; w < WARPS; ++w) {
          const int cell = w % (S::WGR * S::WGC), slice = w / (S::WGR * S::WGC);
          const int wr = S::FR / S::WGR, wc = S::FC / S::WGC;
          const int r0 = cell / S::WGC * wr, c0 = cell % S::WGC * wc;
          owners += fr >= r0 && fr < r0 + wr && fc >= c0 && fc < c0 + wc && ks % S::KSPLIT == slice;
        }
        if (owners != 1) return false;
      }
  return true;
}

template <typename S>
constexpr bool fp32_split_covers_once() {  // in units of one thread's 8x4 outputs
  using M = TileMma<float, S>;
  for (int r = 0; r < S::TM; r += 8)
    for (int c = 0; c < S::TN; c += 4)
      for (int k = 0; k < M::SLICES; ++k) {
        int owners = 0;
        for (int t = 0; t < THREADS; ++t)
          owners += (t % M::GROUP) / M::GROUP_COLS * 8 == r && (t % M::GROUP_COLS) * 4 == c && t / M::GROUP == k;
        if (owners != 1) return false;
      }
  return true;
}

// What a kernel instantiated for storage type T and shape S uses.
template <typename T, typename S>
struct TileKernel {
  using Mma = TileMma<T, S>;
  using Smem = TileSmem<T, S, Mma::SLICES>;
  static_assert(sizeof(T) == 4 ? fp32_split_covers_once<S>() : wmma_split_covers_once<S>(),
                "the tile's work split must cover each output and k exactly once");
};

}  // namespace ftk_cuda
