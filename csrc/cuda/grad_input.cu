// conv2d_grad_input: dx[m, cb] = sum over taps t, live (r, t*blocks_per_tap + cb)
// of dy_t[m, r-block] @ values[tslot], through the transposed (column-major)
// indices, where dy_t is dy read at the output pixel that input pixel m feeds
// through tap t (zero where none does: padding, stride gaps).  One thread
// block: TM input pixels x one TN-wide chunk of a channel block's Bi channels.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "gather.cuh"
#include "geometry.h"
#include "kernels.h"

namespace ftk_cuda {
namespace {

// Grid: one thread block per (pixel tile, channel-block chunk), chunks fastest.
template <typename T, typename S>
__global__ void __launch_bounds__(THREADS) grad_input_kernel(
    const T* __restrict__ dy, const T* __restrict__ values, const int* __restrict__ col_ptr,
    const int* __restrict__ row_idx, const int* __restrict__ tslot, T* __restrict__ dx, ConvGeometry g,
    int64_t pixels, int bo, int bi, int columns) {
  using K = TileKernel<T, S>;
  __shared__ typename K::Smem sm;
  __shared__ int64_t row_n[S::TM];
  __shared__ int row_ih[S::TM], row_iw[S::TM];
  __shared__ int tap_oh[S::TM], tap_ow[S::TM];  // output pixel read through the current tap, or -1
  const int column = static_cast<int>(blockIdx.x % columns);
  const int chunks = (bi + S::TN - 1) / S::TN;
  const int cb = column / chunks, n0 = (column % chunks) * S::TN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / columns) * S::TM;
  const int tid = threadIdx.x;
  tile_pixels<S>(m0, pixels, g.h, g.w, row_n, row_ih, row_iw);
  const bool dy_channels_fast = g.sy[1] == 1;
  typename K::Mma mma;
  mma.zero();
  for (int tap = 0; tap < g.kh * g.kw; ++tap) {
    const int col = tap * g.blocks_per_tap + cb;
    if (col_ptr[col] == col_ptr[col + 1]) continue;
    __syncthreads();  // row_* written; previous tap's tiles consumed
    for (int i = tid; i < S::TM; i += THREADS) {
      const int th = row_ih[i] + g.ph - (tap / g.kw) * g.dh;
      const int tw = row_iw[i] + g.pw - (tap % g.kw) * g.dw;
      const bool ok = row_n[i] >= 0 && th >= 0 && tw >= 0 && th % g.sh == 0 && tw % g.sw == 0 &&
                      th / g.sh < g.oh && tw / g.sw < g.ow;
      tap_oh[i] = ok ? th / g.sh : -1;
      tap_ow[i] = ok ? tw / g.sw : -1;
    }
    for (int q = col_ptr[col]; q < col_ptr[col + 1]; ++q) {
      const int r = row_idx[q];
      const T* blk = values + static_cast<int64_t>(tslot[q]) * bo * bi;
      for (int k0 = 0; k0 < bo; k0 += S::TK) {
        const int kv = k_extent(bo - k0, S::TK);
        __syncthreads();
        for (int e = tid; e < S::TM * kv; e += THREADS) {
          int row, k;
          tile_walk(e, S::TM, kv, dy_channels_fast, row, k);
          const int co = r * bo + k0 + k;
          const bool ok = tap_oh[row] >= 0 && k0 + k < bo && co < g.cout;
          sm.in.a[row * S::A_LD + k] =
              ok ? dy[offset(g.sy, row_n[row], co, tap_oh[row], tap_ow[row])] : zero_value<T>();
        }
        load_block_tile<S>(sm.in.b, blk, bo, bi, k0, n0, kv, /*transposed=*/false);
        __syncthreads();
        mma.step(sm.in.a, sm.in.b, kv);
      }
    }
  }
  __syncthreads();  // the result reuses the operand tiles' shared memory
  mma.store(sm.c);
  __syncthreads();
  store_pixel_tile<S>(sm.c, dx, g.sx, row_n, row_ih, row_iw, cb * bi + n0, bi - n0, g.cin,
                      static_cast<const T*>(nullptr));
}

}  // namespace

void conv2d_grad_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_ptr,
                       const at::Tensor& row_idx, const at::Tensor& tslot, const at::Tensor& dx,
                       c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                       c10::IntArrayRef dilation) {
  check_values(values, dy);
  check_same_type(dx, "dx", dy);
  check_index(col_ptr, "col_ptr", dy);
  check_index(row_idx, "row_idx", dy);
  check_index(tslot, "tslot", dy);
  const int bo = static_cast<int>(values.size(1)), bi = static_cast<int>(values.size(2));
  const ConvGeometry g = conv_geometry(dx, dy, kernel_size, stride, padding, dilation, bi);
  const int64_t block_columns = static_cast<int64_t>(g.kh) * g.kw * g.blocks_per_tap;
  TORCH_CHECK(col_ptr.numel() - 1 == block_columns, "freetickets_cuda: col_ptr has ", col_ptr.numel() - 1,
              " block columns, the kernel and dx's channels need ", block_columns);
  const int64_t pixels = g.in_pixels();
  if (pixels == 0) return;
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTK_DISPATCH(dy.scalar_type(), "freetickets_cuda::conv2d_grad_input", [&] {
    row_tile<scalar_t>(bi, [&](auto shape) {
      using S = decltype(shape);
      const int64_t columns = static_cast<int64_t>(g.blocks_per_tap) * cdiv(bi, S::TN);
      const int64_t blocks = cdiv(pixels, S::TM) * columns;
      TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "freetickets_cuda: too many thread blocks");
      grad_input_kernel<scalar_t, S><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
          dy.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), col_ptr.data_ptr<int>(),
          row_idx.data_ptr<int>(), tslot.data_ptr<int>(), dx.data_ptr<scalar_t>(), g, pixels, bo, bi,
          static_cast<int>(columns));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace ftk_cuda
