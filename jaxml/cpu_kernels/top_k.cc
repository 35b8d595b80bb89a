// Exact top-k of every row of a float32 array, for XLA:CPU through the XLA FFI.
//
// The order is jax.lax.top_k's on canonical scores (jaxml.recsys.causal.metrics.canonical_scores):
// NaN counts as -inf, -0.0 as +0.0, higher scores first, equal scores by index, lower first. The
// values returned are the canonical ones.
//
// Per row, for rows of at least 32 k entries (the rest, and rows with fewer than k finite groups,
// take the simple path below):
//  1. Split the row into 2k equal groups (whole multiples of 16 entries; a tail of fewer than one
//     group's length belongs to none) and take each group's maximum (NaN ignored). The k-th largest
//     maximum t0 is a lower bound on the row's k-th largest score: the k groups with the largest
//     maxima hold at least k entries >= t0. So only entries >= t0 can be in the top k.
//  2. One vectorised pass collects the entries >= t0 (values and ids, in index order). If the
//     buffer fills (many ties at t0), its k best are kept and the bound tightens to the k-th best
//     value, strictly: a later equal score has a higher index and ranks after it.
//  3. The candidates are ordered by (score desc, index asc) and the first k returned.
// On 10,000 standard-normal scores and k = 20, about 27 entries pass the bound.
// The simple path (short rows, few finite groups): the first k entries sorted into a list, then
// every later entry that beats the list's last one (strictly) inserted after the entries it does
// not beat.
// The raw comparisons `x > t`, `x >= t` are false for NaN (whose canonical -inf never reaches the
// top k once t0 > -inf) and treat -0.0 and +0.0 as equal, so they answer as the canonical ones do.
//
// The handler takes x [..., n] and returns values [..., k] float32 and ids [..., k] int32; k comes
// from the result's shape. Built at run time by jaxml.cpu_kernels (its docstring).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

// The AVX-512 paths (group maxima, the filtering pass); -DJAXML_TOP_K_PORTABLE builds the plain loops
// instead, as any other CPU gets (tests/test_cpu_kernels.py builds both).
#if defined(__AVX512F__) && !defined(JAXML_TOP_K_PORTABLE)
#define JAXML_TOP_K_AVX512 1
#include <immintrin.h>
#else
#define JAXML_TOP_K_AVX512 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

inline float Canonical(float v) {
  if (v != v) return -kInf;
  return v == 0.0f ? 0.0f : v;
}

struct Entry {
  float value;
  int32_t id;
};

inline bool Before(const Entry& a, const Entry& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

// Puts (v, id) into the list values[0, size), ids[0, size) (best first), after every entry whose
// value is not below v: all of them have lower ids, so they rank ahead on a tie. With `full`, the
// list keeps its size and its last entry drops out; otherwise it grows by one.
inline void Insert(float* values, int32_t* ids, int64_t size, bool full, float v, int32_t id) {
  int64_t pos = 0;
  while (pos < size && values[pos] >= v) ++pos;
  int64_t last = full ? size - 1 : size;
  for (int64_t i = last; i > pos; --i) {
    values[i] = values[i - 1];
    ids[i] = ids[i - 1];
  }
  values[pos] = v;
  ids[pos] = id;
}

void SimpleRowTopK(const float* row, int64_t n, int64_t k, float* values, int32_t* ids) {
  for (int64_t j = 0; j < k; ++j) Insert(values, ids, j, false, Canonical(row[j]), static_cast<int32_t>(j));
  float threshold = values[k - 1];
  for (int64_t j = k; j < n; ++j) {
    float v = Canonical(row[j]);
    if (v > threshold) {
      Insert(values, ids, k, true, v, static_cast<int32_t>(j));
      threshold = values[k - 1];
    }
  }
}

// Candidates of one row: room for `cap` plus one vector's worth past it.
struct Scratch {
  explicit Scratch(int64_t k) : cap(std::max<int64_t>(4 * k, 64)), values(cap + 16), ids(cap + 16), entries(cap + 16) {}
  int64_t cap;
  std::vector<float> values;
  std::vector<int32_t> ids;
  std::vector<Entry> entries;
  std::vector<float> maxima;
  int64_t count = 0;

  void Gather() {
    for (int64_t i = 0; i < count; ++i) entries[i] = {values[i], ids[i]};
  }
  // Keeps the k best candidates; returns the k-th best value.
  float Keep(int64_t k) {
    Gather();
    std::nth_element(entries.begin(), entries.begin() + (k - 1), entries.begin() + count, Before);
    for (int64_t i = 0; i < k; ++i) {
      values[i] = entries[i].value;
      ids[i] = entries[i].id;
    }
    count = k;
    return entries[k - 1].value;
  }
};

inline float GroupMax(const float* p, int64_t len) {  // len: a multiple of 16; NaN entries ignored
#if JAXML_TOP_K_AVX512
  __m512 a = _mm512_set1_ps(-kInf), b = a;
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    a = _mm512_max_ps(_mm512_loadu_ps(p + i), a);      // max(x, acc) is acc where x is NaN
    b = _mm512_max_ps(_mm512_loadu_ps(p + i + 16), b);
  }
  if (i < len) a = _mm512_max_ps(_mm512_loadu_ps(p + i), a);
  return _mm512_reduce_max_ps(_mm512_max_ps(a, b));
#else
  float m = -kInf;
  for (int64_t i = 0; i < len; ++i) m = p[i] > m ? p[i] : m;
  return m;
#endif
}

// False where the row needs the simple path (see the top of the file).
bool BoundedRowTopK(const float* row, int64_t n, int64_t k, float* values, int32_t* ids, Scratch& s) {
  const int64_t length = (n / (2 * k)) / 16 * 16;
  if (length < 16) return false;
  const int64_t groups = n / length;
  s.maxima.resize(groups);
  for (int64_t g = 0; g < groups; ++g) s.maxima[g] = GroupMax(row + g * length, length);
  std::nth_element(s.maxima.begin(), s.maxima.begin() + (k - 1), s.maxima.end(), std::greater<float>());
  float bound = s.maxima[k - 1];
  if (bound == -kInf) return false;
  bool strict = false;  // entries >= bound until the buffer first fills, > bound after
  s.count = 0;
  int64_t j = 0;
#if JAXML_TOP_K_AVX512
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= n; j += 16) {
    __m512 v = _mm512_loadu_ps(row + j);
    __m512 t = _mm512_set1_ps(bound);
    __mmask16 m = strict ? _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
    if (!m) continue;
    _mm512_storeu_ps(s.values.data() + s.count, _mm512_maskz_compress_ps(m, v));
    __m512i id = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)), iota);
    _mm512_storeu_si512(s.ids.data() + s.count, _mm512_maskz_compress_epi32(m, id));
    s.count += __builtin_popcount(m);
    if (s.count >= s.cap) {
      bound = s.Keep(k);
      strict = true;
    }
  }
#endif
  for (; j < n; ++j) {
    float v = row[j];
    if (strict ? v > bound : v >= bound) {
      s.values[s.count] = v;
      s.ids[s.count] = static_cast<int32_t>(j);
      if (++s.count >= s.cap) {
        bound = s.Keep(k);
        strict = true;
      }
    }
  }
  s.Gather();
  std::partial_sort(s.entries.begin(), s.entries.begin() + k, s.entries.begin() + s.count, Before);
  for (int64_t i = 0; i < k; ++i) {
    values[i] = Canonical(s.entries[i].value);
    ids[i] = s.entries[i].id;
  }
  return true;
}

ffi::Error TopKImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                    ffi::ResultBuffer<ffi::S32> ids) {
  auto in_dims = x.dimensions();
  auto out_dims = values->dimensions();
  if (in_dims.size() == 0 || in_dims.size() != out_dims.size()) {
    return ffi::Error::InvalidArgument("jaxml top_k: the input needs a last axis, and the results the same rank");
  }
  const int64_t n = in_dims.back();
  const int64_t k = out_dims.back();
  if (k < 1 || k > n) {
    return ffi::Error::InvalidArgument("jaxml top_k: k must be in [1, n], got k = " + std::to_string(k) +
                                       ", n = " + std::to_string(n));
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument("jaxml top_k: rows longer than int32 ids can index");
  }
  const int64_t rows = static_cast<int64_t>(x.element_count()) / n;
  const float* in = x.typed_data();
  float* out_values = values->typed_data();
  int32_t* out_ids = ids->typed_data();
  Scratch scratch(k);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = in + r * n;
    if (!BoundedRowTopK(row, n, k, out_values + r * k, out_ids + r * k, scratch)) {
      SimpleRowTopK(row, n, k, out_values + r * k, out_ids + r * k);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmlTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// 1 where this build runs the AVX-512 paths, 0 where it runs the plain loops (for the tests).
extern "C" int JaxmlTopKVectorised() { return JAXML_TOP_K_AVX512; }
