// flexquant's packed CPU matmul (kernels/cpu_packed.py): y = x·Wᵀ with W kept as integer codes, one scale and one
// offset per row and group (w = code·scale + offset), dequantized group by group inside the product.
//
// codes: uint8 [m, n·bits/8], bits 4 (per group of g, byte t holds column t in its low nibble and column t + g/2 in
// its high nibble, so both halves meet x contiguously, as GGML's Q4_0 does), 3 (per 32 columns: 8 bytes of low bit
// pairs, byte t holding columns t + 8k at bits 2k, then a little-endian 32-bit word whose bit c is column c's high
// bit — eight columns come out of one 8-byte load and one broadcast word; g a multiple of 32) or 8;
// sz: float32 [m, ng, 2] (scale, offset); x: float32 [b, n] (columns already in the codes' order).
// Small batches (decode) take the fused row-by-group loop: each group's codes meet x once and the group's sum of x
// carries the offset. Larger batches dequantize a tile of rows into a float buffer and hand it to the BLAS matmul,
// so memory holds one tile, never the dense weight.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// 32 columns of 3-bit codes (the layout above) as floats in ``out``.
inline void unpack32_3(const uint8_t* q, float* out) {
  uint32_t h;
  std::memcpy(&h, q + 8, 4);
#if defined(__AVX2__)
  const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  const __m256i hv = _mm256_set1_epi32(static_cast<int>(h));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), three = _mm256_set1_epi32(3);
  const __m256i four = _mm256_set1_epi32(4);
  for (int k = 0; k < 4; ++k) {
    const __m256i low = _mm256_and_si256(_mm256_srl_epi32(lo, _mm_cvtsi32_si128(2 * k)), three);
    const __m256i high = _mm256_and_si256(
        _mm256_slli_epi32(_mm256_srlv_epi32(hv, _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * k))), 2), four);
    _mm256_storeu_ps(out + 8 * k, _mm256_cvtepi32_ps(_mm256_or_si256(low, high)));
  }
#else
  for (int k = 0; k < 4; ++k)
    for (int t = 0; t < 8; ++t)
      out[8 * k + t] = static_cast<float>(((q[t] >> (2 * k)) & 3) | (((h >> (8 * k + t)) & 1) << 2));
#endif
}

// One group's codes as floats in ``buf`` (plain loops the compiler vectorizes, or unpack32_3).
template <int BITS>
inline void unpack_group(const uint8_t* q, int g, float* buf) {
  if (BITS == 3) {
    for (int c = 0; c < g; c += 32) unpack32_3(q + c * 3 / 8, buf + c);
  } else if (BITS == 4) {
    const int h = g / 2;
    for (int t = 0; t < h; ++t) buf[t] = static_cast<float>(q[t] & 0xF);
    for (int t = 0; t < h; ++t) buf[t + h] = static_cast<float>(q[t] >> 4);
  } else {
    for (int t = 0; t < g; ++t) buf[t] = static_cast<float>(q[t]);
  }
}

// The unpacked group's dot with x, in eight lanes of accumulators.
inline float group_dot(const float* buf, const float* x, int g) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int t = 0;
  for (; t + 8 <= g; t += 8)
    for (int l = 0; l < 8; ++l) acc[l] += buf[t + l] * x[t + l];
  float sum = 0.f;
  for (; t < g; ++t) sum += buf[t] * x[t];
  for (int l = 0; l < 8; ++l) sum += acc[l];
  return sum;
}

// Each group is unpacked once and meets every row of x (up to gemv_max_batch of them).
template <int BITS>
void gemv(const uint8_t* codes, const float* sz, const float* x, const float* xsum, float* y,
          int64_t b, int64_t m, int64_t n, int64_t g) {
  const int64_t ng = n / g, row_bytes = n * BITS / 8, group_bytes = g * BITS / 8;
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(g), acc(b);
    for (int64_t i = r0; i < r1; ++i) {
      const uint8_t* qi = codes + i * row_bytes;
      const float* si = sz + i * ng * 2;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < ng; ++j) {
        unpack_group<BITS>(qi + j * group_bytes, static_cast<int>(g), buf.data());
        for (int64_t k = 0; k < b; ++k)
          acc[k] += si[2 * j] * group_dot(buf.data(), x + k * n + j * g, static_cast<int>(g)) +
                    si[2 * j + 1] * xsum[k * ng + j];
      }
      for (int64_t k = 0; k < b; ++k) y[k * m + i] = acc[k];
    }
  });
}

template <int BITS>
void dequant_rows(const uint8_t* codes, const float* sz, float* out, int64_t r0, int64_t r1, int64_t n, int64_t g) {
  const int64_t ng = n / g, row_bytes = n * BITS / 8;
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {
      const uint8_t* qi = codes + i * row_bytes;
      const float* si = sz + i * ng * 2;
      float* o = out + (i - r0) * n;
      for (int64_t j = 0; j < ng; ++j) {
        const float s = si[2 * j], off = si[2 * j + 1];
        float* oj = o + j * g;
        if (BITS == 3) {
          unpack_group<3>(qi + j * g * 3 / 8, static_cast<int>(g), oj);
#pragma omp simd
          for (int64_t t = 0; t < g; ++t) oj[t] = oj[t] * s + off;
        } else if (BITS == 4) {
          const uint8_t* qj = qi + j * g / 2;
          const int64_t h = g / 2;
#pragma omp simd
          for (int64_t t = 0; t < h; ++t) {
            oj[t] = static_cast<float>(qj[t] & 0xF) * s + off;
            oj[t + h] = static_cast<float>(qj[t] >> 4) * s + off;
          }
        } else {
          const uint8_t* qj = qi + j * g;
#pragma omp simd
          for (int64_t t = 0; t < g; ++t) oj[t] = static_cast<float>(qj[t]) * s + off;
        }
      }
    }
  });
}

// y[k, r] = Σ_t x[k, t]·W[r, t] for a float16 W, converted as it is read (no float copy of W): eight halves at a
// time with F16C where the compiler targets it, else one by one.
inline float half_dot(const at::Half* w, const float* x, int64_t n) {
  int64_t t = 0;
  float sum = 0.f;
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 wf = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + t)));
    acc = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + t), acc);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (int l = 0; l < 8; ++l) sum += lanes[l];
#endif
  for (; t < n; ++t) sum += static_cast<float>(w[t]) * x[t];
  return sum;
}

}  // namespace

// y = x·Wᵀ for float32 x [b, n] and float16 W [m, n] (a lean load's head, decode-sized batches).
torch::Tensor half_matmul(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [b, n]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kHalf && w.is_contiguous() && w.size(1) == x.size(1),
              "w: contiguous float16 [m, n] with x's n");
  const int64_t b = x.size(0), n = x.size(1), m = w.size(0);
  auto y = torch::empty({b, m}, x.options());
  const at::Half* wp = w.data_ptr<at::Half>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = 0; k < b; ++k) yp[k * m + r] = half_dot(wp + r * n, xp + k * n, n);
  });
  return y;
}

torch::Tensor packed_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor sz, int64_t bits, int64_t g,
                            int64_t gemv_max_batch, int64_t tile_rows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [b, n]");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes: contiguous uint8");
  TORCH_CHECK(sz.scalar_type() == torch::kFloat32 && sz.is_contiguous(), "sz: contiguous float32");
  TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, "bits must be 3, 4 or 8");
  TORCH_CHECK(bits != 3 || g % 32 == 0, "3-bit codes need a group size divisible by 32");
  const int64_t b = x.size(0), n = x.size(1), m = codes.size(0);
  TORCH_CHECK(n % g == 0 && g % 2 == 0 && codes.size(1) == n * bits / 8 && sz.size(0) == m &&
              sz.size(1) == n / g && sz.size(2) == 2, "shapes of x, codes and sz do not agree");
  auto y = torch::empty({b, m}, x.options());
  const uint8_t* q = codes.data_ptr<uint8_t>();
  const float* s = sz.data_ptr<float>();
  if (b <= gemv_max_batch) {
    auto xsum = x.view({b, n / g, g}).sum(-1).contiguous();
    if (bits == 3)
      gemv<3>(q, s, x.data_ptr<float>(), xsum.data_ptr<float>(), y.data_ptr<float>(), b, m, n, g);
    else if (bits == 4)
      gemv<4>(q, s, x.data_ptr<float>(), xsum.data_ptr<float>(), y.data_ptr<float>(), b, m, n, g);
    else
      gemv<8>(q, s, x.data_ptr<float>(), xsum.data_ptr<float>(), y.data_ptr<float>(), b, m, n, g);
    return y;
  }
  auto tile = torch::empty({std::min(tile_rows, m), n}, x.options());
  for (int64_t r0 = 0; r0 < m; r0 += tile_rows) {
    const int64_t r1 = std::min(r0 + tile_rows, m);
    if (bits == 3)
      dequant_rows<3>(q, s, tile.data_ptr<float>(), r0, r1, n, g);
    else if (bits == 4)
      dequant_rows<4>(q, s, tile.data_ptr<float>(), r0, r1, n, g);
    else
      dequant_rows<8>(q, s, tile.data_ptr<float>(), r0, r1, n, g);
    y.narrow(1, r0, r1 - r0).copy_(at::mm(x, tile.narrow(0, 0, r1 - r0).t()));
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_matmul", &packed_matmul, "y = x·Wᵀ with W as packed codes, group scales and offsets");
  m.def("half_matmul", &half_matmul, "y = x·Wᵀ with float16 W converted as it is read");
}
