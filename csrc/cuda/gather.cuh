// Device helpers the three kernels share to stage operand tiles in shared
// memory: strided activation addressing and coalesced tile walks.  Activations
// are read through their four (n, c, h, w) strides, NCHW and channels_last
// alike, never copied; everything outside the tensor (ragged edges, padding,
// stride gaps) is loaded as zero.
#pragma once

#include <cstdint>

#include "tile_mma.cuh"

namespace ftk_cuda {

__device__ __forceinline__ int64_t offset(const int64_t* s, int64_t n, int64_t c, int64_t y, int64_t x) {
  return n * s[0] + c * s[1] + y * s[2] + x * s[3];
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  return T(0.0f);
}

// k columns of a tile that hold data (k_len of them), rounded up to the
// tensor cores' 16-wide step (zero-filled): a block narrower than the
// reduction step TK costs no multiply past its edge.
__device__ __forceinline__ int k_extent(int k_len, int tk) {
  const int rounded = (k_len + 15) / 16 * 16;
  return rounded < tk ? rounded : tk;
}

// Element e of a rows x cols tile, numbered along the dimension that is
// contiguous in global memory (cols when cols_fast), so loads and stores coalesce.
__device__ __forceinline__ void tile_walk(int e, int rows, int cols, bool cols_fast, int& row, int& col) {
  row = cols_fast ? e / cols : e % rows;
  col = cols_fast ? e % cols : e / rows;
}

// B operand tile, k_rows x TN of [TK][TN], from one weight block [bo, bi]
// (row-major, contiguous along bi): forward multiplies by the block transposed,
// B[k][n] = block[n0+n][k0+k]; grad_input by the block itself,
// B[k][n] = block[k0+k][n0+n].  Out-of-block: zero.
template <typename S, typename T>
__device__ __forceinline__ void load_block_tile(T* b, const T* blk, int bo, int bi, int k0, int n0, int k_rows,
                                                bool transposed) {
  for (int e = threadIdx.x; e < k_rows * S::TN; e += THREADS) {
    int k, n;
    tile_walk(e, k_rows, S::TN, !transposed, k, n);  // walk along bi, the block's contiguous dimension
    const int o = transposed ? n0 + n : k0 + k;
    const int i = transposed ? k0 + k : n0 + n;
    b[k * S::B_LD + n] = o < bo && i < bi ? blk[o * bi + i] : zero_value<T>();
  }
}

// The tile's pixel rows m0 .. m0 + TM of images h x w: image (-1 past the last
// pixel), row and column of each.
template <typename S>
__device__ __forceinline__ void tile_pixels(int64_t m0, int64_t pixels, int h, int w, int64_t* row_n, int* row_y,
                                            int* row_x) {
  const int64_t hw = static_cast<int64_t>(h) * w;
  for (int i = threadIdx.x; i < S::TM; i += THREADS) {
    const int64_t m = m0 + i;
    row_n[i] = m < pixels ? m / hw : -1;
    row_y[i] = static_cast<int>((m % hw) / w);
    row_x[i] = static_cast<int>(m % w);
  }
}

// The fp32 result tile c (rows: the tile's pixels; columns: channels ch0 ..
// ch0 + TN, of which the first `cols` are the block's) into `out` (strides s),
// + bias[channel] where given; channels past `channels` are not stored.
template <typename S, typename T>
__device__ __forceinline__ void store_pixel_tile(const float* c, T* out, const int64_t* s, const int64_t* row_n,
                                                 const int* row_y, const int* row_x, int ch0, int cols, int channels,
                                                 const T* bias) {
  const bool channels_fast = s[1] == 1;
  for (int e = threadIdx.x; e < S::TM * S::TN; e += THREADS) {
    int row, n;
    tile_walk(e, S::TM, S::TN, channels_fast, row, n);
    const int ch = ch0 + n;
    if (row_n[row] < 0 || n >= cols || ch >= channels) continue;
    float v = c[row * S::C_LD + n];
    if (bias != nullptr) v += static_cast<float>(bias[ch]);
    out[offset(s, row_n[row], ch, row_y[row], row_x[row])] = static_cast<T>(v);
  }
}

}  // namespace ftk_cuda
