// y[t, o] = sum_i s[o, i] u[t, i] with s = +1 where bit i of row o is set, else -1: the binary
// product every sign-only scheme deploys as (fbi/kernels/linear.py applies the scales).
// bits: uint8 (rows, nb), nb a multiple of 8, bit j of byte k is weight 8k + j (the packed
// export's order, fbi/binarize/packing.py). u: float32 (n, 8 nb), zero beyond in_features.
//
// Built for the host it runs on (-march=native, one build folder per CPU, fbi/kernels/cpu.py).
// AVX-512 adds u under the bit mask itself (16 weights an instruction, no unpacking): the
// positive part P = sum over set bits, then y = 2 P - sum(u). AVX2 flips u's sign bits with a
// 256-entry table of lane masks. The plain loop serves any other CPU. Each is tiled R rows x
// T tokens: a load of u serves R rows, a row's mask serves T tokens, and the R x T
// accumulators are independent chains that keep both add ports busy.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
const char* kPath = "avx512";

template <int R, int T>
void tile(const uint8_t* bits, const float* u, float* y, int64_t nb, int64_t rows, int64_t o,
          int64_t t0, int64_t k0, int64_t k1) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t width = 8 * nb;
  for (int64_t k = k0; k < k1; k += 8) {  // 64 weights a step
    uint64_t m[R];
    for (int r = 0; r < R; ++r) std::memcpy(&m[r], bits + (o + r) * nb + k, 8);
    for (int j = 0; j < 4; ++j) {
      __m512 v[T];
      for (int t = 0; t < T; ++t) v[t] = _mm512_loadu_ps(u + (t0 + t) * width + 8 * k + 16 * j);
      for (int r = 0; r < R; ++r) {
        const __mmask16 mask = (__mmask16)(m[r] >> (16 * j));
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_mask_add_ps(acc[r][t], mask, acc[r][t], v[t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      y[(t0 + t) * rows + o + r] += 2.0f * _mm512_reduce_add_ps(acc[r][t]);
}
const bool kPositiveSums = true;  // y = 2 P - sum(u)
#elif defined(__AVX2__)
const char* kPath = "avx2";
struct FlipTable {
  alignas(32) uint32_t lanes[256][8];  // 0x80000000 (flip the sign) where the bit is 0
  FlipTable() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) lanes[b][j] = ((b >> j) & 1) ? 0u : 0x80000000u;
  }
};
const FlipTable kFlip;

inline float hsum(__m256 s) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

template <int R, int T>
void tile(const uint8_t* bits, const float* u, float* y, int64_t nb, int64_t rows, int64_t o,
          int64_t t0, int64_t k0, int64_t k1) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t width = 8 * nb;
  for (int64_t k = k0; k < k1; ++k) {  // 8 weights a step
    __m256 v[T];
    for (int t = 0; t < T; ++t) v[t] = _mm256_loadu_ps(u + (t0 + t) * width + 8 * k);
    for (int r = 0; r < R; ++r) {
      const __m256 flip =
          _mm256_load_ps(reinterpret_cast<const float*>(kFlip.lanes[bits[(o + r) * nb + k]]));
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_add_ps(acc[r][t], _mm256_xor_ps(v[t], flip));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[(t0 + t) * rows + o + r] += hsum(acc[r][t]);
}
const bool kPositiveSums = false;
#else
const char* kPath = "portable";

template <int R, int T>
void tile(const uint8_t* bits, const float* u, float* y, int64_t nb, int64_t rows, int64_t o,
          int64_t t0, int64_t k0, int64_t k1) {
  const int64_t width = 8 * nb;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      const uint8_t* b = bits + (o + r) * nb;
      const float* x = u + (t0 + t) * width;
      float acc = 0.0f;
      for (int64_t i = 8 * k0; i < 8 * k1; ++i) acc += ((b[i >> 3] >> (i & 7)) & 1) ? x[i] : -x[i];
      y[(t0 + t) * rows + o + r] += acc;
    }
}
const bool kPositiveSums = false;
#endif

// Rows [r0, r1) for every token, over the features in chunks of kChunkBytes bytes (so that T
// tokens' slice of u stays in L1 while the rows pass): full R x T tiles, then the leftover
// rows and tokens one at a time.
constexpr int64_t kChunkBytes = 128;  // 1024 features: 4 KB of u a token

template <int R, int T>
void rows_block(const uint8_t* bits, const float* u, float* y, int64_t nb, int64_t rows,
                int64_t n, int64_t r0, int64_t r1) {
  for (int64_t k0 = 0; k0 < nb; k0 += kChunkBytes) {
    const int64_t k1 = std::min(nb, k0 + kChunkBytes);
    int64_t o = r0;
    for (; o + R <= r1; o += R) {
      int64_t t = 0;
      for (; t + T <= n; t += T) tile<R, T>(bits, u, y, nb, rows, o, t, k0, k1);
      for (; t < n; ++t) tile<R, 1>(bits, u, y, nb, rows, o, t, k0, k1);
    }
    for (; o < r1; ++o)
      for (int64_t t = 0; t < n; ++t) tile<1, 1>(bits, u, y, nb, rows, o, t, k0, k1);
  }
}

}  // namespace

torch::Tensor sign_matmul(torch::Tensor bits, torch::Tensor u) {
  TORCH_CHECK(bits.dtype() == torch::kUInt8 && bits.dim() == 2 && bits.is_contiguous(),
              "bits: a contiguous uint8 (rows, bytes) tensor");
  TORCH_CHECK(bits.size(1) % 8 == 0, "bits: ", bits.size(1), " bytes a row, not a multiple of 8");
  TORCH_CHECK(u.dtype() == torch::kFloat32 && u.dim() == 2 && u.is_contiguous(),
              "u: a contiguous float32 (tokens, features) tensor");
  const int64_t rows = bits.size(0), nb = bits.size(1), n = u.size(0);
  TORCH_CHECK(u.size(1) == 8 * nb, "u: ", u.size(1), " features, the bits hold ", 8 * nb);
  auto y = torch::zeros({n, rows}, u.options());
  const uint8_t* pb = bits.data_ptr<uint8_t>();
  const float* pu = u.data_ptr<float>();
  float* py = y.data_ptr<float>();
  // Threads take blocks of rows; a block's bits stay in cache while the tokens pass over them.
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    if (n == 1)
      rows_block<8, 1>(pb, pu, py, nb, rows, n, r0, r1);
    else
      rows_block<4, 4>(pb, pu, py, nb, rows, n, r0, r1);
  });
  if (kPositiveSums) y.sub_(u.sum(1, /*keepdim=*/true));
  return y;
}

// +-1 float32 (rows, 8 nb) from bits (rows, nb): prefill's blocks for a dense GEMM, whose fused
// multiply-adds outrun the masked adds above once each bit serves many tokens.
// Written into ``w`` (a reused buffer: a fresh one pays its page faults at every block).
torch::Tensor unpack(torch::Tensor bits, torch::Tensor w) {
  TORCH_CHECK(bits.dtype() == torch::kUInt8 && bits.dim() == 2 && bits.is_contiguous(),
              "bits: a contiguous uint8 (rows, bytes) tensor");
  const int64_t rows = bits.size(0), nb = bits.size(1);
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous() && w.numel() >= rows * 8 * nb,
              "w: a contiguous float32 buffer of at least ", rows * 8 * nb, " values");
  const uint8_t* pb = bits.data_ptr<uint8_t>();
  float* pw = w.data_ptr<float>();
  at::parallel_for(0, rows * nb, 4096, [&](int64_t b0, int64_t b1) {
#if defined(__AVX512F__)
    const __m512 plus = _mm512_set1_ps(1.0f), minus = _mm512_set1_ps(-1.0f);
    int64_t b = b0;
    for (; b + 2 <= b1; b += 2) {
      uint16_t m;
      std::memcpy(&m, pb + b, 2);
      _mm512_storeu_ps(pw + 8 * b, _mm512_mask_blend_ps((__mmask16)m, minus, plus));
    }
    for (; b < b1; ++b)
      for (int j = 0; j < 8; ++j) pw[8 * b + j] = ((pb[b] >> j) & 1) ? 1.0f : -1.0f;
#else
    for (int64_t b = b0; b < b1; ++b)
      for (int j = 0; j < 8; ++j) pw[8 * b + j] = ((pb[b] >> j) & 1) ? 1.0f : -1.0f;
#endif
  });
  return w.view(-1).narrow(0, 0, rows * 8 * nb).view({rows, 8 * nb});
}

std::string simd_path() { return kPath; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_matmul", &sign_matmul, "binary (+-1 bits) matrix times float32 tokens");
  m.def("unpack", &unpack, "+-1 float32 rows from their bits");
  m.def("simd_path", &simd_path, "the SIMD path this build compiled");
}
