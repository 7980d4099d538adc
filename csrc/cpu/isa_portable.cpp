// Portable build of the tile kernel: 128-bit vectors (SSE2 on x86-64, NEON on
// aarch64, scalarized elsewhere by the compiler's vector extension).
#define FTK_VEC_BYTES 16
#define FTK_REGS 16
#define FTK_ISA_NAME "portable"
#define FTK_ISA_FN isa_portable
#include "tile_impl.inc"

namespace ftk_cpu {
// On builds without the x86 kernels, isa_avx512()/isa_avx2() are the portable one.
bool isa_supported(const IsaKernel& isa) {
  if (&isa == &isa_portable()) return true;
#if defined(__x86_64__) && defined(__GNUC__)
  if (&isa == &isa_avx512())
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
  if (&isa == &isa_avx2()) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return false;
}
}  // namespace ftk_cpu
