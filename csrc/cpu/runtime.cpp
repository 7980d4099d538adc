// Run time of the CPU backend: which instruction set runs, argument checks,
// per-thread scratch, what the caches hold, and build_info/set_isa.
#include <c10/core/InferenceMode.h>

#include <unistd.h>

#include <cstdlib>

#include "internal.h"

namespace ftk_cpu {
namespace detail {
namespace {

std::atomic<const IsaKernel*> g_isa{nullptr};
std::atomic<const Bf16Kernel*> g_bf16{nullptr};

const IsaKernel* isa_by_name(const std::string& name) {
  if (name == "avx512") return &isa_avx512();
  if (name == "avx2") return &isa_avx2();
  if (name == "portable") return &isa_portable();
  return nullptr;
}

// The bf16 kernels, best first.  The emulation is for tests: never chosen by "auto".
const Bf16Kernel* const kBf16Kernels[] = {&bf16_amx(), &bf16_avx512(), &bf16_emulated()};

const Bf16Kernel* bf16_by_name(const std::string& name) {
  for (const Bf16Kernel* k : kBf16Kernels)
    if (name == k->name) return k;
  return nullptr;
}

const Bf16Kernel* best_bf16() {
  for (const Bf16Kernel* k : {&bf16_amx(), &bf16_avx512()})
    if (bf16_supported(*k, nullptr)) return k;
  return nullptr;
}

const IsaKernel& best_isa() {
  for (const IsaKernel* isa : {&isa_avx512(), &isa_avx2()})
    if (isa_supported(*isa)) return *isa;
  return isa_portable();
}

// "auto": the best of both.  A float32 set (avx512, avx2, portable): that
// one, bf16 widened to it.  A bf16 kernel (amx, avx512_bf16, amx_emulated):
// that one for bf16, the best float32 set for float32.
const IsaKernel& set_isa_checked(const std::string& name) {
  const Bf16Kernel* bf16 = bf16_by_name(name);
  const IsaKernel* isa = name == "auto" || bf16 ? &best_isa() : isa_by_name(name);
  TORCH_CHECK(isa != nullptr, "freetickets_cpu: unknown instruction set '", name,
              "'; choose auto, avx512, avx2, portable (float32; bf16 widened) or amx, avx512_bf16, "
              "amx_emulated (bf16)");
  TORCH_CHECK(isa_supported(*isa), "freetickets_cpu: this CPU (or this build) has no '", name,
              "' kernel; best available is '", best_isa().name, "'");
  const char* why = nullptr;
  TORCH_CHECK(!bf16 || bf16_supported(*bf16, &why), "freetickets_cpu: no '", name, "' bf16 kernel here: ", why ? why : "");
  g_bf16.store(name == "auto" ? best_bf16() : bf16);
  g_isa.store(isa);
  return *isa;
}

// Bytes of this core's level-1 data or level-2 cache, as the C library
// reports them; `fallback` where it does not.
int64_t cache_bytes(int level, int64_t fallback) {
  long bytes = 0;
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)  // glibc
  bytes = sysconf(level == 1 ? _SC_LEVEL1_DCACHE_SIZE : _SC_LEVEL2_CACHE_SIZE);
#endif
  return bytes > 0 ? int64_t(bytes) : fallback;
}

}  // namespace

const IsaKernel& isa() {
  const IsaKernel* current = g_isa.load();
  if (current) return *current;
  const char* env = std::getenv("FREETICKETS_CPU_ISA");
  return set_isa_checked(env && *env ? env : "auto");
}

const Bf16Kernel* bf16_kernel() {
  isa();  // makes the choice on first use
  return g_bf16.load();
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "freetickets_cpu: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "freetickets_cpu: ", name,
              " must be float32, got ", t.scalar_type());
}

void check_indices(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot,
                   int64_t n_inner, int64_t nnzb, const char* what) {
  for (const at::Tensor* t : {&ptr, &idx, &slot}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous() &&
                    t->device().is_cpu(),
                "freetickets_cpu: ", what, " indices must be contiguous 1-D int32 CPU tensors");
  }
  TORCH_CHECK(idx.numel() == nnzb && slot.numel() == nnzb, "freetickets_cpu: ", what,
              " indices hold ", idx.numel(), " entries but values hold ", nnzb, " blocks");
  const int32_t* p = ptr.data_ptr<int32_t>();
  const int64_t outer = ptr.numel() - 1;
  TORCH_CHECK(outer >= 0 && p[0] == 0 && p[outer] == nnzb, "freetickets_cpu: ", what,
              " pointer does not span the ", nnzb, " blocks");
  for (int64_t i = 0; i < outer; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], "freetickets_cpu: ", what, " pointer is not monotone");
  const int32_t* ix = idx.data_ptr<int32_t>();
  const int32_t* sl = slot.data_ptr<int32_t>();
  for (int64_t e = 0; e < nnzb; ++e) {
    TORCH_CHECK(ix[e] >= 0 && ix[e] < n_inner, "freetickets_cpu: ", what,
                " block index out of range");
    TORCH_CHECK(sl[e] >= 0 && sl[e] < nnzb, "freetickets_cpu: ", what, " slot out of range");
  }
}

at::Tensor scratch(Scratch which, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local at::Tensor buffers[kNumScratch];
  int64_t numel = 1;
  for (int64_t d : sizes) numel *= d;
  at::Tensor& buf = buffers[which];
  if (!buf.defined() || buf.numel() < numel || buf.options().dtype() != options.dtype()) {
    // A normal tensor even under torch.inference_mode(): an inference tensor
    // could not be written to by a later call made outside it.
    c10::InferenceMode normal_tensors(false);
    buf = at::empty({std::max<int64_t>(numel, 1)}, options);
  }
  return buf.narrow(0, 0, numel).view(sizes);
}

at::Tensor padded_bias(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& like) {
  if (!bias.has_value()) return at::Tensor();
  check_float(*bias, "bias");
  at::Tensor out = at::zeros({n}, like.options());
  out.narrow(0, 0, bias->numel()).copy_(*bias);
  return out;
}

at::Tensor conv_output(at::IntArrayRef sizes, const at::Tensor& like) {
  const bool channels_last = like.is_contiguous(at::MemoryFormat::ChannelsLast) && !like.is_contiguous();
  return at::empty(sizes, like.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
}

bool too_big_for_cache(int64_t floats) {
  static const int64_t l2 = cache_bytes(2, int64_t(1) << 20);
  return floats * int64_t(sizeof(float)) > l2 * at::get_num_threads();
}

bool prefetch_pays(int64_t floats) {
  static const int64_t l1 = cache_bytes(1, int64_t(32) << 10);
  return floats * int64_t(sizeof(float)) <= l1;
}

}  // namespace detail

std::string build_info() {
  std::string s = "isa=";
  s += detail::isa().name;
  s += " supported=";
  const char* sep = "";
  std::vector<const IsaKernel*> listed;  // non-x86 builds alias every ISA to the portable one
  for (const IsaKernel* k : {&isa_avx512(), &isa_avx2(), &isa_portable()}) {
    if (!isa_supported(*k) || std::count(listed.begin(), listed.end(), k)) continue;
    listed.push_back(k);
    s += sep;
    s += k->name;
    sep = ",";
  }
  s += " bf16=";
  s += detail::bf16_kernel() ? detail::bf16_kernel()->name : "widened";
  s += " bf16_kernels=";
  sep = "";
  for (const Bf16Kernel* k : detail::kBf16Kernels) {
    if (!bf16_supported(*k, nullptr)) continue;
    s += sep;
    s += k->name;
    sep = ",";
  }
#ifdef _OPENMP
  s += " openmp=" + std::to_string(_OPENMP);
#else
  s += " openmp=no";
#endif
  s += " threads=" + std::to_string(at::get_num_threads());
  return s;
}

std::string set_isa(const std::string& name) {
  detail::set_isa_checked(name);
  const Bf16Kernel* bf16 = detail::bf16_by_name(name);
  return bf16 ? bf16->name : detail::isa().name;
}

std::string bf16_unavailable() {
  std::string s;
  for (const Bf16Kernel* k : detail::kBf16Kernels) {
    const char* why = nullptr;
    if (bf16_supported(*k, &why)) continue;
    if (!s.empty()) s += "\n";
    s += std::string(k->name) + ": " + (why ? why : "unavailable");
  }
  return s;
}

}  // namespace ftk_cpu
