// conv2d_grad_blocks: the listed weight blocks of dy^T @ x_tap, reduced over
// output pixels, or each one's squared L2 norm: grad_values (the live blocks)
// and grad_block_norms (every block, for RigL).  With split > 1, split k sums
// output pixels [k*chunk, (k+1)*chunk) into out[k] (fp32), reduced by the
// Python backend.  One thread block: one listed block (or a 64x64 piece of a
// larger one) over one pixel range; the tile is the block's size, so blocks
// of 16 and 32 multiply no padding.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "gather.cuh"
#include "geometry.h"
#include "kernels.h"

namespace ftk_cuda {
namespace {

// Grid: (listed block, pixel range, piece of the block).
template <typename T, typename S>
__global__ void __launch_bounds__(THREADS) grad_blocks_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const int* __restrict__ ent_row,
    const int* __restrict__ ent_col, const int* __restrict__ ent_out, float* __restrict__ out_f32,
    T* __restrict__ out_t, ConvGeometry g, int64_t pixels, int bo, int bi, int n_out, int64_t chunk,
    bool squared_norm) {
  using K = TileKernel<T, S>;
  __shared__ typename K::Smem sm;
  __shared__ int64_t pix_n[S::TK];
  __shared__ int pix_oh[S::TK], pix_ow[S::TK], pix_ih[S::TK], pix_iw[S::TK];
  const int e_idx = blockIdx.x, split = blockIdx.y;
  const int i_chunks = (bi + S::TN - 1) / S::TN;
  const int o0 = (blockIdx.z / i_chunks) * S::TM, i0 = (blockIdx.z % i_chunks) * S::TN;
  const int r = ent_row[e_idx], c = ent_col[e_idx];
  const int64_t o = ent_out[e_idx];
  const int tap = c / g.blocks_per_tap, ch0 = (c % g.blocks_per_tap) * bi;
  const int ki = tap / g.kw, kj = tap % g.kw;
  const int tid = threadIdx.x;
  const int64_t start = split * chunk;
  const int64_t stop = start + chunk < pixels ? start + chunk : pixels;
  const bool dy_channels_fast = g.sy[1] == 1, x_channels_fast = g.sx[1] == 1;
  const int64_t hw = static_cast<int64_t>(g.oh) * g.ow;
  typename K::Mma mma;
  mma.zero();
  for (int64_t m0 = start; m0 < stop; m0 += S::TK) {
    const int kv = k_extent(static_cast<int>(stop - m0 < S::TK ? stop - m0 : S::TK), S::TK);
    __syncthreads();
    if (tid < S::TK) {
      const int64_t m = m0 + tid;
      const int oh = static_cast<int>((m % hw) / g.ow), ow = static_cast<int>(m % g.ow);
      pix_n[tid] = m < stop ? m / hw : -1;
      pix_oh[tid] = oh;
      pix_ow[tid] = ow;
      pix_ih[tid] = oh * g.sh - g.ph + ki * g.dh;
      pix_iw[tid] = ow * g.sw - g.pw + kj * g.dw;
    }
    __syncthreads();
    for (int e = tid; e < S::TM * kv; e += THREADS) {  // A = dy^T: rows are output channels
      int row, k;  // pixels (k) are contiguous unless channels are
      tile_walk(e, S::TM, kv, !dy_channels_fast, row, k);
      const int co = r * bo + o0 + row;
      const bool ok = pix_n[k] >= 0 && o0 + row < bo && co < g.cout;
      sm.in.a[row * S::A_LD + k] = ok ? dy[offset(g.sy, pix_n[k], co, pix_oh[k], pix_ow[k])] : zero_value<T>();
    }
    for (int e = tid; e < kv * S::TN; e += THREADS) {  // B = x at this tap: rows are pixels
      int k, n;
      tile_walk(e, kv, S::TN, x_channels_fast, k, n);
      const int ch = ch0 + i0 + n;
      const int ih = pix_ih[k], iw = pix_iw[k];
      const bool ok = pix_n[k] >= 0 && i0 + n < bi && ch < g.cin && ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
      sm.in.b[k * S::B_LD + n] = ok ? x[offset(g.sx, pix_n[k], ch, ih, iw)] : zero_value<T>();
    }
    __syncthreads();
    mma.step(sm.in.a, sm.in.b, kv);
  }
  __syncthreads();  // the result reuses the operand tiles' shared memory
  mma.store(sm.c);
  __syncthreads();
  if (squared_norm && out_t == nullptr && gridDim.y == 1) {
    float sum = 0.0f;
    for (int e = tid; e < S::TM * S::TN; e += THREADS) {
      const float v = sm.c[(e / S::TN) * S::C_LD + e % S::TN];  // padding rows/columns hold zeros
      sum += v * v;
    }
    for (int s = 16; s > 0; s /= 2) sum += __shfl_down_sync(0xffffffffu, sum, s);
    if (tid % 32 == 0) atomicAdd(out_f32 + o, sum);
    return;
  }
  for (int e = tid; e < S::TM * S::TN; e += THREADS) {
    int row, n;
    tile_walk(e, S::TM, S::TN, true, row, n);
    if (o0 + row >= bo || i0 + n >= bi) continue;
    const float v = sm.c[row * S::C_LD + n];
    const int64_t at = (static_cast<int64_t>(split) * n_out + o) * bo * bi + (o0 + row) * bi + i0 + n;
    if (out_t != nullptr) {
      out_t[at] = static_cast<T>(v);
    } else {
      out_f32[at] = v;
    }
  }
}

}  // namespace

void conv2d_grad_blocks(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols,
                        const at::Tensor& outs, const at::Tensor& out, c10::IntArrayRef block_size,
                        c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                        c10::IntArrayRef dilation, int64_t split, int64_t chunk, bool squared_norm) {
  check_same_type(dy, "grad_out", x);
  check_index(rows, "entry rows", x);
  check_index(cols, "entry cols", x);
  check_index(outs, "entry outs", x);
  check_cuda(out, "out", x);
  TORCH_CHECK(out.is_contiguous(), "freetickets_cuda: out must be contiguous");
  const bool to_fp32 = split > 1 || squared_norm;
  TORCH_CHECK(out.scalar_type() == (to_fp32 ? at::kFloat : x.scalar_type()),
              "freetickets_cuda: out has the wrong dtype ", out.scalar_type());
  TORCH_CHECK(split >= 1 && split <= 65535, "freetickets_cuda: split must be in [1, 65535]");
  TORCH_CHECK(block_size.size() == 2 && block_size[0] >= 1 && block_size[1] >= 1,
              "freetickets_cuda: bad block_size ", block_size);
  const int bo = static_cast<int>(block_size[0]), bi = static_cast<int>(block_size[1]);
  const ConvGeometry g = conv_geometry(x, dy, kernel_size, stride, padding, dilation, bi);
  const int64_t pixels = g.out_pixels(), n_entries = rows.numel();
  if (pixels == 0 || n_entries == 0) return;
  TORCH_CHECK(n_entries <= 0x7fffffff, "freetickets_cuda: too many blocks");
  if (squared_norm && split == 1) out.zero_();  // partial squared sums are added atomically
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTK_DISPATCH(x.scalar_type(), "freetickets_cuda::conv2d_grad_blocks", [&] {
    block_tile(bo, bi, [&](auto shape) {
      using S = decltype(shape);
      const unsigned pieces = grid_yz(cdiv(bo, S::TM) * cdiv(bi, S::TN), "pieces of one block");
      const dim3 grid(static_cast<unsigned>(n_entries), static_cast<unsigned>(split), pieces);
      grad_blocks_kernel<scalar_t, S><<<grid, THREADS, 0, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), rows.data_ptr<int>(), cols.data_ptr<int>(),
          outs.data_ptr<int>(), to_fp32 ? out.data_ptr<float>() : nullptr,
          to_fp32 ? nullptr : out.data_ptr<scalar_t>(), g, pixels, bo, bi, static_cast<int>(outs.numel()),
          chunk, squared_norm);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace ftk_cuda
