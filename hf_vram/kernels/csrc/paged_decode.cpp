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

// One vector of x[d ...] as floats: int8 codes widened in registers, floats loaded as they are.
#if defined(__AVX512F__)
inline __m512 widen(const int8_t* x) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))));
}
inline __m512 widen(const float* x) { return _mm512_loadu_ps(x); }
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 widen(const int8_t* x) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
}
inline __m256 widen(const float* x) { return _mm256_loadu_ps(x); }
#endif

// out[g] = q[g] . x for the G query rows, x int8 codes or floats: each dot one vector accumulator and one horizontal
// sum (a plain or `omp simd` reduction ends in a serial chain of 16 scalar adds per dot, measured as most of the
// kernel's time); whole vectors need D a multiple of the width, else the plain loop.
template <typename T>
inline void dots(const float* __restrict q, int64_t G, int64_t D, const T* __restrict x, float* __restrict out) {
#if defined(__AVX512F__)
  if (D % 16 == 0 && G <= 8) {
    __m512 acc[8];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 k = widen(x + d);
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
      const __m256 k = widen(x + d);
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), k, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) {
      __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[g]), _mm256_extractf128_ps(acc[g], 1));
      v = _mm_add_ps(v, _mm_movehl_ps(v, v));
      out[g] = _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
    }
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * static_cast<float>(x[d]);
    out[g] = s;
  }
}

struct Rows {
  const uint8_t* base;
  int64_t stride;      // bytes between rows
  int64_t code_bytes;  // H * D: where the scales start
};

// The rows a task reads its keys and values from: key(t, q, scores) writes the G scores of key t (the dots
// with q, every factor of the key's decoding applied), value(t, buffer) returns key t's value as D floats and the
// factor to scale them by. Key `past` (the last) is the sequence's own new token, as computed.

// One (sequence, KV head): query rows [G, D] times `scale`, over `past` keys from `keys` / `values`, then the fresh
// token, with an online softmax over blocks of kBlock keys. D is a template argument for the common head sizes (the
// loops over it then unroll into whole vectors), 0 for any other.
template <int64_t kD, typename Keys, typename Values>
void attend(const float* query, float scale, int64_t G, int64_t runtime_d, Keys& keys, Values& values, int64_t past,
            const float* fresh_k, const float* fresh_v, float* out) {
  const int64_t D = kD ? kD : runtime_d;
  std::vector<float> q(G * D), key_scores(G), scores(G * kBlock), acc(G * D, 0.0f), buffer(D),
      m(G, -std::numeric_limits<float>::infinity()), l(G, 0.0f);
  for (int64_t i = 0; i < G * D; ++i) q[i] = query[i] * scale;
  const int64_t total = past + 1;
  for (int64_t b0 = 0; b0 < total; b0 += kBlock) {
    const int64_t n = std::min(kBlock, total - b0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = b0 + j;
      if (t < past) {
        keys.score(t, q.data(), G, D, key_scores.data());
      } else {
        dots(q.data(), G, D, fresh_k, key_scores.data());
      }
      for (int64_t g = 0; g < G; ++g) scores[g * kBlock + j] = key_scores[g];
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
      float v_scale = 1.0f;
      const float* v = t < past ? values.value(t, buffer.data(), D, &v_scale) : fresh_v;
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

// int8 rows (KVCodec: H*D codes, then H float16 scales), read by index: the int8 pages, and the int4/int2 pages'
// window.
struct Int8Keys {
  Rows rows;
  int64_t h;
  const int64_t* index;
  void score(int64_t t, const float* q, int64_t G, int64_t D, float* out) const {
    const uint8_t* row = rows.base + index[t] * rows.stride;
    dots(q, G, D, reinterpret_cast<const int8_t*>(row) + h * D, out);
    const float k_scale = half_at(row + rows.code_bytes + 2 * h);
    for (int64_t g = 0; g < G; ++g) out[g] *= k_scale;
  }
};

struct Int8Values {
  Rows rows;
  int64_t h;
  const int64_t* index;
  const float* value(int64_t t, float* buffer, int64_t D, float* v_scale) const {
    const uint8_t* row = rows.base + index[t] * rows.stride;
    const int8_t* c = reinterpret_cast<const int8_t*>(row) + h * D;
    for (int64_t d = 0; d < D; ++d) buffer[d] = static_cast<float>(c[d]);
    *v_scale = half_at(row + rows.code_bytes + 2 * h);
    return buffer;
  }
};

// 4- and 2-bit KIVI rows (hf_vram.kvcache.kivi.WindowedKVCodec): per token `code_bytes` of packed codes (head h's D
// codes at h * D * bits / 8, the low bits of a byte first), then meta. Keys: (scale, low) float16 per channel over
// each group of `group` tokens, the group's [2, H, D] meta spread over its rows' first `key_meta_bytes` bytes after
// the codes (at 2 bits a channel's code in the 2-bit slots its width gives: slot_map); quantized turned back by
// their rotary angle, so turned forward here by their positions (cos / signed sin tables [positions, D], RopeFrame's
// layout; none without a frame), the meta bytes past the key rows' in the same tokens' value rows after their own.
// Values: (scale, low) float16 per token and group of `value_group` channels, [H, D / value_group, 2] after the
// codes, or (value_group 0 at the entry) one float16 scale for the row, its codes symmetric about zero at half
// steps (code * scale - (2^bits - 1) / 2 * scale). A key or value the request's window
// holds (its byte offset in `window` >= 0) is an int8 KVCodec row there, keys as computed (not turned back).
constexpr int64_t kMaxKiviHeadDim = 512;

struct KiviLayout {
  int64_t bits, group, code_bytes, key_meta_bytes, value_group, heads;
  int64_t pairs;  // rotary channel pairs (0: keys were quantized as they are)
  const float* cos;
  const float* sin;
  // value rows of one symmetric scale (WindowedKVCodec.row_scale, value_group D here): the float16 scale at
  // code_bytes, each value code * scale - row_half * scale; 0: a (scale, low) per head and value group
  float row_half = 0.0f;
  // a key group's meta past its key rows' key_meta_bytes continues in its value rows, after their value_meta bytes
  int64_t value_meta = 0;
  const uint8_t* value_base = nullptr;
  int64_t value_stride = 0;

  // (scale, low) of value group j (of `groups` a head) of head h in the value row `row`
  inline void value_pair(const uint8_t* row, int64_t h, int64_t groups, int64_t j, float* scale, float* low) const {
    if (row_half > 0.0f) {
      *scale = half_at(row + code_bytes);
      *low = -row_half * *scale;
      return;
    }
    const uint8_t* meta = row + code_bytes + (h * groups + j) * 4;
    *scale = half_at(meta), *low = half_at(meta + 2);
  }
};

// out[d] = code[d] * scale[d] + low[d] for the D packed codes of one head (the low bits of a byte first). With
// AVX2 or AVX-512, 16 bytes at a time: their 2- or 4-bit fields split with masks and interleaved back into code
// order with byte/word unpacks, widened to floats and multiplied-added in registers (a scalar unpack into memory,
// read back as vectors, stalls on every store it forwards); elsewhere, or for other widths of D, the plain loop.
#if defined(__AVX512F__)
inline void affine16(__m128i codes, const float* scale, const float* low, float* out) {
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
  _mm512_storeu_ps(out, _mm512_fmadd_ps(f, _mm512_loadu_ps(scale), _mm512_loadu_ps(low)));
}
#define HF_VRAM_VECTOR_UNPACK 1
#elif defined(__AVX2__) && defined(__FMA__)
inline void affine16(__m128i codes, const float* scale, const float* low, float* out) {
  const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
  const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
  _mm256_storeu_ps(out, _mm256_fmadd_ps(f0, _mm256_loadu_ps(scale), _mm256_loadu_ps(low)));
  _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(f1, _mm256_loadu_ps(scale + 8), _mm256_loadu_ps(low + 8)));
}
#define HF_VRAM_VECTOR_UNPACK 1
#endif

template <int64_t kBits>
inline void dequantize(const uint8_t* __restrict packed, int64_t D, const float* __restrict scale,
                       const float* __restrict low, float* __restrict out) {
#ifdef HF_VRAM_VECTOR_UNPACK
  if (kBits == 4 && D % 32 == 0) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t j = 0; j < D / 2; j += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + j));
      const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      affine16(_mm_unpacklo_epi8(lo, hi), scale + 2 * j, low + 2 * j, out + 2 * j);
      affine16(_mm_unpackhi_epi8(lo, hi), scale + 2 * j + 16, low + 2 * j + 16, out + 2 * j + 16);
    }
    return;
  }
  if (kBits == 2 && D % 64 == 0) {
    const __m128i mask = _mm_set1_epi8(0x03);
    for (int64_t j = 0; j < D / 4; j += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + j));
      const __m128i f0 = _mm_and_si128(b, mask), f1 = _mm_and_si128(_mm_srli_epi16(b, 2), mask);
      const __m128i f2 = _mm_and_si128(_mm_srli_epi16(b, 4), mask), f3 = _mm_and_si128(_mm_srli_epi16(b, 6), mask);
      const __m128i p01l = _mm_unpacklo_epi8(f0, f1), p01h = _mm_unpackhi_epi8(f0, f1);
      const __m128i p23l = _mm_unpacklo_epi8(f2, f3), p23h = _mm_unpackhi_epi8(f2, f3);
      const int64_t d = 4 * j;
      affine16(_mm_unpacklo_epi16(p01l, p23l), scale + d, low + d, out + d);
      affine16(_mm_unpackhi_epi16(p01l, p23l), scale + d + 16, low + d + 16, out + d + 16);
      affine16(_mm_unpacklo_epi16(p01h, p23h), scale + d + 32, low + d + 32, out + d + 32);
      affine16(_mm_unpackhi_epi16(p01h, p23h), scale + d + 48, low + d + 48, out + d + 48);
    }
    return;
  }
#endif
  constexpr int64_t per_byte = 8 / kBits;
  constexpr int mask = (1 << kBits) - 1;
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<float>((packed[d / per_byte] >> (kBits * (d % per_byte))) & mask) * scale[d] + low[d];
  }
}

// kivi.slot_map: 2-bit keys give each channel 0, 2 or 4 bits (kivi.key_widths), the width in the sign of its scale
// (0: none, the low is the channel's mean; positive: one 2-bit slot; negative: two, the low 2 bits first), and a
// channel's slots follow those of the channels before it. For one head's D signed scales: each channel's first and
// second slot (a channel without one points at a slot it multiplies by 0) and their factors, so that its key is
// low + slot[lo] * a + slot[hi] * b. Indices stay inside the head's D slots whatever the scales say.
inline void slot_map(const float* scale, int64_t D, int32_t* lo, int32_t* hi, float* a, float* b) {
  int64_t next = 0;
  for (int64_t d = 0; d < D; ++d) {
    const int64_t n = scale[d] == 0.0f ? 0 : scale[d] < 0.0f ? 2 : 1;
    const float s = std::fabs(scale[d]);
    lo[d] = static_cast<int32_t>(std::min(next, D - 1));
    hi[d] = static_cast<int32_t>(std::min(next + 1, D - 1));
    a[d] = n > 0 ? s : 0.0f;
    b[d] = n == 2 ? 4.0f * s : 0.0f;
    next += n;
  }
}

// One head's 2-bit key slots (the low bits of a byte first) read through its slot map into channel order.
inline void dequantize_slots(const uint8_t* __restrict packed, int64_t D, const int32_t* lo, const int32_t* hi,
                             const float* a, const float* b, const float* low, float* __restrict slots,
                             float* __restrict out) {
  for (int64_t d = 0; d < D; ++d) slots[d] = static_cast<float>((packed[d / 4] >> (2 * (d % 4))) & 3);
  for (int64_t d = 0; d < D; ++d) out[d] = slots[lo[d]] * a[d] + slots[hi[d]] * b[d] + low[d];
}

template <int64_t kBits>
struct KiviKeys {
  Rows pages;
  const uint8_t* window;
  KiviLayout layout;
  int64_t h;
  const int64_t* index;
  const int64_t* positions;
  const int64_t* window_at;
  int64_t cached_group = -1;
  std::vector<float> scale, low, key, turned, slot_a, slot_b, slots;  // slot_*: kBits == 2 (slot_map)
  std::vector<int32_t> slot_lo, slot_hi;

  // Head h's per-channel (scale, low) of key group `group_id` as floats: the group's [2, H, D] float16 meta lies
  // over the meta bytes of its first rows, so each of the two runs of D values is gathered row piece by row piece
  // (a division per value cost more than the rest of the key's decoding).
  void load_group_meta(int64_t group_id, int64_t D, float* scale_out, float* low_out) const {
    const int64_t first_row = group_id * layout.group, in_keys = layout.group * layout.key_meta_bytes;
    const int64_t tail = layout.key_meta_bytes - layout.value_meta;  // bytes of it in each value row
    uint8_t buffer[2 * kMaxKiviHeadDim];  // D <= kMaxKiviHeadDim: checked once, at the entry
    for (int64_t part = 0; part < 2; ++part) {
      int64_t byte = (part * layout.heads + h) * D * 2, count = D * 2;
      uint8_t* into = buffer;
      while (count > 0) {
        const uint8_t* from;
        int64_t n;
        if (byte < in_keys) {  // the key rows' meta bytes
          const int64_t row = byte / layout.key_meta_bytes, off = byte % layout.key_meta_bytes;
          n = std::min({count, layout.key_meta_bytes - off, in_keys - byte});
          from = pages.base + (first_row + row) * pages.stride + layout.code_bytes + off;
        } else {  // then the value rows', after their own meta
          const int64_t row = (byte - in_keys) / tail, off = (byte - in_keys) % tail;
          n = std::min(count, tail - off);
          from = layout.value_base + (first_row + row) * layout.value_stride + layout.code_bytes + layout.value_meta + off;
        }
        std::memcpy(into, from, n);
        into += n, byte += n, count -= n;
      }
      float* out = part == 0 ? scale_out : low_out;
      for (int64_t d = 0; d < D; ++d) out[d] = half_at(buffer + 2 * d);
    }
  }

  void score(int64_t t, const float* q, int64_t G, int64_t D, float* out) {
    if (window_at[t] >= 0) {
      const uint8_t* row = window + window_at[t];
      dots(q, G, D, reinterpret_cast<const int8_t*>(row) + h * D, out);
      const float s = half_at(row + layout.heads * D + 2 * h);
      for (int64_t g = 0; g < G; ++g) out[g] *= s;
      return;
    }
    const int64_t r = index[t], group_id = r / layout.group;
    if (group_id != cached_group) {
      load_group_meta(group_id, D, scale.data(), low.data());
      if (kBits == 2) slot_map(scale.data(), D, slot_lo.data(), slot_hi.data(), slot_a.data(), slot_b.data());
      cached_group = group_id;
    }
    float* __restrict k = key.data();
    const uint8_t* packed = pages.base + r * pages.stride + h * D * kBits / 8;
    if (kBits == 2) {
      dequantize_slots(packed, D, slot_lo.data(), slot_hi.data(), slot_a.data(), slot_b.data(), low.data(),
                       slots.data(), k);
    } else {
      dequantize<kBits>(packed, D, scale.data(), low.data(), k);
    }
    const float* x = k;
    if (layout.pairs) {  // RopeFrame.turn: x * cos, plus the partner channel times the signed sin
      const int64_t n = layout.pairs;
      const float* __restrict c = layout.cos + positions[t] * D;
      const float* __restrict sn = layout.sin + positions[t] * D;
      float* __restrict turn = turned.data();
      for (int64_t i = 0; i < n; ++i) turn[i] = k[i] * c[i] + k[i + n] * sn[i];
      for (int64_t i = 0; i < n; ++i) turn[i + n] = k[i + n] * c[i + n] + k[i] * sn[i + n];
      for (int64_t d = 2 * n; d < D; ++d) turn[d] = k[d];
      x = turn;
    }
    dots(q, G, D, x, out);
  }
};

template <int64_t kBits>
struct KiviValues {
  Rows pages;
  const uint8_t* window;
  KiviLayout layout;
  int64_t h;
  const int64_t* index;
  const int64_t* window_at;
  std::vector<float> scale, low;

  const float* value(int64_t t, float* buffer, int64_t D, float* v_scale) {
    if (window_at[t] >= 0) {
      const uint8_t* row = window + window_at[t];
      const int8_t* c = reinterpret_cast<const int8_t*>(row) + h * D;
      for (int64_t d = 0; d < D; ++d) buffer[d] = static_cast<float>(c[d]);
      *v_scale = half_at(row + layout.heads * D + 2 * h);
      return buffer;
    }
    const uint8_t* row = pages.base + index[t] * pages.stride;
    const int64_t groups = D / layout.value_group;
    float* __restrict sc = scale.data();
    float* __restrict lo = low.data();
    for (int64_t j = 0; j < groups; ++j) {  // each group's (scale, low) over its channels
      float s, l;
      layout.value_pair(row, h, groups, j, &s, &l);
      std::fill(sc + j * layout.value_group, sc + (j + 1) * layout.value_group, s);
      std::fill(lo + j * layout.value_group, lo + (j + 1) * layout.value_group, l);
    }
    dequantize<kBits>(row + h * D * kBits / 8, D, sc, lo, buffer);
    *v_scale = 1.0f;
    return buffer;
  }
};

// The decode over KIVI pages (kBits 4, 2) and over int8 pages (kBits 8: every row a KVCodec row, read as a KIVI
// window's are) for the common shapes, whole vectors in registers (AVX-512 or AVX2 + FMA; D 64 or 128, at most 8
// query rows per KV head, value groups of whole vectors): the generic `attend` above spends most of its time moving
// floats through memory (each key dequantized into a buffer, turned into another, each value's (scale, low) filled
// over its channels, the running output read and written per value). Here a key group's (scale, low) are loaded once,
// each key is decoded and turned in registers and dotted with the G query rows held there; a value is never
// decoded: its codes are multiplied into the running output with the softmax weight times its scale, and its low
// adds the weight times low to one running sum per value group (sum_t w_t (s_t c_t + l_t) = sum_t (w_t s_t) c_t
// + sum_t w_t l_t), the output rows staying in registers throughout.
#if defined(__AVX512F__)
using vfloat = __m512;
constexpr int64_t kLanes = 16;
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vset(float x) { return _mm512_set1_ps(x); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline float vsum(vfloat a) { return _mm512_reduce_add_ps(a); }
inline vfloat vgather(const float* base, const int32_t* at) {
  return _mm512_i32gather_ps(_mm512_loadu_si512(at), base, 4);
}
// 16 byte codes (in channel order) as floats: one vector
inline void codes_to(__m128i c, vfloat* out) { out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)); }
inline void int8_to(const int8_t* x, vfloat* out) { out[0] = widen(x); }
#define HF_VRAM_REGISTER_DECODE 1
#elif defined(__AVX2__) && defined(__FMA__)
using vfloat = __m256;
constexpr int64_t kLanes = 8;
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vset(float x) { return _mm256_set1_ps(x); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline float vsum(vfloat a) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}
inline vfloat vgather(const float* base, const int32_t* at) {
  return _mm256_i32gather_ps(base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)), 4);
}
inline void codes_to(__m128i c, vfloat* out) {
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
}
inline void int8_to(const int8_t* x, vfloat* out) {
  out[0] = widen(x);
  out[1] = widen(x + 8);
}
#define HF_VRAM_REGISTER_DECODE 1
#endif

#ifdef HF_VRAM_REGISTER_DECODE
constexpr int64_t kPerCodes = 16 / kLanes;  // vectors per 16 codes

// The D packed codes of one head as floats, in channel order (the low bits of a byte first).
template <int64_t kBits, int64_t kD>
inline void unpack_codes(const uint8_t* packed, vfloat* out) {
  if constexpr (kBits == 4) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t j = 0; j < kD / 2; j += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + j));
      const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      codes_to(_mm_unpacklo_epi8(lo, hi), out + (2 * j / 16) * kPerCodes);
      codes_to(_mm_unpackhi_epi8(lo, hi), out + (2 * j / 16 + 1) * kPerCodes);
    }
  } else {
    const __m128i mask = _mm_set1_epi8(0x03);
    for (int64_t j = 0; j < kD / 4; j += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + j));
      const __m128i f0 = _mm_and_si128(b, mask), f1 = _mm_and_si128(_mm_srli_epi16(b, 2), mask);
      const __m128i f2 = _mm_and_si128(_mm_srli_epi16(b, 4), mask), f3 = _mm_and_si128(_mm_srli_epi16(b, 6), mask);
      const __m128i p01l = _mm_unpacklo_epi8(f0, f1), p01h = _mm_unpackhi_epi8(f0, f1);
      const __m128i p23l = _mm_unpacklo_epi8(f2, f3), p23h = _mm_unpackhi_epi8(f2, f3);
      const int64_t at = (4 * j / 16) * kPerCodes;
      codes_to(_mm_unpacklo_epi16(p01l, p23l), out + at);
      codes_to(_mm_unpackhi_epi16(p01l, p23l), out + at + kPerCodes);
      codes_to(_mm_unpacklo_epi16(p01h, p23h), out + at + 2 * kPerCodes);
      codes_to(_mm_unpackhi_epi16(p01h, p23h), out + at + 3 * kPerCodes);
    }
  }
}

// Whether `attend_kivi_fast` takes this shape: D a whole number of 16-code chunks it is compiled for, G query rows
// it holds, value groups of whole vectors, keys either not turned or turned over all D channels.
inline bool fast_kivi_takes(const KiviLayout& layout, int64_t G, int64_t D) {
  return (D == 64 || D == 128) && G >= 1 && G <= 8 && layout.value_group % kLanes == 0 &&
         (layout.pairs == 0 || 2 * layout.pairs == D);
}

template <int64_t kBits, int64_t kD, int64_t kG>
void attend_kivi_fast(const float* query, float scale, const KiviKeys<kBits>& keys, const KiviValues<kBits>& values,
                      int64_t past, const float* fresh_k, const float* fresh_v, float* out) {
  constexpr int64_t kV = kD / kLanes, kHalf = kV / 2;
  const KiviLayout& layout = keys.layout;
  const int64_t h = keys.h, value_groups = kD / layout.value_group, per_group = layout.value_group / kLanes;
  vfloat q[kG][kV], acc[kG][kV];
  float low_acc[kG][kD / kLanes];  // per value group (at most kV of them)
  float m[kG], l[kG], scores[kG][kBlock];
  for (int64_t g = 0; g < kG; ++g) {
    for (int64_t i = 0; i < kV; ++i) {
      q[g][i] = vmul(vload(query + g * kD + i * kLanes), vset(scale));
      acc[g][i] = vset(0.0f);
    }
    for (int64_t j = 0; j < value_groups; ++j) low_acc[g][j] = 0.0f;
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.0f;
  }
  vfloat key_scale[kV], key_low[kV], key_b[kV];  // kBits == 2: key_scale and key_b the slot factors (slot_map)
  int32_t slot_lo[kD], slot_hi[kD];
  int64_t cached_group = -1;
  const int64_t total = past + 1;
  for (int64_t b0 = 0; b0 < total; b0 += kBlock) {
    const int64_t n = std::min(kBlock, total - b0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = b0 + j;
      vfloat k[kV];
      float factor = 1.0f;
      if (t == past) {
        for (int64_t i = 0; i < kV; ++i) k[i] = vload(fresh_k + i * kLanes);
      } else if (const uint8_t* row = kBits == 8 ? keys.pages.base + keys.index[t] * keys.pages.stride
                                      : keys.window_at[t] >= 0 ? keys.window + keys.window_at[t] : nullptr) {
        // a KVCodec row: the int8 pages', or the window's
        for (int64_t i = 0; i < kV; i += kPerCodes) int8_to(reinterpret_cast<const int8_t*>(row) + h * kD + i * kLanes, k + i);
        factor = half_at(row + layout.heads * kD + 2 * h);
      } else {
        const int64_t r = keys.index[t], group_id = r / layout.group;
        if (group_id != cached_group) {
          float s[kD], lo[kD], a[kD], b[kD];
          keys.load_group_meta(group_id, kD, s, lo);
          if (kBits == 2) slot_map(s, kD, slot_lo, slot_hi, a, b);
          const float* first = kBits == 2 ? a : s;  // the factor of a channel's (first) code
          for (int64_t i = 0; i < kV; ++i) key_scale[i] = vload(first + i * kLanes), key_low[i] = vload(lo + i * kLanes);
          if (kBits == 2) for (int64_t i = 0; i < kV; ++i) key_b[i] = vload(b + i * kLanes);
          cached_group = group_id;
        }
        unpack_codes<kBits, kD>(keys.pages.base + r * keys.pages.stride + h * kD * kBits / 8, k);
        if (kBits == 2) {  // slots in channel order through the group's slot map
          float slots[kD];
          for (int64_t i = 0; i < kV; ++i) vstore(slots + i * kLanes, k[i]);
          for (int64_t i = 0; i < kV; ++i) {
            k[i] = vfma(vgather(slots, slot_hi + i * kLanes), key_b[i],
                        vfma(vgather(slots, slot_lo + i * kLanes), key_scale[i], key_low[i]));
          }
        } else {
          for (int64_t i = 0; i < kV; ++i) k[i] = vfma(k[i], key_scale[i], key_low[i]);
        }
        if (layout.pairs) {  // RopeFrame.turn: x * cos, plus the partner half times the signed sin
          const float* c = layout.cos + keys.positions[t] * kD;
          const float* sn = layout.sin + keys.positions[t] * kD;
          vfloat turned[kV];
          for (int64_t i = 0; i < kHalf; ++i) {
            turned[i] = vfma(k[i + kHalf], vload(sn + i * kLanes), vmul(k[i], vload(c + i * kLanes)));
            turned[i + kHalf] =
                vfma(k[i], vload(sn + (i + kHalf) * kLanes), vmul(k[i + kHalf], vload(c + (i + kHalf) * kLanes)));
          }
          for (int64_t i = 0; i < kV; ++i) k[i] = turned[i];
        }
      }
      for (int64_t g = 0; g < kG; ++g) {
        vfloat s = vmul(q[g][0], k[0]);
        for (int64_t i = 1; i < kV; ++i) s = vfma(q[g][i], k[i], s);
        scores[g][j] = vsum(s) * factor;
      }
    }
    for (int64_t g = 0; g < kG; ++g) {
      float* sg = scores[g];
      float block_max = sg[0];
      for (int64_t j = 1; j < n; ++j) block_max = std::max(block_max, sg[j]);
      const float m_new = std::max(m[g], block_max);
      const float correction = exp_nonpositive(m[g] - m_new);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        sg[j] = exp_nonpositive(sg[j] - m_new);
        sum += sg[j];
      }
      l[g] = l[g] * correction + sum;
      m[g] = m_new;
      const vfloat cv = vset(correction);
      for (int64_t i = 0; i < kV; ++i) acc[g][i] = vmul(acc[g][i], cv);
      for (int64_t v = 0; v < value_groups; ++v) low_acc[g][v] *= correction;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = b0 + j;
      vfloat c[kV];
      if (t == past) {
        for (int64_t i = 0; i < kV; ++i) c[i] = vload(fresh_v + i * kLanes);
        for (int64_t g = 0; g < kG; ++g) {
          const vfloat w = vset(scores[g][j]);
          for (int64_t i = 0; i < kV; ++i) acc[g][i] = vfma(w, c[i], acc[g][i]);
        }
        continue;
      }
      const uint8_t* int8_row = nullptr;  // a KVCodec row: the int8 pages', or the window's
      if constexpr (kBits == 8) {
        int8_row = values.pages.base + values.index[t] * values.pages.stride;
      } else if (values.window_at[t] >= 0) {
        int8_row = values.window + values.window_at[t];
      }
      if (int8_row) {
        for (int64_t i = 0; i < kV; i += kPerCodes) int8_to(reinterpret_cast<const int8_t*>(int8_row) + h * kD + i * kLanes, c + i);
        const float s = half_at(int8_row + layout.heads * kD + 2 * h);
        for (int64_t g = 0; g < kG; ++g) {
          const vfloat w = vset(scores[g][j] * s);
          for (int64_t i = 0; i < kV; ++i) acc[g][i] = vfma(w, c[i], acc[g][i]);
        }
        continue;
      }
      const uint8_t* row = values.pages.base + values.index[t] * values.pages.stride;
      unpack_codes<kBits, kD>(row + h * kD * kBits / 8, c);
      for (int64_t v = 0; v < value_groups; ++v) {
        float s, lo;
        layout.value_pair(row, h, value_groups, v, &s, &lo);
        for (int64_t g = 0; g < kG; ++g) {
          const float p = scores[g][j];
          const vfloat w = vset(p * s);
          for (int64_t i = v * per_group; i < (v + 1) * per_group; ++i) acc[g][i] = vfma(w, c[i], acc[g][i]);
          low_acc[g][v] += p * lo;
        }
      }
    }
  }
  for (int64_t g = 0; g < kG; ++g) {
    const float inv = 1.0f / l[g];
    for (int64_t i = 0; i < kV; ++i) {
      const float low = low_acc[g][(i * kLanes) / layout.value_group];
      vstore(out + g * kD + i * kLanes, vmul(vadd(acc[g][i], vset(low)), vset(inv)));
    }
  }
}

// The fast path's instance for (D, G), or null where it does not take the shape.
template <int64_t kBits>
using KiviRun = void (*)(const float*, float, const KiviKeys<kBits>&, const KiviValues<kBits>&, int64_t, const float*,
                         const float*, float*);

template <int64_t kBits, int64_t kD, int64_t kG>
KiviRun<kBits> fast_for_g(int64_t G) {
  if constexpr (kG > 8) {
    return nullptr;
  } else {
    return G == kG ? &attend_kivi_fast<kBits, kD, kG> : fast_for_g<kBits, kD, kG + 1>(G);
  }
}

template <int64_t kBits>
KiviRun<kBits> fast_kivi(const KiviLayout& layout, int64_t G, int64_t D) {
  if (!fast_kivi_takes(layout, G, D)) return nullptr;
  return D == 64 ? fast_for_g<kBits, 64, 1>(G) : fast_for_g<kBits, 128, 1>(G);
}
#else
template <int64_t kBits>
using KiviRun = void (*)(const float*, float, const KiviKeys<kBits>&, const KiviValues<kBits>&, int64_t, const float*,
                         const float*, float*);
template <int64_t kBits>
KiviRun<kBits> fast_kivi(const KiviLayout&, int64_t, int64_t) {
  return nullptr;
}
#endif

struct Shape {
  int64_t S, H, G, D;
};

// What both entries take alike: query [S, H, G, D] and fresh K/V [S, H, D] float32, read_index / starts / lengths
// int64, each sequence's keys inside read_index, at least its own new token.
Shape check_common(const at::Tensor& query, const at::Tensor& read_index, const at::Tensor& starts,
                   const at::Tensor& lengths, const at::Tensor& fresh_keys, const at::Tensor& fresh_values,
                   const char* entry) {
  TORCH_CHECK(query.dim() == 4 && query.scalar_type() == at::kFloat && query.is_contiguous(), "hf_vram ", entry,
              ": query must be contiguous float32 [S, kv_heads, group, head_dim]");
  const Shape shape{query.size(0), query.size(1), query.size(2), query.size(3)};
  for (const at::Tensor* t : {&fresh_keys, &fresh_values}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == shape.S &&
                    t->size(1) == shape.H && t->size(2) == shape.D,
                "hf_vram ", entry, ": fresh keys/values must be contiguous float32 [S, kv_heads, head_dim]");
  }
  for (const at::Tensor* t : {&read_index, &starts, &lengths}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1, "hf_vram ", entry,
                ": read_index, starts and lengths must be contiguous int64 vectors");
  }
  TORCH_CHECK(starts.size(0) == shape.S && lengths.size(0) == shape.S, "hf_vram ", entry,
              ": one start and one length per sequence");
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t s = 0; s < shape.S; ++s) {
    TORCH_CHECK(length[s] >= 1 && start[s] >= 0 && start[s] + length[s] <= read_index.size(0), "hf_vram ", entry,
                ": sequence ", s, " reads read_index[", start[s], ":", start[s] + length[s], "] of ", read_index.size(0),
                " (each sequence needs at least its own new token)");
  }
  return shape;
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
  const Shape shape = check_common(query, read_index, starts, lengths, fresh_keys, fresh_values, "paged_decode_int8");
  const int64_t S = shape.S, H = shape.H, G = shape.G, D = shape.D;
  const Rows keys = rows_of(key_rows, H, D, "key_rows"), values = rows_of(value_rows, H, D, "value_rows");
  const int64_t* index = read_index.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  const int64_t k_rows = key_rows.size(0), v_rows = value_rows.size(0);
  for (int64_t s = 0; s < S; ++s) {  // every row read must exist: a bad index is an error, never a stray read
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
  // the register-resident path reads int8 page rows as it reads a KIVI window's (KVCodec rows, scales after the codes)
  const KiviLayout layout{8, 1, H * D, 0, D, H, 0, nullptr, nullptr};
  const KiviRun<8> fast = fast_kivi<8>(layout, G, D);
  at::parallel_for(0, S * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / H, h = task % H;
      if (fast) {
        const KiviKeys<8> k{keys, nullptr, layout, h, index + start[s], nullptr, nullptr};
        const KiviValues<8> v{values, nullptr, layout, h, index + start[s], nullptr};
        fast(qp + task * G * D, static_cast<float>(scale), k, v, length[s] - 1, fk + task * D, fv + task * D,
             op + task * G * D);
        continue;
      }
      Int8Keys k{keys, h, index + start[s]};
      Int8Values v{values, h, index + start[s]};
      auto run = D == 64 ? attend<64, Int8Keys, Int8Values>
                 : D == 128 ? attend<128, Int8Keys, Int8Values> : attend<0, Int8Keys, Int8Values>;
      run(qp + task * G * D, static_cast<float>(scale), G, D, k, v, length[s] - 1, fk + task * D, fv + task * D,
          op + task * G * D);
    }
  });
  return out;
}

template <int64_t kBits>
void run_kivi(const at::Tensor& query, const KiviLayout& layout, const Rows& keys, const Rows& values,
              const uint8_t* window, const int64_t* index, const int64_t* pos, const int64_t* wk, const int64_t* wv,
              const int64_t* start, const int64_t* length, const at::Tensor& fresh_keys, const at::Tensor& fresh_values,
              float scale, at::Tensor& out) {
  const int64_t H = query.size(1), G = query.size(2), D = query.size(3);
  const float* qp = query.data_ptr<float>();
  const float* fk = fresh_keys.data_ptr<float>();
  const float* fv = fresh_values.data_ptr<float>();
  float* op = out.data_ptr<float>();
  using K = KiviKeys<kBits>;
  using V = KiviValues<kBits>;
  const KiviRun<kBits> fast = fast_kivi<kBits>(layout, G, D);
  at::parallel_for(0, query.size(0) * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / H, h = task % H, o = start[s];
      K k{keys, window, layout, h, index + o, pos + o, wk + o};
      V v{values, window, layout, h, index + o, wv + o};
      if (fast) {
        fast(qp + task * G * D, scale, k, v, length[s] - 1, fk + task * D, fv + task * D, op + task * G * D);
        continue;
      }
      k.scale.resize(D), k.low.resize(D), k.key.resize(D), k.turned.resize(D);
      k.slot_a.resize(D), k.slot_b.resize(D), k.slots.resize(D), k.slot_lo.resize(D), k.slot_hi.resize(D);
      v.scale.resize(D), v.low.resize(D);
      auto run = D == 64 ? attend<64, K, V> : D == 128 ? attend<128, K, V> : attend<0, K, V>;
      run(qp + task * G * D, scale, G, D, k, v, length[s] - 1, fk + task * D, fv + task * D, op + task * G * D);
    }
  });
}

// query [S, H, G, D] float32; key_rows / value_rows [R, row_bytes] uint8 (KIVI rows); read_index and positions
// (each read row's position in its sequence) [N] int64; starts / lengths [S]; window: the bytes the window offsets
// address, window_keys / window_values [N] int64 (-1: from the pages); cos / sin [P, D] float32 (P = 0: no frame);
// fresh_keys / fresh_values [S, H, D] float32. Returns [S, H, G, D] float32.
at::Tensor paged_decode_kivi(const at::Tensor& query, const at::Tensor& key_rows, const at::Tensor& value_rows,
                             const at::Tensor& read_index, const at::Tensor& positions, const at::Tensor& starts,
                             const at::Tensor& lengths, const at::Tensor& window, const at::Tensor& window_keys,
                             const at::Tensor& window_values, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& fresh_keys, const at::Tensor& fresh_values, double scale, int64_t bits,
                             int64_t group, int64_t code_bytes, int64_t key_meta_bytes, int64_t value_group,
                             int64_t rotary_pairs) {
  const Shape shape = check_common(query, read_index, starts, lengths, fresh_keys, fresh_values, "paged_decode_kivi");
  const int64_t S = shape.S, H = shape.H, G = shape.G, D = shape.D;
  TORCH_CHECK(D <= kMaxKiviHeadDim, "hf_vram paged_decode_kivi: head_dim ", D, " is over ", kMaxKiviHeadDim);
  // value_group 0: one symmetric scale a value row (WindowedKVCodec.row_scale), read as one group of D a head
  TORCH_CHECK((bits == 4 || bits == 2) && group > 0 && value_group >= 0 && (value_group == 0 || D % value_group == 0),
              "hf_vram paged_decode_kivi: bits must be 4 or 2 and the groups must divide");
  const bool row_scale = value_group == 0;
  const int64_t value_meta = row_scale ? 2 : H * (D / value_group) * 4, tail = key_meta_bytes - value_meta;
  TORCH_CHECK(code_bytes == H * D * bits / 8 && tail >= 0 && key_meta_bytes > 0 &&
                  (key_meta_bytes + tail) * group >= 2 * H * D * 2,
              "hf_vram paged_decode_kivi: code_bytes / key_meta_bytes do not match the heads");
  for (const at::Tensor* t : {&key_rows, &value_rows}) {
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kByte && t->stride(1) == 1 && t->size(1) >= code_bytes + key_meta_bytes,
                "hf_vram paged_decode_kivi: page rows must be uint8 [R, row_bytes] holding the codes and meta");
  }
  for (const at::Tensor* t : {&positions, &window_keys, &window_values}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1 && t->size(0) == read_index.size(0),
                "hf_vram paged_decode_kivi: positions and window offsets must be int64, one per read row");
  }
  TORCH_CHECK(window.scalar_type() == at::kByte && window.is_contiguous() && window.dim() == 1,
              "hf_vram paged_decode_kivi: window must be the flat uint8 bytes its offsets address");
  const bool pairs = cos.numel() > 0;
  TORCH_CHECK(!pairs || (rotary_pairs > 0 && 2 * rotary_pairs <= D), "hf_vram paged_decode_kivi: rotary_pairs ",
              rotary_pairs, " does not fit head_dim ", D);
  TORCH_CHECK(!cos.numel() || (cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                               sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == D && sin.sizes() == cos.sizes()),
              "hf_vram paged_decode_kivi: cos / sin must be contiguous float32 [positions, head_dim]");
  const int64_t* index = read_index.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* wk = window_keys.data_ptr<int64_t>();
  const int64_t* wv = window_values.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  const int64_t rows = std::min(key_rows.size(0), value_rows.size(0)), window_row = H * (D + 2);
  for (int64_t s = 0; s < S; ++s) {  // every byte read must exist: a bad index is an error, never a stray read
    for (int64_t t = start[s]; t < start[s] + length[s] - 1; ++t) {
      TORCH_CHECK(wk[t] >= 0 || (index[t] >= 0 && (index[t] / group + 1) * group <= rows),
                  "hf_vram paged_decode_kivi: read index ", index[t], " (with its key group) is outside the ", rows,
                  " page rows");
      TORCH_CHECK(wv[t] >= 0 || (index[t] >= 0 && index[t] < rows), "hf_vram paged_decode_kivi: read index ",
                  index[t], " is outside the ", rows, " page rows");
      for (const int64_t at : {wk[t], wv[t]}) {
        TORCH_CHECK(at < 0 || at + window_row <= window.numel(), "hf_vram paged_decode_kivi: window offset ", at,
                    " is outside the window's ", window.numel(), " bytes");
      }
      TORCH_CHECK(!pairs || (pos[t] >= 0 && pos[t] < cos.size(0)), "hf_vram paged_decode_kivi: position ", pos[t],
                  " has no rotary angle (", cos.size(0), " given)");
    }
  }
  // the tables' channel count is D; `pairs` rotary pairs are the first 2 * pairs channels (RopeFrame's layout)
  const KiviLayout layout{bits, group, code_bytes, key_meta_bytes, row_scale ? D : value_group, H, pairs ? rotary_pairs : 0,
                          pairs ? cos.data_ptr<float>() : nullptr, pairs ? sin.data_ptr<float>() : nullptr,
                          row_scale ? static_cast<float>((1 << bits) - 1) / 2.0f : 0.0f, value_meta,
                          value_rows.data_ptr<uint8_t>(), value_rows.stride(0)};
  at::Tensor out = at::empty(query.sizes(), query.options());
  const Rows keys{key_rows.data_ptr<uint8_t>(), key_rows.stride(0), code_bytes};
  const Rows values{value_rows.data_ptr<uint8_t>(), value_rows.stride(0), code_bytes};
  const uint8_t* wbytes = window.data_ptr<uint8_t>();
  if (bits == 4) {
    run_kivi<4>(query, layout, keys, values, wbytes, index, pos, wk, wv, start, length, fresh_keys, fresh_values,
                static_cast<float>(scale), out);
  } else {
    run_kivi<2>(query, layout, keys, values, wbytes, index, pos, wk, wv, start, length, fresh_keys, fresh_values,
                static_cast<float>(scale), out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(hf_vram_cpu, m) {
  m.def(
      "paged_decode_int8(Tensor query, Tensor key_rows, Tensor value_rows, Tensor read_index, Tensor starts, "
      "Tensor lengths, Tensor fresh_keys, Tensor fresh_values, float scale) -> Tensor");
  m.impl("paged_decode_int8", c10::DispatchKey::CPU, &paged_decode_int8);
  m.def(
      "paged_decode_kivi(Tensor query, Tensor key_rows, Tensor value_rows, Tensor read_index, Tensor positions, "
      "Tensor starts, Tensor lengths, Tensor window, Tensor window_keys, Tensor window_values, Tensor cos, Tensor sin, "
      "Tensor fresh_keys, Tensor fresh_values, float scale, int bits, int group, int code_bytes, int key_meta_bytes, "
      "int value_group, int rotary_pairs) -> Tensor");
  m.impl("paged_decode_kivi", c10::DispatchKey::CPU, &paged_decode_kivi);
}
