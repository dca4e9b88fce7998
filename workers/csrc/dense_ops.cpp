// Fused CPU ops for the dense path of a decode step (workers/dense_kernel.py loads them; every
// op has a torch reference there and in the model modules, which give the same numbers).
//
// Shape legend
//   T  tokens of the step (rows of the projections)     B  decode rows handled by an op
//   S  cache slots        H  hidden     E  routed experts     K  experts per token
//   Hk/Hv DeltaNet key/value heads, r = Hv / Hk, Dk/Dv their head dims, C conv channels, W conv
//   kernel; Hq/Hkv attention query/KV heads, D head dim, R rotary dims, N KV blocks, bs block
//   size, M blocks per block-table row.
//
// Every op reads its inputs in the model's dtype (fp32, bf16 or fp16), computes in fp32 and
// rounds where the torch reference rounds (so bf16 results match the eager path up to
// summation order). Work is split across rows / heads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float f(T v) { return static_cast<float>(v); }
template <typename T>
inline T as(float v) { return static_cast<T>(v); }
template <typename T>
inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }  // round through T

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
inline float silu(float x) { return x / (1.f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }

void check(bool ok, const char* what) { TORCH_CHECK(ok, "expertmesh dense op: ", what); }

int64_t grain(int64_t work_per_item) {  // items per task so one task does >= ~16k flops
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_item));
}

// zero-centred RMSNorm of one row: x * rsqrt(mean(x^2) + eps) * (1 + w)
template <typename T>
void rms_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  float ss = 0.f;
_Pragma("omp simd reduction(+ : ss)")
  for (int64_t i = 0; i < n; ++i) ss += f(x[i]) * f(x[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = as<T>(f(x[i]) * r * (1.f + f(w[i])));
}

// ---------------------------------------------------------------------------------- linear
// y [M, N] = x [M, K] @ w[N, K]^T for fp32 activations and fp32 or bf16 weights (bf16 widened
// exactly in registers), AVX-512-sized vectors. Every output is one dot product in one fixed
// order (16 fp32 lanes over K, a fixed tree, then the K % 16 tail), whatever M, the tile or
// the thread: a token's result does not depend on the other tokens of the call. Weights are
// read once per block of MB token rows (x's block stays in L2), so decode (M small) streams
// them at memory speed and prefill reuses them from cache.
typedef float v16f __attribute__((vector_size(64)));
typedef uint16_t v16us __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
constexpr int VL = 16;

inline v16f vload(const float* p) { v16f v; std::memcpy(&v, p, sizeof v); return v; }
inline v16f vload(const c10::BFloat16* p) {  // bf16 -> fp32: the bits are fp32's top half
  v16us h; std::memcpy(&h, p, sizeof h);
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f v; std::memcpy(&v, &u, sizeof v); return v;
}
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
inline float hsum16(v16f v) {  // fixed tree: lane i += lane i + 8, then + 4, + 2, + 1
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

template <typename W, int MR, int NR>
void linear_tile(const float* x, int64_t ldx, const W* w, int64_t K, float* y, int64_t ldy) {
  v16f acc[MR][NR] = {};
  const int64_t K16 = K - K % VL;
  for (int64_t k = 0; k < K16; k += VL) {
    v16f wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = vload(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const v16f xv = vload(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum16(acc[i][j]);
      for (int64_t k = K16; k < K; ++k) s += x[i * ldx + k] * static_cast<float>(w[j * K + k]);
      y[i * ldy + j] = s;
    }
}

template <typename W, int MR>
void linear_tile_n(int nr, const float* x, int64_t ldx, const W* w, int64_t K, float* y,
                   int64_t ldy) {
  switch (nr) {
    case 4: linear_tile<W, MR, 4>(x, ldx, w, K, y, ldy); break;
    case 3: linear_tile<W, MR, 3>(x, ldx, w, K, y, ldy); break;
    case 2: linear_tile<W, MR, 2>(x, ldx, w, K, y, ldy); break;
    default: linear_tile<W, MR, 1>(x, ldx, w, K, y, ldy); break;
  }
}

template <typename W>
void linear_kernel(const float* x, int64_t ldx, const W* w, int64_t M, int64_t N, int64_t K,
                   float* y) {
  constexpr int64_t NR = 4, MR = 4, MB = 64;
  const int64_t nblocks = (N + NR - 1) / NR;
  const int64_t per_block = std::min<int64_t>(M, MB) * NR * K;
  at::parallel_for(0, nblocks, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, per_block)),
                   [&](int64_t lo, int64_t hi) {
    for (int64_t m1 = 0; m1 < M; m1 += MB) {
      const int64_t m2 = std::min(M, m1 + MB);
      for (int64_t nb = lo; nb < hi; ++nb) {
        const int64_t n0 = nb * NR;
        const int nr = static_cast<int>(std::min<int64_t>(NR, N - n0));
        for (int64_t m0 = m1; m0 < m2; m0 += MR) {
          const float* xs = x + m0 * ldx;
          float* ys = y + m0 * N + n0;
          switch (std::min<int64_t>(MR, m2 - m0)) {
            case 4: linear_tile_n<W, 4>(nr, xs, ldx, w + n0 * K, K, ys, N); break;
            case 3: linear_tile_n<W, 3>(nr, xs, ldx, w + n0 * K, K, ys, N); break;
            case 2: linear_tile_n<W, 2>(nr, xs, ldx, w + n0 * K, K, ys, N); break;
            default: linear_tile_n<W, 1>(nr, xs, ldx, w + n0 * K, K, ys, N); break;
          }
        }
      }
    }
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat && (x.stride(1) == 1 || x.size(1) <= 1),
        "linear: x must be float32 [M, K] with unit column stride");
  check(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) &&
            (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
        "linear: w must be contiguous float32 or bfloat16 [N, K]");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  if (w.scalar_type() == at::kFloat)
    linear_kernel(xp, ldx, w.data_ptr<float>(), M, N, K, y.data_ptr<float>());
  else
    linear_kernel(xp, ldx, w.data_ptr<c10::BFloat16>(), M, N, K, y.data_ptr<float>());
  return y;
}

// ------------------------------------------------------------------------- residual + norm
// y = x + delta; (y, rms_norm(y)).  x, delta [T, H] -> two new [T, H]
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps) {
  check(x.dim() == 2 && x.sizes() == delta.sizes(), "add_rms_norm: x and delta must be [T, H]");
  check(weight.numel() == x.size(1), "add_rms_norm: weight must have H elements");
  auto xc = x.contiguous(), dc = delta.to(x.scalar_type()).contiguous();
  auto wc = weight.to(x.scalar_type()).contiguous();
  auto y = at::empty_like(xc), h = at::empty_like(xc);
  const int64_t T = xc.size(0), H = xc.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "add_rms_norm", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *dp = dc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain(4 * H), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        for (int64_t i = 0; i < H; ++i) yp[t * H + i] = as<scalar_t>(f(xp[t * H + i]) + f(dp[t * H + i]));
        rms_row(yp + t * H, wp, hp + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return {y, h};
}

// rms_norm(x) alone (the first layer's input norm)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x.dim() == 2 && weight.numel() == x.size(1), "rms_norm: x [T, H], weight [H]");
  auto xc = x.contiguous();
  auto wc = weight.to(x.scalar_type()).contiguous();
  auto h = at::empty_like(xc);
  const int64_t T = xc.size(0), H = xc.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rms_norm", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *wp = wc.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain(3 * H), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) rms_row(xp + t * H, wp, hp + t * H, H, static_cast<float>(eps));
    });
  });
  return h;
}

// ------------------------------------------------------------------------------- MoE glue
// Router: logits [T, >= E] (row stride free; the first E columns) -> softmax over E, top K
// (largest first; ties: lower id first), renormalised when asked. ids [T, K] int64, weights
// [T, K] in the logits' dtype (the reference: softmax in fp32, topk, w / sum(w), .to(dtype)).
std::tuple<at::Tensor, at::Tensor> route_topk(const at::Tensor& logits, int64_t E, int64_t K,
                                              bool renormalize) {
  check(logits.dim() == 2 && logits.size(1) >= E && logits.stride(1) == 1,
        "route_topk: logits must be [T, >= E] with unit column stride");
  check(K >= 1 && K <= E, "route_topk: K must be in [1, E]");
  const int64_t T = logits.size(0), ld = logits.stride(0);
  auto ids = at::empty({T, K}, logits.options().dtype(at::kLong));
  auto wts = at::empty({T, K}, logits.options());
  int64_t* ip = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_topk", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* wp = wts.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain(8 * E), [&](int64_t lo, int64_t hi) {
      std::vector<float> top(K), pk(K);
      std::vector<int64_t> arg(K);
      for (int64_t t = lo; t < hi; ++t) {
        const scalar_t* row = lp + t * ld;
        int64_t n = 0;  // insertion into the K best so far, largest first
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t e = 0; e < E; ++e) {
          const float v = f(row[e]);
          m = std::max(m, v);
          if (n == K && !(v > top[K - 1])) continue;
          int64_t j = n < K ? n++ : K - 1;
          while (j > 0 && v > top[j - 1]) { top[j] = top[j - 1]; arg[j] = arg[j - 1]; --j; }
          top[j] = v;
          arg[j] = e;
        }
        float sum = 0.f;
        for (int64_t e = 0; e < E; ++e) sum += std::exp(f(row[e]) - m);
        float psum = 0.f;
        for (int64_t k = 0; k < K; ++k) { pk[k] = std::exp(top[k] - m) / sum; psum += pk[k]; }
        for (int64_t k = 0; k < K; ++k) {
          ip[t * K + k] = arg[k];
          wp[t * K + k] = as<scalar_t>(renormalize ? pk[k] / psum : pk[k]);
        }
      }
    });
  });
  return {ids, wts};
}

// Shared expert activation: gu [T, >= 2I] (gate | up, row stride free) -> silu(gate) * up [T, I]
at::Tensor silu_mul(const at::Tensor& gu, int64_t I) {
  check(gu.dim() == 2 && gu.size(1) >= 2 * I && gu.stride(1) == 1,
        "silu_mul: input must be [T, >= 2I] with unit column stride");
  const int64_t T = gu.size(0), ld = gu.stride(0);
  auto out = at::empty({T, I}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gu.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain(8 * I), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t)
        for (int64_t i = 0; i < I; ++i) {
          const float g = rnd<scalar_t>(silu(f(gp[t * ld + i])));
          op[t * I + i] = as<scalar_t>(g * f(gp[t * ld + I + i]));
        }
    });
  });
  return out;
}

// End of a MoE layer, then the next norm: y = x + (routed + sigmoid(gate) * shared);
// (y, rms_norm(y, weight)). gate: [T] with any stride (a column of the fused projection).
std::tuple<at::Tensor, at::Tensor> moe_combine_norm(const at::Tensor& x, const at::Tensor& routed,
                                                    const at::Tensor& shared,
                                                    const at::Tensor& gate,
                                                    const at::Tensor& weight, double eps) {
  check(x.dim() == 2 && routed.sizes() == x.sizes() && shared.sizes() == x.sizes(),
        "moe_combine_norm: x, routed and shared must be [T, H]");
  check(gate.dim() == 1 && gate.size(0) == x.size(0), "moe_combine_norm: gate must be [T]");
  check(weight.numel() == x.size(1), "moe_combine_norm: weight must have H elements");
  const auto st = x.scalar_type();
  auto xc = x.contiguous(), rc = routed.to(st).contiguous(), sc = shared.to(st).contiguous();
  auto gc = gate.to(st);
  auto wc = weight.to(st).contiguous();
  auto y = at::empty_like(xc), h = at::empty_like(xc);
  const int64_t T = xc.size(0), H = xc.size(1), gs = gc.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "moe_combine_norm", [&] {
    using S = scalar_t;
    const S *xp = xc.data_ptr<S>(), *rp = rc.data_ptr<S>(), *sp = sc.data_ptr<S>();
    const S *gp = gc.data_ptr<S>(), *wp = wc.data_ptr<S>();
    S *yp = y.data_ptr<S>(), *hp = h.data_ptr<S>();
    at::parallel_for(0, T, grain(6 * H), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const float g = rnd<S>(sigmoid(f(gp[t * gs])));
        for (int64_t i = 0; i < H; ++i) {
          const int64_t at_ = t * H + i;
          const float sh = rnd<S>(g * f(sp[at_]));
          yp[at_] = as<S>(f(xp[at_]) + rnd<S>(f(rp[at_]) + sh));
        }
        rms_row(yp + t * H, wp, hp + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return {y, h};
}

// ------------------------------------------------------------------------ Gated DeltaNet
// One decode token for each of B sequences: causal conv step (state [S, C, W-1] updated in
// place) + SiLU, L2-normalised q/k (q scaled by Dk^-1/2), gated delta rule on the fp32 state
// [S, Hv, Dk, Dv] (in place), gated RMSNorm with z; writes out[rows[b]] [Hv * Dv].
// proj rows hold [qkvz: per key head q (Dk) | k (Dk) | v (r*Dv) | z (r*Dv)] then
// [ba: per key head b (r) | a (r)] (the checkpoint's in_proj_qkvz and in_proj_ba, fused).
void deltanet_decode(const at::Tensor& proj, const at::Tensor& rows, const at::Tensor& slots,
                     at::Tensor& conv_state, const at::Tensor& conv_w, at::Tensor& ssm,
                     const at::Tensor& A_log, const at::Tensor& dt_bias,
                     const at::Tensor& norm_w, at::Tensor& out, int64_t hk, int64_t hv,
                     int64_t dk, int64_t dv, double eps) {
  const auto st = proj.scalar_type();
  const int64_t r = hv / hk, key_dim = hk * dk, C = 2 * key_dim + hv * dv;
  const int64_t per_head = 2 * dk + 2 * r * dv, ba_off = hk * per_head;
  check(hv % hk == 0, "deltanet_decode: Hv must be a multiple of Hk");
  check(proj.dim() == 2 && proj.stride(1) == 1 && proj.size(1) >= ba_off + 2 * hv,
        "deltanet_decode: proj must be [T, qkvz + ba] with unit column stride");
  check(conv_state.is_contiguous() && conv_state.dim() == 3 && conv_state.size(1) == C &&
            conv_state.scalar_type() == st,
        "deltanet_decode: conv_state must be contiguous [S, C, W-1] in proj's dtype");
  const int64_t Wm1 = conv_state.size(2), W = Wm1 + 1;
  check(conv_w.is_contiguous() && conv_w.numel() == C * W && conv_w.scalar_type() == st,
        "deltanet_decode: conv weight must be contiguous [C, 1, W] in proj's dtype");
  check(ssm.is_contiguous() && ssm.scalar_type() == at::kFloat && ssm.dim() == 4 &&
            ssm.size(0) == conv_state.size(0) && ssm.size(1) == hv && ssm.size(2) == dk &&
            ssm.size(3) == dv,
        "deltanet_decode: ssm state must be contiguous fp32 [S, Hv, Dk, Dv]");
  check(out.is_contiguous() && out.dim() == 2 && out.size(1) == hv * dv && out.scalar_type() == st,
        "deltanet_decode: out must be contiguous [T, Hv * Dv] in proj's dtype");
  check(rows.numel() == slots.numel(), "deltanet_decode: rows and slots differ in length");
  auto rc = rows.to(at::kLong).contiguous(), sc = slots.to(at::kLong).contiguous();
  auto alog = A_log.to(at::kFloat).contiguous(), dtb = dt_bias.to(at::kFloat).contiguous();
  auto nw = norm_w.to(st).contiguous();
  const int64_t B = rc.numel(), S = conv_state.size(0), T = proj.size(0), ld = proj.stride(0);
  const int64_t* rp = rc.data_ptr<int64_t>();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    check(rp[b] >= 0 && rp[b] < T && sp[b] >= 0 && sp[b] < S,
          "deltanet_decode: row or slot out of range");
  float* state = ssm.data_ptr<float>();
  const float *al = alog.data_ptr<float>(), *dt = dtb.data_ptr<float>();
  const float q_scale = 1.f / std::sqrt(static_cast<float>(dk));
  const float feps = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "deltanet_decode", [&] {
    using S_ = scalar_t;
    const S_* pp = proj.data_ptr<S_>();
    S_* cs = conv_state.data_ptr<S_>();
    const S_* cw = conv_w.data_ptr<S_>();
    const S_* nwp = nw.data_ptr<S_>();
    S_* op = out.data_ptr<S_>();
    // conv step of channel c for the slot's state with input x -> silu(conv), in S_ precision
    auto conv = [&](int64_t slot, int64_t c, S_ x) -> float {
      S_* s = cs + (slot * C + c) * Wm1;
      const S_* w = cw + c * W;
      float acc = 0.f;
      for (int64_t i = 0; i < Wm1; ++i) acc += f(s[i]) * f(w[i]);
      acc += f(x) * f(w[Wm1]);
      for (int64_t i = 0; i + 1 < Wm1; ++i) s[i] = s[i + 1];
      if (Wm1 > 0) s[Wm1 - 1] = x;
      return rnd<S_>(silu(rnd<S_>(acc)));
    };
    at::parallel_for(0, B * hk, grain(4 * r * dk * dv), [&](int64_t lo, int64_t hi) {
      std::vector<float> q(dk), k(dk), v(dv), kv(dv), o(dv);
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t b = item / hk, h = item % hk, slot = sp[b];
        const S_* row = pp + rp[b] * ld;
        const S_* head = row + h * per_head;
        float qq = 0.f, kk = 0.f;
        for (int64_t d = 0; d < dk; ++d) {
          q[d] = conv(slot, h * dk + d, head[d]);
          k[d] = conv(slot, key_dim + h * dk + d, head[dk + d]);
          qq += q[d] * q[d];
          kk += k[d] * k[d];
        }
        const float qn = 1.f / std::sqrt(qq + 1e-6f), kn = 1.f / std::sqrt(kk + 1e-6f);
        for (int64_t d = 0; d < dk; ++d) { q[d] = q[d] * qn * q_scale; k[d] *= kn; }
        for (int64_t i = 0; i < r; ++i) {
          const int64_t j = h * r + i;  // value head
          const S_* vin = head + 2 * dk + i * dv;
          const S_* z = head + 2 * dk + r * dv + i * dv;
          for (int64_t d = 0; d < dv; ++d) v[d] = conv(slot, 2 * key_dim + j * dv + d, vin[d]);
          const float beta = rnd<S_>(sigmoid(f(row[ba_off + h * 2 * r + i])));
          const float g = -std::exp(al[j]) * softplus(f(row[ba_off + h * 2 * r + r + i]) + dt[j]);
          const float decay = std::exp(g);
          float* s = state + ((slot * hv + j) * dk) * dv;  // [Dk, Dv]
          std::fill(kv.begin(), kv.end(), 0.f);
          for (int64_t a = 0; a < dk; ++a) {
            float* sa = s + a * dv;
            const float ka = k[a];
_Pragma("omp simd")
            for (int64_t d = 0; d < dv; ++d) { sa[d] *= decay; kv[d] += ka * sa[d]; }
          }
          for (int64_t d = 0; d < dv; ++d) kv[d] = (v[d] - kv[d]) * beta;  // delta
          std::fill(o.begin(), o.end(), 0.f);
          for (int64_t a = 0; a < dk; ++a) {
            float* sa = s + a * dv;
            const float ka = k[a], qa = q[a];
_Pragma("omp simd")
            for (int64_t d = 0; d < dv; ++d) { sa[d] += ka * kv[d]; o[d] += qa * sa[d]; }
          }
          // gated RMSNorm: weight * norm(o) * silu(z), rounding where the reference does
          float ss = 0.f;
          for (int64_t d = 0; d < dv; ++d) { o[d] = rnd<S_>(o[d]); ss += o[d] * o[d]; }
          const float rr = 1.f / std::sqrt(ss / static_cast<float>(dv) + feps);
          S_* dst = op + rp[b] * (hv * dv) + j * dv;
          for (int64_t d = 0; d < dv; ++d) {
            const float y = rnd<S_>(f(nwp[d]) * rnd<S_>(o[d] * rr));
            dst[d] = as<S_>(y * silu(f(z[d])));
          }
        }
      }
    });
  });
}

// ----------------------------------------------------------------------- gated attention
// Per token: q heads and k heads RMS-normed (zero-centred weights) and rotated (partial RoPE,
// first R dims, rotate-half), k and v written to the paged cache at slot_mapping[t] (a row of
// the [N * bs] pool). qkv rows: [q_proj: per head query (D) | gate (D)] [k (Hkv*D)] [v (Hkv*D)].
// Returns q [T, Hq, D].
at::Tensor attn_prep(const at::Tensor& qkv, const at::Tensor& positions,
                     const at::Tensor& slot_mapping, const at::Tensor& q_norm_w,
                     const at::Tensor& k_norm_w, const at::Tensor& inv_freq,
                     at::Tensor& k_cache, at::Tensor& v_cache, int64_t hq, int64_t hkv,
                     int64_t D, int64_t R, double eps) {
  const auto st = qkv.scalar_type();
  const int64_t T = qkv.size(0), ld = qkv.stride(0), half = R / 2;
  check(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) >= 2 * hq * D + 2 * hkv * D,
        "attn_prep: qkv must be [T, 2*Hq*D + 2*Hkv*D] with unit column stride");
  check(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == st &&
            v_cache.scalar_type() == st && k_cache.dim() == 4 && k_cache.size(2) == hkv &&
            k_cache.size(3) == D && v_cache.sizes() == k_cache.sizes(),
        "attn_prep: caches must be contiguous [N, bs, Hkv, D] in qkv's dtype");
  check(R % 2 == 0 && R <= D && inv_freq.numel() == half, "attn_prep: bad rotary dims");
  check(positions.numel() == T && slot_mapping.numel() == T,
        "attn_prep: positions and slot_mapping must have T entries");
  auto pc = positions.to(at::kLong).contiguous(), mc = slot_mapping.to(at::kLong).contiguous();
  auto fc = inv_freq.to(at::kFloat).contiguous();
  auto qw = q_norm_w.to(st).contiguous(), kw = k_norm_w.to(st).contiguous();
  auto q = at::empty({T, hq, D}, qkv.options());
  const int64_t rows = k_cache.size(0) * k_cache.size(1);
  const int64_t* pos = pc.data_ptr<int64_t>();
  const int64_t* map = mc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) check(map[t] >= 0 && map[t] < rows, "attn_prep: slot out of range");
  const float* fr = fc.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "attn_prep", [&] {
    using S_ = scalar_t;
    const S_* xp = qkv.data_ptr<S_>();
    const S_ *qwp = qw.data_ptr<S_>(), *kwp = kw.data_ptr<S_>();
    S_ *qp = q.data_ptr<S_>(), *kc = k_cache.data_ptr<S_>(), *vc = v_cache.data_ptr<S_>();
    at::parallel_for(0, T, grain(6 * (hq + hkv) * D), [&](int64_t lo, int64_t hi) {
      std::vector<float> cs(half), sn(half), tmp(D);
      auto norm_rope = [&](const S_* src, const S_* w, S_* dst) {
        rms_row(src, w, dst, D, feps);
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = f(dst[i]), x2 = f(dst[i + half]);
          tmp[i] = rnd<S_>(rnd<S_>(x1 * cs[i]) + rnd<S_>(-x2 * sn[i]));
          tmp[i + half] = rnd<S_>(rnd<S_>(x2 * cs[i]) + rnd<S_>(x1 * sn[i]));
        }
        for (int64_t i = 0; i < R; ++i) dst[i] = as<S_>(tmp[i]);
      };
      for (int64_t t = lo; t < hi; ++t) {
        const float p = static_cast<float>(pos[t]);
        for (int64_t i = 0; i < half; ++i) {
          const float a = p * fr[i];
          cs[i] = rnd<S_>(std::cos(a));
          sn[i] = rnd<S_>(std::sin(a));
        }
        const S_* row = xp + t * ld;
        for (int64_t h = 0; h < hq; ++h) norm_rope(row + h * 2 * D, qwp, qp + (t * hq + h) * D);
        S_* kd = kc + map[t] * hkv * D;
        S_* vd = vc + map[t] * hkv * D;
        for (int64_t h = 0; h < hkv; ++h) norm_rope(row + 2 * hq * D + h * D, kwp, kd + h * D);
        const S_* vs = row + 2 * hq * D + hkv * D;
        for (int64_t i = 0; i < hkv * D; ++i) vd[i] = vs[i];
      }
    });
  });
  return q;
}

// Decode attention straight from the paged cache (no gather copy): for each b, the query
// q[rows[b]] at position pos = positions[rows[b]] of sequence slots[b] attends to its keys
// k <= pos (blocks block_table[slot, k / bs]); with window >= 0 only keys k < sinks or
// k > pos - window. out[rows[b]] = attention * sigmoid(gate), gate from the qkv rows.
void paged_decode(const at::Tensor& q, const at::Tensor& qkv, const at::Tensor& rows,
                  const at::Tensor& slots, const at::Tensor& positions,
                  const at::Tensor& block_table, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, at::Tensor& out, double scale, int64_t sinks,
                  int64_t window) {
  const auto st = q.scalar_type();
  check(q.dim() == 3 && q.is_contiguous(), "paged_decode: q must be contiguous [T, Hq, D]");
  const int64_t T = q.size(0), hq = q.size(1), D = q.size(2);
  const int64_t hkv = k_cache.size(2), bs = k_cache.size(1), G = hq / hkv, ld = qkv.stride(0);
  check(hq % hkv == 0 && k_cache.size(3) == D && k_cache.is_contiguous() &&
            v_cache.is_contiguous() && k_cache.scalar_type() == st && v_cache.scalar_type() == st,
        "paged_decode: caches must be contiguous [N, bs, Hkv, D] in q's dtype");
  check(qkv.dim() == 2 && qkv.size(0) == T && qkv.stride(1) == 1 && qkv.size(1) >= 2 * hq * D &&
            qkv.scalar_type() == st,
        "paged_decode: qkv must be [T, >= 2*Hq*D] in q's dtype");
  check(out.is_contiguous() && out.dim() == 2 && out.size(0) == T && out.size(1) == hq * D &&
            out.scalar_type() == st,
        "paged_decode: out must be contiguous [T, Hq*D] in q's dtype");
  check(block_table.dim() == 2 && block_table.is_contiguous() &&
            block_table.scalar_type() == at::kLong,
        "paged_decode: block_table must be contiguous int64 [S, M]");
  auto rc = rows.to(at::kLong).contiguous(), sc = slots.to(at::kLong).contiguous();
  auto pc = positions.to(at::kLong).contiguous();
  const int64_t B = rc.numel(), M = block_table.size(1), N = k_cache.size(0);
  const int64_t *rp = rc.data_ptr<int64_t>(), *sp = sc.data_ptr<int64_t>();
  const int64_t *pp = pc.data_ptr<int64_t>(), *bt = block_table.data_ptr<int64_t>();
  check(sc.numel() == B && pc.numel() == T, "paged_decode: rows/slots/positions sizes");
  for (int64_t b = 0; b < B; ++b) {
    check(rp[b] >= 0 && rp[b] < T && sp[b] >= 0 && sp[b] < block_table.size(0),
          "paged_decode: row or slot out of range");
    check(pp[rp[b]] >= 0 && pp[rp[b]] / bs < M, "paged_decode: position beyond the block table");
  }
  const float fscale = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "paged_decode", [&] {
    using S_ = scalar_t;
    const S_ *qp = q.data_ptr<S_>(), *xp = qkv.data_ptr<S_>();
    const S_ *kc = k_cache.data_ptr<S_>(), *vc = v_cache.data_ptr<S_>();
    S_* op = out.data_ptr<S_>();
    at::parallel_for(0, B * hkv, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> qf(G * D), acc(G * D), sc_(G * bs), m(G), l(G);
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t b = item / hkv, g = item % hkv, t = rp[b], slot = sp[b], pos = pp[t];
        for (int64_t i = 0; i < G; ++i)
          for (int64_t d = 0; d < D; ++d) qf[i * D + d] = f(qp[(t * hq + g * G + i) * D + d]);
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
        std::fill(l.begin(), l.end(), 0.f);
        // visible key ranges: [0, pos] or [0, min(sinks, pos + 1)) + [max(sinks, pos-window+1), pos]
        int64_t ranges[2][2] = {{0, pos + 1}, {0, 0}};
        if (window >= 0) {
          const int64_t lo2 = std::max(sinks, pos - window + 1);
          ranges[0][1] = std::min(sinks, pos + 1);
          ranges[1][0] = lo2;
          ranges[1][1] = lo2 <= pos ? pos + 1 : lo2;
        }
        for (auto& range : ranges) {
          for (int64_t k0 = range[0]; k0 < range[1];) {  // one block (or part) at a time
            const int64_t blk = bt[slot * M + k0 / bs], off = k0 % bs;
            const int64_t n = std::min(bs - off, range[1] - k0);
            TORCH_CHECK(blk >= 0 && blk < N, "paged_decode: block id out of range");
            const S_* kb = kc + ((blk * bs + off) * hkv + g) * D;
            const S_* vb = vc + ((blk * bs + off) * hkv + g) * D;
            for (int64_t i = 0; i < G; ++i) {
              const float* qi = qf.data() + i * D;
              float mx = m[i];
              for (int64_t j = 0; j < n; ++j) {
                const S_* kj = kb + j * hkv * D;
                float s = 0.f;
_Pragma("omp simd reduction(+ : s)")
                for (int64_t d = 0; d < D; ++d) s += qi[d] * f(kj[d]);
                s *= fscale;
                sc_[i * bs + j] = s;
                mx = std::max(mx, s);
              }
              const float corr = std::exp(m[i] - mx);  // 0 on the first block (m = -inf)
              float* ai = acc.data() + i * D;
              float li = l[i] * corr;
              for (int64_t d = 0; d < D; ++d) ai[d] *= corr;
              for (int64_t j = 0; j < n; ++j) {
                const float p = std::exp(sc_[i * bs + j] - mx);
                li += p;
                const S_* vj = vb + j * hkv * D;
_Pragma("omp simd")
                for (int64_t d = 0; d < D; ++d) ai[d] += p * f(vj[d]);
              }
              m[i] = mx;
              l[i] = li;
            }
            k0 += n;
          }
        }
        for (int64_t i = 0; i < G; ++i) {
          const int64_t h = g * G + i;
          const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
          const S_* gate = xp + t * ld + h * 2 * D + D;
          S_* dst = op + t * hq * D + h * D;
          for (int64_t d = 0; d < D; ++d) {
            const float a = rnd<S_>(acc[i * D + d] * inv);
            dst[d] = as<S_>(a * rnd<S_>(sigmoid(f(gate[d]))));
          }
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(expertmesh_dense, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("route_topk(Tensor logits, int E, int K, bool renormalize) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gu, int I) -> Tensor");
  m.def("moe_combine_norm(Tensor x, Tensor routed, Tensor shared, Tensor gate, Tensor weight, "
        "float eps) -> (Tensor, Tensor)");
  m.def("deltanet_decode(Tensor proj, Tensor rows, Tensor slots, Tensor(a!) conv_state, "
        "Tensor conv_w, Tensor(b!) ssm, Tensor A_log, Tensor dt_bias, Tensor norm_w, "
        "Tensor(c!) out, int hk, int hv, int dk, int dv, float eps) -> ()");
  m.def("attn_prep(Tensor qkv, Tensor positions, Tensor slot_mapping, Tensor q_norm_w, "
        "Tensor k_norm_w, Tensor inv_freq, Tensor(a!) k_cache, Tensor(b!) v_cache, int hq, "
        "int hkv, int D, int R, float eps) -> Tensor");
  m.def("paged_decode(Tensor q, Tensor qkv, Tensor rows, Tensor slots, Tensor positions, "
        "Tensor block_table, Tensor k_cache, Tensor v_cache, Tensor(a!) out, float scale, "
        "int sinks, int window) -> ()");
}

TORCH_LIBRARY_IMPL(expertmesh_dense, CPU, m) {
  m.impl("linear", &linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("route_topk", &route_topk);
  m.impl("silu_mul", &silu_mul);
  m.impl("moe_combine_norm", &moe_combine_norm);
  m.impl("deltanet_decode", &deltanet_decode);
  m.impl("attn_prep", &attn_prep);
  m.impl("paged_decode", &paged_decode);
}
