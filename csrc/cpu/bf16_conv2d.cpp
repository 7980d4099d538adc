// Conv2d ops on bfloat16 operands through the bf16 kernel (bf16_tile.h), as
// implicit GEMMs on one zero-padded channels-last copy of the input.
//
// The copy holds each image's padded rows split by row phase (row r at
// phase r % stride_h, row r / stride_h) and its width rounded up to a
// multiple of stride_w.  GEMM rows are then "virtual pixels" v = y * Wv + x
// of each image (Wv = padded width / stride_w, y < out_h), and tap (i, j)
// reads pixel  phase_base + (i*dh / sh) * Wq + j*dw + sw * v : one stride for
// every row of a tile, across output rows too, so a tile loads A straight
// from the copy.  Virtual pixels with x >= out_w read padding and are not
// stored (Wv - out_w of every Wv).  Grad-input is, per stride phase of
// the input's pixels, a stride-1 conv of grad_out with the taps that reach
// that phase, flipped, and transposed blocks (stride 1: one phase, every
// tap); grad-values reduces over the padded pixels with grad_out^T placed
// on the same grid, and for strided convs over the input's phase planes
// (pixel_pairs).  A strided 1x1 forward is the stride-1 conv of a strided
// view of the input's pixels (strided_pointwise).  A 1x1,
// stride-1, unpadded conv of a channels-last input whose channels fill its
// blocks (ResNet's pointwise convs) needs no copy: the padded copy would be
// the input itself, so its GEMM reads the input in place.  A forward conv
// with few input channels (cin * kw <= 32: a stem) folds each kernel row's
// taps into one reduction chunk (folded_forward, folded_grad_values).  A
// stride-1 conv of an NCHW input into an NCHW result runs channels by
// pixels instead (channel_major_gemm): the weights as A, the input's channel
// pairs as B, so neither the input nor the result is transposed.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "internal.h"

namespace ftk_cpu {
using namespace detail;
namespace {

constexpr int64_t kTile = 2 * kBf16TileRows;

const uint8_t* bytes(const at::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }

struct Geom {
  int64_t n, cin, h, w, cout, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
};

Geom geom(at::IntArrayRef in, int64_t cout, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
          at::IntArrayRef d) {
  Geom g{in[0], in[1], in[2], in[3], cout, 0, 0, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1]};
  g.oh = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.oh > 0 && g.ow > 0, "freetickets_cpu: conv2d output would be empty");
  return g;
}

// src [N, C, H, W] (any strides) padded by (pad_h, pad_w), row-phase split by
// sh, width rounded up to a multiple of sw, channels to cp, channels-last,
// `slack` zero pixels after the last image.
struct Padded {
  at::Tensor buf;  // [pixels, cp]
  int64_t hq, wq, cp, image_pixels;
  int64_t pixel(int64_t i_dh, int64_t j_dw, int64_t sh) const {  // tap offset, in pixels
    return (i_dh % sh) * hq * wq + (i_dh / sh) * wq + j_dw;
  }
};

Padded layout(int64_t h, int64_t w, int64_t pad_h, int64_t pad_w, int64_t sh, int64_t sw, int64_t cp) {
  Padded p;
  p.hq = cdiv(h + 2 * pad_h, sh);
  p.wq = cdiv(w + 2 * pad_w, sw) * sw;
  p.cp = cp;
  p.image_pixels = sh * p.hq * p.wq;
  return p;
}

// The run of `count` pixels (cp channels each, channels [c, cp) zero) that
// starts at src (channel stride s1, pixel stride s3), written at dst.
void copy_pixels(const uint16_t* src, int64_t s1, int64_t s3, int64_t c, int64_t cp, uint16_t* dst, int64_t count) {
  if (s1 == 1 && s3 == c && c == cp) {  // channels-last, blocks filled: one run
    std::memcpy(dst, src, count * cp * 2);
    return;
  }
  for (int64_t x0 = 0; x0 < count; x0 += kCopyTile)
    for (int64_t c0 = 0; c0 < c; c0 += kCopyTile)
      copy_tile(src + x0 * s3 + c0 * s1, s3, s1, dst + x0 * cp + c0, cp, std::min(kCopyTile, count - x0),
                std::min(kCopyTile, c - c0));
  if (c < cp)
    for (int64_t x = 0; x < count; ++x) std::memset(dst + x * cp + c, 0, (cp - c) * 2);
}

Padded padded(const at::Tensor& src, int64_t pad_h, int64_t pad_w, int64_t sh, int64_t sw, int64_t cp,
              int64_t slack) {
  const int64_t n = src.size(0), c = src.size(1), h = src.size(2), w = src.size(3);
  Padded p = layout(h, w, pad_h, pad_w, sh, sw, cp);
  p.buf = at::empty({n * p.image_pixels + slack, cp}, src.options());
  uint16_t* dst = static_cast<uint16_t*>(p.buf.data_ptr());
  const uint16_t* base = static_cast<const uint16_t*>(src.data_ptr());
  const int64_t s0 = src.stride(0), s1 = src.stride(1), s2 = src.stride(2), s3 = src.stride(3);
  const int64_t rows = n * sh * p.hq, row_elems = p.wq * cp;  // copy rows: (image, row phase, q)
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      uint16_t* out = dst + row * row_elems;
      const int64_t img = row / (sh * p.hq), phase = row / p.hq % sh, q = row % p.hq;
      const int64_t y = q * sh + phase - pad_h;  // padded row q * sh + phase is source row y
      if (y < 0 || y >= h) {
        std::memset(out, 0, row_elems * 2);
        continue;
      }
      std::memset(out, 0, pad_w * cp * 2);
      copy_pixels(base + img * s0 + y * s2, s1, s3, c, cp, out + pad_w * cp, w);
      std::memset(out + (pad_w + w) * cp, 0, (p.wq - pad_w - w) * cp * 2);
    }
  });
  std::memset(dst + rows * row_elems, 0, slack * cp * 2);
  return p;
}

// One term of an implicit GEMM: tap (i, j) of the conv being run, the
// channel offset of its reduction channels (a sub-block's depth), its packed B sub-block.
struct ConvTerm {
  int64_t i, j, channel, b_block;
};

// Whether the padded copy of `src` for `g` would be `src` itself (one GEMM row per pixel of src, so the
// result has as many: a grad-input phase may have fewer): a 1x1, stride-1, unpadded conv of a
// channels-last input of exactly `cp` channels (every pixel's channels contiguous, pixels one after another).
bool reads_in_place(const at::Tensor& src, int64_t cp, const Geom& g) {
  return g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && g.oh == g.h && g.ow == g.w &&
         src.size(1) == cp &&
         (src.size(1) == 1 || src.stride(1) == 1) && (g.w == 1 || src.stride(3) == cp) &&
         (g.h == 1 || src.stride(2) == g.w * cp) && (g.n == 1 || src.stride(0) == g.h * g.w * cp);
}

// The GEMM's output chunks and terms (sub-blocks `s`): conv term t reads A
// at its tap's pixel of the padded copy p (none: the input in place).
void set_terms(Bf16Gemm& gemm, const Padded* p, int64_t cp, const Geom& g, const Bf16Split& s,
               const std::vector<int64_t>& chunk_ptr, const std::vector<int64_t>& chunk_col,
               const std::vector<ConvTerm>& terms, const float* bias, const at::Tensor& out) {
  gemm.set_split(s);
  gemm.chunk_ptr = chunk_ptr;
  gemm.chunk_col = chunk_col;
  gemm.out_cols = out.size(1);
  gemm.bias = bias;
  gemm.out_col_stride = out.stride(1);
  for (const ConvTerm& t : terms) {
    const int64_t pixel = p ? p->pixel(t.i * g.dh, t.j * g.dw, g.sh) : 0;
    gemm.terms.push_back({(pixel * cp + t.channel) * 2, t.b_block * s.elems() * 2});
  }
}

// The padded copy a conv's GEMM reads, made with `slack` zero pixels after its last image.
using MakePadded = c10::function_ref<Padded(int64_t slack)>;

// out [N, C_out, oh, ow] (bf16, any strides) = the implicit GEMM of the conv
// g over the padded copy `make` returns (layout(g.h, g.w, g.ph, g.pw, g.sh,
// g.sw, cp)), whose output chunk j (s.width channels from chunk_col[j]) sums
// its terms over `packed` (sub-blocks s).
void gemm_on_copy(const Bf16Kernel& k, MakePadded make, int64_t cp, const Geom& g, const Bf16Split& s,
                  const std::vector<int64_t>& chunk_ptr, const std::vector<int64_t>& chunk_col,
                  const std::vector<ConvTerm>& terms, const at::Tensor& packed, const float* bias, at::Tensor& out) {
  uint16_t* base = static_cast<uint16_t*>(out.data_ptr());
  const int64_t sn = out.stride(0), sy = out.stride(2), sx = out.stride(3);
  const int64_t wv = cdiv(g.w + 2 * g.pw, g.sw), rpi = cdiv(g.oh * wv, kTile) * kTile;
  // The last tile of an image reads rpi virtual pixels (sw apart) from its
  // farthest tap on: past the image, into zeros after the last one.
  const Padded shape = layout(g.h, g.w, g.ph, g.pw, g.sh, g.sw, cp);
  int64_t far = 0;
  for (int64_t i = 0; i < g.kh; ++i) far = std::max(far, shape.pixel(i * g.dh, (g.kw - 1) * g.dw, g.sh));
  const Padded p = make(std::max<int64_t>(0, far + g.sw * rpi - shape.image_pixels) + 1);
  Bf16Gemm gemm{g.n * rpi, bytes(p.buf), g.sw * cp * 2, std::numeric_limits<int64_t>::max(), bytes(packed)};
  gemm.rows_per_image = rpi;
  gemm.image_bytes = p.image_pixels * cp * 2;
  gemm.prefetch_next = g.kh == 1 && g.kw == 1;
  set_terms(gemm, &p, cp, g, s, chunk_ptr, chunk_col, terms, bias, out);
  bf16_gemm(k, gemm, [&](int64_t m) -> uint16_t* {
    const int64_t img = m / rpi, v = m % rpi, y = v / wv, x = v % wv;
    return y < g.oh && x < g.ow ? base + img * sn + y * sy + x * sx : nullptr;
  });
}

// The chunks of kBf16K channels of an operand (of `channels`, padded to
// whole blocks) that the live blocks read, in channel order: B is built for
// these only (a sparse 1x1 conv's blocks read about half of its input
// channels), the chunk of `channel` at position place(channel).
struct ReadChunks {
  std::vector<int64_t> first;  // each chunk's first channel, ascending
  std::vector<int64_t> where;  // chunk -> its position in `first`; -1: not read (until done(): >= 0 marks read)
  explicit ReadChunks(int64_t channels) : where(size_t(cdiv(channels, kBf16K)), -1) {}
  void add(int64_t channel, int64_t width = 1) {  // channels [channel, channel + width) are read
    for (int64_t q = channel / kBf16K; q <= (channel + width - 1) / kBf16K; ++q) where[size_t(q)] = 0;
  }
  ReadChunks& done() {
    for (size_t q = 0; q < where.size(); ++q)
      if (where[q] >= 0) where[q] = int64_t(first.size()), first.push_back(int64_t(q) * kBf16K);
    return *this;
  }
  int64_t size() const { return int64_t(first.size()); }
  int64_t place(int64_t channel) const { return where[size_t(channel / kBf16K)]; }
};

// Channel-major GEMMs' B: the chunks `rc` of src [N, C, H, W] (bf16, any
// strides) padded by (pad_h, pad_w) as [N][rc.size() * kBf16K / 2][pixels][2]:
// pair row q of chunk d holds channels rc.first[d] + 2q and + 2q + 1 of every
// padded pixel (row-major, W + 2 pad_w wide) side by side, zero for channels
// >= C and past the padded image.  Each pair row is two source rows zipped:
// no transpose.
at::Tensor channel_pairs(const at::Tensor& src, int64_t pad_h, int64_t pad_w, const ReadChunks& rc,
                         int64_t pixels) {
  const int64_t n = src.size(0), c = src.size(1), h = src.size(2), w = src.size(3), wp = w + 2 * pad_w;
  const int64_t rows = rc.size() * kBf16K / 2;  // pair rows per image
  at::Tensor t = at::empty({n, rows, pixels, 2}, src.options());
  uint32_t* dst = static_cast<uint32_t*>(t.data_ptr());
  const uint16_t* base = static_cast<const uint16_t*>(src.data_ptr());
  const int64_t s0 = src.stride(0), s1 = src.stride(1), s2 = src.stride(2), s3 = src.stride(3);
  auto zip = [&](auto unit_stride, uint32_t* out, const uint16_t* a, const uint16_t* b) {
    const int64_t step = decltype(unit_stride)::value ? 1 : s3;  // unit: NCHW rows, vectorizable
    if (b) {
      for (int64_t x = 0; x < w; ++x) out[x] = uint32_t(a[x * step]) | uint32_t(b[x * step]) << 16;
    } else {
      for (int64_t x = 0; x < w; ++x) out[x] = a[x * step];
    }
  };
  at::parallel_for(0, n * rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t img = item / rows, r = item % rows;
      const int64_t ch = rc.first[size_t(r / (kBf16K / 2))] + 2 * (r % (kBf16K / 2));
      uint32_t* out = dst + item * pixels;
      if (ch >= c) {
        std::memset(out, 0, pixels * 4);
        continue;
      }
      std::memset(out, 0, (pad_h * wp + pad_w) * 4);  // the top padding rows, the first row's left padding
      const uint16_t* a = base + img * s0 + ch * s1;
      const uint16_t* b = ch + 1 < c ? a + s1 : nullptr;
      for (int64_t y = 0; y < h; ++y) {
        uint32_t* row = out + (pad_h + y) * wp + pad_w;
        if (s3 == 1) {
          zip(std::true_type{}, row, a + y * s2, b ? b + y * s2 : nullptr);
        } else {
          zip(std::false_type{}, row, a + y * s2, b ? b + y * s2 : nullptr);
        }
        std::memset(row + w, 0, 2 * pad_w * 4);  // this row's right padding, the next row's left
      }
      const int64_t done = (pad_h + h) * wp + pad_w;
      std::memset(out + done, 0, (pixels - done) * 4);
    }
  });
  return t;
}

// The implicit GEMM of a stride-1 conv over src, channels by pixels:
// C^T = W X, rows the output channels (A: the weights, pack_blocks_rows;
// s.width rows per output chunk), columns 32 virtual pixels v = y * Wp + x
// of the padded image (B: channel_pairs; Wp = W + 2 pw; virtual pixels with
// x >= out_w are not stored), tap (i, j) reading B at v + i*dh * Wp + j*dw.  For NCHW inputs
// and results: the input needs its channel pairs zipped instead of a
// transposing copy, and each row of C is a run of an output plane's pixels.
void channel_major_gemm(const Bf16Kernel& k, const at::Tensor& src, int64_t cp, const Geom& g,
                        const std::vector<int64_t>& chunk_ptr, const std::vector<int64_t>& chunk_col,
                        const std::vector<ConvTerm>& terms, const at::Tensor& values, bool reduce_inner,
                        const float* bias, at::Tensor& out) {
  const int64_t wp = g.w + 2 * g.pw, tiles = cdiv(g.oh * wp, kTile), chunks = int64_t(chunk_col.size());
  const int64_t far = (g.kh - 1) * g.dh * wp + (g.kw - 1) * g.dw;  // the farthest tap's offset
  const int64_t pixels = std::max((g.h + 2 * g.ph) * wp + g.pw, tiles * kTile + far);  // channel_pairs' writes
  ReadChunks rc(cp);
  for (const ConvTerm& c : terms) rc.add(c.channel);
  const at::Tensor pairs = channel_pairs(src, g.ph, g.pw, rc.done(), pixels);
  const at::Tensor a = pack_blocks_rows(values, reduce_inner);
  const Bf16Split s = values_split(values, reduce_inner);
  const int64_t ldb = pixels * 4, image_bytes = rc.size() * kBf16K / 2 * ldb;
  std::vector<Bf16Term> t;
  for (const ConvTerm& c : terms)
    t.push_back({c.b_block * s.elems() * 2,
                 (rc.place(c.channel) * kBf16K + c.channel % kBf16K) / 2 * ldb + (c.i * g.dh * wp + c.j * g.dw) * 4});
  const int64_t sn = out.stride(0), sc = out.stride(1), sy = out.stride(2), sx = out.stride(3);
  std::vector<int64_t> col_off(size_t(tiles * kTile));
  for (int64_t v = 0; v < tiles * kTile; ++v) {
    const int64_t y = v / wp, x = v % wp;
    col_off[size_t(v)] = y < g.oh && x < g.ow ? y * sy + x * sx : -1;
  }
  uint16_t* base = static_cast<uint16_t*>(out.data_ptr());
  const bool stream = streams_result(k, out.numel() * 2);
  bf16_blocks(k, int(s.depth), g.n * tiles * chunks, [&](int64_t item, Bf16Block& b, uint16_t** out_rows) {
    const int64_t img = item / (tiles * chunks), tile = item / chunks % tiles, j = item % chunks;
    b.row_tiles = int(s.width / kBf16TileRows);
    b.a = bytes(a);
    b.lda = s.depth * 2;
    b.b = bytes(pairs) + img * image_bytes + tile * kTile * 4;
    b.ldb = ldb;
    b.b_half = 16 * 4;
    b.terms = t.data() + chunk_ptr[size_t(j)];
    b.nterms = chunk_ptr[size_t(j) + 1] - chunk_ptr[size_t(j)];
    b.cols = kBf16Cols;
    b.bias = bias ? bias + chunk_col[size_t(j)] : nullptr;
    b.out_col_offsets = col_off.data() + tile * kTile;
    b.stream = stream;
    for (int64_t r = 0; r < s.width; ++r) {
      const int64_t ch = chunk_col[size_t(j)] + r;
      out_rows[r] = ch < out.size(1) ? base + img * sn + ch * sc : nullptr;
    }
  });
}

// Whether a conv over src into out runs channels by pixels (channel_major_gemm): stride 1, an input whose
// channels are not its innermost dimension and a result whose pixels are (NCHW, both).
bool runs_channel_major(const at::Tensor& src, const Geom& g, const at::Tensor& out) {
  return g.sh == 1 && g.sw == 1 && src.size(1) > 1 && src.stride(1) != 1 && out.stride(3) == 1 &&
         out.stride(1) != 1;
}

// The implicit GEMM over `src` with the conv g (values: its weights, their
// blocks' reduction inner or not, as pack_blocks_vnni): channels by pixels
// for NCHW, else on the padded copy (see gemm_on_copy), or on `src` itself
// where that copy would be `src`.
void implicit_gemm(const Bf16Kernel& k, const at::Tensor& src, int64_t cp, const Geom& g,
                   const std::vector<int64_t>& chunk_ptr, const std::vector<int64_t>& chunk_col,
                   const std::vector<ConvTerm>& terms, const at::Tensor& values, bool reduce_inner,
                   const float* bias, at::Tensor& out) {
  if (runs_channel_major(src, g, out)) {
    channel_major_gemm(k, src, cp, g, chunk_ptr, chunk_col, terms, values, reduce_inner, bias, out);
    return;
  }
  const at::Tensor packed = pack_blocks_vnni(values, reduce_inner);
  const Bf16Split s = values_split(values, reduce_inner);
  if (!reads_in_place(src, cp, g)) {
    gemm_on_copy(k, [&](int64_t slack) { return padded(src, g.ph, g.pw, g.sh, g.sw, cp, slack); }, cp, g, s,
                 chunk_ptr, chunk_col, terms, packed, bias, out);
    return;
  }
  // one GEMM row per pixel; the last row tile's rows past the input come from a zeroed copy (bf16_gemm)
  uint16_t* base = static_cast<uint16_t*>(out.data_ptr());
  const int64_t sn = out.stride(0), sy = out.stride(2), sx = out.stride(3);
  const int64_t pixels = g.n * g.h * g.w, hw = g.h * g.w;
  Bf16Gemm gemm{pixels, bytes(src), cp * 2, pixels, bytes(packed)};
  gemm.prefetch_next = true;
  set_terms(gemm, nullptr, cp, g, s, chunk_ptr, chunk_col, terms, bias, out);
  bf16_gemm(k, gemm, [&](int64_t m) -> uint16_t* { return base + m / hw * sn + m % hw / g.w * sy + m % g.w * sx; });
}

// Few input channels (a network's stem: 3 of them, each tap's padded to a
// 32-wide reduction chunk): the kw taps of a kernel row fold into one chunk
// instead, channel j * cin + c of the copy's pixel (padded row r, column x)
// holding the padded input at (c, r, x * sw + j * dw).  The conv becomes a
// kh x 1 conv over ow columns (rows padded, stride (sh, 1)) with one term per
// kernel row of a block row: kh terms where there were up to kh * kw, each
// 32 deep, and no virtual pixels wasted on the stride's columns.
bool folds_taps(const Geom& g) { return g.kw > 1 && g.cin * g.kw <= kBf16K; }

Geom folded_geom(const Geom& g) {
  return Geom{g.n, kBf16K, g.h + 2 * g.ph, g.ow, g.cout, g.oh, g.ow, g.kh, 1, g.sh, 1, 0, 0, g.dh, 1};
}

// The folded conv's input (f = folded_geom(g)) in layout(f.h, f.w, 0, 0, f.sh, 1, 32), gathered from x (bf16, any
// strides) in one pass: a per-channel copy of 3-channel pixels would cost more than the GEMM.
Padded folded_copy(const at::Tensor& x, const Geom& g, const Geom& f, int64_t slack) {
  Padded p = layout(f.h, f.w, 0, 0, f.sh, 1, kBf16K);
  p.buf = at::empty({g.n * p.image_pixels + slack, kBf16K}, x.options());
  uint16_t* dst = static_cast<uint16_t*>(p.buf.data_ptr());
  const uint16_t* src = static_cast<const uint16_t*>(x.data_ptr());
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  const int64_t rows = g.n * f.sh * p.hq, row_elems = p.wq * kBf16K;  // copy rows: (image, row phase, q)
  const bool span = s1 == 1 && s3 == g.cin && g.dw == 1;  // channels-last: a row's kw taps lie side by side
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      uint16_t* out = dst + row * row_elems;
      const int64_t img = row / (f.sh * p.hq), phase = row / p.hq % f.sh, q = row % p.hq;
      const int64_t y = q * f.sh + phase - g.ph;  // padded row q * sh + phase is source row y
      if (y < 0 || y >= g.h) {
        std::memset(out, 0, row_elems * 2);
        continue;
      }
      const uint16_t* line = src + img * s0 + y * s2;
      for (int64_t xo = 0; xo < p.wq; ++xo, out += kBf16K) {
        const int64_t x0 = xo * g.sw - g.pw;
        if (span && x0 >= 0 && x0 + g.kw <= g.w) {  // the taps' pixels, one run of cin * kw channels
          std::memcpy(out, line + x0 * g.cin, g.kw * g.cin * 2);
          std::memset(out + g.kw * g.cin, 0, (kBf16K - g.kw * g.cin) * 2);
          continue;
        }
        int64_t e = 0;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t xs = xo * g.sw + j * g.dw - g.pw;
          if (xs < 0 || xs >= g.w) {
            for (int64_t c = 0; c < g.cin; ++c) out[e++] = 0;
          } else {
            for (int64_t c = 0; c < g.cin; ++c) out[e++] = line[c * s1 + xs * s3];
          }
        }
        for (; e < kBf16K; ++e) out[e] = 0;
      }
    }
  });
  std::memset(dst + rows * row_elems, 0, slack * kBf16K * 2);
  return p;
}

// The folded conv's weights: block (r, kernel row i) of B holds, at reduction
// index j * cin + c, values[slot of (r, tap (i, j))][:, c], zero where that
// tap's block is dead; only pairs with a live tap get a term.
at::Tensor folded_forward(const Bf16Kernel& k, const at::Tensor& x, const at::Tensor& values, const int32_t* rp,
                          const int32_t* ci, const int32_t* sl, int64_t R, const Geom& g, const float* bias) {
  const int64_t bo = values.size(1), bi = values.size(2);
  const Bf16Split s = bf16_split(bo, kBf16K);  // the folded blocks' (bo x 32)
  const int64_t groups = bo / s.width;
  at::Tensor folded = at::zeros({R * g.kh, bo, kBf16K}, values.options());
  const at::Tensor v = values.contiguous();
  const uint16_t* vp = static_cast<const uint16_t*>(v.data_ptr());
  uint16_t* fp = static_cast<uint16_t*>(folded.data_ptr());
  std::vector<char> live(R * g.kh, 0);
  for (int64_t r = 0; r < R; ++r)
    for (int32_t e = rp[r]; e < rp[r + 1]; ++e) {
      const int64_t i = ci[e] / g.kw, j = ci[e] % g.kw;  // one channel block per tap: column = tap
      live[r * g.kh + i] = 1;
      for (int64_t o = 0; o < bo; ++o)
        for (int64_t c = 0; c < g.cin; ++c)
          fp[((r * g.kh + i) * bo + o) * kBf16K + j * g.cin + c] = vp[(sl[e] * bo + o) * bi + c];
    }
  std::vector<int64_t> chunk_ptr{0}, chunk_col;
  std::vector<ConvTerm> terms;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t grp = 0; grp < groups && r * bo + grp * s.width < g.cout; ++grp) {
      for (int64_t i = 0; i < g.kh; ++i)
        if (live[r * g.kh + i]) terms.push_back({i, 0, 0, (r * g.kh + i) * groups + grp});
      chunk_ptr.push_back(int64_t(terms.size()));
      chunk_col.push_back(r * bo + grp * s.width);
    }
  at::Tensor out = conv_output({g.n, g.cout, g.oh, g.ow}, x);
  const Geom f = folded_geom(g);
  gemm_on_copy(k, [&](int64_t slack) { return folded_copy(x, g, f, slack); }, kBf16K, f, s, chunk_ptr, chunk_col,
               terms, pack_blocks_vnni(folded, true), bias, out);
  return out;
}

// Grad-values' view of the input: padded by (pad_h, pad_w) and split into
// its sh x sw phase planes, plane (pr, pc) holding pixel (r, c) with
// r % sh == pr, c % sw == pc at (image, r / sh, c / sw) for every image.
struct PhasePlanes {
  int64_t sh, sw, hq, wq, plane_pixels;  // plane_pixels: n * hq * wq
  int64_t all_pixels() const { return sh * sw * plane_pixels; }
  int64_t offset(int64_t i_dh, int64_t j_dw) const {  // padded pixel (y*sh + i_dh, x*sw + j_dw), less (y, x)'s
    return ((i_dh % sh) * sw + j_dw % sw) * plane_pixels + (i_dh / sh) * wq + j_dw / sw;
  }
};

PhasePlanes phase_planes_layout(int64_t h, int64_t w, int64_t pad_h, int64_t pad_w, int64_t sh, int64_t sw,
                                int64_t n) {
  const int64_t hq = cdiv(h + 2 * pad_h, sh), wq = cdiv(w + 2 * pad_w, sw);
  return PhasePlanes{sh, sw, hq, wq, n * hq * wq};
}

// Grad-values' B: pixels q of the planes `pl` of src [N, C, H, W] (bf16, any
// strides) in VNNI pairs, pair t = pixels (2t, 2t + 1), for the pairs that
// hold pixels [lo, hi) only (`first` = the first pair's t), and for the
// channel chunks `rc` only (zero past C), chunk by chunk: [chunk][pair][32
// channels][2].  A term's 16 pair rows of a chunk are then 2 KB in a row;
// pair-major, each was a page of its own once the read channels filled 4 KB
// (1024 of them), and a term took 191 ns in the term-cost probe against 49
// chunk-major (docs/cpu-backend.md, "Grad-values' B chunk by chunk").
// Written by one loop straight from src: no padded copy in between.
struct PixelPairs {
  at::Tensor t;  // [rc.size(), pairs, kBf16K, 2]
  int64_t first = 0, pairs = 0;
  static constexpr int64_t kPairBytes = kBf16K * 4;  // a chunk's pair row
  int64_t chunk_bytes() const { return pairs * kPairBytes; }
};

PixelPairs pixel_pairs(const at::Tensor& src, const PhasePlanes& pl, int64_t pad_h, int64_t pad_w,
                       const ReadChunks& rc, int64_t lo, int64_t hi) {
  const int64_t c = src.size(1), h = src.size(2), w = src.size(3);
  const int64_t first = lo / 2, pairs = cdiv(hi, 2) - first;
  const int64_t chunk = pairs * PixelPairs::kPairBytes / 2;  // elements from a chunk to the next
  at::Tensor t = at::empty({rc.size(), pairs, kBf16K, 2}, src.options());
  uint16_t* dst = static_cast<uint16_t*>(t.data_ptr());
  const uint16_t* base = static_cast<const uint16_t*>(src.data_ptr());
  const int64_t s0 = src.stride(0), s1 = src.stride(1), s2 = src.stride(2), s3 = src.stride(3);
  const int64_t plane_hw = pl.hq * pl.wq;
  auto pixel = [&](int64_t q) -> const uint16_t* {  // source pixel q of the planes, or nullptr (zero)
    if (q < 0 || q >= pl.all_pixels()) return nullptr;
    const int64_t plane = q / pl.plane_pixels, rest = q % pl.plane_pixels;
    const int64_t n = rest / plane_hw, y = rest % plane_hw / pl.wq * pl.sh + plane / pl.sw - pad_h,
                  x = rest % pl.wq * pl.sw + plane % pl.sw - pad_w;
    return y >= 0 && y < h && x >= 0 && x < w ? base + n * s0 + y * s2 + x * s3 : nullptr;
  };
  auto live = [&](int64_t d) { return std::clamp<int64_t>(c - rc.first[size_t(d)], 0, kBf16K); };  // below C
  auto zip = [&](auto unit_stride, uint16_t* out, const uint16_t* a, const uint16_t* b) {
    const int64_t step = decltype(unit_stride)::value ? 1 : s1;  // unit: vectorizable interleave
    for (int64_t d = 0; d < rc.size(); ++d, out += chunk) {
      const int64_t c0 = rc.first[size_t(d)], n = live(d);
      if (a && b) {
        for (int64_t ch = 0; ch < n; ++ch) out[2 * ch] = a[(c0 + ch) * step], out[2 * ch + 1] = b[(c0 + ch) * step];
      } else if (a || b) {
        const uint16_t* p = a ? a : b;
        const int64_t one = a ? 0 : 1;
        for (int64_t ch = 0; ch < n; ++ch) out[2 * ch + one] = p[(c0 + ch) * step], out[2 * ch + 1 - one] = 0;
      } else {
        std::memset(out, 0, n * 4);
      }
      if (n < kBf16K) std::memset(out + 2 * n, 0, (kBf16K - n) * 4);
    }
  };
  if (s1 == 1) {  // channels-last: a pair is two runs of channels, zipped
    at::parallel_for(0, pairs, 64, [&](int64_t begin, int64_t end) {
      for (int64_t pr = begin; pr < end; ++pr) {
        const int64_t q = 2 * (first + pr);
        zip(std::true_type{}, dst + pr * 2 * kBf16K, pixel(q), pixel(q + 1));
      }
    });
    return {t, first, pairs};
  }
  // Channels apart (NCHW), 32 pairs at a time.  Where they are 64
  // neighbouring source pixels (a plane without padding or stride: a 1x1
  // conv's), each channel's 32 pairs are one run of 32 words, and the pairs
  // are a transpose of words (transpose_words); pair by pair, each pair
  // takes two strided reads per channel (for ResNet's NCHW 1x1 convs these
  // pairs took longer than grad-values' multiplies).  Other tiles: pair by pair.
  constexpr int64_t kPairs = 32;
  at::parallel_for(0, cdiv(pairs, kPairs), 1, [&](int64_t begin, int64_t end) {
    const uint16_t* px[2 * kPairs];
    for (int64_t tl = begin; tl < end; ++tl) {
      const int64_t pr0 = tl * kPairs, np = std::min(kPairs, pairs - pr0);
      bool run = s3 == 1;
      for (int64_t u = 0; u < 2 * np; ++u) {
        px[u] = pixel(2 * (first + pr0) + u);
        run = run && px[u] && px[u] == px[0] + u;
      }
      uint16_t* out = dst + pr0 * 2 * kBf16K;
      if (!run) {
        for (int64_t u = 0; u < np; ++u) zip(std::false_type{}, out + u * 2 * kBf16K, px[2 * u], px[2 * u + 1]);
        continue;
      }
      for (int64_t d = 0; d < rc.size(); ++d) {
        const int64_t cn = live(d);
        uint32_t* o = reinterpret_cast<uint32_t*>(out + d * chunk);  // pair u's channel ch: o[u * kBf16K + ch]
        transpose_words(px[0] + rc.first[size_t(d)] * s1, s1, o, kBf16K, cn, np);
        if (cn < kBf16K)
          for (int64_t u = 0; u < np; ++u) std::memset(o + u * kBf16K + cn, 0, (kBf16K - cn) * 4);
      }
    }
  });
  return {t, first, pairs};
}

// Grad-values' A: grad_out^T on the reduction grid for the channel chunks
// `rc` (the live block rows'), [rc.size() * kBf16K, kGridLead + kpad]
// (bf16): row d * kBf16K + r, column kGridLead + (n * hq + y) * wq + x holds
// dy[n, rc.first[d] + r, y, x] (zeros elsewhere, and past the channels).
// The kGridLead zero columns let a row be read from one pixel before its
// grid (a tap of odd offset).  Our own transpose, through 32 x 32 tiles in
// L1: aten's transposing copy of a channels-last grad_out cost more than the
// multiplies it feeds.
constexpr int64_t kGridLead = kBf16K;  // a whole chunk: rows stay 64-byte aligned

at::Tensor grad_out_grid(const at::Tensor& dy, const ReadChunks& rc, int64_t kpad, int64_t hq, int64_t wq) {
  const int64_t n = dy.size(0), c = dy.size(1), oh = dy.size(2), ow = dy.size(3), grid = n * hq * wq;
  const int64_t rows = rc.size() * kBf16K, ld = kGridLead + kpad;
  auto live = [&](int64_t row) { return rc.first[size_t(row / kBf16K)] + row % kBf16K < c; };  // a channel's row
  at::Tensor t = at::empty({rows, ld}, dy.options());
  uint16_t* const base = static_cast<uint16_t*>(t.data_ptr());
  uint16_t* dst = base + kGridLead;  // row 0's grid column 0
  const uint16_t* src = static_cast<const uint16_t*>(dy.data_ptr());
  const int64_t s0 = dy.stride(0), s1 = dy.stride(1), s2 = dy.stride(2), s3 = dy.stride(3);
  // Items: runs of kCopyTile grid columns of one (image, grid row) line (a
  // linear's tokens are one line).
  const int64_t runs = cdiv(wq, kCopyTile);
  at::parallel_for(0, n * hq * runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t line = item / runs, img = line / hq, y = line % hq, x0 = item % runs * kCopyTile;
      const int64_t x1 = std::min(x0 + kCopyTile, wq), stored = y < oh ? std::clamp<int64_t>(ow - x0, 0, x1 - x0) : 0;
      uint16_t* col = dst + line * wq + x0;  // row 0's grid column x0 of this line
      static_assert(kCopyTile == kBf16K, "a tile: one chunk's channels");
      for (int64_t d = 0; d < rc.size() && stored > 0; ++d) {
        const int64_t c0 = rc.first[size_t(d)];
        if (c0 < c)
          copy_tile(src + img * s0 + y * s2 + c0 * s1 + x0 * s3, s1, s3, col + d * kBf16K * ld, ld,
                    std::min(kCopyTile, c - c0), stored);
      }
      for (int64_t row = 0; row < rows && stored < x1 - x0; ++row)  // the grid columns past the output's
        if (live(row)) std::memset(col + row * ld + stored, 0, (x1 - x0 - stored) * 2);
    }
  });
  for (int64_t row = 0; row < rows; ++row) {  // the lead, the reduction's tail, and the rows past the channels
    if (live(row)) {
      std::memset(base + row * ld, 0, kGridLead * 2);
      std::memset(dst + row * ld + grid, 0, (kpad - grid) * 2);
    } else {
      std::memset(base + row * ld, 0, ld * 2);
    }
  }
  return t;
}

// Grad-values of a conv whose taps fold (folds_taps): the folded conv's
// (a kh x 1 conv of the folded copy, see folded_forward) over one block per
// (block row, kernel row) with a live tap, then each live block's columns
// picked out of its kernel row's: tap (i, j) channel c is folded column j * cin + c.
at::Tensor folded_grad_values(const Bf16Kernel& k, const at::Tensor& dy, const at::Tensor& x, const int32_t* rp,
                              const int32_t* ci, const int32_t* sl, int64_t R, int64_t nnzb, int64_t bo, int64_t bi,
                              const Geom& g) {
  Geom plain = folded_geom(g);
  plain.sh = 1;  // the folded copy without its row phase split: a [N, 32, H + 2 ph, ow] channels-last image
  const at::Tensor xf = folded_copy(x, g, plain, 0).buf.view({g.n, plain.h, plain.w, kBf16K}).permute({0, 3, 1, 2});
  std::vector<int32_t> ptr{0}, rows_i, slots;
  std::vector<int64_t> fold_of(R * g.kh, -1);  // folded block of (r, kernel row i)
  for (int64_t r = 0; r < R; ++r) {
    for (int32_t e = rp[r]; e < rp[r + 1]; ++e) fold_of[r * g.kh + ci[e] / g.kw] = -2;  // live
    for (int64_t i = 0; i < g.kh; ++i)
      if (fold_of[r * g.kh + i] == -2) {
        fold_of[r * g.kh + i] = int64_t(slots.size());
        rows_i.push_back(int32_t(i));
        slots.push_back(int32_t(slots.size()));
      }
    ptr.push_back(int32_t(slots.size()));
  }
  auto ints = [](const std::vector<int32_t>& v) { return at::tensor(v, at::TensorOptions().dtype(at::kInt)); };
  const at::Tensor dvf = bf16_conv2d_grad_values(k, dy, xf, ints(ptr), ints(rows_i), ints(slots), {bo, kBf16K},
                                                 {g.kh, 1}, {g.sh, 1}, {0, 0}, {g.dh, 1});
  at::Tensor dv = at::zeros({nnzb, bo, bi}, dy.options());
  const uint16_t* src = static_cast<const uint16_t*>(dvf.data_ptr());
  uint16_t* dst = static_cast<uint16_t*>(dv.data_ptr());
  for (int64_t r = 0; r < R; ++r)
    for (int32_t e = rp[r]; e < rp[r + 1]; ++e) {
      const int64_t f = fold_of[r * g.kh + ci[e] / g.kw], j = ci[e] % g.kw;
      for (int64_t o = 0; o < bo; ++o)
        std::memcpy(dst + (sl[e] * bo + o) * bi, src + (f * bo + o) * kBf16K + j * g.cin, g.cin * 2);
    }
  return dv;
}

// A 1x1 unpadded conv of stride s reads input pixels (s y, s x) only: its
// forward is the stride-1 conv of that strided view, whose copies then
// gather a quarter of the input at stride 2 (the phase-split copy of a
// strided conv copies all of it).
bool strided_pointwise(at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  return kernel[0] == 1 && kernel[1] == 1 && padding[0] == 0 && padding[1] == 0 && (stride[0] > 1 || stride[1] > 1);
}

at::Tensor strided_pixels(const at::Tensor& t, at::IntArrayRef stride) {
  return t.slice(2, 0, t.size(2), stride[0]).slice(3, 0, t.size(3), stride[1]);
}

at::Tensor padded_bias_f32(const std::optional<at::Tensor>& bias, int64_t padded_len) {
  if (!bias.has_value()) return at::Tensor();
  at::Tensor b = at::zeros({padded_len + kBf16Cols}, bias->options().dtype(at::kFloat));
  b.narrow(0, 0, bias->numel()).copy_(*bias);
  return b;
}

}  // namespace

at::Tensor bf16_conv2d_forward(const Bf16Kernel& k, const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                               const std::optional<at::Tensor>& bias, int64_t out_channels, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geom g = geom(x.sizes(), out_channels, kernel, stride, padding, dilation);
  const int64_t nnzb = values.size(0), bo = values.size(1), bi = values.size(2);
  const int64_t bpt = cdiv(g.cin, bi), R = row_ptr.numel() - 1, taps = g.kh * g.kw;
  check_indices(row_ptr, col_idx, slot, taps * bpt, nnzb, "BSR");
  TORCH_CHECK(R == cdiv(out_channels, bo), "freetickets_cpu: row_ptr does not match out_channels");
  const int32_t *rp = row_ptr.data_ptr<int32_t>(), *ci = col_idx.data_ptr<int32_t>(), *sl = slot.data_ptr<int32_t>();
  const at::Tensor b = padded_bias_f32(bias, R * bo);
  const float* bias_f32 = b.defined() ? b.data_ptr<float>() : nullptr;
  if (folds_taps(g)) return folded_forward(k, x, values, rp, ci, sl, R, g, bias_f32);
  const Bf16Split s = values_split(values, true);
  const int64_t groups = bo / s.width, chunks = bi / s.depth;
  std::vector<int64_t> chunk_ptr{0}, chunk_col;
  std::vector<ConvTerm> terms;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t grp = 0; grp < groups && r * bo + grp * s.width < out_channels; ++grp) {
      for (int32_t e = rp[r]; e < rp[r + 1]; ++e) {
        const int64_t tap = ci[e] / bpt, cb = ci[e] % bpt;
        for (int64_t kc = 0; kc < chunks && cb * bi + kc * s.depth < g.cin; ++kc)
          terms.push_back({tap / g.kw, tap % g.kw, cb * bi + kc * s.depth, (sl[e] * groups + grp) * chunks + kc});
      }
      chunk_ptr.push_back(int64_t(terms.size()));
      chunk_col.push_back(r * bo + grp * s.width);
    }
  at::Tensor out = conv_output({g.n, out_channels, g.oh, g.ow}, x);
  if (strided_pointwise(kernel, stride, padding)) {
    const at::Tensor view = strided_pixels(x, stride);
    implicit_gemm(k, view, bpt * bi, geom(view.sizes(), out_channels, kernel, {1, 1}, padding, dilation), chunk_ptr,
                  chunk_col, terms, values, true, bias_f32, out);
    return out;
  }
  implicit_gemm(k, x, bpt * bi, g, chunk_ptr, chunk_col, terms, values, true, bias_f32, out);
  return out;
}

at::Tensor bf16_conv2d_grad_input(const Bf16Kernel& k, const at::Tensor& dy, const at::Tensor& values,
                                  const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& tslot,
                                  at::IntArrayRef input_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t n = input_size[0], cin = input_size[1], cout = dy.size(1), nnzb = values.size(0),
                bo = values.size(1), bi = values.size(2);
  const int64_t kh = kernel[0], kw = kernel[1], bpt = cdiv(cin, bi), R = cdiv(cout, bo);
  check_indices(col_ptr, row_idx, tslot, R, nnzb, "transposed");
  TORCH_CHECK(col_ptr.numel() - 1 == kh * kw * bpt, "freetickets_cpu: col_ptr does not match the input channels");
  const Geom fwd = geom(input_size, cout, kernel, stride, padding, dilation);
  TORCH_CHECK(fwd.oh == dy.size(2) && fwd.ow == dy.size(3), "freetickets_cpu: grad_out does not match input_size");
  const Bf16Split s = values_split(values, false);
  const int64_t groups = bi / s.width, chunks = bo / s.depth;
  const int32_t *cp = col_ptr.data_ptr<int32_t>(), *ri = row_idx.data_ptr<int32_t>(), *ts = tslot.data_ptr<int32_t>();
  // One GEMM per phase (r, c) of dx's pixels (row % sh, column % sw): pixel (q sh + r, u sw + c) sums, over
  // the taps (i, j) with (r + ph - i dh) and (c + pw - j dw) divisible by the stride, grad_out pixel
  // (q + a_i, u + b_j), a_i = (r + ph - i dh) / sh, b_j likewise: a stride-1 conv of grad_out (padded by
  // P: the rows and columns a phase reads past it) with tap offsets (a_i + P, b_j + P), transposed blocks,
  // into the phase's pixels.  Stride 1: one phase, the taps flipped.
  struct Taps {
    std::vector<std::vector<int64_t>> offset;  // [phase][tap index]: a_i, or INT64_MIN where the tap skips it
    int64_t pad = 0;                           // P
  };
  auto taps_of = [](int64_t size, int64_t out, int64_t kernel, int64_t stride, int64_t pad, int64_t dil) {
    Taps t;
    t.offset.assign(size_t(stride), std::vector<int64_t>(size_t(kernel), std::numeric_limits<int64_t>::min()));
    for (int64_t r = 0; r < stride && r < size; ++r) {
      const int64_t q = cdiv(size - r, stride);  // the phase's pixels along this side
      for (int64_t i = 0; i < kernel; ++i) {
        const int64_t reach = r + pad - i * dil;
        if (reach % stride) continue;
        const int64_t a = reach / stride;
        t.offset[size_t(r)][size_t(i)] = a;
        t.pad = std::max({t.pad, -a, q - 1 + a - (out - 1)});
      }
    }
    return t;
  };
  const Taps rows = taps_of(input_size[2], dy.size(2), kh, stride[0], padding[0], dilation[0]);
  const Taps cols = taps_of(input_size[3], dy.size(3), kw, stride[1], padding[1], dilation[1]);
  at::Tensor dx = conv_output({n, cin, input_size[2], input_size[3]}, dy);
  auto reached = [](const Taps& t, int64_t phase) {
    const std::vector<int64_t>& o = t.offset[size_t(phase)];
    return std::any_of(o.begin(), o.end(), [](int64_t a) { return a != std::numeric_limits<int64_t>::min(); });
  };
  bool unreached = false;  // a phase no tap reaches: its pixels are zero
  for (int64_t r = 0; r < std::min(stride[0], input_size[2]); ++r) unreached = unreached || !reached(rows, r);
  for (int64_t c = 0; c < std::min(stride[1], input_size[3]); ++c) unreached = unreached || !reached(cols, c);
  if (unreached) dx.zero_();
  for (int64_t r = 0; r < std::min(stride[0], input_size[2]); ++r)
    for (int64_t c = 0; c < std::min(stride[1], input_size[3]); ++c) {
      if (!reached(rows, r) || !reached(cols, c)) continue;  // zeroed above
      std::vector<int64_t> chunk_ptr{0}, chunk_col;
      std::vector<ConvTerm> terms;
      int64_t reach_h = 0, reach_w = 0;  // the largest tap offsets (+ P) used, + 1
      for (int64_t cb = 0; cb < bpt; ++cb)
        for (int64_t grp = 0; grp < groups && cb * bi + grp * s.width < cin; ++grp) {
          for (int64_t tap = 0; tap < kh * kw; ++tap) {
            const int64_t a = rows.offset[size_t(r)][size_t(tap / kw)], b = cols.offset[size_t(c)][size_t(tap % kw)];
            if (a == std::numeric_limits<int64_t>::min() || b == std::numeric_limits<int64_t>::min()) continue;
            reach_h = std::max(reach_h, a + rows.pad + 1);
            reach_w = std::max(reach_w, b + cols.pad + 1);
            for (int32_t e = cp[tap * bpt + cb]; e < cp[tap * bpt + cb + 1]; ++e)
              for (int64_t kc = 0; kc < chunks && ri[e] * bo + kc * s.depth < cout; ++kc)
                terms.push_back({a + rows.pad, b + cols.pad, ri[e] * bo + kc * s.depth,
                                 (ts[e] * groups + grp) * chunks + kc});
          }
          chunk_ptr.push_back(int64_t(terms.size()));
          chunk_col.push_back(cb * bi + grp * s.width);
        }
      at::Tensor target = dx.slice(2, r, input_size[2], stride[0]).slice(3, c, input_size[3], stride[1]);
      Geom g{n, R * bo, dy.size(2), dy.size(3), cin, target.size(2), target.size(3), reach_h, reach_w, 1, 1,
             rows.pad, cols.pad, 1, 1};
      // Into an NCHW dx's strided pixels: a compact result (channels by pixels, whole output rows) and one
      // strided copy, as each bf16 stored `stride` elements from the last would go out on its own.
      const bool compact = target.stride(1) != 1 && !target.is_contiguous();
      at::Tensor result = compact ? at::empty(target.sizes(), target.options()) : target;
      implicit_gemm(k, dy, R * bo, g, chunk_ptr, chunk_col, terms, values, false, nullptr, result);
      if (compact) target.copy_(result);
    }
  return dx;
}

at::Tensor bf16_conv2d_grad_values(const Bf16Kernel& k, const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                   at::IntArrayRef block_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geom g = geom(x.sizes(), dy.size(1), kernel, stride, padding, dilation);
  TORCH_CHECK(g.oh == dy.size(2) && g.ow == dy.size(3), "freetickets_cpu: grad_out does not match the conv's output");
  const int64_t bo = block_size[0], bi = block_size[1], nnzb = col_idx.numel();
  const int64_t bpt = cdiv(g.cin, bi), R = row_ptr.numel() - 1;
  check_indices(row_ptr, col_idx, slot, g.kh * g.kw * bpt, nnzb, "BSR");
  TORCH_CHECK(R == cdiv(g.cout, bo), "freetickets_cpu: row_ptr does not match grad_out's channels");
  if (folds_taps(g))
    return folded_grad_values(k, dy, x, row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                              slot.data_ptr<int32_t>(), R, nnzb, bo, bi, g);
  // The reduction runs over a grid of hq x wq pixels per image: output pixel
  // (y, x) at v = y * wq + x, where tap (i, j) reads padded input pixel
  // (y * sh + i * dh, x * sw + j * dw).  The padded input is split into its
  // sh x sw phases (pixel (r, c) in plane (r % sh, c % sw) at (r / sh, c / sw)),
  // each plane holding every image, so that this pixel is at v + a fixed
  // offset per tap.  A = grad_out^T on the grid (zero where no output pixel
  // is), B = the planes in VNNI pairs of pixels (2t, 2t + 1), made for the
  // pixels the live blocks read only.  A tap of odd offset `off` sums
  // A[v - 1] B[v + off - 1] over v instead: B's pairs, A read one pixel
  // early (grad_out_grid's lead is zero), so one copy of B serves both
  // parities (a copy per parity cost more than the multiplies).  Stride 1:
  // one plane, the padded input.
  const PhasePlanes planes = phase_planes_layout(g.h, g.w, g.ph, g.pw, g.sh, g.sw, g.n);
  auto tap_offset = [&](int64_t e) {
    const int64_t tap = col_idx.data_ptr<int32_t>()[e] / bpt;
    return planes.offset(tap / g.kw * g.dh, tap % g.kw * g.dw);
  };
  int64_t near = std::numeric_limits<int64_t>::max(), far = 0;
  bool odd = false;
  for (int32_t e = 0; e < nnzb; ++e) {  // the pixels the live blocks' taps read: [near, far + kpad)
    const int64_t off = tap_offset(e), even = off / 2 * 2;
    near = std::min(near, even);
    far = std::max(far, even);
    odd = odd || off % 2;
  }
  if (nnzb == 0) near = 0;
  // An odd tap's reduction ends a pixel early: then past the grid's last pixel, a zero one.
  const int64_t pixels = planes.plane_pixels, kpad = cdiv(pixels + odd, kBf16K) * kBf16K;
  ReadChunks rc(bpt * bi);  // a block's chunks, all read, are consecutive in B
  for (int32_t e = 0; e < nnzb; ++e) rc.add(col_idx.data_ptr<int32_t>()[e] % bpt * bi, bi);
  rc.done();
  const PixelPairs pairs = pixel_pairs(x, planes, g.ph, g.pw, rc, near, far + kpad);
  ReadChunks rows(R * bo);  // the live block rows' channels of grad_out
  for (int64_t r = 0; r < R; ++r)
    if (row_ptr.data_ptr<int32_t>()[r + 1] > row_ptr.data_ptr<int32_t>()[r]) rows.add(r * bo, bo);
  const at::Tensor dyt = grad_out_grid(dy, rows.done(), kpad, planes.hq, planes.wq);
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const int64_t lda = (kGridLead + kpad) * 2, ldb = PixelPairs::kPairBytes;
  return bf16_grad_values(k, lda, ldb, kpad / kBf16K, row_ptr, slot, bo, bi, x.options(),
                          [&](int64_t r, int64_t e) {
                            return bytes(dyt) + (rows.place(r * bo) * kBf16K + r * bo % kBf16K) * lda +
                                   (kGridLead - tap_offset(e) % 2) * 2;
                          },
                          [&](int64_t e, int64_t col) {
                            const int64_t ch = ci[e] % bpt * bi + col;
                            return bytes(pairs.t) + rc.place(ch) * pairs.chunk_bytes() +
                                   (tap_offset(e) / 2 - pairs.first) * ldb + ch % kBf16K * 4;
                          });
}

}  // namespace ftk_cpu
