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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
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

// Decode's layer: y = out_scale * (S (in_scale * x)) + beta_out * (beta_in . x), S the sum of
// ``planes`` sign matrices (fbi/kernels/forms.py), a scale left out being ones and the rank-1
// term absent when both betas are. An output's vector may be one value for all.
namespace {
struct Scales {
  const float* in = nullptr;  // (in,)
  const float* out = nullptr;  // (out,) or (1,)
  const float* beta_in = nullptr;  // (in,)
  const float* beta_out = nullptr;  // (out,) or (1,)
  bool out_one = false, beta_out_one = false;
  bool rank1() const { return beta_in || beta_out; }
};

// u = in_scale * x over in features, zero up to width (the padding adds nothing); returns the
// rank-1 term's dot product beta_in . x (0 without the term)
float scale_input(const float* x, const Scales& s, int64_t in, int64_t width, float* u) {
  if (s.in)
    for (int64_t i = 0; i < in; ++i) u[i] = x[i] * s.in[i];
  else
    std::memcpy(u, x, in * sizeof(float));
  std::fill(u + in, u + width, 0.0f);
  if (!s.rank1()) return 0.0f;
  float dot = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  // 16 partial sums: one chain of dependent adds would take 4 cycles an input
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= in; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = s.beta_in ? _mm512_fmadd_ps(v, _mm512_loadu_ps(s.beta_in + i), acc) : _mm512_add_ps(acc, v);
  }
  dot = _mm512_reduce_add_ps(acc);
#endif
  for (; i < in; ++i) dot += s.beta_in ? x[i] * s.beta_in[i] : x[i];
  return dot;
}

// output o of a token from its sign product v and dot product
inline float finish(float v, int64_t o, float dot, const Scales& s) {
  if (s.out) v *= s.out[s.out_one ? 0 : o];
  if (s.rank1()) v += s.beta_out ? dot * s.beta_out[s.beta_out_one ? 0 : o] : dot;
  return v;
}
}  // namespace

// Decode by table lookup (AVX-512; T-MAC's idea in float32): for each group of 4 inputs, the
// 16 sums +-u0 +-u1 +-u2 +-u3 form a table; a row's 4 bits of that group index it. With the
// bits of 16 rows laid side by side (fbi/kernels/cpu.py's lut_layout: byte k of rows 16b..16b+15
// together, each plane's rows padded to a whole block), one _mm512_permutexvar_ps looks up 16
// rows x 4 weights, where the masked adds take 16 weights.
#if defined(__AVX512F__)

namespace {
inline __mmask16 lanes16(int64_t left) {  // the first min(left, 16) lanes
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// T[16 g + c] = sum_j (bit j of c ? u[4g + j] : -u[4g + j]) for the groups of u (8 nb inputs)
void lut_tables(const float* u, float* table, int64_t groups) {
  __m512 sign[4];
  for (int j = 0; j < 4; ++j) {
    alignas(64) float lanes[16];
    for (int c = 0; c < 16; ++c) lanes[c] = ((c >> j) & 1) ? 1.0f : -1.0f;
    sign[j] = _mm512_load_ps(lanes);
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512 t = _mm512_mul_ps(_mm512_set1_ps(u[4 * g]), sign[0]);
    for (int j = 1; j < 4; ++j) t = _mm512_fmadd_ps(_mm512_set1_ps(u[4 * g + j]), sign[j], t);
    _mm512_storeu_ps(table + 16 * g, t);
  }
}

// The 16 rows' sums of one block (p: its nb x 16 bytes), its whole rows in one pass: the layout
// is then read as one stream, prefetched ahead (a token's tables, 16 floats an input, stay in
// L1/L2); passes over chunks of the row across all blocks read 3x slower from memory.
inline __m512 lut_block(const uint8_t* p, const float* table, int64_t nb) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  for (int64_t k = 0; k < nb; k += 2) {  // nb is a multiple of 8
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + 256) * 16), _MM_HINT_T0);
    for (int h = 0; h < 2; ++h) {
      const __m512i v =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (k + h) * 16)));
      const float* t = table + 32 * (k + h);  // the byte's two groups: low, then high nibble
      acc[2 * h] = _mm512_add_ps(acc[2 * h], _mm512_permutexvar_ps(v, _mm512_loadu_ps(t)));
      acc[2 * h + 1] = _mm512_add_ps(
          acc[2 * h + 1], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), _mm512_loadu_ps(t + 16)));
    }
  }
  return _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
}

// The whole layer in one parallel region: each thread scales the tokens and builds their tables
// itself (a few microseconds, less than reading them from another core's cache), then sums and
// finishes its own blocks of rows, each block for every token while its bits are in L1.
torch::Tensor lut_linear(const torch::Tensor& lut, const torch::Tensor& x, int64_t out,
                         const Scales& s) {
  const int64_t planes = lut.size(0), blocks = lut.size(1), nb = lut.size(2);
  const int64_t n = x.size(0), in = x.size(1), width = 8 * nb;
  auto y = torch::empty({n, out}, x.options());
  const uint8_t* pl = lut.data_ptr<uint8_t>();
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    // grown, never freed: a fresh buffer of this size would pay its page faults at every call
    thread_local std::vector<float> u, storage, dots;
    u.resize(width), storage.resize(n * 32 * nb + 16), dots.resize(n);
    // on a cache line: an unaligned table's every load would span two
    float* tables = storage.data() + (16 - reinterpret_cast<uintptr_t>(storage.data()) / 4 % 16) % 16;
    for (int64_t t = 0; t < n; ++t) {
      dots[t] = scale_input(px + t * in, s, in, width, u.data());
      lut_tables(u.data(), tables + t * 32 * nb, 2 * nb);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = 16 * b, left = out - o0;
      const __mmask16 lanes = lanes16(left);
      for (int64_t t = 0; t < n; ++t) {
        __m512 v = lut_block(pl + b * nb * 16, tables + t * 32 * nb, nb);
        if (planes == 2)
          v = _mm512_add_ps(v, lut_block(pl + (blocks + b) * nb * 16, tables + t * 32 * nb, nb));
        alignas(64) float sums[16];
        _mm512_store_ps(sums, v);
        for (int64_t r = 0; r < std::min<int64_t>(left, 16); ++r)
          sums[r] = finish(sums[r], o0 + r, dots[t], s);
        _mm512_mask_storeu_ps(py + t * out + o0, lanes, _mm512_load_ps(sums));
      }
    }
  });
  return y;
}
}  // namespace
#endif

// Decode's whole layer in one call, so that no small torch operation runs between the product
// and its scales (each costs as much as a 2048-row product). ``lut``: the bits in lut_layout,
// for the table lookups (AVX-512 builds; other builds take the masked adds). x (..., in) gives
// y (..., out): the caller's reshapes, a microsecond each, would cost 2 % of a token.
torch::Tensor sign_linear(torch::Tensor bits, c10::optional<torch::Tensor> lut, torch::Tensor input,
                          int64_t planes, c10::optional<torch::Tensor> in_scale,
                          c10::optional<torch::Tensor> out_scale,
                          c10::optional<torch::Tensor> beta_in,
                          c10::optional<torch::Tensor> beta_out) {
  TORCH_CHECK(input.dtype() == torch::kFloat32 && input.dim() >= 1 && input.size(-1) > 0 &&
                  input.is_contiguous(),
              "x: a contiguous float32 (..., features) tensor");
  TORCH_CHECK(bits.dtype() == torch::kUInt8 && bits.dim() == 2 && bits.is_contiguous(),
              "bits: a contiguous uint8 (planes * rows, bytes) tensor");
  const auto x = input.view({-1, input.size(-1)});
  auto shape = input.sizes().vec();
  TORCH_CHECK((planes == 1 || planes == 2) && bits.size(0) % planes == 0,
              "planes: 1 or 2, dividing the bits' ", bits.size(0), " rows");
  const int64_t n = x.size(0), in = x.size(1), nb = bits.size(1), width = 8 * nb;
  const int64_t out = bits.size(0) / planes;
  TORCH_CHECK(in <= width, "x: ", in, " features, the bits hold ", width);
  shape.back() = out;
  auto vec = [&](const c10::optional<torch::Tensor>& v, int64_t size, bool one, const char* name) {
    if (!v.has_value()) return static_cast<const float*>(nullptr);
    TORCH_CHECK(v->dtype() == torch::kFloat32 && v->is_contiguous() &&
                    (v->numel() == size || (one && v->numel() == 1)),
                name, ": a contiguous float32 tensor of ", size, " values");
    return static_cast<const float*>(v->data_ptr<float>());
  };
  Scales s;
  s.in = vec(in_scale, in, false, "in_scale");
  s.out = vec(out_scale, out, true, "out_scale");
  s.beta_in = vec(beta_in, in, false, "beta_in");
  s.beta_out = vec(beta_out, out, true, "beta_out");
  s.out_one = s.out && out_scale->numel() == 1;
  s.beta_out_one = s.beta_out && beta_out->numel() == 1;
#if defined(__AVX512F__)
  if (lut.has_value()) {
    TORCH_CHECK(lut->dtype() == torch::kUInt8 && lut->dim() == 4 && lut->is_contiguous() &&
                    lut->size(0) == planes && lut->size(1) == (out + 15) / 16 &&
                    lut->size(2) == nb && lut->size(3) == 16,
                "lut: lut_layout's contiguous uint8 (", planes, " planes, ", (out + 15) / 16,
                " blocks of 16 rows, ", nb, " bytes, 16) tensor of these bits");
    return lut_linear(*lut, x, out, s).view(shape);
  }
#endif
  auto u = torch::empty({n, width}, x.options());
  std::vector<float> dots(n);
  for (int64_t t = 0; t < n; ++t)
    dots[t] = scale_input(x.data_ptr<float>() + t * in, s, in, width, u.data_ptr<float>() + t * width);
  auto sums = sign_matmul(bits, u);
  const float* ps = sums.data_ptr<float>();
  auto y = torch::empty({n, out}, x.options());
  float* py = y.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t o = 0; o < out; ++o) {
      float v = ps[t * planes * out + o];
      if (planes == 2) v += ps[t * planes * out + out + o];
      py[t * out + o] = finish(v, o, dots[t], s);
    }
  return y.view(shape);
}

// Prefill: torch's int8 GEMM (AMX or VNNI where the CPU has them) on S and on the inputs split
// into three int8 pieces, so that every product is exact and summed in int32:
//   u[t] = s_t (q1 + q2 / 254 + q3 / 254^2) + r,  s_t = max |u[t]| / 127,
// each piece the rounded remainder of the last (x - round(x) is exact), |q| <= 127; |r| <= s_t /
// 2 / 254^2, 2^-24 of the token's largest input, as fine as fp32's own rounding. Then
// y[t] = s_t (Y1 + (Y2 + Y3 / 254) / 254) with Y = q S^T (exact int32, in fp32 below 2^24).

// S (the sum of ``planes`` +-1 matrices; bits: planes x rows of them) as int8 (rows,
// in_features) into ``w``, a reused buffer (a fresh one pays its page faults at every call).
torch::Tensor sign_weight(torch::Tensor bits, int64_t planes, int64_t in_features,
                          torch::Tensor w) {
  TORCH_CHECK(bits.dtype() == torch::kUInt8 && bits.dim() == 2 && bits.is_contiguous(),
              "bits: a contiguous uint8 (planes * rows, bytes) tensor");
  TORCH_CHECK((planes == 1 || planes == 2) && bits.size(0) % planes == 0,
              "planes: 1 or 2, dividing the bits' ", bits.size(0), " rows");
  const int64_t rows = bits.size(0) / planes, nb = bits.size(1);
  TORCH_CHECK(nb % 8 == 0, "bits: ", nb, " bytes a row, not a multiple of 8");
  TORCH_CHECK(in_features <= 8 * nb, "in_features ", in_features, ": the bits hold ", 8 * nb);
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.is_contiguous() && w.numel() >= rows * in_features,
              "w: a contiguous int8 buffer of at least ", rows * in_features, " values");
  const uint8_t* pb = bits.data_ptr<uint8_t>();
  int8_t* pw = w.data_ptr<int8_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; ++o) {
      const uint8_t* s1 = pb + o * nb;
      const uint8_t* s2 = planes == 2 ? pb + (rows + o) * nb : nullptr;
      int8_t* row = pw + o * in_features;
      int64_t i = 0;
#if defined(__AVX512BW__)
      const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
      for (; i < in_features; i += 64) {  // 64 weights a step; the rows' bytes run to 8 nb
        const __mmask64 lanes = in_features - i >= 64 ? ~0ULL : (1ULL << (in_features - i)) - 1;
        uint64_t m;
        std::memcpy(&m, s1 + i / 8, 8);
        __m512i v = _mm512_mask_blend_epi8(m, minus, plus);
        if (s2) {
          std::memcpy(&m, s2 + i / 8, 8);
          v = _mm512_add_epi8(v, _mm512_mask_blend_epi8(m, minus, plus));
        }
        _mm512_mask_storeu_epi8(row + i, lanes, v);
      }
#else
      for (; i < in_features; ++i) {
        int v = ((s1[i >> 3] >> (i & 7)) & 1) ? 1 : -1;
        if (s2) v += ((s2[i >> 3] >> (i & 7)) & 1) ? 1 : -1;
        row[i] = static_cast<int8_t>(v);
      }
#endif
    }
  });
  return w.view(-1).narrow(0, 0, rows * in_features).view({rows, in_features});
}

// u (n, k) float32 -> (q (3 n, k) int8: the pieces q1, q2, q3 of every token, piece-major;
// s (n,) float32).
std::vector<torch::Tensor> split_int8(torch::Tensor u) {
  TORCH_CHECK(u.dtype() == torch::kFloat32 && u.dim() == 2 && u.is_contiguous(),
              "u: a contiguous float32 (tokens, features) tensor");
  const int64_t n = u.size(0), k = u.size(1);
  auto q = torch::empty({3 * n, k}, u.options().dtype(torch::kInt8));
  auto s = torch::empty({n}, u.options());
  const float* pu = u.data_ptr<float>();
  int8_t* pq = q.data_ptr<int8_t>();
  float* ps = s.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* x = pu + t * k;
      // max drops NaNs: x * 0 is NaN for every non-finite x, so their sum says whether any came
      float amax = 0.0f, bad = 0.0f;
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 vmax = _mm512_setzero_ps(), vbad = _mm512_setzero_ps();
      for (; i < k; i += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(lanes16(k - i), x + i);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        vbad = _mm512_add_ps(vbad, _mm512_mul_ps(v, _mm512_setzero_ps()));
      }
      amax = _mm512_reduce_max_ps(vmax);
      bad = _mm512_reduce_add_ps(vbad);
#endif
      for (; i < k; ++i) amax = std::max(amax, std::fabs(x[i])), bad += x[i] * 0.0f;
      int8_t* q1 = pq + t * k;
      int8_t* q2 = pq + (n + t) * k;
      int8_t* q3 = pq + (2 * n + t) * k;
      if (std::isnan(bad)) {  // NaN out, as the dense product gives
        ps[t] = std::numeric_limits<float>::quiet_NaN();
        std::memset(q1, 0, k), std::memset(q2, 0, k), std::memset(q3, 0, k);
        continue;
      }
      // (a token below 1e-30 everywhere gives zeros, not 127 / amax = inf)
      ps[t] = amax / 127.0f;
      const float inv = amax >= 1e-30f ? 127.0f / amax : 0.0f;
      i = 0;
#if defined(__AVX512F__)
      constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      const __m512 vinv = _mm512_set1_ps(inv), v254 = _mm512_set1_ps(254.0f);
      for (; i < k; i += 16) {
        const __mmask16 lanes = lanes16(k - i);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + i), vinv);
        __m512 r = _mm512_roundscale_ps(v, kNearest);
        _mm512_mask_cvtepi32_storeu_epi8(q1 + i, lanes, _mm512_cvtps_epi32(r));
        v = _mm512_mul_ps(_mm512_sub_ps(v, r), v254);
        r = _mm512_roundscale_ps(v, kNearest);
        _mm512_mask_cvtepi32_storeu_epi8(q2 + i, lanes, _mm512_cvtps_epi32(r));
        r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, r), v254), kNearest);
        _mm512_mask_cvtepi32_storeu_epi8(q3 + i, lanes, _mm512_cvtps_epi32(r));
      }
#endif
      for (; i < k; ++i) {
        float v = x[i] * inv;
        float r = std::nearbyint(v);
        q1[i] = static_cast<int8_t>(r);
        v = (v - r) * 254.0f;
        r = std::nearbyint(v);
        q2[i] = static_cast<int8_t>(r);
        q3[i] = static_cast<int8_t>(std::nearbyint((v - r) * 254.0f));
      }
    }
  });
  return {q, s};
}

// y (n, rows) float32 from Y = q S^T (3 n, rows) int32 and the tokens' scales s.
torch::Tensor combine_int8(torch::Tensor y3, torch::Tensor s) {
  TORCH_CHECK(y3.dtype() == torch::kInt32 && y3.dim() == 2 && y3.is_contiguous() &&
                  y3.size(0) % 3 == 0,
              "Y: a contiguous int32 (3 tokens, rows) tensor");
  const int64_t n = y3.size(0) / 3, rows = y3.size(1);
  TORCH_CHECK(s.dtype() == torch::kFloat32 && s.numel() == n, "s: one float32 scale a token");
  auto y = torch::empty({n, rows}, s.options());
  const int32_t* p = y3.data_ptr<int32_t>();
  const float* ps = s.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int32_t* a = p + t * rows;
      const int32_t* b = p + (n + t) * rows;
      const int32_t* c = p + (2 * n + t) * rows;
      float* out = py + t * rows;
      int64_t o = 0;
#if defined(__AVX512F__)
      const __m512 st = _mm512_set1_ps(ps[t]), step = _mm512_set1_ps(1.0f / 254.0f);
      for (; o < rows; o += 16) {
        const __mmask16 lanes = lanes16(rows - o);
        const __m512 low = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(lanes, c + o)), step,
            _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(lanes, b + o)));
        const __m512 high = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(lanes, a + o));
        const __m512 sum = _mm512_fmadd_ps(low, step, high);
        _mm512_mask_storeu_ps(out + o, lanes, _mm512_mul_ps(st, sum));
      }
#endif
      for (; o < rows; ++o)
        out[o] = ps[t] * (static_cast<float>(a[o]) +
                          (static_cast<float>(b[o]) + static_cast<float>(c[o]) * (1.0f / 254.0f)) *
                              (1.0f / 254.0f));
    }
  });
  return y;
}

// The output head as stored (bf16) times float32 tokens, summed in float32: y[t, o] =
// sum_i w[o, i] x[t, i]. A bf16 value is the top half of its float32, so a weight widens exactly
// by a 16-bit shift; decode reads 2 bytes a weight instead of fp32's 4. A block of R rows
// (16 KB at d_model 2048) stays in cache while the tokens pass over it.
namespace {
inline float widen(uint16_t b) {
  const uint32_t v = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}

template <int R>
void bf16_rows(const uint16_t* w, const float* x, float* y, int64_t in, int64_t rows, int64_t o,
               int64_t t) {
  float sums[R];
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (; i + 16 <= in; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int r = 0; r < R; ++r) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (o + r) * in + i));
      const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      acc[r] = _mm512_fmadd_ps(wv, xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(__AVX2__)
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (; i + 8 <= in; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int r = 0; r < R; ++r) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (o + r) * in + i));
      const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#if defined(__FMA__)
      acc[r] = _mm256_fmadd_ps(wv, xv, acc[r]);
#else
      acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(wv, xv));
#endif
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = hsum(acc[r]);
#else
  for (int r = 0; r < R; ++r) sums[r] = 0.0f;
#endif
  for (int r = 0; r < R; ++r) {
    for (int64_t j = i; j < in; ++j) sums[r] += widen(w[(o + r) * in + j]) * x[j];
    y[t * rows + o + r] = sums[r];
  }
}
}  // namespace

torch::Tensor bf16_matmul(torch::Tensor w, torch::Tensor x) {
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.dim() == 2 && w.is_contiguous(),
              "w: a contiguous bfloat16 (rows, features) tensor");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x: a contiguous float32 (tokens, features) tensor");
  const int64_t rows = w.size(0), in = w.size(1), n = x.size(0);
  TORCH_CHECK(x.size(1) == in, "x: ", x.size(1), " features, w has ", in);
  auto y = torch::empty({n, rows}, x.options());
  const uint16_t* pw = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  constexpr int R = 8;  // independent FMA chains: enough to hide their latency
  at::parallel_for(0, rows / R, 32, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < n; ++t) bf16_rows<R>(pw, px + t * in, py, in, rows, b * R, t);
  });
  for (int64_t o = rows / R * R; o < rows; ++o)
    for (int64_t t = 0; t < n; ++t) bf16_rows<1>(pw, px + t * in, py, in, rows, o, t);
  return y;
}

std::string simd_path() { return kPath; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_matmul", &sign_matmul, "binary (+-1 bits) matrix times float32 tokens");
  m.def("sign_linear", &sign_linear, "decode's layer: the sign product, its scales, rank-1 term");
  m.def("sign_weight", &sign_weight, "the int8 sign matrix from its bits");
  m.def("split_int8", &split_int8, "float32 inputs as three exact int8 pieces and a scale a token");
  m.def("combine_int8", &combine_int8, "float32 outputs from the pieces' int32 products");
  m.def("bf16_matmul", &bf16_matmul, "bfloat16 matrix times float32 tokens, summed in float32");
  m.def("simd_path", &simd_path, "the SIMD path this build compiled");
}
