// conv2d_forward: y[m, r-block] = sum over live (r, c) of x_tap(c)[m, cb(c)] @ values[slot]^T
// (+ bias), where weight block column c is channel block cb(c) = c % blocks_per_tap
// at tap c / blocks_per_tap.  Same decomposition as the Triton backend
// (freetickets_kernels/backends/implicit_gemm.py); a linear layer is the 1x1
// conv of 1x1 images.  One thread block: TM output pixels x one TN-wide chunk
// of a block row's Bo channels; dead blocks are never visited.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "gather.cuh"
#include "geometry.h"
#include "kernels.h"

namespace ftk_cuda {
namespace {

// Grid: one thread block per (pixel tile, block-row chunk), chunks fastest, so
// the thread blocks running together read the same input pixels (L2 reuse).
template <typename T, typename S>
__global__ void __launch_bounds__(THREADS) forward_kernel(
    const T* __restrict__ x, const T* __restrict__ values, const int* __restrict__ row_ptr,
    const int* __restrict__ col_idx, const int* __restrict__ slot, const T* __restrict__ bias,
    T* __restrict__ y, ConvGeometry g, int64_t pixels, int bo, int bi, int columns) {
  using K = TileKernel<T, S>;
  __shared__ typename K::Smem sm;
  __shared__ int64_t row_n[S::TM];
  __shared__ int row_oh[S::TM], row_ow[S::TM];
  const int column = static_cast<int>(blockIdx.x % columns);
  const int chunks = (bo + S::TN - 1) / S::TN;
  const int r = column / chunks, n0 = (column % chunks) * S::TN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / columns) * S::TM;
  const int tid = threadIdx.x;
  tile_pixels<S>(m0, pixels, g.oh, g.ow, row_n, row_oh, row_ow);
  const bool x_channels_fast = g.sx[1] == 1;
  typename K::Mma mma;
  mma.zero();
  for (int p = row_ptr[r]; p < row_ptr[r + 1]; ++p) {
    const int c = col_idx[p];
    const T* blk = values + static_cast<int64_t>(slot[p]) * bo * bi;
    const int tap = c / g.blocks_per_tap, ch0 = (c % g.blocks_per_tap) * bi;
    const int ki = tap / g.kw, kj = tap % g.kw;
    for (int k0 = 0; k0 < bi; k0 += S::TK) {
      const int kv = k_extent(bi - k0, S::TK);
      __syncthreads();  // previous step done with the tiles (and row_* written)
      for (int e = tid; e < S::TM * kv; e += THREADS) {
        int row, k;
        tile_walk(e, S::TM, kv, x_channels_fast, row, k);
        const int ch = ch0 + k0 + k;
        const int ih = row_oh[row] * g.sh - g.ph + ki * g.dh;
        const int iw = row_ow[row] * g.sw - g.pw + kj * g.dw;
        const bool ok = row_n[row] >= 0 && k0 + k < bi && ch < g.cin && ih >= 0 && ih < g.h && iw >= 0 &&
                        iw < g.w;
        sm.in.a[row * S::A_LD + k] = ok ? x[offset(g.sx, row_n[row], ch, ih, iw)] : zero_value<T>();
      }
      load_block_tile<S>(sm.in.b, blk, bo, bi, k0, n0, kv, /*transposed=*/true);
      __syncthreads();
      mma.step(sm.in.a, sm.in.b, kv);
    }
  }
  __syncthreads();  // the result reuses the operand tiles' shared memory
  mma.store(sm.c);
  __syncthreads();
  store_pixel_tile<S>(sm.c, y, g.sy, row_n, row_oh, row_ow, r * bo + n0, bo - n0, g.cout, bias);
}

}  // namespace

void conv2d_forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, const at::Tensor& slot, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& y, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                    c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_values(values, x);
  check_same_type(y, "y", x);
  check_index(row_ptr, "row_ptr", x);
  check_index(col_idx, "col_idx", x);
  check_index(slot, "slot", x);
  if (bias) {
    check_same_type(*bias, "bias", x);
    TORCH_CHECK(bias->is_contiguous(), "freetickets_cuda: bias must be contiguous");
  }
  const int bo = static_cast<int>(values.size(1)), bi = static_cast<int>(values.size(2));
  const ConvGeometry g = conv_geometry(x, y, kernel_size, stride, padding, dilation, bi);
  const int64_t block_rows = row_ptr.numel() - 1;
  TORCH_CHECK(block_rows == cdiv(g.cout, bo), "freetickets_cuda: row_ptr has ", block_rows,
              " block rows, y's ", g.cout, " channels need ", cdiv(g.cout, bo));
  const int64_t pixels = g.out_pixels();
  if (pixels == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTK_DISPATCH(x.scalar_type(), "freetickets_cuda::conv2d_forward", [&] {
    row_tile<scalar_t>(bo, [&](auto shape) {
      using S = decltype(shape);
      const int64_t columns = block_rows * cdiv(bo, S::TN);
      const int64_t blocks = cdiv(pixels, S::TM) * columns;
      TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "freetickets_cuda: too many thread blocks");
      forward_kernel<scalar_t, S><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
          x.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), row_ptr.data_ptr<int>(),
          col_idx.data_ptr<int>(), slot.data_ptr<int>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
          y.data_ptr<scalar_t>(), g, pixels, bo, bi, static_cast<int>(columns));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace ftk_cuda
