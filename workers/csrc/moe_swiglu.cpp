// Fused routed-expert SwiGLU for CPUs: gate_up -> SiLU * up -> down -> weighted sum, with the
// work split across experts and output rows (one parallel region per phase), and weights
// stored as fp32, bf16, int8 (one scale per output row) or int4 (one scale per group of inputs).
//
// Shape legend: T tokens, K experts per token, E experts held, H hidden, I expert intermediate,
// N (token, expert) pairs with an expert (ids >= 0), G input groups of a row (int4).
//
// Every dot product runs in one fixed order (16 fp32 lanes over the row, then a fixed tree),
// whichever block, thread or batch a pair lands in: a pair's result does not depend on the
// other pairs of the call (so a shard computing a subset gives the same per-pair values).
// The final sum over a token's K experts is taken in fp64 and rounded once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int8_t v16b __attribute__((vector_size(16)));
typedef uint8_t v16ub __attribute__((vector_size(16)));
typedef uint16_t v16us __attribute__((vector_size(32)));

enum Kind : int64_t { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3 };
constexpr int L = 16;   // fp32 lanes
constexpr int NT = 4;   // tokens sharing one pass over a weight row

inline v16f load_f(const float* p) { v16f v; std::memcpy(&v, p, sizeof v); return v; }

inline v16f load_w(const float* p) { return load_f(p); }
inline v16f load_w(const uint16_t* p) {  // bf16 -> fp32: the bits are fp32's top half
  v16us h; std::memcpy(&h, p, sizeof h);
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f f; std::memcpy(&f, &u, sizeof f); return f;
}
inline v16f load_w(const int8_t* p) {
#if defined(__AVX512F__)  // gcc widens a vector of chars element by element otherwise
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  v16f v; std::memcpy(&v, &f, sizeof v); return v;
#else
  v16b b; std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(__builtin_convertvector(b, v16i), v16f);
#endif
}

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
inline float hsum(v16f v) {  // fixed tree: lane i += lane i + 8, then + 4, + 2, + 1
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

constexpr int RT = 4;  // rows sharing one pass over the token vectors

// acc[t][j] = the unreduced lanes of dot(row j, xs[t]) for t < NTT, j < R: R rows of n inputs
// (n % 16 == 0) from w0, row stride n. The R * NTT sums are independent chains (one token at
// decode is not latency-bound); each keeps the one fixed order of every dot product.
template <int NTT, int R, typename W>
inline void tile_accs(const W* w0, int64_t n, const float* const* xs, v16f (*acc)[R]) {
  for (int t = 0; t < NTT; ++t)
    for (int j = 0; j < R; ++j) acc[t][j] = v16f{};
  for (int64_t k = 0; k < n; k += L) {
    v16f w[R];
    for (int j = 0; j < R; ++j) w[j] = load_w(w0 + j * n + k);
    for (int t = 0; t < NTT; ++t) {
      const v16f x = load_f(xs[t] + k);
      for (int j = 0; j < R; ++j) acc[t][j] += w[j] * x;
    }
  }
}

// res[t * ldr + j] = dot(row j, xs[t]) * (scale ? scale[j] : 1), reduced one by one
template <int NTT, int R, typename W>
inline void tile_dots(const W* w0, int64_t n, const float* const* xs, const float* scale,
                      float* res, int64_t ldr) {
  v16f acc[NTT][R];
  tile_accs<NTT, R>(w0, n, xs, acc);
  for (int t = 0; t < NTT; ++t)
    for (int j = 0; j < R; ++j) res[t * ldr + j] = hsum(acc[t][j]) * (scale ? scale[j] : 1.f);
}

// lane r = hsum(v[r]) for 16 rows at once, each with hsum's exact tree: every add below pairs
// the same two values as hsum does for that row (lane i with lane i + 8, then + 4, + 2, + 1).
inline v16f hsum16x16(const v16f* v) {
  v16f w[8], z[4], q[2];
  for (int j = 0; j < 8; ++j)
    w[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * j], v[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)
    z[j] = __builtin_shufflevector(w[2 * j], w[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * j], w[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)
    q[j] = __builtin_shufflevector(z[2 * j], z[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(z[2 * j], z[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22,
                                   23, 26, 27, 30, 31);
  return __builtin_shufflevector(q[0], q[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(q[0], q[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

// buf[t][j0 + j] = the unreduced lanes of dot(row j, xs[t]), t < NTT, j < RT
template <int NTT, typename W>
inline void tile_into(const W* w0, int64_t n, const float* const* xs, v16f (*buf)[16], int j0) {
  v16f acc[NTT][RT];
  tile_accs<NTT, RT>(w0, n, xs, acc);
  for (int t = 0; t < NTT; ++t)
    for (int j = 0; j < RT; ++j) buf[t][j0 + j] = acc[t][j];
}

// 16 rows from w0 against nt token vectors, reduced 16 at a time
template <typename W>
inline void rows16(const W* w0, int64_t n, const float* const* xs, int nt, const float* scale,
                   float* res, int64_t ldr) {
  v16f buf[NT][16];
  for (int j = 0; j < 16; j += RT) {
    switch (nt) {
      case 4: tile_into<4>(w0 + j * n, n, xs, buf, j); break;
      case 3: tile_into<3>(w0 + j * n, n, xs, buf, j); break;
      case 2: tile_into<2>(w0 + j * n, n, xs, buf, j); break;
      default: tile_into<1>(w0 + j * n, n, xs, buf, j); break;
    }
  }
  for (int t = 0; t < nt; ++t) {
    v16f sum = hsum16x16(buf[t]);
    if (scale) sum *= load_f(scale);
    std::memcpy(res + t * ldr, &sum, sizeof sum);
  }
}

template <int R, typename W>
inline void tiles(const W* w0, int64_t n, const float* const* xs, int nt, const float* scale,
                  float* res, int64_t ldr) {
  switch (nt) {
    case 4: tile_dots<4, R>(w0, n, xs, scale, res, ldr); break;
    case 3: tile_dots<3, R>(w0, n, xs, scale, res, ldr); break;
    case 2: tile_dots<2, R>(w0, n, xs, scale, res, ldr); break;
    default: tile_dots<1, R>(w0, n, xs, scale, res, ldr); break;
  }
}

// res[t * ldr + j] = dot(rows[r0 + j], xs[t]) * row scale, j < nr, t < nt
template <typename W>
inline void block_dots(const W* rows, int64_t r0, int64_t nr, int64_t n, const float* scales,
                       const float* const* xs, int nt, float* res, int64_t ldr) {
  int64_t j = 0;
  for (; j + 16 <= nr; j += 16)
    rows16(rows + (r0 + j) * n, n, xs, nt, scales ? scales + r0 + j : nullptr, res + j, ldr);
  for (; j + RT <= nr; j += RT)
    tiles<RT>(rows + (r0 + j) * n, n, xs, nt, scales ? scales + r0 + j : nullptr, res + j, ldr);
  for (; j < nr; ++j)
    tiles<1>(rows + (r0 + j) * n, n, xs, nt, scales ? scales + r0 + j : nullptr, res + j, ldr);
}

// int4: byte b of a 32-input block holds input b (low nibble) and input 16 + b (high nibble),
// stored as q + 8; scales[g] covers inputs [g * group, (g + 1) * group).
inline void dot_rows_int4(const uint8_t* row, const float* scales, int64_t group,
                          const float* const* xs, int nt, int64_t n, float* out) {
  v16f acc[NT] = {};
  for (int64_t g0 = 0; g0 < n; g0 += group) {
    v16f part[NT] = {};
    for (int64_t k = g0; k < g0 + group; k += 2 * L) {
      v16ub b; std::memcpy(&b, row + k / 2, sizeof b);
      v16f lo = __builtin_convertvector(__builtin_convertvector(b & 15, v16i) - 8, v16f);
      v16f hi = __builtin_convertvector(__builtin_convertvector(b >> 4, v16i) - 8, v16f);
      for (int t = 0; t < NT; ++t)
        if (t < nt) part[t] += lo * load_f(xs[t] + k) + hi * load_f(xs[t] + k + L);
    }
    const float s = scales[g0 / group];
    for (int t = 0; t < NT; ++t)
      if (t < nt) acc[t] += part[t] * s;
  }
  for (int t = 0; t < nt; ++t) out[t] = hsum(acc[t]);
}

struct Mat {  // one projection of all experts: rows of `in` inputs, `out` rows per expert
  Kind kind;
  const void* data;
  const float* scales;
  int64_t out, in, group;

  // res[t * ldr + j] = dot of row r0 + j (j < nr) of expert e with token vector t (t < nt),
  // scaled (int8/int4 dequantised)
  void dots(int64_t e, int64_t r0, int64_t nr, const float* const* xs, int nt, float* res,
            int64_t ldr) const {
    const int64_t base = e * out;
    switch (kind) {
      case F32:
        block_dots(static_cast<const float*>(data) + base * in, r0, nr, in, nullptr, xs, nt,
                   res, ldr);
        break;
      case BF16:
        block_dots(static_cast<const uint16_t*>(data) + base * in, r0, nr, in, nullptr, xs, nt,
                   res, ldr);
        break;
      case INT8:
        block_dots(static_cast<const int8_t*>(data) + base * in, r0, nr, in, scales + base, xs,
                   nt, res, ldr);
        break;
      case INT4:
        for (int64_t j = 0; j < nr; ++j) {
          const int64_t row = base + r0 + j;
          float tmp[NT];
          dot_rows_int4(static_cast<const uint8_t*>(data) + row * (in / 2),
                        scales + row * (in / group), group, xs, nt, in, tmp);
          for (int t = 0; t < nt; ++t) res[t * ldr + j] = tmp[t];
        }
        break;
    }
  }
};

Mat make_mat(const at::Tensor& w, const at::Tensor& s, int64_t kind, int64_t group,
             const char* name) {
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), name, ": expected a contiguous [E, out, in]");
  Mat m{static_cast<Kind>(kind), w.data_ptr(), nullptr, w.size(1), w.size(2), group};
  switch (m.kind) {
    case F32: TORCH_CHECK(w.scalar_type() == at::kFloat, name, ": expected float32"); break;
    case BF16: TORCH_CHECK(w.scalar_type() == at::kBFloat16, name, ": expected bfloat16"); break;
    case INT8:
      TORCH_CHECK(w.scalar_type() == at::kChar, name, ": expected int8");
      TORCH_CHECK(s.numel() == w.size(0) * w.size(1), name, ": one scale per row expected");
      break;
    case INT4:
      TORCH_CHECK(w.scalar_type() == at::kByte, name, ": expected uint8 (two int4 per byte)");
      m.in = 2 * w.size(2);
      TORCH_CHECK(group % 32 == 0 && m.in % group == 0, name, ": bad int4 group ", group);
      TORCH_CHECK(s.numel() == w.size(0) * w.size(1) * (m.in / group), name,
                  ": one scale per row and group expected");
      break;
    default: TORCH_CHECK(false, name, ": unknown weight kind ", kind);
  }
  if (m.kind == INT8 || m.kind == INT4) {
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), name,
                ": scales must be contiguous float32");
    m.scales = s.data_ptr<float>();
  }
  TORCH_CHECK(m.in % L == 0, name, ": input size must be a multiple of 16");
  return m;
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

}  // namespace

// hidden [T, H] f32, ids [T, K] int64 (rows of the weights, -1 = none), weights [T, K] f32,
// w13 [E, 2I, H] (+ s13), w2 [E, H, I] (+ s2) of `kind` -> [T, H] f32.
at::Tensor moe_swiglu(const at::Tensor& hidden, const at::Tensor& ids, const at::Tensor& weights,
                      const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                      const at::Tensor& s2, int64_t kind, int64_t group) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kFloat, "hidden: [T, H] float32");
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "ids: [T, K] int64");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat,
              "weights: [T, K] float32");
  const Mat gu = make_mat(w13, s13, kind, group, "w13");
  const Mat dn = make_mat(w2, s2, kind, group, "w2");
  const int64_t T = ids.size(0), K = ids.size(1), E = w13.size(0), H = hidden.size(1);
  const int64_t I = gu.out / 2;
  TORCH_CHECK(gu.in == H && dn.out == H && dn.in == I && w2.size(0) == E,
              "w13/w2 shapes do not match hidden size ", H);
  at::Tensor x = hidden.contiguous();
  at::Tensor idc = ids.contiguous(), wc = weights.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  const float* wt = wc.data_ptr<float>();
  const float* xp = x.data_ptr<float>();

  // pairs grouped by expert (counting sort, stable: token order within an expert)
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t p = 0; p < T * K; ++p) {
    const int64_t e = id[p];
    TORCH_CHECK(e < E, "expert row ", e, " out of range (", E, " held)");
    if (e >= 0) ++start[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t N = start[E];
  std::vector<int64_t> pair(N), fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < T * K; ++p)
    if (id[p] >= 0) pair[fill[id[p]]++] = p;
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) active.push_back(e);

  at::Tensor act = at::empty({N, I}, x.options());       // SiLU(gate) * up, by sorted pair
  at::Tensor y = at::empty({T * K, H}, x.options());  // weighted expert output, by (t, k)
  float* ap = act.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t A = static_cast<int64_t>(active.size());

  // phase 1: items = (active expert, block of RB1 intermediate rows)
  constexpr int64_t RB1 = 32;
  const int64_t nb1 = (I + RB1 - 1) / RB1;
  at::parallel_for(0, A * nb1, 1, [&](int64_t lo, int64_t hi) {
    const float* xs[NT];
    float g[NT * RB1], u[NT * RB1];
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t e = active[it / nb1], r0 = (it % nb1) * RB1, r1 = std::min(I, r0 + RB1);
      for (int64_t p0 = start[e]; p0 < start[e + 1]; p0 += NT) {
        const int nt = static_cast<int>(std::min<int64_t>(NT, start[e + 1] - p0));
        for (int t = 0; t < nt; ++t) xs[t] = xp + (pair[p0 + t] / K) * H;
        gu.dots(e, r0, r1 - r0, xs, nt, g, RB1);
        gu.dots(e, I + r0, r1 - r0, xs, nt, u, RB1);
        for (int t = 0; t < nt; ++t)
          for (int64_t r = r0; r < r1; ++r)
            ap[(p0 + t) * I + r] = silu(g[t * RB1 + r - r0]) * u[t * RB1 + r - r0];
      }
    }
  });

  // phase 2: items = (active expert, block of RB2 hidden rows); y[(t, k)] = w * down(act)
  constexpr int64_t RB2 = 64;
  const int64_t nb2 = (H + RB2 - 1) / RB2;
  at::parallel_for(0, A * nb2, 1, [&](int64_t lo, int64_t hi) {
    const float* as[NT];
    float d[NT * RB2];
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t e = active[it / nb2], r0 = (it % nb2) * RB2, r1 = std::min(H, r0 + RB2);
      for (int64_t p0 = start[e]; p0 < start[e + 1]; p0 += NT) {
        const int nt = static_cast<int>(std::min<int64_t>(NT, start[e + 1] - p0));
        for (int t = 0; t < nt; ++t) as[t] = ap + (p0 + t) * I;
        dn.dots(e, r0, r1 - r0, as, nt, d, RB2);
        for (int t = 0; t < nt; ++t)
          for (int64_t r = r0; r < r1; ++r)
            yp[pair[p0 + t] * H + r] = d[t * RB2 + r - r0] * wt[pair[p0 + t]];
      }
    }
  });

  // phase 3: out[t] = sum_k y[(t, k)] in fp64, rounded once
  at::Tensor out = at::empty({T, H}, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> acc(H);
    for (int64_t t = lo; t < hi; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t k = 0; k < K; ++k) {
        if (id[t * K + k] < 0) continue;
        const float* row = yp + (t * K + k) * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += row[h];
      }
      for (int64_t h = 0; h < H; ++h) op[t * H + h] = static_cast<float>(acc[h]);
    }
  });
  return out;
}

TORCH_LIBRARY(expertmesh, m) {
  m.def("moe_swiglu(Tensor hidden, Tensor ids, Tensor weights, Tensor w13, Tensor s13, "
        "Tensor w2, Tensor s2, int kind, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) { m.impl("moe_swiglu", &moe_swiglu); }
