// ConvGeometry and the launchers' tensor checks (geometry.h).
#include "geometry.h"

#include <limits>

namespace ftk_cuda {
namespace {

// (n, c, h, w) element strides of a 4-D activation, or of a 2-D one [N, C] as [N, C, 1, 1].
void nchw_strides(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 4; ++i) s[i] = i < t.dim() ? t.stride(i) : 0;
}

int checked_pair(c10::IntArrayRef v, int i, const char* name, int64_t least) {
  TORCH_CHECK(v.size() == 2 && v[0] >= least && v[1] >= least && v[0] <= (1 << 20) && v[1] <= (1 << 20),
              "freetickets_cuda: bad ", name, " ", v);
  return static_cast<int>(v[i]);
}

}  // namespace

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

unsigned grid_yz(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= 65535, "freetickets_cuda: too many ", what, " (", blocks, " > 65535 thread blocks along one grid axis)");
  return static_cast<unsigned>(blocks);
}

}  // namespace ftk_cuda
