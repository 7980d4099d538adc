// Conv2d ops on the sparse-GEMM driver: an implicit GEMM whose A rows are
// the taps' reads of the input (TapRows: no im2col), or, for stride-1 NCHW
// convs that pay, a weights-first product on each image's zero-padded
// channel planes.  conv2d_forward and conv2d_grad_input share both paths
// (grad-input is the transposed conv); conv2d_grad_values sets up each tap's
// reduction segments for grad_values.cpp.
#include <ATen/ThreadLocalState.h>

#include "internal.h"

namespace ftk_cpu {
using namespace detail;
namespace {

struct ConvGeom {
  int64_t n, cin, h, w, cout, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t taps() const { return kh * kw; }
  // 1x1, stride 1, no padding: the conv is a GEMM over pixels
  bool pointwise() const { return kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0; }
};

ConvGeom conv_geom(at::IntArrayRef input_size, int64_t cout, at::IntArrayRef kernel,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(input_size.size() == 4 && kernel.size() == 2 && stride.size() == 2 &&
                  padding.size() == 2 && dilation.size() == 2,
              "freetickets_cpu: conv2d needs a 4-D input and pairs for kernel/stride/padding/dilation");
  ConvGeom g{input_size[0], input_size[1], input_size[2], input_size[3], cout, 0, 0,
             kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  g.oh = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.oh > 0 && g.ow > 0, "freetickets_cpu: conv2d output would be empty");
  return g;
}

// The A row pointers of a conv's implicit GEMM: GEMM row m is pixel (y, x) of
// image n in the walked grid (forward: the output; grad-input: the input), and
// tap `tap` reads pixel ((y * mul_h + h[tap]) / div_h, (x * mul_w + w[tap]) / div_w)
// of `src` when that divides exactly and lies inside it, else zeros.
// Forward: mul = stride, div = 1.  Grad-input walks the transposed conv:
// mul = 1, div = stride, offsets negated.  `src` is read in place through its
// strides: a row points at a pixel's first channel, the kernel steps
// `channel_stride` per channel (1 for channels_last, H * W for NCHW).
struct TapRows {
  const float* src;
  at::Tensor zeros;  // a padding row: zero wherever a term reads it
  const float* zero_row;  // its data, read by every tile's fill
  int64_t src_h, src_w, image_stride, y_stride, x_stride, channel_stride;
  int64_t walk_h, walk_w, mul_h, mul_w, div_h, div_w;
  std::vector<int64_t> h, w;

  // src_sizes / src_strides: [N, C, H, W] (only C, H, W are read when one
  // image is walked at a time; `src` may then be set per image).
  TapRows(const ConvGeom& g, bool transposed, const float* src_, at::IntArrayRef src_sizes,
          at::IntArrayRef src_strides, const at::TensorOptions& options)
      : src(src_) {
    src_h = src_sizes[2];
    src_w = src_sizes[3];
    image_stride = src_strides[0];
    y_stride = src_strides[2];
    x_stride = src_strides[3];
    channel_stride = src_strides[1];
    zeros = at::zeros({(src_sizes[1] - 1) * channel_stride + 1}, options);
    zero_row = zeros.data_ptr<float>();
    walk_h = transposed ? g.h : g.oh;
    walk_w = transposed ? g.w : g.ow;
    mul_h = transposed ? 1 : g.sh;
    mul_w = transposed ? 1 : g.sw;
    div_h = transposed ? g.sh : 1;
    div_w = transposed ? g.sw : 1;
    for (int64_t tap = 0; tap < g.taps(); ++tap) {
      const int64_t dh = (tap / g.kw) * g.dh - g.ph, dw = (tap % g.kw) * g.dw - g.pw;
      h.push_back(transposed ? -dh : dh);
      w.push_back(transposed ? -dw : dw);
    }
  }

  // Source coordinate times div, and whether it is a whole pixel inside [0, size).
  static bool inside(int64_t scaled, int64_t div, int64_t size) {
    return scaled >= 0 && scaled < size * div && (div == 1 || scaled % div == 0);
  }

  void fill(int64_t m0, int tn, const int32_t* taps, int64_t ntaps, const float** a_rows) const {
    // locals: the pointer stores below would otherwise reload every member
    const int64_t *hs = h.data(), *ws = w.data(), sh = src_h, sw = src_w, ys = y_stride, xs = x_stride;
    const int64_t mh = mul_h, mw = mul_w, dh = div_h, dw = div_w;
    const float* zero = zero_row;
    PixelWalk px(m0, walk_h, walk_w);
    if (dh == 1 && dw == 1) {
      // The tile's pixels as runs along walked rows (one or two where rows
      // are wider than a tile): a tap reads a run's pixels from one source
      // row, mw * xs apart, and only an interval of them lies inside it (the
      // rest read the zero row).  No per-pixel checks.
      int t = 0;
      while (t < tn) {
        const int run = int(std::min<int64_t>(tn - t, walk_w - px.x));
        const float* image = src + px.n * image_stride;
        for (int64_t u = 0; u < ntaps; ++u) {
          const float** out = a_rows + taps[u] * kMaxTileRows + t;
          const int64_t sy = px.y * mh + hs[taps[u]];
          // inside for i in [lo, hi): 0 <= (px.x + i) * mw + ws < sw
          const int64_t first = px.x * mw + ws[taps[u]];
          int lo = 0, hi = 0;
          if (sy >= 0 && sy < sh) {
            lo = first >= 0 ? 0 : int(std::min<int64_t>(run, cdiv(-first, mw)));
            hi = first >= sw ? 0 : int(std::min<int64_t>(run, cdiv(sw - first, mw)));
          }
          const int64_t off = sy * ys + first * xs, step = mw * xs;
          for (int i = 0; i < run; ++i) out[i] = i >= lo && i < hi ? image + (off + i * step) : zero;
        }
        t += run;
        px.y += (px.x + run) / walk_w;  // a run ends at a row's end or at the tile's
        px.x = (px.x + run) % walk_w;
        if (px.y == walk_h) px.y = 0, ++px.n;
      }
      for (int64_t u = 0; u < ntaps; ++u)
        for (int i = t; i < kMaxTileRows; ++i) a_rows[taps[u] * kMaxTileRows + i] = zero;
      return;
    }
    for (int t = 0; t < kMaxTileRows; ++t, px.next()) {
      const float* image = src + px.n * image_stride;
      for (int64_t u = 0; u < ntaps; ++u) {
        const int64_t sy = px.y * mh + hs[taps[u]], sx = px.x * mw + ws[taps[u]];
        const bool ok = t < tn && inside(sy, dh, sh) && inside(sx, dw, sw);
        a_rows[taps[u] * kMaxTileRows + t] = ok ? image + sy / dh * ys + sx / dw * xs : zero;
      }
    }
  }
};

// one_image(img) for every image.  With a few images per thread, each thread
// takes whole images (the work of one image at low density is too small to
// share); else the threads share each image.
bool whole_images_per_thread(int64_t images) { return images >= 2 * at::get_num_threads(); }

template <class OneImage>
void for_each_image(int64_t images, OneImage one_image) {
  if (whole_images_per_thread(images)) {  // run() inside a parallel region runs inline
    // The workers run torch ops (views, copies) on the op's tensors: under the
    // caller's thread-local state, i.e. below autograd (else copies from an
    // input that requires grad would record history on the scratch buffers,
    // keeping every call's inputs alive) and in its inference mode.
    const at::ThreadLocalState caller;
    share_items(images, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard state(caller);
      for (int64_t img = begin; img < end; ++img) one_image(img);
    });
  } else {
    for (int64_t img = 0; img < images; ++img) one_image(img);
  }
}

// Stride-1 convs on NCHW planes run weights-first on each image: output
// pixel (oy, ox) reads B^T column oy * Wp + ox, Wp being the width of the
// planes zero-padded by the conv's padding, and tap (i, j) reads the padded
// planes shifted by i * dh * Wp + j * dw: whole vectors, always in bounds.
// C^T is the output image itself: its rows, OW wide, are computed from the
// padded rows Wp floats apart (ColumnGrid), so no result is copied.  The
// planes are copied into scratch (one image at a time: L2-sized) unless a
// 1x1 conv can read them in place (whole lines long: else every vector load
// straddles two lines).  Grad-input is the stride-1 conv of
// grad_out padded by (k - 1) * d - p with the taps flipped (so it needs
// p <= (k - 1) * d).
struct Planes {
  int64_t pad_h, pad_w;
  bool flip;
};

Planes planes_for(const ConvGeom& g, bool grad_input) {
  if (!grad_input) return {g.ph, g.pw, false};
  return {(g.kh - 1) * g.dh - g.ph, (g.kw - 1) * g.dw - g.pw, true};
}

// Whether that applies to `src` and pays: a 1x1 conv's planes must hold a
// vector (16 pixels), other convs may spend at most a quarter of the columns
// on padding, and the live values, streamed once per image, must weigh less
// than an image's activations (large maps, narrow layers).
// 1x1: where the planes are not whole lines long (14x14, 7x7) each path
// makes one extra pass over an activation: the planes copy their source, the
// general path transposes its result; the smaller wins.
// Convs with taps copy the padded planes in and write output rows in place;
// the general path packs NCHW images channels-last (packs_images) and
// writes its results through transposes.  Planes pay where the output rows
// are long (the tiles run along them) or the general path's blocks are
// mostly padding (fewer input channels than a block: a 3-channel first
// conv); rows of 16 and less lose (rows of 14 waste a partial vector).
// Measured: docs/cpu-backend.md, "Convs on planes".
bool on_planes(const ConvGeom& g, const at::Tensor& src, const at::Tensor& values, bool grad_input) {
  const Planes pp = planes_for(g, grad_input);
  const int64_t wp = src.size(3) + 2 * pp.pad_w, out_w = grad_input ? g.w : g.ow;
  const int64_t src_channels = grad_input ? g.cout : g.cin, out_channels = grad_input ? g.cin : g.cout;
  const bool pointwise_pays = g.h * g.w >= 16 && ((g.h * g.w) % kLineFloats == 0 || src_channels <= out_channels);
  const bool shape_pays =
      g.pointwise() ? pointwise_pays : 4 * (wp - out_w) <= wp && (g.cin < values.size(2) || out_w >= 32);
  return src.is_contiguous() && g.sh == 1 && g.sw == 1 && pp.pad_h >= 0 && pp.pad_w >= 0 && shape_pays &&
         g.oh * g.ow * (g.cin + g.cout) >= values.numel();
}

// One contiguous image's c planes of h x w into planes of ld floats in `dst`,
// each zero-padded to (h + 2 pad_h) x (w + 2 pad_w); the tail of every plane
// and the slack up to `floats` are zeros too.  One pass, in order.
void pad_planes(const float* src, int64_t c, int64_t h, int64_t w, const Planes& pp, int64_t ld, float* dst,
                int64_t floats) {
  const int64_t wp = w + 2 * pp.pad_w;
  for (int64_t ch = 0; ch < c; ++ch, src += h * w) {
    float* plane = dst + ch * ld;
    std::fill(plane, plane + pp.pad_h * wp, 0.f);
    for (int64_t y = 0; y < h; ++y) {
      float* row = plane + (pp.pad_h + y) * wp;
      std::fill(row, row + pp.pad_w, 0.f);
      std::copy(src + y * w, src + (y + 1) * w, row + pp.pad_w);
      std::fill(row + pp.pad_w + w, row + wp, 0.f);
    }
    std::fill(plane + (pp.pad_h + h) * wp, plane + ld, 0.f);  // bottom rows, tail
  }
  std::fill(dst + c * ld, dst + floats, 0.f);
}

// out[img] = the weights-first product over src[img]'s planes, padded as
// planes_for(g, grad_input) says.
void weights_first_on_planes(WeightsFirst w, const ConvGeom& g, bool grad_input, const at::Tensor& src,
                             const at::Tensor& out) {
  const Planes pp = planes_for(g, grad_input);
  const int64_t c_src = src.size(1), h = src.size(2), wd = src.size(3), c_out = out.size(1);
  const int64_t out_h = out.size(2), out_w = out.size(3);
  const int64_t hp = h + 2 * pp.pad_h, wp = wd + 2 * pp.pad_w, n = out_h * out_w;
  const bool copy_in = g.taps() > 1 || (hp * wp) % kLineFloats != 0;
  const int64_t ld = copy_in ? cdiv(hp * wp, kLineFloats) * kLineFloats : hp * wp;
  // Every B^T read is whole vectors: up to a line past a row (or the last
  // plane, into zeroed slack).
  const int64_t b_readable = wp == out_w ? cdiv(n, kLineFloats) * kLineFloats : out_h * wp + kLineFloats;
  const int64_t floats = c_src * ld + (g.kw - 1) * g.dw + kLineFloats;
  for (int64_t tap = 0; tap < g.taps(); ++tap) {
    const int64_t i = tap / g.kw, j = tap % g.kw;
    w.tap_off.push_back((pp.flip ? g.kh - 1 - i : i) * g.dh * wp + (pp.flip ? g.kw - 1 - j : j) * g.dw);
  }
  for_each_image(g.n, [&](int64_t img) {
    const float* bt = src.data_ptr<float>() + img * c_src * h * wd;
    if (copy_in) {
      float* planes = scratch(kTransposeA, {floats}, src.options()).data_ptr<float>();
      pad_planes(bt, c_src, h, wd, pp, ld, planes, floats);
      bt = planes;
    }
    weights_first(w, bt, ld, n, out.data_ptr<float>() + img * c_out * n, n, b_readable,
                  wp == out_w ? ColumnGrid{1, 0} : ColumnGrid{out_h, wp});
  });
}

// Whether a conv source is read through a channels-last copy of each image:
// NCHW planes put a pixel's channels H * W floats apart, so each reduction
// step of a tile reads another line, and the taps read those lines again
// (4 KB planes: all in one L1 set, so from L2).  An image packed in L2 by
// register transposes costs less where the GEMM walks about as many pixels
// as the source has (stride 1; grad-input) and each thread takes whole
// images; a strided forward reads a quarter of them per tap, a few images
// would pack their whole batch out of cache, and a 1x1 conv reads each line
// once.  Measured: docs/cpu-backend.md, "Packing images channels-last".
bool packs_images(const ConvGeom& g, bool transposed, const at::Tensor& src) {
  const int64_t walked = transposed ? g.h * g.w : g.oh * g.ow;
  const bool planes = src.stride(3) == 1 && src.stride(2) == src.size(3) && src.stride(1) != 1 && src.size(1) > 1;
  return planes && g.taps() > 1 && whole_images_per_thread(g.n) && 2 * walked >= src.size(2) * src.size(3);
}

// Element stride between a pixel's channels as the conv kernel reads them.
int64_t read_channel_stride(const ConvGeom& g, bool transposed, const at::Tensor& src) {
  return packs_images(g, transposed, src) ? 1 : src.stride(1);
}

// Forward, grad-input: one sparse GEMM whose A rows are the conv taps' reads
// of `src` (walked as TapRows says); terms were built with
// read_channel_stride(src).  Packed sources run image by image, each thread
// on its own: the image's planes transposed into pixel rows of C floats in
// scratch, then the GEMM's rows of that image.
void run_conv(SparseGemm& gemm, const ConvGeom& g, bool transposed, const at::Tensor& src) {
  const auto fill = [](const TapRows& rows) {
    return [&rows](int64_t m0, int tn, const int32_t* taps, int64_t ntaps, const float** a_rows) {
      rows.fill(m0, tn, taps, ntaps, a_rows);
    };
  };
  if (!packs_images(g, transposed, src)) {
    const TapRows rows(g, transposed, src.data_ptr<float>(), src.sizes(), src.strides(), src.options());
    gemm.a_stride = rows.channel_stride;
    // a tile's rows span kh source rows of its pixels and the taps' reach
    const int64_t tile_px = isa().tile_rows(gemm.width) + (g.kw - 1) * g.dw;
    gemm.prefetch_a = prefetch_pays(g.kh * tile_px * src.size(1));
    run(gemm, fill(rows));
    return;
  }
  const int64_t c = src.size(1), h = src.size(2), w = src.size(3);
  const TapRows packed(g, transposed, nullptr, src.sizes(), {h * w * c, 1, w * c, c}, src.options());
  gemm.a_stride = 1;
  const int64_t image_rows = gemm.rows / g.n, image_floats = h * w * c;
  for_each_image(g.n, [&](int64_t img) {
    const at::Tensor image = scratch(kTransposeA, {image_floats}, src.options());
    isa().transpose(src.data_ptr<float>() + img * src.stride(0), src.stride(1), int(c), int(h * w),
                    image.data_ptr<float>(), c, false);
    TapRows rows = packed;
    rows.src = image.data_ptr<float>();
    OutRows out = gemm.out;
    out.base += img * out.image_stride;
    run_on(gemm, image_rows, out, fill(rows));
  });
}

}  // namespace

at::Tensor conv2d_forward(const at::Tensor& x, const at::Tensor& values_, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, const at::Tensor& slot,
                          const std::optional<at::Tensor>& bias, int64_t out_channels,
                          at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation) {
  const at::ScalarType dtype = op_dtype({&x, &values_}, {"x", "values"});
  if (bias.has_value()) op_dtype({&x, &*bias}, {"x", "bias"});
  if (const Bf16Kernel* k = bf16_runs(x, values_.size(1), values_.size(2)))
    return bf16_conv2d_forward(*k, x, values_, row_ptr, col_idx, slot, bias, out_channels, kernel, stride, padding,
                               dilation);
  if (dtype != at::kFloat)
    return widened_call(dtype, conv2d_forward, x, values_, row_ptr, col_idx, slot, bias, out_channels, kernel, stride,
                        padding, dilation);
  const ConvGeom g = conv_geom(x.sizes(), out_channels, kernel, stride, padding, dilation);
  const int64_t nnzb = values_.size(0), bo = values_.size(1), bi = values_.size(2);
  const int64_t blocks_per_tap = cdiv(g.cin, bi), R = row_ptr.numel() - 1;
  check_indices(row_ptr, col_idx, slot, g.taps() * blocks_per_tap, nnzb, "BSR");
  TORCH_CHECK(R == cdiv(out_channels, bo), "freetickets_cpu: row_ptr does not match out_channels");
  const at::Tensor y = conv_output({g.n, g.cout, g.oh, g.ow}, x);
  if (on_planes(g, x, values_, false)) {
    const at::Tensor values = values_.contiguous();
    WeightsFirst w = weights_first_forward(values, row_ptr, col_idx, slot, g.cout, g.cin);
    w.blocks_per_tap = blocks_per_tap;  // BSR block columns are tap * blocks_per_tap + channel block
    weights_first_on_planes(w, g, false, x, y);
    if (bias.has_value()) {
      check_float(*bias, "bias");
      y.add_(bias->view({1, -1, 1, 1}));
    }
    return y;
  }
  const at::Tensor vt = values_.transpose(1, 2).contiguous();  // small next to the activations
  const at::Tensor bp = padded_bias(bias, R * bo, x);
  const int64_t channel_stride = read_channel_stride(g, false, x);
  SparseGemm gemm{g.n * g.oh * g.ow, R, int(bo), g.cout, pixel_rows(y), {}, {}, bo,
                  bp.defined() ? bp.data_ptr<float>() : nullptr, int(g.taps())};
  const int32_t *rp = row_ptr.data_ptr<int32_t>(), *ci = col_idx.data_ptr<int32_t>(),
                *sl = slot.data_ptr<int32_t>();
  gemm.term_ptr.assign(rp, rp + R + 1);
  for (int64_t e = 0; e < nnzb; ++e) {
    const int64_t tap = ci[e] / blocks_per_tap, cb = ci[e] % blocks_per_tap;
    gemm.terms.push_back({int32_t(tap), int32_t(std::min(bi, g.cin - cb * bi)), cb * bi * channel_stride,
                          vt.data_ptr<float>() + sl[e] * bi * bo});
  }
  run_conv(gemm, g, /*transposed=*/false, x);
  return y;
}

at::Tensor conv2d_grad_input(const at::Tensor& dy, const at::Tensor& values_, const at::Tensor& col_ptr,
                             const at::Tensor& row_idx, const at::Tensor& tslot,
                             at::IntArrayRef input_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::ScalarType dtype = op_dtype({&dy, &values_}, {"grad_out", "values"});
  if (const Bf16Kernel* k = bf16_runs(dy, values_.size(1), values_.size(2)))
    return bf16_conv2d_grad_input(*k, dy, values_, col_ptr, row_idx, tslot, input_size, kernel, stride, padding,
                                  dilation);
  if (dtype != at::kFloat)
    return widened_call(dtype, conv2d_grad_input, dy, values_, col_ptr, row_idx, tslot, input_size, kernel, stride,
                        padding, dilation);
  const ConvGeom g = conv_geom(input_size, dy.size(1), kernel, stride, padding, dilation);
  TORCH_CHECK(dy.size(2) == g.oh && dy.size(3) == g.ow,
              "freetickets_cpu: grad_out spatial size does not match the conv geometry");
  const at::Tensor values = values_.contiguous();
  const int64_t nnzb = values.size(0), bo = values.size(1), bi = values.size(2);
  const int64_t blocks_per_tap = cdiv(g.cin, bi), C = col_ptr.numel() - 1;
  TORCH_CHECK(C == g.taps() * blocks_per_tap, "freetickets_cpu: col_ptr does not match the input channels");
  check_indices(col_ptr, row_idx, tslot, cdiv(g.cout, bo), nnzb, "transposed");
  const at::Tensor dx = conv_output({g.n, g.cin, g.h, g.w}, dy);
  const int32_t *cp = col_ptr.data_ptr<int32_t>(), *ri = row_idx.data_ptr<int32_t>(),
                *ts = tslot.data_ptr<int32_t>();
  if (on_planes(g, dy, values, true)) {
    WeightsFirst w = weights_first_grad_input(values, col_ptr, row_idx, tslot, g.cout, g.cin);
    // rows are input channel blocks: gather each one's blocks over all taps,
    // column tap * R + output block row
    const int64_t R = cdiv(g.cout, bo);
    std::vector<int32_t> ptr{0}, idx, slots;
    for (int64_t cb = 0; cb < blocks_per_tap; ++cb) {
      for (int64_t tap = 0; tap < g.taps(); ++tap)
        for (int32_t e = cp[tap * blocks_per_tap + cb]; e < cp[tap * blocks_per_tap + cb + 1]; ++e) {
          idx.push_back(int32_t(tap * R + ri[e]));
          slots.push_back(ts[e]);
        }
      ptr.push_back(int32_t(idx.size()));
    }
    w.ptr = ptr.data();
    w.idx = idx.data();
    w.slot = slots.data();
    w.blocks_per_tap = R;
    weights_first_on_planes(w, g, true, dy, dx);
    return dx;
  }
  const int64_t channel_stride = read_channel_stride(g, true, dy);
  // Output block cb (Bi input channels) sums, over taps, the blocks of column tap*blocks_per_tap + cb.
  SparseGemm gemm{g.n * g.h * g.w, blocks_per_tap, int(bi), g.cin, pixel_rows(dx), {0}, {}, bi, nullptr, int(g.taps())};
  for (int64_t cb = 0; cb < blocks_per_tap; ++cb) {
    for (int64_t tap = 0; tap < g.taps(); ++tap) {
      const int64_t col = tap * blocks_per_tap + cb;
      for (int32_t e = cp[col]; e < cp[col + 1]; ++e)
        gemm.terms.push_back({int32_t(tap), int32_t(std::min(bo, g.cout - ri[e] * bo)),
                              ri[e] * bo * channel_stride, values.data_ptr<float>() + ts[e] * bo * bi});
    }
    gemm.term_ptr.push_back(int64_t(gemm.terms.size()));
  }
  run_conv(gemm, g, /*transposed=*/true, dy);
  return dx;
}

at::Tensor conv2d_grad_values(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& slot,
                              at::IntArrayRef block_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::ScalarType dtype = op_dtype({&dy, &x}, {"grad_out", "x"});
  if (const Bf16Kernel* k = bf16_runs(dy, block_size[0], block_size[1]))
    return bf16_conv2d_grad_values(*k, dy, x, row_ptr, col_idx, slot, block_size, kernel, stride, padding, dilation);
  if (dtype != at::kFloat)
    return widened_call(dtype, conv2d_grad_values, dy, x, row_ptr, col_idx, slot, block_size, kernel, stride, padding,
                        dilation);
  const ConvGeom g = conv_geom(x.sizes(), dy.size(1), kernel, stride, padding, dilation);
  const int64_t nnzb = col_idx.numel(), bo = block_size[0], bi = block_size[1];
  const int64_t blocks_per_tap = cdiv(g.cin, bi), M = g.n * g.oh * g.ow;
  const FlatPixels dyf = flat_pixels(dy), xf = flat_pixels(x);
  const GradRows a{dyf.t.data_ptr<float>(), dyf.channel, dyf.pixel, dyf.image, g.cout};
  const GradCols b{xf.t.data_ptr<float>(), xf.channel, xf.pixel, xf.image, g.cin};
  if (g.pointwise())
    return grad_values_pointwise(a, b, g.n, g.h * g.w, row_ptr, col_idx, slot, block_size, x);
  check_indices(row_ptr, col_idx, slot, g.taps() * blocks_per_tap, nnzb, "BSR");
  if (M == 0) return at::zeros({nnzb, bo, bi}, x.options());  // an empty batch: no gradient
  std::vector<TapWork> work = taps_with_entries(row_ptr, col_idx, slot, g.taps(), blocks_per_tap, bi);
  // units are output rows (n, oh); each tap reads one segment of a row: the
  // output columns whose input column iw = ow*sw - pw + j*dw lies inside the image
  for (int64_t tap = 0; tap < g.taps(); ++tap) {
    TapWork& tw = work[tap];
    const int64_t i = tap / g.kw, j = tap % g.kw;
    const int64_t ow_lo = std::max<int64_t>(0, cdiv(g.pw - j * g.dw, g.sw));
    const int64_t ow_hi = std::min<int64_t>(g.ow, cdiv(g.w + g.pw - j * g.dw, g.sw));
    tw.unit_ptr.push_back(0);
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t oh = 0; oh < g.oh; ++oh) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh, iw = ow_lo * g.sw - g.pw + j * g.dw;
        if (!tw.entries.empty() && ow_hi > ow_lo && ih >= 0 && ih < g.h)
          tw.segs.push_back({n * a.image_stride + (oh * g.ow + ow_lo) * a.k_stride,
                             n * b.image_stride + ih * xf.t.stride(2) + iw * xf.t.stride(3), int32_t(ow_hi - ow_lo)});
        tw.unit_ptr.push_back(int64_t(tw.segs.size()));
      }
  }
  const GradValues dv = new_grad_values(x, nnzb, bo, bi, g.n * g.oh, M * (g.cout + g.taps() * g.cin),
                                        g.cout % bo != 0 || g.cin % bi != 0);
  grad_values_blocks(a, b, g.sw * xf.t.stride(3), work, g.n * g.oh, dv);
  return dv.result();
}

}  // namespace ftk_cpu
