// Fused RMSNorm, rotary-embedding, SwiGLU and GELU kernels, forward and backward, for fp32 training on x86 CPUs
// (kernels/training.py builds this file on first use and says why it is there).
//
// At small widths a training step on a CPU spends as much time in these two as in the matrix products
// they sit between: torch runs RMSNorm's backward on the CPU as ~15 elementwise kernels, RoPE as a roll,
// two products and a sum each way, SwiGLU as five, each a pass over memory; its tanh GELU is its slowest
// elementwise kernel. Here each is one pass.
//
//   rms_norm(x, w, eps) -> (y, rstd)             y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row
//   rms_norm_backward(g, x, w, rstd) -> (dx, dw) dx = rstd * (g*w - x * rstd^2 * mean(g*w*x)), dw = sum_rows g*x*rstd
//   rope(x, cos, sin) -> y                       y[d] = x[d] * cos[d] + x[(d + D/2) % D] * sin[d]
//   swiglu(a, u) -> h                            h = silu(a) * u = a * sigmoid(a) * u
//   swiglu_backward(g, a, u) -> (da, du)         da = g * u * s * (1 + a * (1 - s)), du = g * a * s, s = sigmoid(a)
//   gelu(x) -> y                                 GPT-2's tanh GELU: 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi)
//   gelu_backward(g, x) -> dx                    g * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2))
// `sin` carries the rotate-half sign (model/transformer.py's rope_tables); the rotation's inverse, which
// is its backward, is the same kernel with -sin. x is (B, T, H, D) with rows of D contiguous; cos and sin
// broadcast to (B, T, 1, D).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_j a[j] * b[j]
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
  }
  for (; j + 8 <= n; j += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// sum_j a[j] * b[j] * c[j]
inline float dot3(const float* a, const float* b, const float* c, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j)), _mm256_loadu_ps(c + j), acc);
  float s = hsum(acc);
  for (; j < n; ++j) s += a[j] * b[j] * c[j];
  return s;
}

// exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2/2, exp(r) by Cephes' degree-7 expf polynomial (~1 ulp)
// and 2^n into the exponent bits.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));  // NaN stays NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 sigmoid8(__m256 a) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), a))));
}

inline float sigmoid1(float a) { return 1.f / (1.f + std::exp(-a)); }

constexpr float kGeluK = 0.7978845608028654f, kGeluC = 0.044715f;

// tanh(k (x + c x^3)) for 8 floats, as 2 sigmoid(2z) - 1
inline __m256 gelu_tanh8(__m256 x) {
  const __m256 z = _mm256_mul_ps(_mm256_set1_ps(kGeluK),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kGeluC), x), _mm256_mul_ps(x, x), x));
  return _mm256_fmsub_ps(_mm256_set1_ps(2.f), sigmoid8(_mm256_add_ps(z, z)), _mm256_set1_ps(1.f));
}

inline float gelu_tanh1(float x) { return std::tanh(kGeluK * (x + kGeluC * x * x * x)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be an fp32 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

int64_t grain(int64_t row_floats) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_floats, 1)); }

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "x");
  check_rows(w, "weight");
  const int64_t C = x.size(-1), N = x.numel() / C;
  TORCH_CHECK(w.numel() == C, "weight has ", w.numel(), " values for rows of ", C);
  auto y = at::empty_like(x);
  auto rstd = at::empty({N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, N, grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * C;
      float* yr = yp + r * C;
      const float s = 1.f / std::sqrt(dot(xr, xr, C) / static_cast<float>(C) + e);
      rp[r] = s;
      const __m256 sv = _mm256_set1_ps(s);
      int64_t j = 0;
      for (; j + 8 <= C; j += 8)
        _mm256_storeu_ps(yr + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + j), sv), _mm256_loadu_ps(wp + j)));
      for (; j < C; ++j) yr[j] = xr[j] * s * wp[j];
    }
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& g_, const at::Tensor& x, const at::Tensor& w,
                                                     const at::Tensor& rstd) {
  const at::Tensor g = g_.contiguous();
  check_rows(g, "grad");
  check_rows(x, "x");
  check_rows(w, "weight");
  check_rows(rstd, "rstd");
  const int64_t C = x.size(-1), N = x.numel() / C;
  auto dx = at::empty_like(x);
  const int64_t threads = at::get_num_threads();
  auto partial = at::zeros({threads, C}, x.options());  // each thread's share of dw
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  const float invC = 1.f / static_cast<float>(C);
  at::parallel_for(0, N, grain(C), [&](int64_t r0, int64_t r1) {
    float* dw = pp + at::get_thread_num() * C;
    for (int64_t r = r0; r < r1; ++r) {
      const float *gr = gp + r * C, *xr = xp + r * C;
      float* dr = dxp + r * C;
      const float s = rp[r];
      const float k = s * s * s * dot3(gr, wp, xr, C) * invC;  // rstd * rstd^2 * mean(g*w*x)
      const __m256 sv = _mm256_set1_ps(s), kv = _mm256_set1_ps(k);
      int64_t j = 0;
      for (; j + 8 <= C; j += 8) {
        const __m256 gv = _mm256_loadu_ps(gr + j), xv = _mm256_loadu_ps(xr + j);
        // dx = rstd * g * w - k * x ; dw += g * x * rstd
        _mm256_storeu_ps(dr + j, _mm256_fnmadd_ps(kv, xv, _mm256_mul_ps(_mm256_mul_ps(gv, _mm256_loadu_ps(wp + j)), sv)));
        _mm256_storeu_ps(dw + j, _mm256_fmadd_ps(_mm256_mul_ps(gv, xv), sv, _mm256_loadu_ps(dw + j)));
      }
      for (; j < C; ++j) {
        dr[j] = s * gr[j] * wp[j] - k * xr[j];
        dw[j] += gr[j] * xr[j] * s;
      }
    }
  });
  return {dx, partial.sum(0)};
}

// RoPE, SwiGLU and GELU also take bf16 tensors (what autocast's products give them): loaded as fp32,
// computed in fp32, rounded to bf16 once (to nearest even; NaN stays NaN).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(at::BFloat16* p, float v) { *p = at::BFloat16(v); }

void check_elements(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              name, " must be an fp32 or bf16 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same(const at::Tensor& a, const at::Tensor& b) {
  check_elements(a, "gate");
  check_elements(b, "up");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "gate and up differ in shape or dtype");
}

// Run fn<T>() with T the C++ type of t's dtype (fp32 or bf16).
template <typename F>
auto by_dtype(const at::Tensor& t, F fn) {
  return t.scalar_type() == at::kBFloat16 ? fn(static_cast<at::BFloat16*>(nullptr)) : fn(static_cast<float*>(nullptr));
}

// y[d] = x[d] * cos[d] + x[(d + D/2) % D] * sign * sin[d] over rows of D; cos/sin (fp32) indexed by (b, t).
at::Tensor rope(const at::Tensor& x_, const at::Tensor& cos, const at::Tensor& sin, double sign) {
  const at::Tensor x = x_.contiguous();
  check_elements(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (B, T, H, D)");
  const int64_t Bn = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 16 == 0, "rope kernel: head size ", D, " is not a multiple of 16");
  const at::Tensor c = cos.expand({Bn, T, 1, D}), s = sin.expand({Bn, T, 1, D});
  TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat && c.stride(3) == 1 && s.stride(3) == 1,
              "cos/sin must be fp32 with rows of D contiguous");
  auto y = at::empty_like(x);
  const float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  const int64_t cb = c.stride(0), ct = c.stride(1), sb = s.stride(0), st = s.stride(1);
  const __m256 sg = _mm256_set1_ps(static_cast<float>(sign));
  by_dtype(x, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const T_* xp = static_cast<const T_*>(x.data_ptr());
    T_* yp = static_cast<T_*>(y.data_ptr());
    at::parallel_for(0, Bn * T, grain(H * D), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / T, t = i % T;
        const float *cr = cp + b * cb + t * ct, *sr = sp + b * sb + t * st;
        for (int64_t h = 0; h < H; ++h) {
          const T_* xr = xp + (i * H + h) * D;
          T_* yr = yp + (i * H + h) * D;
          for (int64_t j = 0; j < half; j += 8) {
            const __m256 lo = load8(xr + j), hi = load8(xr + half + j);
            store8(yr + j, _mm256_fmadd_ps(_mm256_mul_ps(hi, sg), _mm256_loadu_ps(sr + j),
                                           _mm256_mul_ps(lo, _mm256_loadu_ps(cr + j))));
            store8(yr + half + j, _mm256_fmadd_ps(_mm256_mul_ps(lo, sg), _mm256_loadu_ps(sr + half + j),
                                                  _mm256_mul_ps(hi, _mm256_loadu_ps(cr + half + j))));
          }
        }
      }
    });
    return 0;
  });
  return y;
}

constexpr int64_t kElementGrain = 32768;

at::Tensor swiglu(const at::Tensor& a, const at::Tensor& u) {
  check_same(a, u);
  auto h = at::empty_like(a);
  by_dtype(a, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const T_ *ap = static_cast<const T_*>(a.data_ptr()), *up = static_cast<const T_*>(u.data_ptr());
    T_* hp = static_cast<T_*>(h.data_ptr());
    at::parallel_for(0, a.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {
        const __m256 av = load8(ap + i);
        store8(hp + i, _mm256_mul_ps(_mm256_mul_ps(av, sigmoid8(av)), load8(up + i)));
      }
      for (; i < i1; ++i) {
        const float av = load1(ap + i);
        store1(hp + i, av * sigmoid1(av) * load1(up + i));
      }
    });
    return 0;
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& g_, const at::Tensor& a, const at::Tensor& u) {
  const at::Tensor g = g_.contiguous();
  check_same(a, u);
  check_same(g, a);
  auto da = at::empty_like(a), du = at::empty_like(u);
  by_dtype(a, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const T_ *gp = static_cast<const T_*>(g.data_ptr()), *ap = static_cast<const T_*>(a.data_ptr()),
             *up = static_cast<const T_*>(u.data_ptr());
    T_ *dap = static_cast<T_*>(da.data_ptr()), *dup = static_cast<T_*>(du.data_ptr());
    at::parallel_for(0, a.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
      const __m256 one = _mm256_set1_ps(1.f);
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {
        const __m256 gv = load8(gp + i), av = load8(ap + i), uv = load8(up + i);
        const __m256 sv = sigmoid8(av), gs = _mm256_mul_ps(gv, sv);
        store8(dup + i, _mm256_mul_ps(gs, av));
        // da = g * s * u * (1 + a * (1 - s))
        store8(dap + i, _mm256_mul_ps(_mm256_mul_ps(gs, uv), _mm256_fmadd_ps(av, _mm256_sub_ps(one, sv), one)));
      }
      for (; i < i1; ++i) {
        const float av = load1(ap + i), s = sigmoid1(av), gs = load1(gp + i) * s;
        store1(dup + i, gs * av);
        store1(dap + i, gs * load1(up + i) * (1.f + av * (1.f - s)));
      }
    });
    return 0;
  });
  return {da, du};
}

at::Tensor gelu(const at::Tensor& x) {
  check_elements(x, "x");
  auto y = at::empty_like(x);
  by_dtype(x, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const T_* xp = static_cast<const T_*>(x.data_ptr());
    T_* yp = static_cast<T_*>(y.data_ptr());
    at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
      const __m256 half = _mm256_set1_ps(0.5f);
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {
        const __m256 xv = load8(xp + i);
        const __m256 hx = _mm256_mul_ps(half, xv);
        store8(yp + i, _mm256_fmadd_ps(hx, gelu_tanh8(xv), hx));
      }
      for (; i < i1; ++i) {
        const float xv = load1(xp + i);
        store1(yp + i, 0.5f * xv * (1.f + gelu_tanh1(xv)));
      }
    });
    return 0;
  });
  return y;
}

at::Tensor gelu_backward(const at::Tensor& g_, const at::Tensor& x) {
  const at::Tensor g = g_.contiguous();
  check_elements(x, "x");
  check_elements(g, "grad");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(), "grad and x differ in shape or dtype");
  auto dx = at::empty_like(x);
  by_dtype(x, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const T_ *gp = static_cast<const T_*>(g.data_ptr()), *xp = static_cast<const T_*>(x.data_ptr());
    T_* dp = static_cast<T_*>(dx.data_ptr());
    at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
      const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f), k = _mm256_set1_ps(kGeluK),
                   c3 = _mm256_set1_ps(3.f * kGeluC);
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {
        const __m256 xv = load8(xp + i), t = gelu_tanh8(xv);
        // 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)
        const __m256 dz = _mm256_mul_ps(k, _mm256_fmadd_ps(c3, _mm256_mul_ps(xv, xv), one));
        const __m256 inner = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, xv), _mm256_fnmadd_ps(t, t, one)), dz);
        store8(dp + i, _mm256_mul_ps(load8(gp + i), _mm256_fmadd_ps(half, _mm256_add_ps(one, t), inner)));
      }
      for (; i < i1; ++i) {
        const float xv = load1(xp + i), t = gelu_tanh1(xv);
        store1(dp + i, load1(gp + i) * (0.5f * (1.f + t) + 0.5f * xv * (1.f - t * t) * kGeluK * (1.f + 3.f * kGeluC * xv * xv)));
      }
    });
    return 0;
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_meta(const at::Tensor& x, const at::Tensor&, double) {
  return {at::empty_like(x), at::empty({x.numel() / x.size(-1)}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_meta(const at::Tensor&, const at::Tensor& x, const at::Tensor& w,
                                                          const at::Tensor&) {
  return {at::empty_like(x), at::empty_like(w)};
}

at::Tensor rope_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, double) { return at::empty_like(x); }

at::Tensor gelu_meta(const at::Tensor& x) { return at::empty_like(x); }

at::Tensor gelu_backward_meta(const at::Tensor&, const at::Tensor& x) { return at::empty_like(x); }

at::Tensor swiglu_meta(const at::Tensor& a, const at::Tensor&) { return at::empty_like(a); }

std::tuple<at::Tensor, at::Tensor> swiglu_backward_meta(const at::Tensor&, const at::Tensor& a, const at::Tensor& u) {
  return {at::empty_like(a), at::empty_like(u)};
}

}  // namespace

TORCH_LIBRARY(llmgen_training, lib) {
  lib.def("rms_norm(Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  lib.def("rms_norm_backward(Tensor g, Tensor x, Tensor w, Tensor rstd) -> (Tensor, Tensor)");
  lib.def("rope(Tensor x, Tensor cos, Tensor sin, float sign) -> Tensor");
  lib.def("swiglu(Tensor a, Tensor u) -> Tensor");
  lib.def("swiglu_backward(Tensor g, Tensor a, Tensor u) -> (Tensor, Tensor)");
  lib.def("gelu(Tensor x) -> Tensor");
  lib.def("gelu_backward(Tensor g, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmgen_training, CPU, lib) {
  lib.impl("rms_norm", rms_norm);
  lib.impl("rms_norm_backward", rms_norm_backward);
  lib.impl("rope", rope);
  lib.impl("swiglu", swiglu);
  lib.impl("swiglu_backward", swiglu_backward);
  lib.impl("gelu", gelu);
  lib.impl("gelu_backward", gelu_backward);
}

TORCH_LIBRARY_IMPL(llmgen_training, Meta, lib) {
  lib.impl("rms_norm", rms_norm_meta);
  lib.impl("rms_norm_backward", rms_norm_backward_meta);
  lib.impl("rope", rope_meta);
  lib.impl("swiglu", swiglu_meta);
  lib.impl("swiglu_backward", swiglu_backward_meta);
  lib.impl("gelu", gelu_meta);
  lib.impl("gelu_backward", gelu_backward_meta);
}
