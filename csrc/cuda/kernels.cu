// The CUDA backend's three kernels: implicit-GEMM conv2d with a block-sparse
// weight (a linear layer is the 1x1 conv of 1x1 images).  Same decomposition as
// the Triton backend (freetickets_kernels/backends/implicit_gemm.py):
//
//   forward      y[m, r-block]  = sum over live (r, c) of x_tap(c)[m, cb(c)] @ values[slot]^T
//   grad_input   dx[m, cb]      = sum over taps t, live (r, t*CBPT + cb) of dy_t[m, r-block] @ values[tslot]
//   grad_blocks  listed blocks of dy^T @ x_tap, reduced over output pixels (split in ranges)
//
// Activations are read through their four (n, c, h, w) strides: NCHW and
// channels_last alike, never copied.  Operand tiles are gathered into shared
// memory with masks (ragged edges, padding, stride, dilation) and multiplied by
// TileMma.  Dead blocks are never visited.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"
#include "tile_mma.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the CUDA backend needs sm_80 or newer (bf16 tensor cores): set TORCH_CUDA_ARCH_LIST, e.g. to 8.0;9.0"
#endif

namespace ftk_cuda {
namespace {

// Geometry of one call, as built by ImplicitGemmOps (shape_args + strides).
struct Geometry {
  int64_t m;  // rows of the GEMM: output pixels (forward, grad_blocks) or input pixels (grad_input)
  int cin, h, w, cout, oh, ow, kh, kw, cbpt, sh, sw, ph, pw, dh, dw;
  int64_t sa[4];  // (n, c, h, w) strides of the first activation (x; dy)
  int64_t sb[4];  // strides of the second (y; dx; x)
};

Geometry make_geometry(c10::IntArrayRef g) {
  TORCH_CHECK(g.size() == 24, "freetickets_cuda: geometry needs 24 ints, got ", g.size());
  Geometry o;
  o.m = g[0];
  int* f[] = {&o.cin, &o.h, &o.w, &o.cout, &o.oh, &o.ow, &o.kh, &o.kw, &o.cbpt,
              &o.sh, &o.sw, &o.ph, &o.pw, &o.dh, &o.dw};
  for (int i = 0; i < 15; ++i) *f[i] = static_cast<int>(g[1 + i]);
  for (int i = 0; i < 4; ++i) {
    o.sa[i] = g[16 + i];
    o.sb[i] = g[20 + i];
  }
  return o;
}

__device__ __forceinline__ int64_t offset(const int64_t* s, int64_t n, int64_t c, int64_t y, int64_t x) {
  return n * s[0] + c * s[1] + y * s[2] + x * s[3];
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  return T(0.0f);
}

// Element e of a rows x cols tile, numbered along the dimension that is
// contiguous in global memory (cols when cols_fast), so loads and stores coalesce.
__device__ __forceinline__ void tile_walk(int e, int rows, int cols, bool cols_fast, int& row, int& col) {
  row = cols_fast ? e / cols : e % rows;
  col = cols_fast ? e % cols : e / rows;
}

// B operand tile [TK][TN] from one weight block [bo, bi] (row-major, contiguous
// along bi): forward multiplies by the block transposed, B[k][n] = block[n0+n][k0+k];
// grad_input by the block itself, B[k][n] = block[k0+k][n0+n].  Out-of-block: zero.
template <typename T>
__device__ __forceinline__ void load_block_tile(T* b, const T* blk, int bo, int bi, int k0, int n0,
                                                bool transposed) {
  for (int e = threadIdx.x; e < TK * TN; e += THREADS) {
    int k, n;
    tile_walk(e, TK, TN, !transposed, k, n);  // walk along bi, the block's contiguous dimension
    const int o = transposed ? n0 + n : k0 + k;
    const int i = transposed ? k0 + k : n0 + n;
    b[k * B_LD + n] = o < bo && i < bi ? blk[o * bi + i] : zero_value<T>();
  }
}

// ---------------------------------------------------------------- forward

template <typename T>
__global__ void __launch_bounds__(THREADS) forward_kernel(
    const T* __restrict__ x, const T* __restrict__ values, const int* __restrict__ row_ptr,
    const int* __restrict__ col_idx, const int* __restrict__ slot, const T* __restrict__ bias,
    T* __restrict__ y, Geometry g, int bo, int bi) {
  __shared__ TileSmem<T> sm;
  __shared__ int64_t row_n[TM];
  __shared__ int row_oh[TM], row_ow[TM];
  const int chunks = (bo + TN - 1) / TN;
  const int r = blockIdx.y / chunks, n0 = (blockIdx.y % chunks) * TN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * TM;
  const int tid = threadIdx.x;
  if (tid < TM) {
    const int64_t m = m0 + tid;
    const int64_t hw = static_cast<int64_t>(g.oh) * g.ow;
    row_n[tid] = m < g.m ? m / hw : -1;  // -1: past the last pixel
    row_oh[tid] = static_cast<int>((m % hw) / g.ow);
    row_ow[tid] = static_cast<int>(m % g.ow);
  }
  const bool x_channels_fast = g.sa[1] == 1;
  TileMma<T> mma;
  mma.zero();
  for (int p = row_ptr[r]; p < row_ptr[r + 1]; ++p) {
    const int c = col_idx[p];
    const T* blk = values + static_cast<int64_t>(slot[p]) * bo * bi;
    const int tap = c / g.cbpt, ch0 = (c % g.cbpt) * bi;
    const int ki = tap / g.kw, kj = tap % g.kw;
    for (int k0 = 0; k0 < bi; k0 += TK) {
      __syncthreads();  // previous step done with the tiles (and row_* written)
      for (int e = tid; e < TM * TK; e += THREADS) {
        int row, k;
        tile_walk(e, TM, TK, x_channels_fast, row, k);
        const int ch = ch0 + k0 + k;
        const int ih = row_oh[row] * g.sh - g.ph + ki * g.dh;
        const int iw = row_ow[row] * g.sw - g.pw + kj * g.dw;
        const bool ok = row_n[row] >= 0 && k0 + k < bi && ch < g.cin && ih >= 0 && ih < g.h && iw >= 0 &&
                        iw < g.w;
        sm.a[row * A_LD + k] = ok ? x[offset(g.sa, row_n[row], ch, ih, iw)] : zero_value<T>();
      }
      load_block_tile(sm.b, blk, bo, bi, k0, n0, /*transposed=*/true);
      __syncthreads();
      mma.step(sm.a, sm.b);
    }
  }
  __syncthreads();
  mma.store(sm.c);
  __syncthreads();
  const bool y_channels_fast = g.sb[1] == 1;
  for (int e = tid; e < TM * TN; e += THREADS) {
    int row, n;
    tile_walk(e, TM, TN, y_channels_fast, row, n);
    const int co = r * bo + n0 + n;
    if (row_n[row] < 0 || n0 + n >= bo || co >= g.cout) continue;
    float v = sm.c[row * C_LD + n];
    if (bias != nullptr) v += static_cast<float>(bias[co]);
    y[offset(g.sb, row_n[row], co, row_oh[row], row_ow[row])] = static_cast<T>(v);
  }
}

// ------------------------------------------------------------- grad input

template <typename T>
__global__ void __launch_bounds__(THREADS) grad_input_kernel(
    const T* __restrict__ dy, const T* __restrict__ values, const int* __restrict__ col_ptr,
    const int* __restrict__ row_idx, const int* __restrict__ tslot, T* __restrict__ dx, Geometry g,
    int bo, int bi) {
  __shared__ TileSmem<T> sm;
  __shared__ int64_t row_n[TM];
  __shared__ int row_ih[TM], row_iw[TM];
  __shared__ int tap_oh[TM], tap_ow[TM];  // output pixel read through the current tap, or -1
  const int chunks = (bi + TN - 1) / TN;
  const int cb = blockIdx.y / chunks, n0 = (blockIdx.y % chunks) * TN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * TM;
  const int tid = threadIdx.x;
  if (tid < TM) {
    const int64_t m = m0 + tid;
    const int64_t hw = static_cast<int64_t>(g.h) * g.w;
    row_n[tid] = m < g.m ? m / hw : -1;
    row_ih[tid] = static_cast<int>((m % hw) / g.w);
    row_iw[tid] = static_cast<int>(m % g.w);
  }
  const bool dy_channels_fast = g.sa[1] == 1;
  TileMma<T> mma;
  mma.zero();
  for (int tap = 0; tap < g.kh * g.kw; ++tap) {
    const int col = tap * g.cbpt + cb;
    if (col_ptr[col] == col_ptr[col + 1]) continue;
    __syncthreads();  // row_* written; previous tap's tiles consumed
    if (tid < TM) {
      const int th = row_ih[tid] + g.ph - (tap / g.kw) * g.dh;
      const int tw = row_iw[tid] + g.pw - (tap % g.kw) * g.dw;
      const bool ok = row_n[tid] >= 0 && th >= 0 && tw >= 0 && th % g.sh == 0 && tw % g.sw == 0 &&
                      th / g.sh < g.oh && tw / g.sw < g.ow;
      tap_oh[tid] = ok ? th / g.sh : -1;
      tap_ow[tid] = ok ? tw / g.sw : -1;
    }
    for (int q = col_ptr[col]; q < col_ptr[col + 1]; ++q) {
      const int r = row_idx[q];
      const T* blk = values + static_cast<int64_t>(tslot[q]) * bo * bi;
      for (int k0 = 0; k0 < bo; k0 += TK) {
        __syncthreads();
        for (int e = tid; e < TM * TK; e += THREADS) {
          int row, k;
          tile_walk(e, TM, TK, dy_channels_fast, row, k);
          const int co = r * bo + k0 + k;
          const bool ok = tap_oh[row] >= 0 && k0 + k < bo && co < g.cout;
          sm.a[row * A_LD + k] = ok ? dy[offset(g.sa, row_n[row], co, tap_oh[row], tap_ow[row])] : zero_value<T>();
        }
        load_block_tile(sm.b, blk, bo, bi, k0, n0, /*transposed=*/false);
        __syncthreads();
        mma.step(sm.a, sm.b);
      }
    }
  }
  __syncthreads();
  mma.store(sm.c);
  __syncthreads();
  const bool dx_channels_fast = g.sb[1] == 1;
  for (int e = tid; e < TM * TN; e += THREADS) {
    int row, n;
    tile_walk(e, TM, TN, dx_channels_fast, row, n);
    const int ch = cb * bi + n0 + n;
    if (row_n[row] < 0 || n0 + n >= bi || ch >= g.cin) continue;
    dx[offset(g.sb, row_n[row], ch, row_ih[row], row_iw[row])] = static_cast<T>(sm.c[row * C_LD + n]);
  }
}

// ------------------------------------------------------------ grad blocks

template <typename T>
__global__ void __launch_bounds__(THREADS) grad_blocks_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const int* __restrict__ ent_row,
    const int* __restrict__ ent_col, const int* __restrict__ ent_out, float* __restrict__ out_f32,
    T* __restrict__ out_t, Geometry g, int bo, int bi, int n_out, int64_t chunk, bool squared_norm) {
  __shared__ TileSmem<T> sm;
  __shared__ int64_t pix_n[TK];
  __shared__ int pix_oh[TK], pix_ow[TK], pix_ih[TK], pix_iw[TK];
  const int e_idx = blockIdx.x, split = blockIdx.y;
  const int i_chunks = (bi + TN - 1) / TN;
  const int o0 = (blockIdx.z / i_chunks) * TM, i0 = (blockIdx.z % i_chunks) * TN;
  const int r = ent_row[e_idx], c = ent_col[e_idx];
  const int64_t o = ent_out[e_idx];
  const int tap = c / g.cbpt, ch0 = (c % g.cbpt) * bi;
  const int ki = tap / g.kw, kj = tap % g.kw;
  const int tid = threadIdx.x;
  const int64_t start = split * chunk;
  const int64_t stop = start + chunk < g.m ? start + chunk : g.m;
  const bool dy_channels_fast = g.sa[1] == 1, x_channels_fast = g.sb[1] == 1;
  const int64_t hw = static_cast<int64_t>(g.oh) * g.ow;
  TileMma<T> mma;
  mma.zero();
  for (int64_t m0 = start; m0 < stop; m0 += TK) {
    __syncthreads();
    if (tid < TK) {
      const int64_t m = m0 + tid;
      const int oh = static_cast<int>((m % hw) / g.ow), ow = static_cast<int>(m % g.ow);
      pix_n[tid] = m < stop ? m / hw : -1;
      pix_oh[tid] = oh;
      pix_ow[tid] = ow;
      pix_ih[tid] = oh * g.sh - g.ph + ki * g.dh;
      pix_iw[tid] = ow * g.sw - g.pw + kj * g.dw;
    }
    __syncthreads();
    for (int e = tid; e < TM * TK; e += THREADS) {  // A = dy^T: rows are output channels
      int row, k;  // pixels (k) are contiguous unless channels are
      tile_walk(e, TM, TK, !dy_channels_fast, row, k);
      const int co = r * bo + o0 + row;
      const bool ok = pix_n[k] >= 0 && o0 + row < bo && co < g.cout;
      sm.a[row * A_LD + k] = ok ? dy[offset(g.sa, pix_n[k], co, pix_oh[k], pix_ow[k])] : zero_value<T>();
    }
    for (int e = tid; e < TK * TN; e += THREADS) {  // B = x at this tap: rows are pixels
      int k, n;
      tile_walk(e, TK, TN, x_channels_fast, k, n);
      const int ch = ch0 + i0 + n;
      const int ih = pix_ih[k], iw = pix_iw[k];
      const bool ok = pix_n[k] >= 0 && i0 + n < bi && ch < g.cin && ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
      sm.b[k * B_LD + n] = ok ? x[offset(g.sb, pix_n[k], ch, ih, iw)] : zero_value<T>();
    }
    __syncthreads();
    mma.step(sm.a, sm.b);
  }
  __syncthreads();
  mma.store(sm.c);
  __syncthreads();
  if (squared_norm && out_t == nullptr && gridDim.y == 1) {
    float sum = 0.0f;
    for (int e = tid; e < TM * TN; e += THREADS) {
      const float v = sm.c[(e / TN) * C_LD + e % TN];  // padding rows/columns hold zeros
      sum += v * v;
    }
    for (int s = 16; s > 0; s /= 2) sum += __shfl_down_sync(0xffffffffu, sum, s);
    if (tid % 32 == 0) atomicAdd(out_f32 + o, sum);
    return;
  }
  for (int e = tid; e < TM * TN; e += THREADS) {
    int row, n;
    tile_walk(e, TM, TN, true, row, n);
    if (o0 + row >= bo || i0 + n >= bi) continue;
    const float v = sm.c[row * C_LD + n];
    const int64_t at = (static_cast<int64_t>(split) * n_out + o) * bo * bi + (o0 + row) * bi + i0 + n;
    if (out_t != nullptr) {
      out_t[at] = static_cast<T>(v);
    } else {
      out_f32[at] = v;
    }
  }
}

// ---------------------------------------------------------------- checks

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "freetickets_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "freetickets_cuda: ", name, " is on ", t.device(), ", expected ",
              like.device());
}

void check_index(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_cuda(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous(), "freetickets_cuda: ", name,
              " must be a contiguous int32 tensor");
}

void check_same_type(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_cuda(t, name, like);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "freetickets_cuda: ", name, " is ", t.scalar_type(),
              ", expected ", like.scalar_type());
}

void check_values(const at::Tensor& values, const at::Tensor& like) {
  check_same_type(values, "values", like);
  TORCH_CHECK(values.dim() == 3 && values.is_contiguous(), "freetickets_cuda: values must be a contiguous "
              "[nnzb, Bo, Bi] tensor");
}

// Blocks of the grid dimension that indexes (row or column block) x (64-wide chunk).
unsigned grid_y(int64_t blocks, int block, const char* what) {
  const int64_t y = blocks * ((block + TN - 1) / TN);
  TORCH_CHECK(y <= 65535, "freetickets_cuda: too many ", what, " (", y, " > 65535 grid rows)");
  return static_cast<unsigned>(y);
}

}  // namespace

// -------------------------------------------------------------- launches

#define FTK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
             const at::Tensor& slot, const c10::optional<at::Tensor>& bias, const at::Tensor& y,
             c10::IntArrayRef geometry) {
  check_values(values, x);
  check_same_type(y, "y", x);
  check_index(row_ptr, "row_ptr", x);
  check_index(col_idx, "col_idx", x);
  check_index(slot, "slot", x);
  if (bias) {
    check_same_type(*bias, "bias", x);
    TORCH_CHECK(bias->is_contiguous(), "freetickets_cuda: bias must be contiguous");
  }
  const Geometry g = make_geometry(geometry);
  if (g.m == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int bo = static_cast<int>(values.size(1)), bi = static_cast<int>(values.size(2));
  const dim3 grid(static_cast<unsigned>((g.m + TM - 1) / TM), grid_y(row_ptr.numel() - 1, bo, "block rows"));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTK_DISPATCH(x.scalar_type(), "freetickets_cuda::forward", [&] {
    forward_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(
        x.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), row_ptr.data_ptr<int>(), col_idx.data_ptr<int>(),
        slot.data_ptr<int>(), bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), g, bo, bi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void grad_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_ptr,
                const at::Tensor& row_idx, const at::Tensor& tslot, const at::Tensor& dx,
                c10::IntArrayRef geometry) {
  check_values(values, dy);
  check_same_type(dx, "dx", dy);
  check_index(col_ptr, "col_ptr", dy);
  check_index(row_idx, "row_idx", dy);
  check_index(tslot, "tslot", dy);
  const Geometry g = make_geometry(geometry);
  if (g.m == 0) return;
  const c10::cuda::CUDAGuard guard(dy.device());
  const int bo = static_cast<int>(values.size(1)), bi = static_cast<int>(values.size(2));
  const dim3 grid(static_cast<unsigned>((g.m + TM - 1) / TM), grid_y(g.cbpt, bi, "channel blocks"));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTK_DISPATCH(dy.scalar_type(), "freetickets_cuda::grad_input", [&] {
    grad_input_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(
        dy.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), col_ptr.data_ptr<int>(), row_idx.data_ptr<int>(),
        tslot.data_ptr<int>(), dx.data_ptr<scalar_t>(), g, bo, bi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void grad_blocks(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols,
                 const at::Tensor& outs, const at::Tensor& out, c10::IntArrayRef geometry, int64_t block_o,
                 int64_t block_i, int64_t split, int64_t chunk, bool squared_norm) {
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
  const Geometry g = make_geometry(geometry);
  const int64_t n_entries = rows.numel();
  if (g.m == 0 || n_entries == 0) return;
  TORCH_CHECK(n_entries <= 0x7fffffff, "freetickets_cuda: too many blocks");
  const int bo = static_cast<int>(block_o), bi = static_cast<int>(block_i);
  const int64_t z = static_cast<int64_t>((bo + TM - 1) / TM) * ((bi + TN - 1) / TN);
  TORCH_CHECK(z <= 65535, "freetickets_cuda: block size too large");
  if (squared_norm && split == 1) out.zero_();  // partial squared sums are added atomically
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(static_cast<unsigned>(n_entries), static_cast<unsigned>(split), static_cast<unsigned>(z));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTK_DISPATCH(x.scalar_type(), "freetickets_cuda::grad_blocks", [&] {
    grad_blocks_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), rows.data_ptr<int>(), cols.data_ptr<int>(),
        outs.data_ptr<int>(), to_fp32 ? out.data_ptr<float>() : nullptr,
        to_fp32 ? nullptr : out.data_ptr<scalar_t>(), g, bo, bi, static_cast<int>(outs.numel()), chunk,
        squared_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ftk_cuda
