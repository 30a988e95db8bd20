// Decode attention straight from int8 K/V page rows (continuous batching's one-token sequences).
//
// A row holds one token's keys (or values) for every KV head of one layer: H*D int8 codes, then H float16 scales
// (hf_vram.kvcache.codec.KVCodec). Each (sequence, KV head) task walks its read indices, scores the G query rows of
// that KV head against the codes (converted to float in registers, scale applied to the dot product), and keeps an
// online softmax over blocks of keys: the K/V it reads are the int8 bytes themselves, never a dequantized,
// gathered or padded copy. The last key and value of a sequence are its own new token, passed as computed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // keys scored before one rescale of the running output

inline float half_at(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
}

// e^x for x <= 0 in plain float and integer steps, so a loop of them vectorizes (std::exp is a scalar call, and at
// ~20 ns it cost more than the rest of the attention): 2^(x log2 e) = 2^n * 2^f, 2^f by a degree-6 polynomial on
// [0, 1) (relative error below 2e-7), 2^n built in the exponent bits. Below -87 the result is 0 (float's smallest
// normal is e^-87.3); -inf (the first block's running maximum) gives 0 too.
inline float exp_nonpositive(float x) {
  const float y = std::max(x, -87.0f) * 1.44269504088896341f;
  const float n = std::floor(y);
  const float f = y - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// out[g] = q[g] . codes for the G query rows: the int8 codes widened to float in registers, each dot one vector
// accumulator and one horizontal sum (a plain or `omp simd` reduction ends in a serial chain of 16 scalar adds per
// dot, measured as most of the kernel's time); whole vectors need D a multiple of the width, else the plain loop.
inline void dots_int8(const float* __restrict q, int64_t G, int64_t D, const int8_t* __restrict codes,
                      float* __restrict out) {
#if defined(__AVX512F__)
  if (D % 16 == 0 && G <= 8) {
    __m512 acc[8];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 k = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + d))));
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d), k, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) out[g] = _mm512_reduce_add_ps(acc[g]);
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0 && G <= 8) {
    __m256 acc[8];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 k = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + d))));
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), k, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) {
      __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc[g]), _mm256_extractf128_ps(acc[g], 1));
      x = _mm_add_ps(x, _mm_movehl_ps(x, x));
      out[g] = _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
    }
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * static_cast<float>(codes[d]);
    out[g] = s;
  }
}

struct Rows {
  const uint8_t* base;
  int64_t stride;      // bytes between rows
  int64_t code_bytes;  // H * D: where the scales start
};

// One (sequence, KV head): query rows [G, D] times `scale`, over `past` page rows, then the fresh token. D is a
// template argument for the common head sizes (the loops over it then unroll into whole vectors), 0 for any other.
template <int64_t kD>
void attend(const float* query, float scale, int64_t G, int64_t runtime_d, int64_t h, const Rows& keys, const Rows& values,
            const int64_t* index, int64_t past, const float* fresh_k, const float* fresh_v, float* out) {
  const int64_t D = kD ? kD : runtime_d;
  std::vector<float> q(G * D), dots(G), scores(G * kBlock), acc(G * D, 0.0f), codes(D),
      m(G, -std::numeric_limits<float>::infinity()), l(G, 0.0f);
  for (int64_t i = 0; i < G * D; ++i) q[i] = query[i] * scale;
  const int64_t total = past + 1;
  for (int64_t b0 = 0; b0 < total; b0 += kBlock) {
    const int64_t n = std::min(kBlock, total - b0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = b0 + j;
      if (t < past) {
        const uint8_t* row = keys.base + index[t] * keys.stride;
        dots_int8(q.data(), G, D, reinterpret_cast<const int8_t*>(row) + h * D, dots.data());
        const float k_scale = half_at(row + keys.code_bytes + 2 * h);
        for (int64_t g = 0; g < G; ++g) scores[g * kBlock + j] = dots[g] * k_scale;
      } else {
        for (int64_t g = 0; g < G; ++g) {
          float s = 0.0f;
          for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * fresh_k[d];
          scores[g * kBlock + j] = s;
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sg = scores.data() + g * kBlock;
      float block_max = sg[0];
      for (int64_t j = 1; j < n; ++j) block_max = std::max(block_max, sg[j]);
      const float m_new = std::max(m[g], block_max);
      const float correction = exp_nonpositive(m[g] - m_new);  // 0 for the first block (m = -inf)
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        sg[j] = exp_nonpositive(sg[j] - m_new);
        sum += sg[j];
      }
      l[g] = l[g] * correction + sum;
      m[g] = m_new;
      float* ag = acc.data() + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] *= correction;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = b0 + j;
      const float* v = fresh_v;
      float v_scale = 1.0f;
      if (t < past) {
        const uint8_t* row = values.base + index[t] * values.stride;
        const int8_t* c = reinterpret_cast<const int8_t*>(row) + h * D;
        for (int64_t d = 0; d < D; ++d) codes[d] = static_cast<float>(c[d]);
        v = codes.data();
        v_scale = half_at(row + values.code_bytes + 2 * h);
      }
      for (int64_t g = 0; g < G; ++g) {
        const float w = scores[g * kBlock + j] * v_scale;
        float* ag = acc.data() + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += w * v[d];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / l[g];
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv;
  }
}

Rows rows_of(const at::Tensor& t, int64_t heads, int64_t head_dim, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kByte && t.stride(1) == 1,
              "hf_vram paged_decode_int8: ", what, " must be uint8 rows [R, row_bytes] with contiguous bytes");
  TORCH_CHECK(t.size(1) >= heads * (head_dim + 2), "hf_vram paged_decode_int8: ", what, " rows hold ", t.size(1),
              " bytes, fewer than ", heads, " heads x (", head_dim, " codes + a float16 scale)");
  return Rows{t.data_ptr<uint8_t>(), t.stride(0), heads * head_dim};
}

// query [S, H, G, D] float32; key_rows/value_rows [R, row_bytes] uint8; read_index [N] int64; starts/lengths [S]
// int64 (a sequence's keys: read_index[start : start + length], the last one its own new token); fresh_keys /
// fresh_values [S, H, D] float32. Returns [S, H, G, D] float32.
at::Tensor paged_decode_int8(const at::Tensor& query, const at::Tensor& key_rows, const at::Tensor& value_rows,
                             const at::Tensor& read_index, const at::Tensor& starts, const at::Tensor& lengths,
                             const at::Tensor& fresh_keys, const at::Tensor& fresh_values, double scale) {
  TORCH_CHECK(query.dim() == 4 && query.scalar_type() == at::kFloat && query.is_contiguous(),
              "hf_vram paged_decode_int8: query must be contiguous float32 [S, kv_heads, group, head_dim]");
  const int64_t S = query.size(0), H = query.size(1), G = query.size(2), D = query.size(3);
  for (const at::Tensor* t : {&fresh_keys, &fresh_values}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == S &&
                    t->size(1) == H && t->size(2) == D,
                "hf_vram paged_decode_int8: fresh keys/values must be contiguous float32 [S, kv_heads, head_dim]");
  }
  for (const at::Tensor* t : {&read_index, &starts, &lengths}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1,
                "hf_vram paged_decode_int8: read_index, starts and lengths must be contiguous int64 vectors");
  }
  TORCH_CHECK(starts.size(0) == S && lengths.size(0) == S,
              "hf_vram paged_decode_int8: one start and one length per sequence");
  const Rows keys = rows_of(key_rows, H, D, "key_rows"), values = rows_of(value_rows, H, D, "value_rows");
  const int64_t* index = read_index.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  const int64_t n_index = read_index.size(0), k_rows = key_rows.size(0), v_rows = value_rows.size(0);
  for (int64_t s = 0; s < S; ++s) {  // every row read must exist: a bad index is an error, never a stray read
    TORCH_CHECK(length[s] >= 1 && start[s] >= 0 && start[s] + length[s] <= n_index,
                "hf_vram paged_decode_int8: sequence ", s, " reads read_index[", start[s], ":", start[s] + length[s],
                "] of ", n_index, " (each sequence needs at least its own new token)");
    for (int64_t t = start[s]; t < start[s] + length[s] - 1; ++t) {
      TORCH_CHECK(index[t] >= 0 && index[t] < std::min(k_rows, v_rows), "hf_vram paged_decode_int8: read index ",
                  index[t], " is outside the ", std::min(k_rows, v_rows), " page rows");
    }
  }
  at::Tensor out = at::empty(query.sizes(), query.options());
  const float* qp = query.data_ptr<float>();
  const float* fk = fresh_keys.data_ptr<float>();
  const float* fv = fresh_values.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, S * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / H, h = task % H;
      auto run = D == 64 ? attend<64> : D == 128 ? attend<128> : attend<0>;
      run(qp + task * G * D, static_cast<float>(scale), G, D, h, keys, values, index + start[s], length[s] - 1,
          fk + task * D, fv + task * D, op + task * G * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(hf_vram_cpu, m) {
  m.def(
      "paged_decode_int8(Tensor query, Tensor key_rows, Tensor value_rows, Tensor read_index, Tensor starts, "
      "Tensor lengths, Tensor fresh_keys, Tensor fresh_values, float scale) -> Tensor");
  m.impl("paged_decode_int8", c10::DispatchKey::CPU, &paged_decode_int8);
}
