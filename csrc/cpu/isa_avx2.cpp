// AVX2 + FMA build of the tile kernel (chosen at run time when the CPU has it).
#include "tile.h"
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FTK_VEC_BYTES 32
// No FTK_STREAM: a 32-byte non-temporal store fills half a cache line, and the
// transpose writes the other half only after a whole sweep of columns, so
// each line left the write-combining buffers partial: NCHW outputs were 2x
// slower with them than with plain stores.
#define FTK_REGS 16
#define FTK_ISA_NAME "avx2"
#define FTK_ISA_FN isa_avx2_impl
#include "tile_impl.inc"
#pragma GCC pop_options
namespace ftk_cpu {
const IsaKernel& isa_avx2() { return isa_avx2_impl(); }
}
#else
namespace ftk_cpu {
const IsaKernel& isa_avx2() { return isa_portable(); }
}
#endif
