// Fused RMSNorm, rotary-embedding, SwiGLU, GELU and causal attention kernels, forward and backward, for
// training on x86 CPUs (kernels/training.py builds this file on first use and says why it is there); each
// pair is also one autograd node (the `*_train` operators, at the end).
//
// At small widths a training step on a CPU spends as much time in these as in the matrix products
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
// broadcast to (B, T, 1, D). The attention kernel has its own notes further down.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorUtils.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
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
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

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

// Run fn<T>() with T the C++ type of t's dtype (fp32 or bf16).
template <typename F>
auto by_dtype(const at::Tensor& t, F fn) {
  return t.scalar_type() == at::kBFloat16 ? fn(static_cast<at::BFloat16*>(nullptr)) : fn(static_cast<float*>(nullptr));
}

// y[d] = x[d] * cos[d] + x[(d + D/2) % D] * sign * sin[d] over rows of D; cos/sin (fp32) indexed by (b, t).
// A rotation by RoPE tables (fp32, rows of D for each (b, t)); sign -1: the inverse rotation, which is its
// backward. The rope kernel below applies it; the attention kernel applies it to q and k as it copies them in and
// to their gradients as they leave. Without tables (cos null) nothing is rotated.
struct Rot {
  const float *cos = nullptr, *sin = nullptr;
  int64_t cb = 0, ct = 0, sb = 0, st = 0;
  float sign = 1.f;
  Rot() = default;
  Rot(const at::Tensor& c, const at::Tensor& s, float sign_)
      : cos(c.data_ptr<float>()), sin(s.data_ptr<float>()), cb(c.stride(0)), ct(c.stride(1)), sb(s.stride(0)),
        st(s.stride(1)), sign(sign_) {}
  Rot inverse() const {
    Rot r = *this;
    r.sign = -sign;
    return r;
  }
};

// y = scale * rotate(x) for one row of D (a multiple of 16) at (b, t)
template <typename S_, typename D_>
inline void rotate_row(const S_* x, const Rot& rot, int64_t b, int64_t t, int64_t D, float scale, D_* y) {
  const int64_t half = D / 2;
  const float *c = rot.cos + b * rot.cb + t * rot.ct, *s = rot.sin + b * rot.sb + t * rot.st;
  const __m256 sg = _mm256_set1_ps(rot.sign), sc = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < half; j += 8) {
    const __m256 lo = _mm256_mul_ps(load8(x + j), sc), hi = _mm256_mul_ps(load8(x + half + j), sc);
    store8(y + j, _mm256_fmadd_ps(_mm256_mul_ps(hi, sg), _mm256_loadu_ps(s + j), _mm256_mul_ps(lo, _mm256_loadu_ps(c + j))));
    store8(y + half + j, _mm256_fmadd_ps(_mm256_mul_ps(lo, sg), _mm256_loadu_ps(s + half + j),
                                         _mm256_mul_ps(hi, _mm256_loadu_ps(c + half + j))));
  }
}

at::Tensor rope(const at::Tensor& x_, const at::Tensor& cos, const at::Tensor& sin, double sign) {
  const at::Tensor x = x_.contiguous();
  check_elements(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (B, T, H, D)");
  const int64_t Bn = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 16 == 0, "rope kernel: head size ", D, " is not a multiple of 16");
  const at::Tensor c = cos.expand({Bn, T, 1, D}), s = sin.expand({Bn, T, 1, D});
  TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat && c.stride(3) == 1 && s.stride(3) == 1,
              "cos/sin must be fp32 with rows of D contiguous");
  auto y = at::empty_like(x);
  const Rot rot(c, s, static_cast<float>(sign));
  by_dtype(x, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const T_* xp = static_cast<const T_*>(x.data_ptr());
    T_* yp = static_cast<T_*>(y.data_ptr());
    at::parallel_for(0, Bn * T, grain(H * D), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t h = 0; h < H; ++h) rotate_row(xp + (i * H + h) * D, rot, i / T, i % T, D, 1.f, yp + (i * H + h) * D);
    });
    return 0;
  });
  return y;
}

constexpr int64_t kElementGrain = 32768;

// SwiGLU's gate and up as rows of their last dimension (H, contiguous), their rows `stride` apart: whole tensors
// (stride H) or, as kernels/training.py's joined projections give them, the two halves of one (rows, 2H) product
// (stride 2H). `joint`: up starts where gate's row ends, so their gradients can come back the same way, as the
// halves of one (rows, 2H) tensor: the gradient the joined product's backward takes whole, without a copy.
struct GateUp {
  int64_t rows, H, stride;
  bool joint;
};

GateUp gate_up_rows(const at::Tensor& a, const at::Tensor& u) {
  for (const at::Tensor* t : {&a, &u})
    TORCH_CHECK(t->device().is_cpu() && (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16) &&
                    t->dim() >= 1 && t->stride(-1) == 1, "swiglu: gate and up must be fp32 or bf16 CPU tensors with a contiguous last dimension");
  TORCH_CHECK(a.sizes() == u.sizes() && a.strides() == u.strides() && a.scalar_type() == u.scalar_type(),
              "swiglu: gate and up differ in shape, layout or dtype");
  const int64_t H = a.size(-1), rows = H ? a.numel() / H : 0;
  const auto st = at::detail::computeStride(a.sizes(), a.strides(), at::IntArrayRef({rows, H}));
  TORCH_CHECK(st.has_value(), "swiglu: gate and up must be rows of their last dimension at one stride");
  const int64_t stride = rows > 1 ? (*st)[0] : 2 * H;
  const bool joint = stride == 2 * H && static_cast<const char*>(u.data_ptr()) ==
                                            static_cast<const char*>(a.data_ptr()) + H * a.element_size();
  TORCH_CHECK(stride >= H, "swiglu: gate and up rows overlap");
  return {rows, H, stride, joint};
}

// new (rows, H) gradients shaped like gate and up: the halves of one (rows, 2H) tensor where gate and up were
std::pair<at::Tensor, at::Tensor> like_gate_up(const at::Tensor& a, const GateUp& r) {
  if (!r.joint) return {at::empty(a.sizes(), a.options()), at::empty(a.sizes(), a.options())};
  const at::Tensor both = at::empty({r.rows, 2 * r.H}, a.options());
  return {both.narrow(1, 0, r.H).view(a.sizes()), both.narrow(1, r.H, r.H).view(a.sizes())};
}

at::Tensor swiglu(const at::Tensor& a, const at::Tensor& u) {
  const GateUp r = gate_up_rows(a, u);
  auto h = at::empty(a.sizes(), a.options());
  by_dtype(a, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const T_ *ap = static_cast<const T_*>(a.data_ptr()), *up = static_cast<const T_*>(u.data_ptr());
    T_* hp = static_cast<T_*>(h.data_ptr());
    const int64_t H = r.H, S = r.stride;
    at::parallel_for(0, r.rows, grain(H), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const T_ *ar = ap + row * S, *ur = up + row * S;
        T_* hr = hp + row * H;
        int64_t i = 0;
        for (; i + 8 <= H; i += 8) {
          const __m256 av = load8(ar + i);
          store8(hr + i, _mm256_mul_ps(_mm256_mul_ps(av, sigmoid8(av)), load8(ur + i)));
        }
        for (; i < H; ++i) {
          const float av = load1(ar + i);
          store1(hr + i, av * sigmoid1(av) * load1(ur + i));
        }
      }
    });
    return 0;
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& g_, const at::Tensor& a, const at::Tensor& u) {
  const at::Tensor g = g_.contiguous();
  const GateUp r = gate_up_rows(a, u);
  TORCH_CHECK(g.sizes() == a.sizes() && g.scalar_type() == a.scalar_type(), "swiglu_backward: grad must match gate");
  auto [da, du] = like_gate_up(a, r);
  by_dtype(a, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const T_ *gp = static_cast<const T_*>(g.data_ptr()), *ap = static_cast<const T_*>(a.data_ptr()),
             *up = static_cast<const T_*>(u.data_ptr());
    T_ *dap = static_cast<T_*>(da.data_ptr()), *dup = static_cast<T_*>(du.data_ptr());
    const int64_t H = r.H, S = r.stride, DS = r.joint ? 2 * H : H;  // gate/up rows S apart, their gradients' DS
    at::parallel_for(0, r.rows, grain(H), [&](int64_t r0, int64_t r1) {
      const __m256 one = _mm256_set1_ps(1.f);
      for (int64_t row = r0; row < r1; ++row) {
        const T_ *gr = gp + row * H, *ar = ap + row * S, *ur = up + row * S;
        T_ *dar = dap + row * DS, *dur = dup + row * DS;
        int64_t i = 0;
        for (; i + 8 <= H; i += 8) {
          const __m256 gv = load8(gr + i), av = load8(ar + i), uv = load8(ur + i);
          const __m256 sv = sigmoid8(av), gs = _mm256_mul_ps(gv, sv);
          store8(dur + i, _mm256_mul_ps(gs, av));
          // da = g * s * u * (1 + a * (1 - s))
          store8(dar + i, _mm256_mul_ps(_mm256_mul_ps(gs, uv), _mm256_fmadd_ps(av, _mm256_sub_ps(one, sv), one)));
        }
        for (; i < H; ++i) {
          const float av = load1(ar + i), s = sigmoid1(av), gs = load1(gr + i) * s;
          store1(dur + i, gs * av);
          store1(dar + i, gs * load1(ur + i) * (1.f + av * (1.f - s)));
        }
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

// sum_i sum_j t_i[j]^2 over contiguous fp32 tensors (the gradients, for clipping to a global norm), on every thread:
// torch's norms of a list run each tensor on one (17 ms for llama-110m's 79M gradients, 9 here). Pieces of 64K
// floats, 4 accumulators each, summed in double.
// Elements [begin, end) of tensor `t` of a list: the list cut into pieces of at most `size` elements, so that one
// parallel loop over all of them shares the work out evenly whatever the tensors' sizes.
struct Piece {
  size_t t;
  int64_t begin, end;
};

std::vector<Piece> pieces_of(at::TensorList ts, int64_t size) {
  std::vector<Piece> out;
  for (size_t i = 0; i < ts.size(); ++i)
    for (int64_t e = 0; e < ts[i].numel(); e += size) out.push_back({i, e, std::min(ts[i].numel(), e + size)});
  return out;
}

at::Tensor sum_squares(at::TensorList ts) {
  for (const at::Tensor& t : ts)
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "sum_squares: fp32 contiguous CPU tensors only");
  const std::vector<Piece> pieces = pieces_of(ts, 1 << 16);
  std::vector<double> part(pieces.size());
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* p = ts[pieces[i].t].data_ptr<float>() + pieces[i].begin;
      const int64_t n = pieces[i].end - pieces[i].begin;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t j = 0;
      for (; j + 32 <= n; j += 32) {
        const __m256 x0 = _mm256_loadu_ps(p + j), x1 = _mm256_loadu_ps(p + j + 8), x2 = _mm256_loadu_ps(p + j + 16),
                     x3 = _mm256_loadu_ps(p + j + 24);
        a0 = _mm256_fmadd_ps(x0, x0, a0), a1 = _mm256_fmadd_ps(x1, x1, a1), a2 = _mm256_fmadd_ps(x2, x2, a2);
        a3 = _mm256_fmadd_ps(x3, x3, a3);
      }
      double sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; j < n; ++j) sum += static_cast<double>(p[j]) * p[j];
      part[i] = sum;
    }
  });
  double total = 0.0;
  for (double v : part) total += v;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kFloat));
}

// One AdamW step (decoupled weight decay, torch.optim.AdamW's arithmetic) over lists of contiguous fp32 CPU tensors, in
// place, on every thread at once: p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), with g the gradient divided by grad_scale where given
// (clipping folded in). torch's fused CPU step runs one parallel loop a tensor and writes the divided gradient back
// (a pass over every gradient nobody reads); here one loop over pieces of all of them, the gradient only read.
void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList steps, double lr, double beta1, double beta2, double weight_decay, double eps,
                const std::optional<at::Tensor>& grad_scale) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "adamw_step: lists of different lengths");
  struct Coef { float decay, step_size, inv_bc2_sqrt; };
  std::vector<Coef> coef(n);
  for (size_t i = 0; i < n; ++i) {
    for (const at::Tensor* t : {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == params[i].numel(),
                  "adamw_step: contiguous fp32 CPU tensors of one size each");
    const double t = steps[i].item<double>(), bc1 = 1 - std::pow(beta1, t), bc2 = 1 - std::pow(beta2, t);
    coef[i] = {static_cast<float>(1 - lr * weight_decay), static_cast<float>(lr / bc1), static_cast<float>(1 / std::sqrt(bc2))};
  }
  const std::vector<Piece> pieces = pieces_of(params, 1 << 15);
  const float inv_scale = grad_scale ? 1.f / grad_scale->item<float>() : 1.f;
  const float b1 = beta1, b2 = beta2, c1 = 1 - beta1, c2 = 1 - beta2, ep = eps;
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const size_t i = pieces[k].t;
      const int64_t e0 = pieces[k].begin, e1 = pieces[k].end;
      float *p = params[i].data_ptr<float>(), *m = exp_avgs[i].data_ptr<float>(), *v = exp_avg_sqs[i].data_ptr<float>();
      const float* g = grads[i].data_ptr<float>();
      const Coef c = coef[i];
      const __m256 vdecay = _mm256_set1_ps(c.decay), vstep = _mm256_set1_ps(c.step_size), vbc = _mm256_set1_ps(c.inv_bc2_sqrt),
                   vis = _mm256_set1_ps(inv_scale), vb1 = _mm256_set1_ps(b1), vb2 = _mm256_set1_ps(b2), vc1 = _mm256_set1_ps(c1),
                   vc2 = _mm256_set1_ps(c2), veps = _mm256_set1_ps(ep);
      int64_t j = e0;
      for (; j + 8 <= e1; j += 8) {
        const __m256 gv = _mm256_mul_ps(_mm256_loadu_ps(g + j), vis);
        const __m256 mv = _mm256_fmadd_ps(_mm256_loadu_ps(m + j), vb1, _mm256_mul_ps(gv, vc1));
        const __m256 vv = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), vb2, _mm256_mul_ps(_mm256_mul_ps(gv, gv), vc2));
        const __m256 denom = _mm256_fmadd_ps(_mm256_sqrt_ps(vv), vbc, veps);
        const __m256 pv = _mm256_mul_ps(_mm256_loadu_ps(p + j), vdecay);
        _mm256_storeu_ps(m + j, mv);
        _mm256_storeu_ps(v + j, vv);
        _mm256_storeu_ps(p + j, _mm256_sub_ps(pv, _mm256_div_ps(_mm256_mul_ps(vstep, mv), denom)));
      }
      for (; j < e1; ++j) {
        const float gv = g[j] * inv_scale;
        m[j] = m[j] * b1 + gv * c1;
        v[j] = v[j] * b2 + gv * gv * c2;
        p[j] = p[j] * c.decay - c.step_size * m[j] / (std::sqrt(v[j]) * c.inv_bc2_sqrt + ep);
      }
    }
  });
}

// Cross-entropy over rows of logits (N, V), in place: row i becomes w_i (softmax(row) - onehot(t_i)), the
// gradient of sum_i w_i (lse_i - row_i[t_i]), which is returned (fp32 scalar). A row with w_i = 0 becomes 0
// (an ignored target). Three passes over a row while it is in cache: its maximum, exp(x - max) with their
// sum, the scale by w / sum.
at::Tensor cross_entropy_grad(at::Tensor logits, const at::Tensor& targets, const at::Tensor& weights) {
  check_rows(logits, "logits");
  check_rows(weights, "weights");
  TORCH_CHECK(logits.dim() == 2, "logits must be (rows, vocabulary)");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.is_contiguous() &&
                  targets.numel() == logits.size(0) && weights.numel() == logits.size(0),
              "targets (int64) and weights (fp32) must have one entry per row of logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  float* x = logits.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(wp[i] == 0.f || (tp[i] >= 0 && tp[i] < V), "target ", tp[i], " is outside the vocabulary of ", V);
  std::vector<double> part(N, 0.0);
  at::parallel_for(0, N, grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = x + r * V;
      const float w = wp[r];
      if (w == 0.f) {
        std::fill(row, row + V, 0.f);
        continue;
      }
      const float picked = row[tp[r]];
      __m256 mv = _mm256_set1_ps(-INFINITY);
      int64_t j = 0;
      for (; j + 8 <= V; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + j));
      float m = hmax(mv);
      for (; j < V; ++j) m = std::max(m, row[j]);
      mv = _mm256_set1_ps(m);
      __m256 sv = _mm256_setzero_ps();
      for (j = 0; j + 8 <= V; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), mv));
        _mm256_storeu_ps(row + j, e);
        sv = _mm256_add_ps(sv, e);
      }
      float sum = hsum(sv);
      for (; j < V; ++j) sum += (row[j] = std::exp(row[j] - m));
      part[r] = static_cast<double>(w) * (m + std::log(sum) - picked);
      const __m256 scale = _mm256_set1_ps(w / sum);
      for (j = 0; j + 8 <= V; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), scale));
      for (; j < V; ++j) row[j] *= w / sum;
      row[tp[r]] -= w;
    }
  });
  double total = 0.0;
  for (double v : part) total += v;
  return at::scalar_tensor(static_cast<float>(total), logits.options());
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

at::Tensor swiglu_meta(const at::Tensor& a, const at::Tensor&) { return at::empty(a.sizes(), a.options()); }

std::tuple<at::Tensor, at::Tensor> swiglu_backward_meta(const at::Tensor&, const at::Tensor& a, const at::Tensor& u) {
  return {at::empty(a.sizes(), a.options()), at::empty(u.sizes(), u.options())};
}

// ---- causal attention at short context -------------------------------------------------------------------
// Training at a CPU's context lengths (64-256 tokens) runs attention on many small heads: torch's flash
// kernel for the CPU spends most of its time around its small block products (1.2 ms forward and backward
// for 48 heads of 64 x 32 where the arithmetic is ~30 MFLOP). Here one task takes one (batch, head) whole:
// its q, k and v copied once into fp32 scratch (k transposed, zero-padded to 8 keys), then 4 query rows at
// a time: scores against all keys up to the last row (24 at a time, 12 accumulators), the causal softmax
// (masked entries exactly 0), and P V. The log-sum-exp of each row is kept for the backward, and at short
// lengths P itself (AttentionFn says when; else the backward recomputes it), which accumulates dK and dV for a KV
// head over the query heads that share it (grouped-query attention): ds = P (dP - rowsum(dO * O)),
// dq = scale ds K, dk = scale ds^T q, dv = P^T dO.
//
//   attention(q, k, v, scale, starts, keep_p, cos, sin) -> (o, lse, p)   q (B, H, T, D), k, v (B, Hk, T, D),
//                                                                         lse (B, H, T), p (B H Tr Tp) or empty
//   attention_backward(g, q, k, v, o, lse, scale, starts, p, cos, sin) -> (dq, dk, dv)
// starts (B, T), optional: each query's first key (examples packed into a row, padding: each token sees the
// keys of its own example only); the keys before it are computed and masked like those after the query.
// cos, sin, optional: RoPE tables (as the rope kernel takes them); q and k then come in unrotated, are rotated
// as they are copied in, and their gradients leave through the inverse rotation: no pass of its own each way.
// Rows of D must be contiguous (any other strides); o, dq, dk, dv come back as transposed views of
// (B, T, heads, D) tensors, the layout the model reshapes them from and to. fp32 or bf16 (computed in fp32).

constexpr int64_t kRows = 4, kKeys = 8;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[r][c] (+)= sum_{k < n} A[r * as + k * ak] * B[k * ldb + c] for 4 rows r and 8 NV columns c (NV <= 3): 4 x NV
// accumulators in registers (named, not an array: GCC spills an array of vectors to the stack on every step).
template <int NV>
inline void tile4(const float* A, int64_t as, int64_t ak, const float* B, int64_t ldb, int64_t n, float* C, int64_t ldc,
                  bool add) {
  const __m256 z = _mm256_setzero_ps();
  __m256 c00 = z, c01 = z, c02 = z, c10 = z, c11 = z, c12 = z, c20 = z, c21 = z, c22 = z, c30 = z, c31 = z, c32 = z;
  for (int64_t k = 0; k < n; ++k) {
    const float* bk = B + k * ldb;
    const __m256 b0 = _mm256_loadu_ps(bk), b1 = NV > 1 ? _mm256_loadu_ps(bk + 8) : z, b2 = NV > 2 ? _mm256_loadu_ps(bk + 16) : z;
    const float* a = A + k * ak;
    __m256 x = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    if (NV > 1) c01 = _mm256_fmadd_ps(x, b1, c01);
    if (NV > 2) c02 = _mm256_fmadd_ps(x, b2, c02);
    x = _mm256_broadcast_ss(a + as);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    if (NV > 1) c11 = _mm256_fmadd_ps(x, b1, c11);
    if (NV > 2) c12 = _mm256_fmadd_ps(x, b2, c12);
    x = _mm256_broadcast_ss(a + 2 * as);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    if (NV > 1) c21 = _mm256_fmadd_ps(x, b1, c21);
    if (NV > 2) c22 = _mm256_fmadd_ps(x, b2, c22);
    x = _mm256_broadcast_ss(a + 3 * as);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    if (NV > 1) c31 = _mm256_fmadd_ps(x, b1, c31);
    if (NV > 2) c32 = _mm256_fmadd_ps(x, b2, c32);
  }
  const __m256 acc[kRows][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + 8 * v;
      _mm256_storeu_ps(c, add ? _mm256_add_ps(_mm256_loadu_ps(c), acc[r][v]) : acc[r][v]);
    }
}

// tile4 across columns [0, width), width a multiple of 8: 24 at a time (12 accumulators, enough to keep both FMA
// units busy through their latency), what is left 16 at a time (32 as 16 + 16 rather than 24 + 8), then 8
inline void product4(const float* A, int64_t as, int64_t ak, const float* B, int64_t ldb, int64_t n, int64_t width,
                     float* C, int64_t ldc, bool add) {
  const int64_t rem = width % 24, end24 = width - (rem == 8 && width >= 32 ? 32 : rem);
  int64_t c = 0;
  for (; c < end24; c += 24) tile4<3>(A, as, ak, B + c, ldb, n, C + c, ldc, add);
  for (; c + 16 <= width; c += 16) tile4<2>(A, as, ak, B + c, ldb, n, C + c, ldc, add);
  if (c < width) tile4<1>(A, as, ak, B + c, ldb, n, C + c, ldc, add);
}

// S[r][j] = sum_d A[r][d] * Bt[d][j] for 4 rows of A (D apart) and keys j < kc (a multiple of 16); S rows ldb apart.
inline void scores4(const float* A, const float* Bt, int64_t D, int64_t ldb, int64_t kc, float* S) {
  product4(A, D, 1, Bt, ldb, D, kc, S, ldb, false);
}

// O[r][d] (+)= sum_{j < n} P(r, j) * M[j][d] for 4 rows r, P(r, j) at P[r * rs + j * js] (rows of P or, with
// rs = 1, its columns); M and O rows of D (a multiple of 16). With add, O's values are added to.
inline void times4(const float* P, int64_t rs, int64_t js, const float* M, int64_t n, int64_t D, float* O, bool add) {
  product4(P, rs, js, M, D, n, D, O, D, add);
}

// A view of one (batch, head)'s (T, D) rows of a (B, heads, T, D) tensor with rows of D contiguous.
template <typename T_>
struct Rows {
  T_* p;
  int64_t sb, sh, st;
  Rows(const at::Tensor& t) : p(static_cast<T_*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), st(t.stride(2)) {}
  Rows(T_* p_, int64_t st_) : p(p_), sb(0), sh(0), st(st_) {}  // one head's rows in scratch
  T_* row(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

// rows [0, T) of (b, h) into dst (rows of D, fp32, times scale, rotated where rot has tables); rows up to `padded` zero
template <typename T_>
void gather(const Rows<T_>& src, int64_t b, int64_t h, int64_t T, int64_t D, float scale, int64_t padded, float* dst,
            const Rot& rot = Rot()) {
  for (int64_t t = 0; t < T; ++t) {
    const T_* s = src.row(b, h, t);
    if (t + 4 < T)  // rows 4 ahead on their way into cache (the rows are heads apart: a stride the hardware misses)
      for (int64_t d = 0; d < D * static_cast<int64_t>(sizeof(T_)); d += 64)
        _mm_prefetch(reinterpret_cast<const char*>(src.row(b, h, t + 4)) + d, _MM_HINT_T0);
    if (rot.cos) {
      rotate_row(s, rot, b, t, D, scale, dst + t * D);
      continue;
    }
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(dst + t * D + d, _mm256_mul_ps(load8(s + d), _mm256_set1_ps(scale)));
  }
  std::fill(dst + T * D, dst + padded * D, 0.f);
}

// the 8 x 8 transpose of rows r[0..7]
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i)
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20), r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
}

// the transpose: dst[d][t] (ld apart), columns past T zero; 8 x 8 tiles, the last rows one by one
template <typename T_>
void gather_t(const Rows<T_>& src, int64_t b, int64_t h, int64_t T, int64_t D, int64_t ld, float* dst) {
  int64_t t = 0;
  for (; t + 8 <= T; t += 8)
    for (int64_t d = 0; d < D; d += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(src.row(b, h, t + i) + d);
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (d + i) * ld + t, r[i]);
    }
  for (; t < T; ++t) {
    const T_* s = src.row(b, h, t);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + t] = load1(s + d);
  }
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * ld + T, dst + (d + 1) * ld, 0.f);
}

template <typename T_>
void scatter(const float* src, int64_t rows, int64_t D, float scale, const Rows<T_>& dst, int64_t b, int64_t h, int64_t t0,
             const Rot& rot = Rot()) {
  for (int64_t r = 0; r < rows; ++r) {
    T_* o = dst.row(b, h, t0 + r);
    if (rot.cos) {
      rotate_row(src + r * D, rot, b, t0 + r, D, scale, o);
      continue;
    }
    for (int64_t d = 0; d < D; d += 8) store8(o + d, _mm256_mul_ps(_mm256_loadu_ps(src + r * D + d), _mm256_set1_ps(scale)));
  }
}

// lanes j0 .. j0 + 7 below n, as a mask
inline __m256 below(int64_t j0, int64_t n) {
  return _mm256_cmp_ps(_mm256_add_ps(_mm256_set1_ps(static_cast<float>(j0)), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7)),
                       _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
}

// P = exp(S - m) for the 4 rows from query i0, each over the keys from first[r] up to its own position (the
// rest of the kc and rows past T: exactly 0). With lse given, m = lse (P comes out normalised, as the backward
// wants); without, m is the row's maximum, and each row's 1 / sum goes to inv_out and its log-sum-exp to lse_out.
void causal_softmax4(float* S, int64_t ld, int64_t i0, int64_t T, int64_t kc, int64_t lo, const int64_t* first,
                     const float* lse, float* inv_out, float* lse_out) {
  for (int64_t r = 0; r < kRows; ++r) {
    float* s = S + r * ld;
    std::fill(s, s + lo, 0.f);  // keys before lo (before every row's first): not computed
    const int64_t n = i0 + r + 1, nv = round_up(n, 8), f = first[r];
    auto keep = [&](int64_t j) {  // lanes j .. j + 7 in [f, n)
      const __m256 m = below(j, n);
      return j < f ? _mm256_andnot_ps(below(j, f), m) : m;
    };
    if (n > T) {
      std::fill(s, s + kc, 0.f);
      if (!lse) inv_out[r] = 0.f;
      continue;
    }
    float m;
    if (lse) {
      m = lse[r];
    } else {
      __m256 vm = _mm256_set1_ps(-INFINITY);
      for (int64_t j = lo; j < nv; j += 8)
        vm = _mm256_max_ps(vm, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + j), keep(j)));
      m = hmax(vm);
    }
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = lo; j < nv; j += 8) {
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv)), keep(j));
      _mm256_storeu_ps(s + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    std::fill(s + nv, s + kc, 0.f);
    if (!lse) {
      const float sum = hsum(acc);
      inv_out[r] = 1.f / sum;
      lse_out[r] = m + std::log(sum);
    }
  }
}

void check_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16) &&
                    t->scalar_type() == q.scalar_type(), "attention: q, k, v must be CPU tensors of one dtype, fp32 or bf16");
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, "attention: tensors must be (B, heads, T, D) with rows of D contiguous");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "attention: q, k, v shapes disagree");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "attention: query heads are not a multiple of KV heads");
  TORCH_CHECK(q.size(3) % 16 == 0, "attention: head size ", q.size(3), " is not a multiple of 16");
}

// each query's first key: starts (B, T) int64 where given (packed or padded rows: the keys of its own sequence),
// else 0 (plain causal)
const int64_t* first_keys(const std::optional<at::Tensor>& starts, const at::Tensor& q) {
  if (!starts) return nullptr;
  TORCH_CHECK(starts->device().is_cpu() && starts->scalar_type() == at::kLong && starts->is_contiguous() &&
                  starts->dim() == 2 && starts->size(0) == q.size(0) && starts->size(1) == q.size(2),
              "attention: starts must be a contiguous (B, T) int64 CPU tensor");
  const int64_t* p = starts->data_ptr<int64_t>();
  for (int64_t i = 0; i < starts->numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] <= i % q.size(2), "attention: a query's first key must be at or before it");
  return p;
}

// RoPE tables (cos and the signed sin, fp32, broadcast to (B, T, 1, D) with rows of D contiguous) where given
Rot rope_of(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, const at::Tensor& q,
            at::Tensor* keep) {
  TORCH_CHECK(cos.has_value() == sin.has_value(), "attention: give both RoPE tables or neither");
  if (!cos) return Rot();
  const int64_t Bn = q.size(0), T = q.size(2), D = q.size(3);
  keep[0] = cos->expand({Bn, T, 1, D});
  keep[1] = sin->expand({Bn, T, 1, D});
  TORCH_CHECK(keep[0].device().is_cpu() && keep[0].scalar_type() == at::kFloat && keep[1].scalar_type() == at::kFloat &&
                  keep[0].stride(3) == 1 && keep[1].stride(3) == 1,
              "attention: the RoPE tables must be fp32 CPU tensors with rows of D contiguous");
  return Rot(keep[0], keep[1], 1.f);
}

// the first keys of the 4 rows from query i0 of batch row b (rows past T: 0)
inline void first4(const int64_t* st, int64_t b, int64_t i0, int64_t T, int64_t* out) {
  for (int64_t r = 0; r < kRows; ++r) out[r] = st && i0 + r < T ? st[b * T + i0 + r] : 0;
}

// the first key any of the 4 rows from query i0 sees, down to a multiple of kKeys: the keys the block computes start there
inline int64_t low_key(const int64_t* f4, int64_t i0, int64_t T) {
  int64_t lo = f4[0];
  for (int64_t r = 1; r < kRows && i0 + r < T; ++r) lo = std::min(lo, f4[r]);
  return lo / kKeys * kKeys;
}

// a (B, heads, T, D) view of a new (B, T, heads, D) tensor
at::Tensor heads_view(const at::Tensor& like, int64_t heads, at::ScalarType dtype) {
  return at::empty({like.size(0), like.size(2), heads, like.size(3)}, like.options().dtype(dtype)).transpose(1, 2);
}

// new (B, heads, T, D) gradients for q, k and v, as transposed views of (B, T, heads, D) tensors; where q, k and v
// are the column blocks of one (B, T, (H + 2 Hk) D) tensor (kernels/training.py's joined q/k/v product), so are
// they: the gradient that product's backward takes whole, without a copy
std::tuple<at::Tensor, at::Tensor, at::Tensor> like_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t Bn = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3), W = (H + 2 * Hk) * D;
  const auto at_ = [&](const at::Tensor& t) { return static_cast<const char*>(t.data_ptr()); };
  const int64_t es = q.element_size();
  const bool joint = q.stride(3) == 1 && q.stride(1) == D && q.stride(2) == W && (Bn == 1 || q.stride(0) == T * W) &&
                     k.strides() == q.strides() && v.strides() == q.strides() && at_(k) == at_(q) + H * D * es &&
                     at_(v) == at_(k) + Hk * D * es;
  if (!joint)
    return {heads_view(q, H, q.scalar_type()), heads_view(k, Hk, q.scalar_type()), heads_view(v, Hk, q.scalar_type())};
  const at::Tensor all = at::empty({Bn, T, H + 2 * Hk, D}, q.options());
  return {all.narrow(2, 0, H).transpose(1, 2), all.narrow(2, H, Hk).transpose(1, 2), all.narrow(2, H + Hk, Hk).transpose(1, 2)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         double scale, const std::optional<at::Tensor>& starts, bool keep_p,
                                                         const std::optional<at::Tensor>& cos,
                                                         const std::optional<at::Tensor>& sin) {
  check_heads(q, k, v);
  const int64_t* st = first_keys(starts, q);
  at::Tensor tables[2];
  const Rot rot = rope_of(cos, sin, q, tables);
  const int64_t Bn = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3), group = H / Hk;
  const int64_t Tr = round_up(T, kRows), Tp = round_up(T, kKeys);
  at::Tensor o = heads_view(q, H, q.scalar_type());
  at::Tensor lse = at::empty({Bn, H, T}, q.options().dtype(at::kFloat));
  float* lp = lse.data_ptr<float>();
  at::Tensor pk = at::empty({keep_p ? Bn * H * Tr * Tp : 0}, q.options().dtype(at::kFloat));
  float* pp = pk.data_ptr<float>();
  by_dtype(q, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const Rows<T_> Q(q), K(k), V(v), O(o);
    at::parallel_for(0, Bn * H, 1, [&](int64_t u0, int64_t u1) {
      std::vector<float> qs(Tr * D), kt(D * Tp), vs(Tp * D), s(kRows * Tp), out(kRows * D), kr(rot.cos ? T * D : 0);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / H, h = u % H, hk = h / group;
        gather(Q, b, h, T, D, static_cast<float>(scale), Tr, qs.data(), rot);
        if (rot.cos) {  // k rotated, then transposed
          gather(K, b, hk, T, D, 1.f, T, kr.data(), rot);
          gather_t(Rows<float>(kr.data(), D), 0, 0, T, D, Tp, kt.data());
        } else {
          gather_t(K, b, hk, T, D, Tp, kt.data());
        }
        const float* vp = vs.data();  // V's fp32 rows read where they are (T a multiple of 8: no padding row is read)
        int64_t vstride = D;
        if constexpr (std::is_same_v<T_, float>) {
          if (T == Tp) vp = V.row(b, hk, 0), vstride = V.st;
        }
        if (vp == vs.data()) gather(V, b, hk, T, D, 1.f, Tp, vs.data());
        for (int64_t i0 = 0; i0 < T; i0 += kRows) {
          const int64_t kc = round_up(std::min(i0 + kRows, T), kKeys);
          int64_t f4[kRows];
          first4(st, b, i0, T, f4);
          const int64_t lo = low_key(f4, i0, T);  // 0 unless the rows start later (packed examples)
          scores4(qs.data() + i0 * D, kt.data() + lo, D, Tp, kc - lo, s.data() + lo);
          float lse4[kRows], inv[kRows];
          causal_softmax4(s.data(), Tp, i0, T, kc, lo, f4, nullptr, inv, lse4);
          // P V, P unnormalised: the rows are scaled by 1 / sum as they leave
          product4(s.data() + lo, Tp, 1, vp + lo * vstride, vstride, kc - lo, D, out.data(), D, false);
          if (keep_p)  // P for the backward, normalised: rows i0.. of this head, keys up to kc (the backward reads no further)
            for (int64_t r = 0; r < kRows; ++r) {
              const float *src = s.data() + r * Tp;
              float* dst = pp + (u * Tr + i0 + r) * Tp;
              const __m256 iv = _mm256_set1_ps(inv[r]);
              // streamed past the cache (the backward reads it long after): no read of the lines first (32-byte aligned: Tp
              // a multiple of 8 from torch's 64-byte aligned block)
              for (int64_t j = 0; j < kc; j += 8) _mm256_stream_ps(dst + j, _mm256_mul_ps(_mm256_loadu_ps(src + j), iv));
            }
          const int64_t rows = std::min(kRows, T - i0);
          for (int64_t r = 0; r < rows; ++r) scatter(out.data() + r * D, 1, D, inv[r], O, b, h, i0 + r);
          std::copy(lse4, lse4 + rows, lp + u * T + i0);
        }
      }
      _mm_sfence();  // the streamed P visible to whichever thread runs the backward
    });
    return 0;
  });
  return {o, lse, pk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& o,
                                                                  const at::Tensor& lse_, double scale,
                                                                  const std::optional<at::Tensor>& starts,
                                                                  const std::optional<at::Tensor>& kept_p,
                                                                  const std::optional<at::Tensor>& cos,
                                                                  const std::optional<at::Tensor>& sin) {
  check_heads(q, k, v);
  const int64_t* st = first_keys(starts, q);
  at::Tensor tables[2];
  const Rot rot = rope_of(cos, sin, q, tables), unrot = rot.inverse();
  TORCH_CHECK(g.sizes() == q.sizes() && o.sizes() == q.sizes() && g.scalar_type() == q.scalar_type() &&
                  o.scalar_type() == q.scalar_type() && g.stride(3) == 1 && o.stride(3) == 1,
              "attention_backward: grad and output must match q");
  const at::Tensor lse = lse_.contiguous();
  const int64_t Bn = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3), group = H / Hk;
  const int64_t Tr = round_up(T, kRows), Tp = round_up(T, kKeys);
  auto [dq, dk, dv] = like_qkv(q, k, v);
  const float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const float* kp = nullptr;  // the forward's P (B * H, Tr, Tp), where it kept it: not recomputed
  if (kept_p && kept_p->numel()) {
    TORCH_CHECK(kept_p->scalar_type() == at::kFloat && kept_p->is_contiguous() && kept_p->numel() == Bn * H * Tr * Tp,
                "attention_backward: the kept P does not match q");
    kp = kept_p->data_ptr<float>();
  }
  by_dtype(q, [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    const Rows<T_> Q(q), K(k), V(v), O(o), G(g), DQ(dq), DK(dk), DV(dv);
    at::parallel_for(0, Bn * Hk, 1, [&](int64_t u0, int64_t u1) {
      // P and dS of one head whole (rows i < Tr, keys j < Tp), for dV = P^T dO and dK = dS^T q by columns
      std::vector<float> qs(Tr * D), go(Tr * D), oo(Tr * D), delta(Tr), kt(D * Tp), ks(Tp * D), vt(D * Tp),
          p(Tr * Tp), ds(Tr * Tp), dqr(kRows * D), dka(Tr * D), dva(Tr * D);
      std::vector<int64_t> reach(T, T);  // 1 + the last query whose first key is at or before key x
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / Hk, hk = u % Hk;
        if (st) {
          std::fill(reach.begin(), reach.end(), 0);
          for (int64_t i = 0; i < T; ++i) reach[st[b * T + i]] = std::max(reach[st[b * T + i]], i + 1);
          for (int64_t x = 1; x < T; ++x) reach[x] = std::max(reach[x], reach[x - 1]);
        }
        gather(K, b, hk, T, D, 1.f, Tp, ks.data(), rot);
        if (!kp) gather_t(Rows<float>(ks.data(), D), 0, 0, T, D, Tp, kt.data());  // K^T only to recompute P
        gather_t(V, b, hk, T, D, Tp, vt.data());
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          gather(Q, b, h, T, D, sc, Tr, qs.data(), rot);
          // dO and O: fp32 rows are read where they are (T a multiple of 4: no padding row is read); else copied
          const float *gp = go.data(), *op = oo.data();
          int64_t gs = D, os = D;
          if constexpr (std::is_same_v<T_, float>) {
            if (T == Tr) gp = G.row(b, h, 0), op = O.row(b, h, 0), gs = G.st, os = O.st;
          }
          if (gp == go.data()) {
            gather(G, b, h, T, D, 1.f, Tr, go.data());
            gather(O, b, h, T, D, 1.f, Tr, oo.data());
          }
          for (int64_t t = 0; t < Tr; ++t) delta[t] = dot(gp + t * gs, op + t * os, D);
          const float* lrow = lp + (b * H + h) * T;
          const float* ph = kp ? kp + (b * H + h) * Tr * Tp : p.data();
          for (int64_t i0 = 0; i0 < T; i0 += kRows) {
            const int64_t kc = round_up(std::min(i0 + kRows, T), kKeys), rows = std::min(kRows, T - i0);
            float l4[kRows] = {0.f, 0.f, 0.f, 0.f};
            std::copy(lrow + i0, lrow + i0 + rows, l4);
            const float* pb = ph + i0 * Tp;
            if (kp && i0 + kRows < T)  // the next block's rows of the kept P (long out of cache) fetched while this one runs
              for (int64_t r = 0; r < kRows; ++r)
                for (int64_t j = 0; j < kc + kKeys; j += 16)
                  _mm_prefetch(reinterpret_cast<const char*>(pb + (kRows + r) * Tp + j), _MM_HINT_T0);
            float* db = ds.data() + i0 * Tp;
            int64_t f4[kRows];
            first4(st, b, i0, T, f4);
            const int64_t lo = low_key(f4, i0, T);
            if (!kp) {  // P again: exp(q k^T - lse)
              float* pw = p.data() + i0 * Tp;
              scores4(qs.data() + i0 * D, kt.data() + lo, D, Tp, kc - lo, pw + lo);
              causal_softmax4(pw, Tp, i0, T, kc, lo, f4, l4, nullptr, nullptr);
            }
            product4(gp + i0 * gs, gs, 1, vt.data() + lo, Tp, D, kc - lo, db + lo, Tp, false);  // dP = dO V^T
            for (int64_t r = 0; r < kRows; ++r) {  // dS = P (dP - delta)
              const __m256 dl = _mm256_set1_ps(delta[i0 + r]);
              float* dr = db + r * Tp;
              const float* pr = pb + r * Tp;
              std::fill(dr, dr + lo, 0.f);
              for (int64_t j = lo; j < kc; j += 8)
                _mm256_storeu_ps(dr + j, _mm256_mul_ps(_mm256_loadu_ps(pr + j), _mm256_sub_ps(_mm256_loadu_ps(dr + j), dl)));
            }
            times4(db + lo, Tp, 1, ks.data() + lo * D, kc - lo, D, dqr.data(), false);  // dq = scale dS K
            scatter(dqr.data(), rows, D, sc, DQ, b, h, i0, unrot);
          }
          // keys j0..j0+3 take queries i >= j0 up to the last that sees any of them (the rest of their columns
          // are 0); the row block of query i wrote its P and dS out to key i0 + 3 at least (zeros before its lo),
          // so every entry read here was written
          const bool add = h > hk * group;
          for (int64_t j0 = 0; j0 < T; j0 += kRows) {
            const int64_t n = st ? std::max<int64_t>(0, reach[std::min(j0 + kRows, T) - 1] - j0) : Tr - j0;
            product4(ph + j0 * Tp + j0, 1, Tp, gp + j0 * gs, gs, n, D, dva.data() + j0 * D, D, add);  // dV = P^T dO
            times4(ds.data() + j0 * Tp + j0, 1, Tp, qs.data() + j0 * D, n, D, dka.data() + j0 * D, add);
          }
        }
        scatter(dka.data(), T, D, 1.f, DK, b, hk, 0, unrot);
        scatter(dva.data(), T, D, 1.f, DV, b, hk, 0);
      }
    });
    return 0;
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&,
                                                              double, const std::optional<at::Tensor>&, bool keep_p,
                                                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  const int64_t n = keep_p ? q.size(0) * q.size(1) * round_up(q.size(2), kRows) * round_up(q.size(2), kKeys) : 0;
  return {heads_view(q, q.size(1), q.scalar_type()), at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat)),
          at::empty({n}, q.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(const at::Tensor&, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor&, const at::Tensor&, double,
                                                                       const std::optional<at::Tensor>&,
                                                                       const std::optional<at::Tensor>&,
                                                                       const std::optional<at::Tensor>&,
                                                                       const std::optional<at::Tensor>&) {
  return {heads_view(q, q.size(1), q.scalar_type()), heads_view(k, k.size(1), q.scalar_type()),
          heads_view(v, v.size(1), q.scalar_type())};
}

}  // namespace

// ---- autograd ------------------------------------------------------------------------------------------------
// Each kernel pair as one autograd node made in C++: a Python autograd.Function costs ~20 us a call each way,
// ~1 ms of a 38 ms shakespeare-char step over its 25 calls.

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RMSNormFn : torch::autograd::Function<RMSNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double eps) {
    auto [y, rstd] = rms_norm(x, w, eps);
    ctx->save_for_backward({x, w, rstd});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto s = ctx->get_saved_variables();
    auto [dx, dw] = rms_norm_backward(g[0], s[0], s[1], s[2]);
    return {dx, ctx->needs_input_grad(1) ? dw : at::Tensor(), at::Tensor()};
  }
};

struct RopeFn : torch::autograd::Function<RopeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return rope(x, cos, sin, 1.0);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto s = ctx->get_saved_variables();
    return {rope(g[0], s[0], s[1], -1.0), at::Tensor(), at::Tensor()};  // the inverse rotation
  }
};

struct SwiGLUFn : torch::autograd::Function<SwiGLUFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& u) {
    ctx->save_for_backward({a, u});
    return swiglu(a, u);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto s = ctx->get_saved_variables();
    auto [da, du] = swiglu_backward(g[0], s[0], s[1]);
    return {da, du};
  }
};

struct GELUFn : torch::autograd::Function<GELUFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});
    return ::gelu(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {::gelu_backward(g[0], ctx->get_saved_variables()[0])};
  }
};

struct AttentionFn : torch::autograd::Function<AttentionFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            const std::optional<at::Tensor>& starts, const std::optional<at::Tensor>& cos,
                            const std::optional<at::Tensor>& sin) {
    // P kept for the backward (which then skips recomputing it: ~1/5 of its products and the exponentials) where
    // it takes no more memory than q, k, v and o together: T H <= (H + Hk) D (the small preset's 128 tokens with
    // heads of 64); past that recomputed (SmolLM2's finetune at 256 tokens: 1.5x their size, +350 MB, no faster)
    const bool keep = (q.requires_grad() || k.requires_grad() || v.requires_grad()) &&
                      q.size(2) * q.size(1) <= (q.size(1) + k.size(1)) * q.size(3);  // (no backward to come: not kept)
    auto [o, lse, p] = attention(q, k, v, scale, starts, keep, cos, sin);
    ctx->save_for_backward({q, k, v, o, lse, p});
    ctx->saved_data["scale"] = scale;
    if (starts) ctx->saved_data["starts"] = *starts;
    if (cos) ctx->saved_data["cos"] = *cos, ctx->saved_data["sin"] = *sin;
    return o;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor grad = g[0].stride(3) == 1 ? g[0] : g[0].contiguous();
    std::optional<at::Tensor> starts;
    if (ctx->saved_data.count("starts")) starts = ctx->saved_data["starts"].toTensor();
    std::optional<at::Tensor> cos, sin;
    if (ctx->saved_data.count("cos")) cos = ctx->saved_data["cos"].toTensor(), sin = ctx->saved_data["sin"].toTensor();
    auto [dq, dk, dv] =
        attention_backward(grad, s[0], s[1], s[2], s[3], s[4], ctx->saved_data["scale"].toDouble(), starts, s[5], cos, sin);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// x (..., C) times several weights (n_i, C), x w_i^T, written side by side into one (..., sum n_i) tensor and
// returned as views of its column blocks: q, k and v (or SwiGLU's gate and up), whose gradients the attention and
// SwiGLU kernels give back the same way, as the blocks of one tensor g. The backward then takes g whole: the
// weights' gradients as one product g^T x (x read and packed by MKL once, not once a weight; each weight's gradient
// a block of its rows), and dx = sum_i g_i w_i accumulated in place by the products (no sum of separate dx
// afterwards). The weights are not joined (a copy of each every step cost as much as it saved at 512 rows).
struct LinearsFn : torch::autograd::Function<LinearsFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList ws) {
    const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
    std::vector<int64_t> widths;
    int64_t W = 0;
    for (const at::Tensor& w : ws) {
      TORCH_CHECK(w.dim() == 2 && w.size(1) == C && w.scalar_type() == x.scalar_type(), "linears: weights must be (n, C) of x's dtype");
      widths.push_back(w.size(0));
      W += w.size(0);
    }
    const at::Tensor x2 = x.reshape({rows, C}), y = at::empty({rows, W}, x.options());
    variable_list saved{x2}, out;
    for (int64_t i = 0, at_ = 0; i < static_cast<int64_t>(ws.size()); at_ += widths[i++]) {
      at::Tensor block = y.narrow(1, at_, widths[i]);
      at::mm_out(block, x2, ws[i].t());  // MKL writes the block in place (its rows W apart)
      saved.push_back(ws[i]);
      std::vector<int64_t> sizes = x.sizes().vec();
      sizes.back() = widths[i];
      out.push_back(block.view(sizes));
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["widths"] = widths;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor& x2 = s[0];
    const auto widths = ctx->saved_data["widths"].toIntVector();
    const int64_t rows = x2.size(0), n = static_cast<int64_t>(widths.size());
    int64_t W = 0;
    for (int64_t w : widths) W += w;
    const at::Tensor gy = whole(g, widths, rows, W, x2);
    variable_list out(1 + n);
    if (ctx->needs_input_grad(0)) {
      at::Tensor dx = at::mm(gy.narrow(1, 0, widths[0]), s[1]);
      for (int64_t i = 1, at_ = widths[0]; i < n; at_ += widths[i++]) dx.addmm_(gy.narrow(1, at_, widths[i]), s[1 + i]);
      out[0] = dx.view(ctx->saved_data["x_sizes"].toIntVector());
    }
    bool all = true, any = false;
    for (int64_t i = 0; i < n; ++i) all = all && ctx->needs_input_grad(1 + i), any = any || ctx->needs_input_grad(1 + i);
    if (any) {
      const at::Tensor dw = all ? at::mm(gy.t(), x2) : at::Tensor();
      for (int64_t i = 0, at_ = 0; i < n; at_ += widths[i++])
        if (ctx->needs_input_grad(1 + i)) out[1 + i] = all ? dw.narrow(0, at_, widths[i]) : at::mm(gy.narrow(1, at_, widths[i]).t(), x2);
    }
    return out;
  }
  // the gradients of the blocks as one (rows, W) tensor: a view where they are the blocks of one already, else joined
  static at::Tensor whole(const variable_list& g, const std::vector<int64_t>& widths, int64_t rows, int64_t W, const at::Tensor& like) {
    bool joint = true;
    const char* next = nullptr;
    for (size_t i = 0; i < widths.size() && joint; ++i) {
      const at::Tensor& t = g[i];
      joint = t.defined() && t.scalar_type() == like.scalar_type() && t.dim() >= 1 && t.stride(-1) == 1 &&
              (i == 0 || (t.is_alias_of(g[0]) && static_cast<const char*>(t.data_ptr()) == next));
      if (!joint) break;
      const auto st = at::detail::computeStride(t.sizes(), t.strides(), at::IntArrayRef({rows, widths[i]}));
      joint = st.has_value() && (rows == 1 || (*st)[0] == W);
      next = static_cast<const char*>(t.data_ptr()) + widths[i] * t.element_size();
    }
    if (joint) return g[0].as_strided({rows, W}, {W, 1});
    std::vector<at::Tensor> parts;
    for (size_t i = 0; i < widths.size(); ++i)
      parts.push_back(g[i].defined() ? g[i].reshape({rows, widths[i]}) : at::zeros({rows, widths[i]}, like.options()));
    return parts.size() == 1 ? parts[0].contiguous() : at::cat(parts, 1);
  }
};

at::Tensor rms_norm_train(const at::Tensor& x, const at::Tensor& w, double eps) { return RMSNormFn::apply(x, w, eps); }
std::vector<at::Tensor> linears_train(const at::Tensor& x, at::TensorList ws) { return LinearsFn::apply(x, ws); }
at::Tensor rope_train(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s) { return RopeFn::apply(x, c, s); }
at::Tensor swiglu_train(const at::Tensor& a, const at::Tensor& u) { return SwiGLUFn::apply(a, u); }
at::Tensor gelu_train(const at::Tensor& x) { return GELUFn::apply(x); }
at::Tensor attention_train(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                           const std::optional<at::Tensor>& starts, const std::optional<at::Tensor>& cos,
                           const std::optional<at::Tensor>& sin) {
  return AttentionFn::apply(q, k, v, scale, starts, cos, sin);
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
  lib.def("attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? starts=None, bool keep_p=False, Tensor? cos=None, Tensor? sin=None) -> (Tensor, Tensor, Tensor)");
  lib.def("attention_backward(Tensor g, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale, Tensor? starts=None, Tensor? p=None, Tensor? cos=None, Tensor? sin=None) -> (Tensor, Tensor, Tensor)");
  lib.def("cross_entropy_grad(Tensor(a!) logits, Tensor targets, Tensor weights) -> Tensor");
  lib.def("sum_squares(Tensor[] tensors) -> Tensor");
  lib.def("adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor[] steps, float lr, float beta1, float beta2, float weight_decay, float eps, Tensor? grad_scale=None) -> ()");
  // the same with their backward: one autograd node each
  lib.def("rms_norm_train(Tensor x, Tensor w, float eps) -> Tensor");
  lib.def("rope_train(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  lib.def("swiglu_train(Tensor a, Tensor u) -> Tensor");
  lib.def("gelu_train(Tensor x) -> Tensor");
  lib.def("attention_train(Tensor q, Tensor k, Tensor v, float scale, Tensor? starts=None, Tensor? cos=None, Tensor? sin=None) -> Tensor");
  lib.def("linears_train(Tensor x, Tensor[] weights) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(llmgen_training, CPU, lib) {
  lib.impl("rms_norm", rms_norm);
  lib.impl("rms_norm_backward", rms_norm_backward);
  lib.impl("rope", rope);
  lib.impl("swiglu", swiglu);
  lib.impl("swiglu_backward", swiglu_backward);
  lib.impl("gelu", gelu);
  lib.impl("gelu_backward", gelu_backward);
  lib.impl("attention", attention);
  lib.impl("attention_backward", attention_backward);
  lib.impl("cross_entropy_grad", cross_entropy_grad);
  lib.impl("sum_squares", sum_squares);
  lib.impl("adamw_step", adamw_step);
  lib.impl("rms_norm_train", rms_norm_train);  // under inference mode (no autograd key): forward only
  lib.impl("rope_train", rope_train);
  lib.impl("swiglu_train", swiglu_train);
  lib.impl("gelu_train", gelu_train);
  lib.impl("attention_train", attention_train);
  lib.impl("linears_train", linears_train);
}

TORCH_LIBRARY_IMPL(llmgen_training, Meta, lib) {
  lib.impl("rms_norm", rms_norm_meta);
  lib.impl("rms_norm_backward", rms_norm_backward_meta);
  lib.impl("rope", rope_meta);
  lib.impl("swiglu", swiglu_meta);
  lib.impl("swiglu_backward", swiglu_backward_meta);
  lib.impl("gelu", gelu_meta);
  lib.impl("gelu_backward", gelu_backward_meta);
  lib.impl("attention", attention_meta);
  lib.impl("attention_backward", attention_backward_meta);
}

TORCH_LIBRARY_IMPL(llmgen_training, Autograd, lib) {
  lib.impl("rms_norm_train", rms_norm_train);
  lib.impl("rope_train", rope_train);
  lib.impl("swiglu_train", swiglu_train);
  lib.impl("gelu_train", gelu_train);
  lib.impl("attention_train", attention_train);
  lib.impl("linears_train", linears_train);
}
