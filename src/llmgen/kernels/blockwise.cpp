// Block-quantized weight products for CPU decoding with AVX2 (kernels/blockwise.py builds this file
// on first use and says why it is there).
//
// Weights are cut into blocks of 32 along the input features, each with its own fp16 scale:
//   q4: 4-bit codes 0..15 with a scale d and a minimum m per block (w = q * d + m), two blocks per 32 bytes
//       (byte j: weight j of the first block in the low half, weight j of the second in the high half);
//   q8: signed 8-bit codes with a scale d per block (w = q * d).
// For q4 the activations are cut the same way and rounded to int8 with one scale per block, so a block's
// dot product is 32 integer multiply-adds (vpmaddubsw + vpmaddwd) and one fp32 multiply-add by the two
// scales (q4 is bound by arithmetic: widening its codes to fp32 would about double it). q8 is bound by memory:
// its codes are widened to fp32 in registers and multiply the activations as they are (weight-only).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t B = 32;  // weights per block

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 unsigned codes times 32 signed activations, as 8 int32 partial sums in fp32.
inline __m256 dot_u8s8(__m256i u, __m256i s) {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

// The activations (M, K) as int8 blocks: codes qa (M, K), scales da (M, K/32) and, for q4's minimum
// term, each block's sum of codes times its scale sa (M, K/32). Kept in buffers reused from call to call
// (per calling thread): allocating tensors for them cost more than a small product.
struct Quantized {
  std::vector<int8_t> qa;
  std::vector<float> da, sa;
};

const Quantized& quantize_rows(const at::Tensor& x2) {
  thread_local Quantized r;
  const int64_t M = x2.size(0), K = x2.size(1), nb = K / B;
  if (static_cast<int64_t>(r.qa.size()) < M * K) r.qa.resize(M * K);
  if (static_cast<int64_t>(r.da.size()) < M * nb) r.da.resize(M * nb), r.sa.resize(M * nb);
  const float* xp = x2.data_ptr<float>();
  int8_t* qp = r.qa.data();
  float* dp = r.da.data();
  float* sp = r.sa.data();
  auto rows = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* v = xp + i * B;
      float amax = 0.f;
      for (int j = 0; j < B; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      for (int j = 0; j < B; ++j) {
        const int q = static_cast<int>(std::nearbyint(v[j] * inv));
        qp[i * B + j] = static_cast<int8_t>(q);
        sum += q;
      }
      dp[i] = d;
      sp[i] = d * static_cast<float>(sum);
    }
  };
  if (M * nb < 1024) rows(0, M * nb);  // one row: faster than waking the other threads
  else at::parallel_for(0, M * nb, 256, rows);
  return r;
}

at::Tensor checked_rows(const at::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "blockwise products take fp32 activations");
  TORCH_CHECK(x.size(-1) == in_features && in_features % (2 * B) == 0,
              "blockwise products need input features a multiple of 64");
  return x.reshape({-1, in_features}).contiguous();
}

at::Tensor shaped(const at::Tensor& y, const at::Tensor& x, int64_t out_features) {
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return y.view(shape);
}

// From this many activation rows (prefill) the products go through BLAS on the weight widened to fp32,
// on the same activations (q4: rounded to int8 per block, as the kernels take them). Measured on SmolLM2
// (AMD EPYC, 2 cores): q4's integer kernel is the faster up to ~80 rows on its layers; q8's weight-only
// one up to ~30 rows on a layer whose widened weight stays in cache (3.5 MB), but the int8 output head
// (113 MB widened) is the faster through the kernel up to 64 rows (a 34-row forward: 101 ms against 143).
// At 256 rows BLAS takes half the time.
constexpr int64_t Q4_GEMM_ROWS = 80, Q8_GEMM_ROWS = 64;

at::Tensor widened(const at::Tensor& q, const at::Tensor& d, const at::Tensor* m) {
  const int64_t N = q.size(0), K = m ? q.size(1) * 2 : q.size(1), nb = K / B;
  at::Tensor w = at::empty({N, K}, d.options().dtype(at::kFloat));
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* mp = m ? reinterpret_cast<const uint16_t*>(m->data_ptr<at::Half>()) : nullptr;
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* out = wp + n * K;
      for (int64_t b = 0; b < nb; ++b) {
        const float db = _cvtsh_ss(dp[n * nb + b]);
        if (mp) {  // pairs of blocks share their bytes: the first in the low halves, the second in the high
          const uint8_t* codes = qp + n * (K / 2) + (b / 2) * B;
          const float mb = _cvtsh_ss(mp[n * nb + b]);
          const int shift = (b % 2) * 4;
          for (int j = 0; j < B; ++j) out[b * B + j] = static_cast<float>((codes[j] >> shift) & 15) * db + mb;
        } else {
          const int8_t* codes = reinterpret_cast<const int8_t*>(qp) + n * K + b * B;
          for (int j = 0; j < B; ++j) out[b * B + j] = static_cast<float>(codes[j]) * db;
        }
      }
    }
  });
  return w;
}

// Per (weight row, activation row): the products of the two scales of every block, stored for broadcast.
template <typename Body>
void each_row(int64_t N, int64_t nb, Body body) {
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<float> scale(nb + 8);
    for (int64_t n = n0; n < n1; ++n) body(n, scale.data());
  });
}

// d, m: nb fp16 scales and minimums of one weight row; da, sa: the activation row's scales and scaled code
// sums. Writes s = d * da and returns sum(m * sa).
inline float scales(const uint16_t* d, const uint16_t* m, const float* da, const float* sa, int64_t nb, float* s) {
  __m256 macc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    _mm256_storeu_ps(s + b, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + b))), _mm256_loadu_ps(da + b)));
    macc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(m + b))), _mm256_loadu_ps(sa + b), macc);
  }
  float mins = hsum(macc);
  for (; b < nb; ++b) {
    s[b] = _cvtsh_ss(d[b]) * da[b];
    mins += _cvtsh_ss(m[b]) * sa[b];
  }
  return mins;
}

// Weight row n times activation rows r0 .. r0+R-1 into y; s: scratch for R rows of block scales.
template <int R>
inline void q4_rows(const uint8_t* qp, const uint16_t* dp, const uint16_t* mp, const int8_t* ap, const float* dap,
                    const float* sap, float* yp, int64_t n, int64_t r0, int64_t N, int64_t K, float* s) {
  const int64_t nb = K / B;
  const uint8_t* row = qp + n * (K / 2);
  const __m256i low = _mm256_set1_epi8(0x0F);
  float mins[R];
  __m256 acc[R], tail[R];
  for (int i = 0; i < R; ++i) {
    mins[i] = scales(dp + n * nb, mp + n * nb, dap + (r0 + i) * nb, sap + (r0 + i) * nb, nb, s + i * nb);
    acc[i] = tail[i] = _mm256_setzero_ps();
  }
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    // four blocks: their 16-bit pair sums (at most 2 * 15 * 127 each) added pairwise twice stay within
    // 16 bits, so one vpmaddwd and one multiply-add serve four blocks; lane j of each half ends up
    // holding block b + j, whose scale s[b + j] is broadcast to both halves
    const __m256i c0 = _mm256_loadu_si256((const __m256i*)(row + b * 16));
    const __m256i c1 = _mm256_loadu_si256((const __m256i*)(row + b * 16 + 32));
    const __m256i u0 = _mm256_and_si256(c0, low), u1 = _mm256_and_si256(_mm256_srli_epi16(c0, 4), low);
    const __m256i u2 = _mm256_and_si256(c1, low), u3 = _mm256_and_si256(_mm256_srli_epi16(c1, 4), low);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const int8_t* ar = ap + (r0 + i) * K + b * B;
      const __m256i p0 = _mm256_maddubs_epi16(u0, _mm256_loadu_si256((const __m256i*)ar));
      const __m256i p1 = _mm256_maddubs_epi16(u1, _mm256_loadu_si256((const __m256i*)(ar + B)));
      const __m256i p2 = _mm256_maddubs_epi16(u2, _mm256_loadu_si256((const __m256i*)(ar + 2 * B)));
      const __m256i p3 = _mm256_maddubs_epi16(u3, _mm256_loadu_si256((const __m256i*)(ar + 3 * B)));
      const __m256i sums = _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(p0, p1), _mm256_hadd_epi16(p2, p3)),
                                             _mm256_set1_epi16(1));
      acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ps((const __m128*)(s + i * nb + b)), _mm256_cvtepi32_ps(sums), acc[i]);
    }
  }
  for (; b < nb; b += 2) {  // the last two blocks (a row of 18, 2 x 9 pairs of blocks)
    const __m256i codes = _mm256_loadu_si256((const __m256i*)(row + b * 16));
    const __m256i u0 = _mm256_and_si256(codes, low), u1 = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const int8_t* ar = ap + (r0 + i) * K + b * B;
      tail[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(s + i * nb + b), dot_u8s8(u0, _mm256_loadu_si256((const __m256i*)ar)), tail[i]);
      tail[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(s + i * nb + b + 1),
                                dot_u8s8(u1, _mm256_loadu_si256((const __m256i*)(ar + B))), tail[i]);
    }
  }
  for (int i = 0; i < R; ++i) yp[(r0 + i) * N + n] = hsum(_mm256_add_ps(acc[i], tail[i])) + mins[i];
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
  const int64_t N = q.size(0), K = q.size(1) * 2, nb = K / B;
  const at::Tensor x2 = checked_rows(x, K);
  const int64_t M = x2.size(0);
  const Quantized& a = quantize_rows(x2);
  if (M >= Q4_GEMM_ROWS) {  // the rounded activations, codes times their block's scale
    at::Tensor xr = at::empty({M, K}, x2.options());
    float* xrp = xr.data_ptr<float>();
    at::parallel_for(0, M * nb, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int j = 0; j < B; ++j) xrp[i * B + j] = static_cast<float>(a.qa[i * B + j]) * a.da[i];
    });
    return shaped(at::linear(xr, widened(q, d, &m)), x, N);
  }
  at::Tensor y = at::empty({M, N}, x2.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  const int8_t* ap = a.qa.data();
  const float* dap = a.da.data();
  const float* sap = a.sa.data();
  float* yp = y.data_ptr<float>();
  // Activation rows R at a time (R fixed at compile time, so their accumulators stay in registers) share
  // each weight block's codes, loaded and unpacked once.
  each_row(N, nb * 4, [&](int64_t n, float* s) {
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) q4_rows<4>(qp, dp, mp, ap, dap, sap, yp, n, r, N, K, s);
    for (; r + 2 <= M; r += 2) q4_rows<2>(qp, dp, mp, ap, dap, sap, yp, n, r, N, K, s);
    if (r < M) q4_rows<1>(qp, dp, mp, ap, dap, sap, yp, n, r, N, K, s);
  });
  return shaped(y, x, N);
}

// int8 blocks times fp32 activations (no rounding of the activations): each group of 8 codes widened to
// fp32 in registers, a block's products summed, then scaled by the block's d.
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d) {
  const int64_t N = q.size(0), K = q.size(1), nb = K / B;
  const at::Tensor x2 = checked_rows(x, K);
  const int64_t M = x2.size(0);
  if (M >= Q8_GEMM_ROWS) return shaped(at::linear(x2, widened(q, d, nullptr)), x, N);
  at::Tensor y = at::empty({M, N}, x2.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  each_row(N, nb, [&](int64_t n, float* s) {
    const int8_t* row = qp + n * K;
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) _mm256_storeu_ps(s + b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dp + n * nb + b))));
    for (; b < nb; ++b) s[b] = _cvtsh_ss(dp[n * nb + b]);
    // R activation rows at a time against this weight row: each block's codes are widened once for all R
    auto rows = [&](int64_t r0, auto R_) {
      constexpr int R = decltype(R_)::value;
      __m256 acc[R][2];
      for (int j = 0; j < R; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* w = row + b * B;
        __m256 wf[4];
        for (int i = 0; i < 4; ++i) wf[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + 8 * i))));
        const __m256 sb = _mm256_broadcast_ss(s + b);
        for (int j = 0; j < R; ++j) {
          const float* a = xp + (r0 + j) * K + b * B;
          const __m256 p0 = _mm256_fmadd_ps(wf[2], _mm256_loadu_ps(a + 16), _mm256_mul_ps(wf[0], _mm256_loadu_ps(a)));
          const __m256 p1 = _mm256_fmadd_ps(wf[3], _mm256_loadu_ps(a + 24), _mm256_mul_ps(wf[1], _mm256_loadu_ps(a + 8)));
          acc[j][0] = _mm256_fmadd_ps(sb, p0, acc[j][0]);
          acc[j][1] = _mm256_fmadd_ps(sb, p1, acc[j][1]);
        }
      }
      for (int j = 0; j < R; ++j) yp[(r0 + j) * N + n] = hsum(_mm256_add_ps(acc[j][0], acc[j][1]));
    };
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) rows(r, std::integral_constant<int, 4>());
    for (; r < M; ++r) rows(r, std::integral_constant<int, 1>());
  });
  return shaped(y, x, N);
}

// Attention of one new token per row over its cached keys and values, for decoding: q (B, H, G, D) are
// the G query heads that share each of the H key/value heads, k and v (B, H, S, D) the cache (any strides
// but the last), mask (B, 1, 1, S) True where a slot may be attended (None: every slot). torch's CPU
// attention kernel spends ~35 us a call on its blocking for a query this small; this is a plain loop.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat);
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1 && q.size(-1) % 8 == 0);
  const at::Tensor qc = q.contiguous();
  const int64_t Bn = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  at::Tensor out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool* mp = nullptr;
  int64_t mb = 0, ms = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->size(-1) == S);
    mp = mask->data_ptr<bool>();
    mb = mask->size(0) == 1 ? 0 : mask->stride(0);
    ms = mask->stride(-1);
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, Bn * H * G, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> p(S);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / (H * G), h = (u / G) % H;
      const float* qr = qp + u * D;
      const float* kb = kp + b * k.stride(0) + h * k.stride(1);
      const float* vb = vp + b * v.stride(0) + h * v.stride(1);
      const bool* mr = mp ? mp + b * mb : nullptr;
      float top = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (mr && !mr[s * ms]) {
          p[s] = -INFINITY;
          continue;
        }
        const float* kr = kb + s * k.stride(2);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(kr + d), acc);
        p[s] = hsum(acc) * scale;
        top = std::max(top, p[s]);
      }
      float* o = op + u * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      if (top == -INFINITY) continue;  // nothing to attend to
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        if (p[s] == -INFINITY) continue;
        const float w = std::exp(p[s] - top);
        total += w;
        const float* vr = vb + s * v.stride(2);
        const __m256 wv = _mm256_set1_ps(w);
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(o + d)));
      }
      const __m256 inv = _mm256_set1_ps(1.f / total);
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(inv, _mm256_loadu_ps(o + d)));
    }
  });
  return out;
}

// RMSNorm of fp32 rows (x * rsqrt(mean(x^2) + eps) * w) in one pass a row: torch's CPU rms_norm is several
// kernels, ~11-28 us a call on a 576-wide decode row (61 calls a SmolLM2 token), this ~1 us.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.is_contiguous() && w.is_contiguous());
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  TORCH_CHECK(w.numel() == D);
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float* o = op + r * D;
      __m256 acc = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) {
        const __m256 v = _mm256_loadu_ps(xr + d);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float ss = hsum(acc);
      for (; d < D; ++d) ss += xr[d] * xr[d];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      const __m256 iv = _mm256_set1_ps(inv);
      for (d = 0; d + 8 <= D; d += 8)
        _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + d), iv), _mm256_loadu_ps(wp + d)));
      for (; d < D; ++d) o[d] = xr[d] * inv * wp[d];
    }
  };
  if (R * D < (1 << 16)) {
    rows(0, R);  // a decode step's few rows: waking the other threads costs more than the work
  } else {
    at::parallel_for(0, R, 16, rows);
  }
  return out;
}

// Shapes only (torch.compile traces with these): symbolic sizes kept symbolic, so a dynamic row count
// stays dynamic.
at::Tensor meta_like(const at::Tensor& x, const at::Tensor& q) {
  auto shape = x.sym_sizes().vec();
  shape.back() = q.sym_size(0);
  return at::empty_symint(shape, x.options());
}

at::Tensor q4_meta(const at::Tensor& x, const at::Tensor& q, const at::Tensor&, const at::Tensor&) {
  return meta_like(x, q);
}

at::Tensor q8_meta(const at::Tensor& x, const at::Tensor& q, const at::Tensor&) { return meta_like(x, q); }

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor&, double) { return at::empty_symint(x.sym_sizes(), x.options()); }

at::Tensor attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&) {
  return at::empty_symint(q.sym_sizes(), q.options());
}

}  // namespace

TORCH_LIBRARY(llmgen_blockwise, lib) {
  lib.def("q4_linear(Tensor x, Tensor q, Tensor d, Tensor m) -> Tensor");
  lib.def("q8_linear(Tensor x, Tensor q, Tensor d) -> Tensor");
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
  lib.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmgen_blockwise, CPU, lib) {
  lib.impl("q4_linear", q4_linear);
  lib.impl("q8_linear", q8_linear);
  lib.impl("decode_attention", decode_attention);
  lib.impl("rms_norm", rms_norm);
}

TORCH_LIBRARY_IMPL(llmgen_blockwise, Meta, lib) {
  lib.impl("q4_linear", q4_meta);
  lib.impl("q8_linear", q8_meta);
  lib.impl("decode_attention", attention_meta);
  lib.impl("rms_norm", rms_norm_meta);
}
