// Attention over the paged KV cache.
//
// Both kernels read a per-sequence metadata row of u32: [q_start, q_len, context_len, block ids...]
// where q_start is the sequence's first new token in the flat batch, context_len counts its cached
// plus new tokens (the new ones are already written to the cache), and the block ids list, in
// order, the cache blocks holding its tokens. The caches are [num_blocks * block_size, kv_heads,
// head_dim]. GQA: q head h reads kv head h / (q_heads / kv_heads); one block of threads serves a
// whole group of q heads, so each K/V row is read once for all of them.
//
// Numerics: f32 inside, online softmax (no score matrix), one rounding when the output is stored.
#include <float.h>
#include "common.cuh"

#define QS_MAX_GROUP 8
#define QS_WARPS 4

// One key of one query's online softmax, for a warp holding E dims per lane: the score q·k
// (summed over the warp, so every lane of the warp must call it), then the running max `m`,
// sum `l` and weighted values `acc` rescaled and updated with v.
template <int E>
__device__ __forceinline__ void online_softmax_step(const float (&q)[E], const float (&k)[E], const float (&v)[E],
                                                    float& m, float& l, float (&acc)[E]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) s += q[e] * k[e];
  s = warp_sum(s);
  const float mn = fmaxf(m, s);
  const float c = expf(m - mn), p = expf(s - mn);
  l = l * c + p;
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = acc[e] * c + p * v[e];
  m = mn;
}

// Decode: one query per sequence. Grid (splits, kv_heads, seqs): each block covers `part`
// consecutive context positions of one sequence and kv head. With one split the result is
// final; otherwise partial (acc, max, sum) go to scratch and `paged_decode_reduce` merges them.
template <typename T, int E>
__device__ void paged_decode(const T* q, long long qst, long long qsh, const T* kc, const T* vc, const uint32_t* meta,
                             int meta_w, int hq, int hkv, int D, int block_size, float scale, int part, int splits,
                             T* out, float* part_acc, float* part_ml) {
  const int b = blockIdx.z, kvh = blockIdx.y, split = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t* row = meta + (size_t)b * meta_w;
  const int qpos = row[0], ctx = row[2];
  const int G = hq / hkv;
  const int start = split * part, end = min(ctx, start + part);
  if (start >= ctx) return;  // the whole block leaves: no barrier is skipped by part of it
  __shared__ float s_m[QS_WARPS][QS_MAX_GROUP], s_l[QS_WARPS][QS_MAX_GROUP];
  __shared__ float s_acc[QS_WARPS][QS_MAX_GROUP][32 * E];
  float qv[QS_MAX_GROUP][E], acc[QS_MAX_GROUP][E], m[QS_MAX_GROUP], l[QS_MAX_GROUP];
#pragma unroll
  for (int g = 0; g < QS_MAX_GROUP; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      acc[g][e] = 0.f;
      qv[g][e] = 0.f;
    }
    if (g < G) {
      const T* qp = q + qpos * qst + (kvh * G + g) * qsh + lane * E;
#pragma unroll
      for (int e = 0; e < E; ++e) qv[g][e] = lane * E + e < D ? to_f(qp[e]) * scale : 0.f;
    }
  }
  for (int j = start + warp; j < end; j += QS_WARPS) {
    const size_t slot = (size_t)row[3 + j / block_size] * block_size + j % block_size;
    const size_t base = (slot * hkv + kvh) * D + lane * E;
    float kf[E], vf[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool in = lane * E + e < D;
      kf[e] = in ? to_f(kc[base + e]) : 0.f;
      vf[e] = in ? to_f(vc[base + e]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < QS_MAX_GROUP; ++g) {
      // G is uniform across the warp: every lane takes part in the step's shuffles.
      if (g < G) online_softmax_step<E>(qv[g], kf, vf, m[g], l[g], acc[g]);
    }
  }
#pragma unroll
  for (int g = 0; g < QS_MAX_GROUP; ++g) {
    if (g < G) {
      if (lane == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
#pragma unroll
      for (int e = 0; e < E; ++e) s_acc[warp][g][lane * E + e] = acc[g][e];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, d = i % D, h = kvh * G + g;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < QS_WARPS; ++w) M = fmaxf(M, s_m[w][g]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < QS_WARPS; ++w) {
      if (s_m[w][g] > -INFINITY) {  // a warp that saw no position holds nothing
        const float f = expf(s_m[w][g] - M);
        L += s_l[w][g] * f;
        A += s_acc[w][g][d] * f;
      }
    }
    if (splits == 1) {
      out[((size_t)qpos * hq + h) * D + d] = from_f<T>(A / L);
    } else {
      const size_t pi = ((size_t)b * hq + h) * splits + split;
      part_acc[pi * D + d] = A;
      if (d == 0) {
        part_ml[pi * 2] = M;
        part_ml[pi * 2 + 1] = L;
      }
    }
  }
}

// Merges the splits of `paged_decode`. Grid (q_heads, seqs), one thread per head dim.
template <typename T>
__device__ void paged_decode_reduce(const float* part_acc, const float* part_ml, const uint32_t* meta, int meta_w,
                                    int hq, int head_dim, int part, int splits, T* out) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  if (d >= head_dim) return;
  const uint32_t* row = meta + (size_t)b * meta_w;
  const int qpos = row[0], ctx = row[2];
  const int used = min(splits, (ctx + part - 1) / part);
  const size_t first = ((size_t)b * hq + h) * splits;
  float M = -INFINITY;
  for (int s = 0; s < used; ++s) M = fmaxf(M, part_ml[(first + s) * 2]);
  float L = 0.f, A = 0.f;
  for (int s = 0; s < used; ++s) {
    const float f = expf(part_ml[(first + s) * 2] - M);
    L += part_ml[(first + s) * 2 + 1] * f;
    A += part_acc[(first + s) * head_dim + d] * f;
  }
  out[((size_t)qpos * hq + h) * head_dim + d] = from_f<T>(A / L);
}

// Prefill (any number of new tokens per sequence, causal). Grid (tiles, kv_heads, seqs): a block
// owns 16 (token, q head of the group) items of one sequence; each warp keeps 4 of them in
// registers. K/V rows stream through shared memory 16 positions at a time and every item's
// online softmax consumes them, so no score matrix is ever stored.
#define QS_ITEMS 4
#define QS_KTILE 16
template <typename T, int E>
__device__ void paged_prefill(const T* q, long long qst, long long qsh, const T* kc, const T* vc,
                              const uint32_t* meta, int meta_w, int hq, int hkv, int D, int block_size, float scale,
                              T* out) {
  constexpr int PER_BLOCK = QS_WARPS * QS_ITEMS;
  const int b = blockIdx.z, kvh = blockIdx.y, tile = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t* row = meta + (size_t)b * meta_w;
  const int q_start = row[0], q_len = row[1], ctx = row[2];
  const int before = ctx - q_len;
  const int G = hq / hkv;
  const int n_items = q_len * G, first = tile * PER_BLOCK;
  if (first >= n_items) return;  // uniform for the block
  const int last = min(first + PER_BLOCK, n_items) - 1;
  const int kmax = before + last / G;  // the last key any item of this block sees
  __shared__ T sk[QS_KTILE][32 * E], sv[QS_KTILE][32 * E];
  float qv[QS_ITEMS][E], acc[QS_ITEMS][E], m[QS_ITEMS], l[QS_ITEMS];
  int lim[QS_ITEMS];
#pragma unroll
  for (int k = 0; k < QS_ITEMS; ++k) {
    const int it = first + warp * QS_ITEMS + k;
    lim[k] = it < n_items ? before + it / G : -1;  // -1: no item, sees nothing
    m[k] = -INFINITY;
    l[k] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      acc[k][e] = 0.f;
      qv[k][e] = 0.f;
    }
    if (it < n_items) {
      const T* qp = q + (q_start + it / G) * qst + (kvh * G + it % G) * qsh + lane * E;
#pragma unroll
      for (int e = 0; e < E; ++e) qv[k][e] = lane * E + e < D ? to_f(qp[e]) * scale : 0.f;
    }
  }
  for (int k0 = 0; k0 <= kmax; k0 += QS_KTILE) {
    __syncthreads();
    for (int x = threadIdx.x; x < QS_KTILE * D; x += blockDim.x) {
      const int jj = x / D, d = x % D, j = k0 + jj;
      if (j <= kmax) {
        const size_t slot = (size_t)row[3 + j / block_size] * block_size + j % block_size;
        sk[jj][d] = kc[(slot * hkv + kvh) * D + d];
        sv[jj][d] = vc[(slot * hkv + kvh) * D + d];
      }
    }
    __syncthreads();
    const int n = min(QS_KTILE, kmax - k0 + 1);
    for (int jj = 0; jj < n; ++jj) {
      const int j = k0 + jj;
      float kf[E], vf[E];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const bool in = lane * E + e < D;
        kf[e] = in ? to_f(sk[jj][lane * E + e]) : 0.f;
        vf[e] = in ? to_f(sv[jj][lane * E + e]) : 0.f;
      }
#pragma unroll
      for (int k = 0; k < QS_ITEMS; ++k) {
        // lim is uniform across the warp: every lane takes part in the step's shuffles.
        if (j <= lim[k]) online_softmax_step<E>(qv[k], kf, vf, m[k], l[k], acc[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < QS_ITEMS; ++k) {
    const int it = first + warp * QS_ITEMS + k;
    if (it < n_items) {
      T* op = out + ((size_t)(q_start + it / G) * hq + kvh * G + it % G) * D + lane * E;
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (lane * E + e < D) op[e] = from_f<T>(acc[k][e] / l[k]);
    }
  }
}

// E: head-dim elements per lane (head_dim <= 32 * E); entry points for E = 1, 2, 4, 8.
#define ATTN_ENTRIES_E(T, NAME, E)                                                                                  \
  extern "C" __global__ void paged_decode_##NAME##_e##E(                                                           \
      const T* q, long long qst, long long qsh, const T* kc, const T* vc, const uint32_t* meta, int meta_w, int hq, \
      int hkv, int head_dim, int block_size, float scale, int part, int splits, T* out, float* part_acc,           \
      float* part_ml) {                                                                                            \
    paged_decode<T, E>(q, qst, qsh, kc, vc, meta, meta_w, hq, hkv, head_dim, block_size, scale, part, splits, out, \
                       part_acc, part_ml);                                                                         \
  }                                                                                                                \
  extern "C" __global__ void paged_prefill_##NAME##_e##E(const T* q, long long qst, long long qsh, const T* kc,     \
                                                          const T* vc, const uint32_t* meta, int meta_w, int hq,   \
                                                          int hkv, int head_dim, int block_size, float scale,      \
                                                          T* out) {                                                \
    paged_prefill<T, E>(q, qst, qsh, kc, vc, meta, meta_w, hq, hkv, head_dim, block_size, scale, out);            \
  }

#define ATTN_ENTRIES(T, NAME)                                                                                    \
  ATTN_ENTRIES_E(T, NAME, 1)                                                                                    \
  ATTN_ENTRIES_E(T, NAME, 2)                                                                                    \
  ATTN_ENTRIES_E(T, NAME, 4)                                                                                    \
  ATTN_ENTRIES_E(T, NAME, 8)                                                                                    \
  extern "C" __global__ void paged_decode_reduce_##NAME(const float* part_acc, const float* part_ml,            \
                                                         const uint32_t* meta, int meta_w, int hq, int head_dim, \
                                                         int part, int splits, T* out) {                         \
    paged_decode_reduce<T>(part_acc, part_ml, meta, meta_w, hq, head_dim, part, splits, out);                   \
  }

QS_FOR_DTYPES(ATTN_ENTRIES)
