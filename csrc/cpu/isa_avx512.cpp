// AVX-512 build of the tile kernel (chosen at run time when the CPU has it).
#include "tile.h"
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#define FTK_VEC_BYTES 64
#include <immintrin.h>
#define FTK_STREAM(p, v) _mm512_stream_ps(p, (__m512)(v))
#define FTK_REGS 32
#define FTK_ISA_NAME "avx512"
#define FTK_ISA_FN isa_avx512_impl
#include "tile_impl.inc"
#pragma GCC pop_options
namespace ftk_cpu {
const IsaKernel& isa_avx512() { return isa_avx512_impl(); }
}
#else
namespace ftk_cpu {
const IsaKernel& isa_avx512() { return isa_portable(); }
}
#endif
