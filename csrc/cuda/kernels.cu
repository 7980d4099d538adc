// The CUDA backend's three kernels: implicit-GEMM conv2d with a block-sparse
// weight (a linear layer is the 1x1 conv of 1x1 images).  Same decomposition as
// the Triton backend (freetickets_kernels/backends/implicit_gemm.py):
//
//   conv2d_forward      y[m, r-block] = sum over live (r, c) of x_tap(c)[m, cb(c)] @ values[slot]^T
//   conv2d_grad_input   dx[m, cb]     = sum over taps t, live (r, t*blocks_per_tap + cb) of
//                                       dy_t[m, r-block] @ values[tslot]
//   conv2d_grad_blocks  listed blocks of dy^T @ x_tap, reduced over output pixels (split in ranges)
//
// where weight block column c is channel block cb(c) = c % blocks_per_tap at tap c / blocks_per_tap.
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

#include <limits>

#include "kernels.h"
#include "tile_mma.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the CUDA backend needs sm_80 or newer (bf16 tensor cores): set TORCH_CUDA_ARCH_LIST, e.g. to 8.0;9.0"
#endif

namespace ftk_cuda {
namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One call's convolution in the kernels' terms, read off its two activations
// and the named conv arguments of the op.  The field names are those of
// ConvProblem and of the Triton kernels' arguments (upper case there), see
// freetickets_kernels/backends/implicit_gemm.py; tests/test_implicit_gemm.py
// checks this field list against ConvProblem.kernel_args.
struct ConvGeometry {
  int n, cin, h, w, cout, oh, ow, kh, kw, blocks_per_tap, sh, sw, ph, pw, dh, dw;
  int64_t sx[4];  // (n, c, h, w) strides of the input-side activation (x; dx)
  int64_t sy[4];  // (n, c, h, w) strides of the output-side activation (y; dy)

  int64_t in_pixels() const { return static_cast<int64_t>(n) * h * w; }
  int64_t out_pixels() const { return static_cast<int64_t>(n) * oh * ow; }
};

// (n, c, h, w) element strides of a 4-D activation, or of a 2-D one [N, C] as [N, C, 1, 1].
void nchw_strides(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 4; ++i) s[i] = i < t.dim() ? t.stride(i) : 0;
}

int checked_pair(c10::IntArrayRef v, int i, const char* name, int64_t least) {
  TORCH_CHECK(v.size() == 2 && v[0] >= least && v[1] >= least && v[0] <= (1 << 20) && v[1] <= (1 << 20),
              "freetickets_cuda: bad ", name, " ", v);
  return static_cast<int>(v[i]);
}

// `input` is x or dx ([N, Cin, H, W], or [N, Cin] for a linear layer), `output`
// y or dy ([N, Cout, OH, OW] or [N, Cout]); Bi = block_in input channels per block.
ConvGeometry conv_geometry(const at::Tensor& input, const at::Tensor& output, c10::IntArrayRef kernel_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                           int64_t block_in) {
  TORCH_CHECK(input.dim() == output.dim() && (input.dim() == 4 || input.dim() == 2),
              "freetickets_cuda: activations must be both [N, C, H, W] or both [N, C], got ", input.sizes(),
              " and ", output.sizes());
  TORCH_CHECK(input.size(0) == output.size(0), "freetickets_cuda: batch ", input.size(0), " in, ",
              output.size(0), " out");
  TORCH_CHECK(block_in >= 1, "freetickets_cuda: bad block size ", block_in);
  for (const at::Tensor* t : {&input, &output})
    for (int64_t d : t->sizes())
      TORCH_CHECK(d <= std::numeric_limits<int>::max(), "freetickets_cuda: dimension ", d, " too large");
  const bool image = input.dim() == 4;
  ConvGeometry g;
  g.n = static_cast<int>(input.size(0));
  g.cin = static_cast<int>(input.size(1));
  g.h = image ? static_cast<int>(input.size(2)) : 1;
  g.w = image ? static_cast<int>(input.size(3)) : 1;
  g.cout = static_cast<int>(output.size(1));
  g.oh = image ? static_cast<int>(output.size(2)) : 1;
  g.ow = image ? static_cast<int>(output.size(3)) : 1;
  g.kh = checked_pair(kernel_size, 0, "kernel_size", 1);
  g.kw = checked_pair(kernel_size, 1, "kernel_size", 1);
  g.blocks_per_tap = static_cast<int>(cdiv(g.cin, block_in));
  g.sh = checked_pair(stride, 0, "stride", 1);
  g.sw = checked_pair(stride, 1, "stride", 1);
  g.ph = checked_pair(padding, 0, "padding", 0);
  g.pw = checked_pair(padding, 1, "padding", 0);
  g.dh = checked_pair(dilation, 0, "dilation", 1);
  g.dw = checked_pair(dilation, 1, "dilation", 1);
  const int64_t span_h = static_cast<int64_t>(g.h) + 2 * g.ph - static_cast<int64_t>(g.dh) * (g.kh - 1) - 1;
  const int64_t span_w = static_cast<int64_t>(g.w) + 2 * g.pw - static_cast<int64_t>(g.dw) * (g.kw - 1) - 1;
  TORCH_CHECK(span_h >= 0 && span_w >= 0 && g.oh == span_h / g.sh + 1 && g.ow == span_w / g.sw + 1,
              "freetickets_cuda: output ", output.sizes(), " is not the conv of input ", input.sizes(),
              " (kernel_size ", kernel_size, ", stride ", stride, ", padding ", padding, ", dilation ", dilation,
              ")");
  nchw_strides(input, g.sx);
  nchw_strides(output, g.sy);
  return g;
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
    T* __restrict__ y, ConvGeometry g, int64_t pixels, int bo, int bi) {
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
    row_n[tid] = m < pixels ? m / hw : -1;  // -1: past the last pixel
    row_oh[tid] = static_cast<int>((m % hw) / g.ow);
    row_ow[tid] = static_cast<int>(m % g.ow);
  }
  const bool x_channels_fast = g.sx[1] == 1;
  TileMma<T> mma;
  mma.zero();
  for (int p = row_ptr[r]; p < row_ptr[r + 1]; ++p) {
    const int c = col_idx[p];
    const T* blk = values + static_cast<int64_t>(slot[p]) * bo * bi;
    const int tap = c / g.blocks_per_tap, ch0 = (c % g.blocks_per_tap) * bi;
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
        sm.a[row * A_LD + k] = ok ? x[offset(g.sx, row_n[row], ch, ih, iw)] : zero_value<T>();
      }
      load_block_tile(sm.b, blk, bo, bi, k0, n0, /*transposed=*/true);
      __syncthreads();
      mma.step(sm.a, sm.b);
    }
  }
  __syncthreads();
  mma.store(sm.c);
  __syncthreads();
  const bool y_channels_fast = g.sy[1] == 1;
  for (int e = tid; e < TM * TN; e += THREADS) {
    int row, n;
    tile_walk(e, TM, TN, y_channels_fast, row, n);
    const int co = r * bo + n0 + n;
    if (row_n[row] < 0 || n0 + n >= bo || co >= g.cout) continue;
    float v = sm.c[row * C_LD + n];
    if (bias != nullptr) v += static_cast<float>(bias[co]);
    y[offset(g.sy, row_n[row], co, row_oh[row], row_ow[row])] = static_cast<T>(v);
  }
}

// ------------------------------------------------------------- grad input

template <typename T>
__global__ void __launch_bounds__(THREADS) grad_input_kernel(
    const T* __restrict__ dy, const T* __restrict__ values, const int* __restrict__ col_ptr,
    const int* __restrict__ row_idx, const int* __restrict__ tslot, T* __restrict__ dx, ConvGeometry g,
    int64_t pixels, int bo, int bi) {
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
    row_n[tid] = m < pixels ? m / hw : -1;
    row_ih[tid] = static_cast<int>((m % hw) / g.w);
    row_iw[tid] = static_cast<int>(m % g.w);
  }
  const bool dy_channels_fast = g.sy[1] == 1;
  TileMma<T> mma;
  mma.zero();
  for (int tap = 0; tap < g.kh * g.kw; ++tap) {
    const int col = tap * g.blocks_per_tap + cb;
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
          sm.a[row * A_LD + k] = ok ? dy[offset(g.sy, row_n[row], co, tap_oh[row], tap_ow[row])] : zero_value<T>();
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
  const bool dx_channels_fast = g.sx[1] == 1;
  for (int e = tid; e < TM * TN; e += THREADS) {
    int row, n;
    tile_walk(e, TM, TN, dx_channels_fast, row, n);
    const int ch = cb * bi + n0 + n;
    if (row_n[row] < 0 || n0 + n >= bi || ch >= g.cin) continue;
    dx[offset(g.sx, row_n[row], ch, row_ih[row], row_iw[row])] = static_cast<T>(sm.c[row * C_LD + n]);
  }
}

// ------------------------------------------------------------ grad blocks

template <typename T>
__global__ void __launch_bounds__(THREADS) grad_blocks_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const int* __restrict__ ent_row,
    const int* __restrict__ ent_col, const int* __restrict__ ent_out, float* __restrict__ out_f32,
    T* __restrict__ out_t, ConvGeometry g, int64_t pixels, int bo, int bi, int n_out, int64_t chunk,
    bool squared_norm) {
  __shared__ TileSmem<T> sm;
  __shared__ int64_t pix_n[TK];
  __shared__ int pix_oh[TK], pix_ow[TK], pix_ih[TK], pix_iw[TK];
  const int e_idx = blockIdx.x, split = blockIdx.y;
  const int i_chunks = (bi + TN - 1) / TN;
  const int o0 = (blockIdx.z / i_chunks) * TM, i0 = (blockIdx.z % i_chunks) * TN;
  const int r = ent_row[e_idx], c = ent_col[e_idx];
  const int64_t o = ent_out[e_idx];
  const int tap = c / g.blocks_per_tap, ch0 = (c % g.blocks_per_tap) * bi;
  const int ki = tap / g.kw, kj = tap % g.kw;
  const int tid = threadIdx.x;
  const int64_t start = split * chunk;
  const int64_t stop = start + chunk < pixels ? start + chunk : pixels;
  const bool dy_channels_fast = g.sy[1] == 1, x_channels_fast = g.sx[1] == 1;
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
      sm.a[row * A_LD + k] = ok ? dy[offset(g.sy, pix_n[k], co, pix_oh[k], pix_ow[k])] : zero_value<T>();
    }
    for (int e = tid; e < TK * TN; e += THREADS) {  // B = x at this tap: rows are pixels
      int k, n;
      tile_walk(e, TK, TN, x_channels_fast, k, n);
      const int ch = ch0 + i0 + n;
      const int ih = pix_ih[k], iw = pix_iw[k];
      const bool ok = pix_n[k] >= 0 && i0 + n < bi && ch < g.cin && ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
      sm.b[k * B_LD + n] = ok ? x[offset(g.sx, pix_n[k], ch, ih, iw)] : zero_value<T>();
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
  TORCH_CHECK(row_ptr.numel() - 1 == cdiv(g.cout, bo), "freetickets_cuda: row_ptr has ", row_ptr.numel() - 1,
              " block rows, y's ", g.cout, " channels need ", cdiv(g.cout, bo));
  const int64_t pixels = g.out_pixels();
  if (pixels == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(static_cast<unsigned>((pixels + TM - 1) / TM), grid_y(row_ptr.numel() - 1, bo, "block rows"));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTK_DISPATCH(x.scalar_type(), "freetickets_cuda::conv2d_forward", [&] {
    forward_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(
        x.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), row_ptr.data_ptr<int>(), col_idx.data_ptr<int>(),
        slot.data_ptr<int>(), bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), g, pixels,
        bo, bi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

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
  const int64_t columns = static_cast<int64_t>(g.kh) * g.kw * g.blocks_per_tap;
  TORCH_CHECK(col_ptr.numel() - 1 == columns, "freetickets_cuda: col_ptr has ", col_ptr.numel() - 1,
              " block columns, the kernel and dx's channels need ", columns);
  const int64_t pixels = g.in_pixels();
  if (pixels == 0) return;
  const c10::cuda::CUDAGuard guard(dy.device());
  const dim3 grid(static_cast<unsigned>((pixels + TM - 1) / TM), grid_y(g.blocks_per_tap, bi, "channel blocks"));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTK_DISPATCH(dy.scalar_type(), "freetickets_cuda::conv2d_grad_input", [&] {
    grad_input_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(
        dy.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), col_ptr.data_ptr<int>(), row_idx.data_ptr<int>(),
        tslot.data_ptr<int>(), dx.data_ptr<scalar_t>(), g, pixels, bo, bi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

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
  const int64_t z = static_cast<int64_t>((bo + TM - 1) / TM) * ((bi + TN - 1) / TN);
  TORCH_CHECK(z <= 65535, "freetickets_cuda: block size too large");
  if (squared_norm && split == 1) out.zero_();  // partial squared sums are added atomically
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(static_cast<unsigned>(n_entries), static_cast<unsigned>(split), static_cast<unsigned>(z));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTK_DISPATCH(x.scalar_type(), "freetickets_cuda::conv2d_grad_blocks", [&] {
    grad_blocks_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), rows.data_ptr<int>(), cols.data_ptr<int>(),
        outs.data_ptr<int>(), to_fp32 ? out.data_ptr<float>() : nullptr,
        to_fp32 ? nullptr : out.data_ptr<scalar_t>(), g, pixels, bo, bi, static_cast<int>(outs.numel()), chunk,
        squared_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ftk_cuda
