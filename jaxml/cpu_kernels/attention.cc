// Multi-head softmax attention for XLA:CPU through the XLA FFI: one fused pass per (example, head).
//
// Forward (JaxmlAttentionForward): q [B, T, H, K], k [B, S, H, K], v [B, S, H, V] (float32, the layout the projections
// produce; no head-major copies) -> out [B, T, H, V] and the probabilities P [B, H, T, S] that the
// backward pass reads (JaxmlAttentionInference, outside autodiff, keeps them in scratch). Per (b, h): the head's queries (scaled by 1 / sqrt(K)), keys (transposed)
// and values are packed into contiguous scratch, the scores Q K^T are written straight into P's
// rows, each row gets its softmax in place (max, exp, sum; a Cephes-style exp), and O = P V is
// written to out. Backward, from dO: dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K / sqrt(K),
// dK = dS^T Q / sqrt(K), dV = P^T dO, the same formulas as jaxml.nn.attention_core's backward.
//
// All products run on one register-tiled kernel, out[r, :] = sum_c A(r, c) B[c, :] with A read
// through strides (so A^T costs nothing) and B rows contiguous, 16-float vectors. The shapes it
// takes: K and V multiples of 16, S a multiple of 16 (jaxml.cpu_kernels.attention checks them and
// runs the plain form otherwise). The (b, h) pairs are shared among the XLA:CPU intra-op threads:
// the caller and the tasks it schedules take pairs from one atomic counter, and the caller waits
// for every pair to finish (a task that starts late finds none left).
//
// Built at run time by jaxml.cpu_kernels (its docstring), only where the compiler targets AVX-512.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#define JAXML_ATTENTION_AVX512 1
#include <immintrin.h>
#else
#define JAXML_ATTENTION_AVX512 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if JAXML_ATTENTION_AVX512
namespace {

inline __m512 Exp(__m512 x) {  // e^x for x <= 0 (a row minus its maximum); relative error about 1e-7
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln 2, in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// out[r * ldo + j] = alpha * sum_c A[r * sr + c * sc] * B[c * ldb + j] for r < RT, j < 16 NV.
template <int RT, int NV>
inline void Tile(const float* A, int64_t sr, int64_t sc, int64_t C, const float* B, int64_t ldb, float* out,
                 int64_t ldo, float alpha) {
  __m512 acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    __m512 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_ps(B + c * ldb + 16 * j);
    for (int r = 0; r < RT; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * sr + c * sc]);
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
    }
  }
  const __m512 s = _mm512_set1_ps(alpha);
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out + r * ldo + 16 * j, _mm512_mul_ps(acc[r][j], s));
}

template <int RT, int NV>
inline void Rows(const float* A, int64_t sr, int64_t sc, int64_t R, int64_t C, const float* B, int64_t ldb,
                 float* out, int64_t ldo, float alpha, int64_t j0) {
  int64_t r = 0;
  for (; r + RT <= R; r += RT) Tile<RT, NV>(A + r * sr, sr, sc, C, B + j0, ldb, out + r * ldo + j0, ldo, alpha);
  for (; r < R; ++r) Tile<1, NV>(A + r * sr, sr, sc, C, B + j0, ldb, out + r * ldo + j0, ldo, alpha);
}

// out [R, D] = alpha * A(R x C, strides sr, sc) @ B [C, D] (rows ldb apart); D a multiple of 16.
void Gemm(const float* A, int64_t sr, int64_t sc, int64_t R, int64_t C, const float* B, int64_t ldb, int64_t D,
          float* out, int64_t ldo, float alpha) {
  int64_t j = 0;
  for (; j + 64 <= D; j += 64) Rows<4, 4>(A, sr, sc, R, C, B, ldb, out, ldo, alpha, j);
  for (; j + 32 <= D; j += 32) Rows<8, 2>(A, sr, sc, R, C, B, ldb, out, ldo, alpha, j);
  for (; j + 16 <= D; j += 16) Rows<8, 1>(A, sr, sc, R, C, B, ldb, out, ldo, alpha, j);
}

// Runs f(i) for i < n on the calling thread and on the pool's other threads.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Dims {
  int64_t B, T, S, H, K, V;
};

ffi::Error CheckDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) {
    return ffi::Error::InvalidArgument("jaxml attention: q, k, v must be [B, T, H, K], [B, S, H, K], [B, S, H, V]");
  }
  *d = Dims{qd[0], qd[1], kd[1], qd[2], qd[3], vd[3]};
  if (kd[0] != d->B || vd[0] != d->B || kd[2] != d->H || vd[2] != d->H || kd[3] != d->K || vd[1] != d->S) {
    return ffi::Error::InvalidArgument("jaxml attention: q, k, v shapes do not agree");
  }
  if (d->K % 16 || d->V % 16 || d->S % 16) {
    return ffi::Error::InvalidArgument("jaxml attention: K, V and S must be multiples of 16, got K = " +
                                       std::to_string(d->K) + ", V = " + std::to_string(d->V) +
                                       ", S = " + std::to_string(d->S));
  }
  return ffi::Error::Success();
}

// The forward pass; the probabilities go to pp ([B, H, T, S]) or, when pp is null, to scratch.
ffi::Error Forward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                   ffi::Buffer<ffi::F32>& v, float* op, float* pp) {
  Dims d;
  if (auto e = CheckDims(q, k, v, &d); e.failure()) return e;
  const int64_t B = d.B, T = d.T, S = d.S, H = d.H, K = d.K, V = d.V;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  ParallelFor(pool, B * H, [=](int64_t i) {
    const int64_t b = i / H, h = i % H;
    thread_local std::vector<float> scratch;
    scratch.resize(T * K + K * S + S * V + (pp ? 0 : T * S));
    float* Q = scratch.data();
    float* Kt = Q + T * K;
    float* Vs = Kt + K * S;
    for (int64_t t = 0; t < T; ++t) {
      const float* src = qp + ((b * T + t) * H + h) * K;
      for (int64_t c = 0; c < K; c += 16)
        _mm512_storeu_ps(Q + t * K + c, _mm512_mul_ps(_mm512_loadu_ps(src + c), _mm512_set1_ps(scale)));
    }
    for (int64_t s = 0; s < S; ++s) {
      const float* ks = kp + ((b * S + s) * H + h) * K;
      for (int64_t c = 0; c < K; ++c) Kt[c * S + s] = ks[c];
      const float* vs = vp + ((b * S + s) * H + h) * V;
      for (int64_t c = 0; c < V; c += 16) _mm512_storeu_ps(Vs + s * V + c, _mm512_loadu_ps(vs + c));
    }
    float* P = pp ? pp + i * T * S : Vs + S * V;
    Gemm(Q, K, 1, T, K, Kt, S, S, P, S, 1.0f);
    for (int64_t t = 0; t < T; ++t) {
      float* row = P + t * S;
      __m512 m = _mm512_loadu_ps(row);
      for (int64_t c = 16; c < S; c += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + c));
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < S; c += 16) {
        const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(row + c), mx));
        _mm512_storeu_ps(row + c, e);
        sum = _mm512_add_ps(sum, e);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
      for (int64_t c = 0; c < S; c += 16) _mm512_storeu_ps(row + c, _mm512_mul_ps(_mm512_loadu_ps(row + c), inv));
    }
    Gemm(P, S, 1, T, S, Vs, V, V, op + (b * T * H + h) * V, H * V, 1.0f);
  });
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs) {
  return Forward(pool, q, k, v, out->typed_data(), probs->typed_data());
}

// Inference (nothing differentiates): the probabilities stay in per-thread scratch.
ffi::Error InferenceImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out) {
  return Forward(pool, q, k, v, out->typed_data(), nullptr);
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> out,
                        ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (auto e = CheckDims(q, k, v, &d); e.failure()) return e;
  const int64_t B = d.B, T = d.T, S = d.S, H = d.H, K = d.K, V = d.V;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float* pp = probs.typed_data();
  const float* op = out.typed_data();
  const float* dop = dout.typed_data();
  float* dqp = dq->typed_data();
  float* dkp = dk->typed_data();
  float* dvp = dv->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  ParallelFor(pool, B * H, [=](int64_t i) {
    const int64_t b = i / H, h = i % H;
    thread_local std::vector<float> scratch;
    scratch.resize(T * V + V * S + S * K + T * K + T * S);
    float* dO = scratch.data();
    float* Vt = dO + T * V;
    float* Ks = Vt + V * S;
    float* Q = Ks + S * K;
    float* dS = Q + T * K;
    for (int64_t t = 0; t < T; ++t) {
      const float* g = dop + ((b * T + t) * H + h) * V;
      for (int64_t c = 0; c < V; c += 16) _mm512_storeu_ps(dO + t * V + c, _mm512_loadu_ps(g + c));
      const float* qs = qp + ((b * T + t) * H + h) * K;
      for (int64_t c = 0; c < K; c += 16) _mm512_storeu_ps(Q + t * K + c, _mm512_loadu_ps(qs + c));
    }
    for (int64_t s = 0; s < S; ++s) {
      const float* vs = vp + ((b * S + s) * H + h) * V;
      for (int64_t c = 0; c < V; ++c) Vt[c * S + s] = vs[c];
      const float* ks = kp + ((b * S + s) * H + h) * K;
      for (int64_t c = 0; c < K; c += 16) _mm512_storeu_ps(Ks + s * K + c, _mm512_loadu_ps(ks + c));
    }
    const float* P = pp + i * T * S;
    Gemm(dO, V, 1, T, V, Vt, S, S, dS, S, 1.0f);  // dP
    for (int64_t t = 0; t < T; ++t) {
      const float* o = op + ((b * T + t) * H + h) * V;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < V; c += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(dO + t * V + c), _mm512_loadu_ps(o + c), acc);
      const __m512 row = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
      for (int64_t c = 0; c < S; c += 16) {
        const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(dS + t * S + c), row);
        _mm512_storeu_ps(dS + t * S + c, _mm512_mul_ps(_mm512_loadu_ps(P + t * S + c), x));
      }
    }
    Gemm(dS, S, 1, T, S, Ks, K, K, dqp + (b * T * H + h) * K, H * K, scale);  // dQ = dS K
    Gemm(dS, 1, S, S, T, Q, K, K, dkp + (b * S * H + h) * K, H * K, scale);   // dK = dS^T Q
    Gemm(P, 1, S, S, T, dO, V, V, dvp + (b * S * H + h) * V, H * V, 1.0f);    // dV = P^T dO
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmlAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmlAttentionInference, InferenceImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmlAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#endif  // JAXML_ATTENTION_AVX512

// 1 where this build has the kernels (the compiler targets AVX-512), 0 where it has none.
extern "C" int JaxmlAttentionVectorised() { return JAXML_ATTENTION_AVX512; }
