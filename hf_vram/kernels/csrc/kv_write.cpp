// Quantize K or V states into int8 rows at byte offsets: the write side of hf_vram's int8 pages and of the int4/int2
// pages' int8 window, one pass in place of torch's eight (amax, divide, round, clamp, cast, cat, index math, scatter),
// each a dispatch for a step's few decoding tokens.
//
// A row (hf_vram.kvcache.codec.KVCodec) is H*D int8 codes, then H float16 scales: per head scale = fp16(amax / 127),
// code = round_half_even(x / max(float(scale), 1e-8)) clamped to [-127, 127], the same float32 operations in the same
// order as KVCodec.encode, so both write identical bytes (tested bit for bit).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

template <typename T>
void write_rows(const T* states, int64_t n, int64_t H, int64_t D, uint8_t* bytes, const int64_t* offsets) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* row = bytes + offsets[r];
      const T* x = states + r * H * D;
      for (int64_t h = 0; h < H; ++h) {
        float amax = 0.0f;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(static_cast<float>(x[h * D + d])));
        const c10::Half scale(amax / 127.0f);
        std::memcpy(row + H * D + h * sizeof(c10::Half), &scale, sizeof(c10::Half));
        const float denom = std::max(static_cast<float>(scale), 1e-8f);
        int8_t* codes = reinterpret_cast<int8_t*>(row + h * D);
        for (int64_t d = 0; d < D; ++d) {
          const float q = std::nearbyint(static_cast<float>(x[h * D + d]) / denom);
          codes[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
        }
      }
    }
  });
}

void quantize_rows_int8(const at::Tensor& states, at::Tensor& bytes, const at::Tensor& offsets) {
  TORCH_CHECK(states.dim() == 3 && states.is_contiguous(),
              "hf_vram quantize_rows_int8: states must be contiguous [n, heads, head_dim]");
  TORCH_CHECK(bytes.dim() == 1 && bytes.is_contiguous() && bytes.scalar_type() == at::kByte,
              "hf_vram quantize_rows_int8: bytes must be the flat uint8 tensor the offsets address");
  TORCH_CHECK(offsets.dim() == 1 && offsets.is_contiguous() && offsets.scalar_type() == at::kLong &&
                  offsets.size(0) == states.size(0),
              "hf_vram quantize_rows_int8: offsets must be int64, one per row of states");
  const int64_t n = states.size(0), H = states.size(1), D = states.size(2), row_bytes = H * (D + 2);
  const int64_t* at = offsets.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {  // every byte written must exist: a bad offset is an error, never a stray write
    TORCH_CHECK(at[r] >= 0 && at[r] + row_bytes <= bytes.numel(), "hf_vram quantize_rows_int8: a row at byte ", at[r],
                " does not fit the ", bytes.numel(), " bytes");
  }
  uint8_t* out = bytes.data_ptr<uint8_t>();
  switch (states.scalar_type()) {
    case at::kBFloat16:
      write_rows(states.data_ptr<c10::BFloat16>(), n, H, D, out, at);
      break;
    case at::kHalf:
      write_rows(states.data_ptr<c10::Half>(), n, H, D, out, at);
      break;
    case at::kFloat:
      write_rows(states.data_ptr<float>(), n, H, D, out, at);
      break;
    default:
      TORCH_CHECK(false, "hf_vram quantize_rows_int8: states must be bfloat16, float16 or float32, not ",
                  states.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_vram_cpu, m) {
  m.def("quantize_rows_int8(Tensor states, Tensor(a!) bytes, Tensor offsets) -> ()");
  m.impl("quantize_rows_int8", c10::DispatchKey::CPU, &quantize_rows_int8);
}
