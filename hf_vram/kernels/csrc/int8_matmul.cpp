// Weight-only int8 matmul for the few rows of a decoding step: y[M, N] = (x[M, K] . w[N, K]^T) * scale[N].
//
// torch's packed kernel (`_weight_int8pack_mm`) walks the whole weight once per row of x, so a continuous-batching
// step with 16 decoding sequences costs 16 matrix-vector products (measured linear in the rows on SmolLM2's
// shapes). Here each tile of output channels is widened from int8 once per tile of rows and multiplied into all of
// them, with float32 accumulators in registers: the weight is read from memory once per call. x arrives in the
// activation dtype (bfloat16, float16 or float32) and is widened to float32 once; each output is its row's dot
// product in one fixed order (the same for any M: a row's result does not depend on the rows beside it), times its
// channel's scale, rounded once to x's dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// The tile: output channels widened together x rows multiplied by each widened vector. Its accumulators, the
// widened channels and one row's vector should fit the vector registers: AVX2 has 16, so 3 x 4 there (16 live
// vectors; 4 x 4 needs 21), 4 x 4 elsewhere (AVX-512 has 32).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int64_t kTileN = 3;
#else
constexpr int64_t kTileN = 4;
#endif
constexpr int64_t kTileM = 4;

#if defined(__AVX512F__)
constexpr int64_t kWidth = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vwiden(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kWidth = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vwiden(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
constexpr int64_t kWidth = 8;  // plain arrays: the compiler vectorizes what the target allows
struct Vec {
  float v[kWidth];
};
inline Vec vzero() { return Vec{}; }
inline Vec vload(const float* p) {
  Vec r;
  for (int64_t i = 0; i < kWidth; ++i) r.v[i] = p[i];
  return r;
}
inline Vec vwiden(const int8_t* p) {
  Vec r;
  for (int64_t i = 0; i < kWidth; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int64_t i = 0; i < kWidth; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline float vsum(Vec a) {
  float s = 0.0f;
  for (int64_t i = 0; i < kWidth; ++i) s += a.v[i];
  return s;
}
#endif

// acc[m][j] = x[m] . w[n + j] over the whole vectors of K (`kv` floats); then the tail of K, element by element.
// NT channels and MT rows: the tile's shape, fixed at compile time so the accumulators stay in registers. `wf`:
// the NT channels' first `kv` codes already widened to float32 (rows [j * kv, (j + 1) * kv)), read instead of
// widening the int8 codes again for every tile of rows (`Widened`); else widen them here (one tile of rows).
template <int64_t NT, int64_t MT, bool Widened>
inline void tile(const float* x, int64_t K, const int8_t* w, const float* wf, int64_t kv, float out[kTileM][kTileN]) {
  Vec acc[MT][NT];
  for (int64_t m = 0; m < MT; ++m)
    for (int64_t j = 0; j < NT; ++j) acc[m][j] = vzero();
  for (int64_t k = 0; k < kv; k += kWidth) {
    Vec wv[NT];
    for (int64_t j = 0; j < NT; ++j) wv[j] = Widened ? vload(wf + j * kv + k) : vwiden(w + j * K + k);
    for (int64_t m = 0; m < MT; ++m) {
      const Vec xv = vload(x + m * K + k);
      for (int64_t j = 0; j < NT; ++j) acc[m][j] = vfma(xv, wv[j], acc[m][j]);
    }
  }
  for (int64_t m = 0; m < MT; ++m) {
    for (int64_t j = 0; j < NT; ++j) {
      float s = vsum(acc[m][j]);
      for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * static_cast<float>(w[j * K + k]);
      out[m][j] = s;
    }
  }
}

// The NT channels' first `kv` codes widened to float32 into `wf` (the buffer `tile` reads), once per channel tile.
inline void widen_tile(const int8_t* w, int64_t K, int64_t kv, int64_t nt, float* wf) {
  for (int64_t j = 0; j < nt; ++j)
    for (int64_t k = 0; k < kv; k += kWidth) {
      const Vec v = vwiden(w + j * K + k);
      std::copy(reinterpret_cast<const float*>(&v), reinterpret_cast<const float*>(&v) + kWidth, wf + j * kv + k);
    }
}

// The tile function for NT channels and MT rows (both at most the tile sizes), reading widened channels or not: a
// table, so the loops below pick one by index and every shape is a compiled instance.
using TileFn = void (*)(const float*, int64_t, const int8_t*, const float*, int64_t, float[kTileM][kTileN]);
template <int64_t NT, bool Widened>
constexpr TileFn tile_for_rows(int64_t mt) {
  return mt == 1   ? tile<NT, 1, Widened>
         : mt == 2 ? tile<NT, 2, Widened>
         : mt == 3 ? tile<NT, 3, Widened>
                   : tile<NT, 4, Widened>;
}
template <bool Widened>
inline TileFn tile_fn(int64_t nt, int64_t mt) {
  switch (nt) {
    case 1:
      return tile_for_rows<1, Widened>(mt);
    case 2:
      return tile_for_rows<2, Widened>(mt);
    case 3:
      return tile_for_rows<3, Widened>(mt);
    default:
      return tile_for_rows<kTileN, Widened>(mt);
  }
}

#if defined(__AVX512F__)
// The same product with AVX512-BF16's pairwise dot (`vdpbf16ps`: 32 multiply-adds an instruction, twice float32
// FMA's): each tile of channels is widened once per call into bfloat16 (int8 codes are exact in it) in a buffer the
// tile's rows then read from L1, and bfloat16 rows of x are read as they are. Products of bfloat16 pairs are exact
// in float32, and each accumulator lane adds its pairs in k order, so a row's result still does not depend on M.
#define HF_VRAM_BF16DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
constexpr int64_t kDotN = 4;  // channels a tile widens
constexpr int64_t kDotM = 6;  // rows each widened channel meets

template <int64_t NT, int64_t MT>
HF_VRAM_BF16DOT inline void dot_tile(const uint16_t* x, int64_t K, const uint16_t* wb, float out[kDotM][kDotN]) {
  __m512 acc[MT][NT];
  for (int64_t m = 0; m < MT; ++m)
    for (int64_t j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[NT];
    for (int64_t j = 0; j < NT; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wb + j * K + k);
    for (int64_t m = 0; m < MT; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int64_t j = 0; j < NT; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
    }
  }
  for (int64_t m = 0; m < MT; ++m)
    for (int64_t j = 0; j < NT; ++j) out[m][j] = _mm512_reduce_add_ps(acc[m][j]);
}

using DotFn = void (*)(const uint16_t*, int64_t, const uint16_t*, float[kDotM][kDotN]);
template <int64_t NT>
constexpr DotFn dot_for_rows(int64_t mt) {
  return mt == 1   ? dot_tile<NT, 1>
         : mt == 2 ? dot_tile<NT, 2>
         : mt == 3 ? dot_tile<NT, 3>
         : mt == 4 ? dot_tile<NT, 4>
         : mt == 5 ? dot_tile<NT, 5>
                   : dot_tile<NT, 6>;
}
inline DotFn dot_fn(int64_t nt, int64_t mt) {
  switch (nt) {
    case 1:
      return dot_for_rows<1>(mt);
    case 2:
      return dot_for_rows<2>(mt);
    case 3:
      return dot_for_rows<3>(mt);
    default:
      return dot_for_rows<4>(mt);
  }
}

// int8 codes -> bfloat16 bits, 32 at a time (K a multiple of 32).
HF_VRAM_BF16DOT inline void widen_bf16(const int8_t* w, int64_t K, uint16_t* out) {
  for (int64_t k = 0; k < K; k += 32) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
    const __m512 hi =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16))));
    _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

HF_VRAM_BF16DOT void run_bf16dot(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const int8_t* w = weight.data_ptr<int8_t>();
  const c10::BFloat16* sc = scales.data_ptr<c10::BFloat16>();
  c10::BFloat16* y = out.data_ptr<c10::BFloat16>();
  const int64_t tiles = (N + kDotN - 1) / kDotN;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> wb(kDotN * K);
    float part[kDotM][kDotN];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kDotN, nt = std::min(kDotN, N - n0);
      for (int64_t j = 0; j < nt; ++j) widen_bf16(w + (n0 + j) * K, K, wb.data() + j * K);
      for (int64_t m0 = 0; m0 < M; m0 += kDotM) {
        const int64_t mt = std::min(kDotM, M - m0);
        dot_fn(nt, mt)(xs + m0 * K, K, wb.data(), part);
        for (int64_t m = 0; m < mt; ++m)
          for (int64_t j = 0; j < nt; ++j)
            y[(m0 + m) * N + n0 + j] = static_cast<c10::BFloat16>(part[m][j] * static_cast<float>(sc[n0 + j]));
      }
    }
  });
}

bool has_bf16dot() { return __builtin_cpu_supports("avx512bf16"); }
#else
bool has_bf16dot() { return false; }  // builds below AVX-512 keep the float32 loops
#endif

template <typename T>
void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  std::vector<float> xf(M * K);  // x widened once; every channel tile reads it
  const T* xs = x.data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xs[i]);
  const int8_t* w = weight.data_ptr<int8_t>();
  const T* sc = scales.data_ptr<T>();
  T* y = out.data_ptr<T>();
  const int64_t kv = K - K % kWidth;
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  const bool widen_once = M > kTileM;  // more than one tile of rows meets each channel tile
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    float part[kTileM][kTileN];
    std::vector<float> wf(widen_once ? kTileN * kv : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kTileN, nt = std::min(kTileN, N - n0);
      if (widen_once) widen_tile(w + n0 * K, K, kv, nt, wf.data());
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int64_t mt = std::min(kTileM, M - m0);
        (widen_once ? tile_fn<true>(nt, mt) : tile_fn<false>(nt, mt))(xf.data() + m0 * K, K, w + n0 * K, wf.data(), kv, part);
        for (int64_t m = 0; m < mt; ++m)
          for (int64_t j = 0; j < nt; ++j)
            y[(m0 + m) * N + n0 + j] = static_cast<T>(part[m][j] * static_cast<float>(sc[n0 + j]));
      }
    }
  });
}

at::Tensor int8_weight_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "hf_vram int8_weight_matmul: x must be a contiguous [M, K] matrix");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kChar &&
                  weight.size(1) == x.size(1),
              "hf_vram int8_weight_matmul: weight must be contiguous int8 [N, K] with x's K (", x.size(1), ")");
  TORCH_CHECK(scales.dim() == 1 && scales.is_contiguous() && scales.size(0) == weight.size(0) &&
                  scales.scalar_type() == x.scalar_type(),
              "hf_vram int8_weight_matmul: scales must be contiguous [N] in x's dtype");
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  switch (x.scalar_type()) {
    case at::kBFloat16:
#if defined(__AVX512F__)
      if (has_bf16dot() && x.size(1) % 32 == 0) {
        run_bf16dot(x, weight, scales, out);
        break;
      }
#endif
      run<c10::BFloat16>(x, weight, scales, out);
      break;
    case at::kHalf:
      run<c10::Half>(x, weight, scales, out);
      break;
    case at::kFloat:
      run<float>(x, weight, scales, out);
      break;
    default:
      TORCH_CHECK(false, "hf_vram int8_weight_matmul: x must be bfloat16, float16 or float32, not ", x.scalar_type());
  }
  return out;
}

// Whether bfloat16 x takes the BF16-dot loops: an AVX-512 build on a CPU with AVX512-BF16.
bool int8_weight_matmul_bf16_dot() { return has_bf16dot(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_vram_cpu, m) {
  m.def("int8_weight_matmul(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.impl("int8_weight_matmul", c10::DispatchKey::CPU, &int8_weight_matmul);
  m.def("int8_weight_matmul_bf16_dot() -> bool", &int8_weight_matmul_bf16_dot);
}
