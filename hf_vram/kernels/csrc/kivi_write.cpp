// Quantize whole KIVI groups (hf_vram.kvcache.kivi.WindowedKVCodec) from the int8 rows they were held in: the seal
// of the int4/int2 pages, one pass in place of torch's (window read, rotary turn back, per-channel range, rounding,
// packing, meta spread over the group's rows, and the same per token for the values): some forty small ops per
// layer for a group or two, which cost 0.1-0.4 ms each time in dispatch alone.
//
// In: int8 KVCodec rows (H*D codes, then H float16 scales) at byte offsets, each group's `group` rows in order,
// decoded as torch decodes them into the model's dtype (code times the scale in that dtype, rounded to it); keys
// turned back by the signed cos / sin tables of their positions (RopeFrame.turn: x * cos, plus the partner half
// times sin), then per channel over the group (scale, low) = fp16((max - low) / levels), fp16(min) (or, with `clip`,
// the range shrunk about its middle by the ratio of least squared error), codes round_half_even((x - low) / scale)
// clamped (at 2 bits each channel given 0, 2 or 4 bits as kivi.key_widths gives them, its codes in 2-bit slots);
// values per token and group of `value_group` channels, min-max (value_group 0: one symmetric scale a row, its codes
// round(x / scale + levels / 2)), the key group's meta past the key rows' meta bytes in the value rows'. Out: the groups' key rows and value rows
// [n * group, row_bytes], laid out as WindowedKVCodec.encode_keys / encode_values lay them out. The float32
// arithmetic follows the codec's order; where the compiler fuses a multiply-add the rounding of a turned key can
// differ in its last bit, so a code may differ by one at an exact tie (tested against the codec).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int kRatios = 13;  // hf_vram.kvcache.kivi.CLIP_RATIOS: 1.0, 0.95, ..., 0.4

inline float round_to(float x, int64_t dtype) {  // 0: float32, 1: bfloat16, 2: float16
  if (dtype == 1) return static_cast<float>(c10::BFloat16(x));
  if (dtype == 2) return static_cast<float>(c10::Half(x));
  return x;
}

inline float half_at(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
}

inline void put_half(uint8_t* p, float x) {
  const c10::Half h(x);
  std::memcpy(p, &h, sizeof(h));
}

// Row r of an int8 KVCodec row, head h, as the model's dtype holds it: torch converts the float16 scale to that
// dtype, then multiplies (an int8 code is exact in every float dtype).
inline void decode_int8(const uint8_t* row, int64_t H, int64_t D, int64_t h, int64_t dtype, float* out) {
  const float scale = round_to(half_at(row + H * D + 2 * h), dtype);
  const int8_t* codes = reinterpret_cast<const int8_t*>(row) + h * D;
  for (int64_t d = 0; d < D; ++d) out[d] = round_to(static_cast<float>(codes[d]) * scale, dtype);
}

struct Quantized {
  float scale, low;  // as stored: float16 values
};

// (scale, low) of x[0..n) (stride `step`) min-max, or clipped to the ratio of least squared error.
Quantized channel_range(const float* x, int64_t n, int64_t step, int levels, bool clip) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) lo = std::min(lo, x[i * step]), hi = std::max(hi, x[i * step]);
  auto range = [&](float a, float b) {
    const float low = static_cast<float>(c10::Half(a));
    return Quantized{static_cast<float>(c10::Half((b - low) / static_cast<float>(levels))), low};
  };
  if (!clip) return range(lo, hi);
  const float middle = (lo + hi) / 2.0f, half = (hi - lo) / 2.0f;
  Quantized best{};
  float best_error = 0.0f;
  for (int r = 0; r < kRatios; ++r) {
    const float ratio = static_cast<float>(1.0 - 0.05 * r);
    const float low = static_cast<float>(c10::Half(middle - half * ratio));
    const Quantized q{static_cast<float>(c10::Half((middle + half * ratio - low) / static_cast<float>(levels))), low};
    const float denom = std::max(q.scale, 1e-8f);
    float error = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float c = std::min(static_cast<float>(levels), std::max(0.0f, std::nearbyint((x[i * step] - q.low) / denom)));
      const float e = c * q.scale + q.low - x[i * step];
      error += e * e;
    }
    if (r == 0 || error < best_error) best = q, best_error = error;
  }
  return best;
}

inline int code_of(float x, const Quantized& q, int levels) {
  return static_cast<int>(
      std::min(static_cast<float>(levels), std::max(0.0f, std::nearbyint((x - q.low) / std::max(q.scale, 1e-8f)))));
}

inline void put_bits(uint8_t* codes, int64_t index, int64_t bits, int code) {
  const int64_t per_byte = 8 / bits;
  codes[index / per_byte] |= static_cast<uint8_t>(code << (bits * (index % per_byte)));
}

inline void put_code(uint8_t* codes, int64_t index, int64_t bits, float x, const Quantized& q) {
  put_bits(codes, index, bits, code_of(x, q, (1 << bits) - 1));
}

// Squared error (double) of x[0..n) (stride `step`) rounded by q at `levels`.
double rounding_error(const float* x, int64_t n, int64_t step, const Quantized& q, int levels) {
  double error = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = static_cast<double>(code_of(x[i * step], q, levels)) * q.scale + q.low - x[i * step];
    error += e * e;
  }
  return error;
}

constexpr float kTinyScale = 5.9604644775390625e-08f;  // 2^-24, float16's least positive value (kivi.TINY_SCALE)

// kivi.key_widths for one (group, head): x [group, D] turned-back keys -> each channel's stored (scale, low) (the
// width in the scale: 0, positive 2 bits, negative 4 bits) and the group's slot codes written into the key rows
// (`out` the group's first row, codes of head h at h * D slots).
void put_key_widths(const float* x, int64_t group, int64_t D, int64_t h, uint8_t* out, int64_t row_bytes,
                    float* scale_out, float* low_out) {
  std::vector<Quantized> two(D), four(D);
  std::vector<double> gains(2 * D);
  std::vector<int> slots(D, 0);
  for (int64_t d = 0; d < D; ++d) {
    double sum = 0.0;
    for (int64_t t = 0; t < group; ++t) sum += x[t * D + d];
    low_out[d] = static_cast<float>(c10::Half(static_cast<float>(sum / static_cast<double>(group))));
    double flat = 0.0;
    for (int64_t t = 0; t < group; ++t) {
      const double e = static_cast<double>(low_out[d]) - x[t * D + d];
      flat += e * e;
    }
    two[d] = channel_range(x + d, group, D, 3, true);
    four[d] = channel_range(x + d, group, D, 15, true);
    const double e2 = rounding_error(x + d, group, D, two[d], 3), e4 = rounding_error(x + d, group, D, four[d], 15);
    gains[d] = flat - e2;
    gains[D + d] = std::min(e2 - e4, flat - e2);
  }
  std::vector<int64_t> order(2 * D);
  for (int64_t i = 0; i < 2 * D; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return gains[a] > gains[b]; });
  for (int64_t i = 0; i < D; ++i) ++slots[order[i] % D];
  int64_t slot = h * D;
  for (int64_t d = 0; d < D; ++d) {
    if (slots[d] == 0) {
      scale_out[d] = 0.0f;
      continue;
    }
    const Quantized& q = slots[d] == 2 ? four[d] : two[d];
    const int levels = slots[d] == 2 ? 15 : 3;
    scale_out[d] = slots[d] == 2 ? -std::max(q.scale, kTinyScale) : std::max(q.scale, kTinyScale);
    low_out[d] = q.low;
    for (int64_t t = 0; t < group; ++t) {
      const int code = code_of(x[t * D + d], q, levels);
      put_bits(out + t * row_bytes, slot, 2, code & 3);
      if (slots[d] == 2) put_bits(out + t * row_bytes, slot + 1, 2, code >> 2);
    }
    slot += slots[d];
  }
}

std::tuple<at::Tensor, at::Tensor> kivi_encode_from_int8(
    const at::Tensor& bytes, const at::Tensor& key_offsets, const at::Tensor& value_offsets, const at::Tensor& cos,
    const at::Tensor& sin, int64_t heads, int64_t head_dim, int64_t bits, int64_t group, int64_t value_group,
    int64_t rotary_pairs, bool clip, int64_t code_bytes, int64_t key_meta_bytes, int64_t row_bytes, int64_t dtype) {
  const int64_t H = heads, D = head_dim, int8_row = H * (D + 2);
  TORCH_CHECK(bytes.dim() == 1 && bytes.is_contiguous() && bytes.scalar_type() == at::kByte,
              "hf_vram kivi_encode_from_int8: bytes must be the flat uint8 tensor the offsets address");
  // value_group 0: one symmetric float16 scale a value row; else a (scale, low) per head and group of channels
  TORCH_CHECK(value_group >= 0 && (value_group == 0 || D % value_group == 0),
              "hf_vram kivi_encode_from_int8: value_group must be 0 or divide head_dim");
  const int64_t value_meta = value_group ? H * (D / value_group) * 4 : 2, key_tail = key_meta_bytes - value_meta;
  TORCH_CHECK((bits == 4 || bits == 2) && group > 0 && dtype >= 0 && dtype <= 2 && code_bytes == H * D * bits / 8 &&
                  key_tail >= 0 && (key_meta_bytes + key_tail) * group >= 2 * H * D * 2 &&
                  row_bytes >= code_bytes + key_meta_bytes,
              "hf_vram kivi_encode_from_int8: the layout (bits, groups, bytes) does not fit the heads");
  for (const at::Tensor* t : {&key_offsets, &value_offsets}) {
    TORCH_CHECK(t->dim() == 1 && t->is_contiguous() && t->scalar_type() == at::kLong && t->size(0) % group == 0 &&
                    t->size(0) == key_offsets.size(0),
                "hf_vram kivi_encode_from_int8: offsets must be int64, whole groups, as many for keys as for values");
    const int64_t* at = t->data_ptr<int64_t>();
    for (int64_t r = 0; r < t->size(0); ++r) {  // every byte read must exist
      TORCH_CHECK(at[r] >= 0 && at[r] + int8_row <= bytes.numel(), "hf_vram kivi_encode_from_int8: a row at byte ",
                  at[r], " is outside the ", bytes.numel(), " bytes");
    }
  }
  const int64_t rows = key_offsets.size(0), n = rows / group, pairs = cos.numel() ? rotary_pairs : 0;
  TORCH_CHECK(!cos.numel() || (cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                               sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == rows && cos.size(1) == D &&
                               sin.sizes() == cos.sizes() && pairs > 0 && 2 * pairs <= D),
              "hf_vram kivi_encode_from_int8: cos / sin must be contiguous float32 [rows, head_dim] with the rotary pairs");
  at::Tensor key_rows = at::zeros({rows, row_bytes}, bytes.options());
  at::Tensor value_rows = at::zeros({rows, row_bytes}, bytes.options());
  const uint8_t* src = bytes.data_ptr<uint8_t>();
  const int64_t* ko = key_offsets.data_ptr<int64_t>();
  const int64_t* vo = value_offsets.data_ptr<int64_t>();
  const float* cp = pairs ? cos.data_ptr<float>() : nullptr;
  const float* sp = pairs ? sin.data_ptr<float>() : nullptr;
  uint8_t* kout = key_rows.data_ptr<uint8_t>();
  uint8_t* vout = value_rows.data_ptr<uint8_t>();
  const int levels = (1 << bits) - 1;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(group * D), raw(H * D), meta(2 * H * D);
    std::vector<uint8_t> meta_bytes(group * (key_meta_bytes + key_tail));
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * group;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t t = 0; t < group; ++t) {  // the group's keys of head h, turned back: x [t, d]
          float* xt = x.data() + t * D;
          if (!pairs) {
            decode_int8(src + ko[first + t], H, D, h, dtype, xt);
            continue;
          }
          decode_int8(src + ko[first + t], H, D, h, dtype, raw.data());
          const float* c = cp + (first + t) * D;
          const float* s = sp + (first + t) * D;
          for (int64_t d = 0; d < D; ++d) xt[d] = raw[d] * c[d];
          for (int64_t i = 0; i < pairs; ++i) {
            xt[i] += raw[i + pairs] * s[i];
            xt[i + pairs] += raw[i] * s[i + pairs];
          }
        }
        if (bits == 2) {  // kivi.WIDTH_BITS: each channel 0, 2 or 4 bits
          put_key_widths(x.data(), group, D, h, kout + first * row_bytes, row_bytes, meta.data() + h * D,
                         meta.data() + (H + h) * D);
          continue;
        }
        for (int64_t d = 0; d < D; ++d) {
          const Quantized q = channel_range(x.data() + d, group, D, levels, clip);
          meta[h * D + d] = q.scale, meta[(H + h) * D + d] = q.low;
          for (int64_t t = 0; t < group; ++t) put_code(kout + (first + t) * row_bytes, h * D + d, bits, x[t * D + d], q);
        }
      }
      std::fill(meta_bytes.begin(), meta_bytes.end(), 0);
      for (int64_t i = 0; i < 2 * H * D; ++i) put_half(meta_bytes.data() + 2 * i, meta[i]);
      for (int64_t t = 0; t < group; ++t) {
        std::memcpy(kout + (first + t) * row_bytes + code_bytes, meta_bytes.data() + t * key_meta_bytes, key_meta_bytes);
      }
      for (int64_t t = 0; t < group; ++t) {  // values: per token (and group of channels), then the key meta's rest
        uint8_t* row = vout + (first + t) * row_bytes;
        if (value_group == 0) {  // WindowedKVCodec.row_scale: levels symmetric about zero, one scale for the row
          const float half = static_cast<float>(levels) / 2.0f;
          float top = 0.0f;
          for (int64_t h = 0; h < H; ++h) decode_int8(src + vo[first + t], H, D, h, dtype, raw.data() + h * D);
          for (int64_t i = 0; i < H * D; ++i) top = std::max(top, std::abs(raw[i]));
          const float scale = static_cast<float>(c10::Half(top / half)), denom = std::max(scale, 1e-8f);
          put_half(row + code_bytes, scale);
          for (int64_t i = 0; i < H * D; ++i) {
            const float c = std::min(static_cast<float>(levels), std::max(0.0f, std::nearbyint(raw[i] / denom + half)));
            put_bits(row, i, bits, static_cast<int>(c));
          }
        } else {
          const int64_t groups = D / value_group;
          for (int64_t h = 0; h < H; ++h) {
            decode_int8(src + vo[first + t], H, D, h, dtype, raw.data());
            for (int64_t j = 0; j < groups; ++j) {
              const Quantized q = channel_range(raw.data() + j * value_group, value_group, 1, levels, false);
              uint8_t* m = row + code_bytes + ((h * groups + j) * 2) * 2;
              put_half(m, q.scale), put_half(m + 2, q.low);
              for (int64_t d = j * value_group; d < (j + 1) * value_group; ++d) put_code(row, h * D + d, bits, raw[d], q);
            }
          }
        }
        if (key_tail) {
          std::memcpy(row + code_bytes + value_meta, meta_bytes.data() + group * key_meta_bytes + t * key_tail, key_tail);
        }
      }
    }
  });
  return {key_rows, value_rows};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_vram_cpu, m) {
  m.def(
      "kivi_encode_from_int8(Tensor bytes, Tensor key_offsets, Tensor value_offsets, Tensor cos, Tensor sin, "
      "int heads, int head_dim, int bits, int group, int value_group, int rotary_pairs, bool clip, int code_bytes, "
      "int key_meta_bytes, int row_bytes, int dtype) -> (Tensor, Tensor)");
  m.impl("kivi_encode_from_int8", c10::DispatchKey::CPU, &kivi_encode_from_int8);
}
