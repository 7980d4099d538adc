// The dtypes a CPU op takes, and the portable path for bfloat16 and float16:
// operands widened to float32 at the op's entry, the float32 kernels, one
// rounding of the result.  The dedicated bf16 kernels (AVX512-BF16, AMX) are
// chosen per op ahead of it (bf16_runs, bf16_gemm.cpp), as the ISA is for float32.
#include "internal.h"

namespace ftk_cpu {
namespace detail {

at::ScalarType op_dtype(std::initializer_list<const at::Tensor*> operands, std::initializer_list<const char*> names) {
  const at::Tensor& first = **operands.begin();
  const at::ScalarType dtype = first.scalar_type();
  auto name = names.begin();
  for (const at::Tensor* t : operands) {
    TORCH_CHECK(t->device().is_cpu(), "freetickets_cpu: ", *name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == dtype, "freetickets_cpu: ", *name, " is ", t->scalar_type(), " but ",
                *names.begin(), " is ", dtype, "; every floating operand of an op has one dtype");
    ++name;
  }
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "freetickets_cpu: ",
              *names.begin(), " must be float32, bfloat16 or float16, got ", dtype);
  return dtype;
}

at::Tensor widen(const at::Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return t;
  if (t.is_non_overlapping_and_dense()) return t.to(at::kFloat);  // keeps the strides
  // A strided view (.to() would pick a memory format of its own): the same
  // strides, so the float32 kernels choose the layout they choose for t.
  // Overlapping views (expanded dimensions) become contiguous, as the
  // float32 path treats them.
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.stride(d) == 0 && t.size(d) > 1) return t.contiguous().to(at::kFloat);
  return at::empty_strided(t.sizes(), t.strides(), t.options().dtype(at::kFloat)).copy_(t);
}

}  // namespace detail
}  // namespace ftk_cpu
