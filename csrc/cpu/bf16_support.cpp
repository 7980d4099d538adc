// Which bf16 kernels this CPU runs: CPUID for the instructions, XCR0 for the
// OS saving their register state, and for AMX the Linux permission to use
// the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, asked once per process).
#include "bf16_tile.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ftk_cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
struct Cpu {
  bool avx512_bf16 = false, amx_bf16 = false, os_avx512 = false, os_amx = false;
  Cpu() {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    const bool avx512f = b & (1u << 16), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
    amx_bf16 = (d & (1u << 22)) && (d & (1u << 24));
    const bool xsave = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 27));  // OSXSAVE
    if (xsave) {
      unsigned lo, hi;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      os_avx512 = (lo & 0xe6) == 0xe6;      // SSE, AVX, opmask, ZMM state
      os_amx = (lo & (3u << 17)) == (3u << 17);  // XTILECFG, XTILEDATA
    }
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d))
      avx512_bf16 = avx512f && avx512bw && avx512vl && (a & (1u << 5));
  }
};
const Cpu& cpu() {
  static const Cpu c;
  return c;
}
#endif

// nullptr when granted, else why not.
const char* amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
  static const char* why = [] () -> const char* {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
      return "Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM; kernel older than 5.16?)";
    return nullptr;
  }();
  return why;
#else
  return "AMX needs Linux on x86-64";
#endif
}

}  // namespace

bool bf16_supported(const Bf16Kernel& k, const char** why) {
  const char* reason = nullptr;
  if (!k.block) {
    reason = "this build has no such kernel (GCC 11 or newer on x86-64 builds it)";
  } else if (&k == &bf16_emulated()) {
#if defined(__x86_64__) && defined(__GNUC__)
  } else if (&k == &bf16_amx()) {
    if (!cpu().amx_bf16)
      reason = "this CPU has no AMX-BF16";
    else if (!cpu().os_amx || !cpu().os_avx512)
      reason = "the OS does not enable the AMX tile state";
    else
      reason = amx_permission();
  } else if (&k == &bf16_avx512()) {
    if (!cpu().avx512_bf16)
      reason = "this CPU has no AVX512-BF16";
    else if (!cpu().os_avx512)
      reason = "the OS does not enable the AVX-512 state";
#endif
  }
  if (why) *why = reason;
  return reason == nullptr;
}

}  // namespace ftk_cpu
