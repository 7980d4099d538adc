// One thread block's 64x64 fp32 accumulator tile, fed by 64x32 (A) and 32x64 (B)
// operand tiles staged in shared memory.  fp16/bf16 multiply on tensor cores
// (WMMA 16x16x16, fp32 accumulate); fp32 on the CUDA cores.  The kernels in
// kernels.cu only gather operand tiles and write results; this is the only
// place that multiplies.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace ftk_cuda {

constexpr int TM = 64;       // rows of the output tile
constexpr int TN = 64;       // columns of the output tile
constexpr int TK = 32;       // reduction step
constexpr int THREADS = 128; // 4 warps
constexpr int A_LD = TK + 8; // padded leading dimensions (WMMA needs multiples of 8 halves / 4 floats)
constexpr int B_LD = TN + 8;
constexpr int C_LD = TN + 4;

// Shared-memory staging of one step: A [TM][TK], B [TK][TN], and the fp32 result C [TM][TN].
template <typename T>
struct alignas(128) TileSmem {
  alignas(32) T a[TM * A_LD];
  alignas(32) T b[TK * B_LD];
  alignas(32) float c[TM * C_LD];
};

// WMMA element type of a c10 storage type
template <typename T> struct WmmaType;
template <> struct WmmaType<c10::Half> { using type = __half; };
template <> struct WmmaType<c10::BFloat16> { using type = __nv_bfloat16; };

// Tensor-core tile: warp w owns rows [16w, 16w + 16) and all TN columns.
template <typename T>
struct TileMma {
  using E = typename WmmaType<T>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[TN / 16];

  __device__ void zero() {
#pragma unroll
    for (int j = 0; j < TN / 16; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.0f);
  }

  __device__ void step(const T* a, const T* b) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const E* ae = reinterpret_cast<const E*>(a);
    const E* be = reinterpret_cast<const E*>(b);
#pragma unroll
    for (int k = 0; k < TK; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, ae + warp * 16 * A_LD + k, A_LD);
#pragma unroll
      for (int j = 0; j < TN / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, be + k * B_LD + j * 16, B_LD);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }

  __device__ void store(float* c) {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int j = 0; j < TN / 16; ++j)
      nvcuda::wmma::store_matrix_sync(c + warp * 16 * C_LD + j * 16, acc[j], C_LD, nvcuda::wmma::mem_row_major);
  }
};

// fp32 tile on CUDA cores: thread t owns rows 8*(t/16)..+8 and columns 4*(t%16)..+4.
template <>
struct TileMma<float> {
  float acc[8][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }

  __device__ void step(const float* a, const float* b) {
    const int r0 = (threadIdx.x / 16) * 8, c0 = (threadIdx.x % 16) * 4;
#pragma unroll 4
    for (int k = 0; k < TK; ++k) {
      float bv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = b[k * B_LD + c0 + j];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float av = a[(r0 + i) * A_LD + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av, bv[j], acc[i][j]);
      }
    }
  }

  __device__ void store(float* c) {
    const int r0 = (threadIdx.x / 16) * 8, c0 = (threadIdx.x % 16) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[(r0 + i) * C_LD + c0 + j] = acc[i][j];
  }
};

static_assert(THREADS == 32 * (TM / 16), "one warp per 16 rows of the tile");
static_assert(THREADS == (TM / 8) * (TN / 4), "fp32 tile: 8x4 outputs per thread");

}  // namespace ftk_cuda
