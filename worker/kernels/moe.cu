// The fused mixture-of-experts path: token copies grouped by expert on the device (no host round
// trip, so nothing waits on the routing), one grouped GEMM for every local expert's gate/up
// projection with SiLU·mul in its epilogue, one grouped GEMM for the down projection, and a
// per-token weighted sum over its top-k slots (un-permute). The CPU reference is
// `moe_experts` in worker/src/kernels/reference.rs; numerics as the unfused path: f32 inside,
// one rounding to T per stored value.
//
// Assignments are the (token, slot) pairs, token-major: a = t * top_k + j. Each local expert's
// rows of the grouped layout start at a multiple of BM, so every BM-row tile belongs to one
// expert and a GEMM block reads one expert's weights.
#include "common.cuh"

constexpr int MOE_MAX_EXPERTS = 1024;

// Groups the assignments by local expert (ids in [first, first + local)). Writes rows[p] = a for
// each grouped row (-1 for padding), tile_expert[i] = local expert of tile i (-1: unused), and
// inv[a] = p (-1: an expert another rank holds). One block; within an expert the row order
// depends on atomics, which is harmless: each row is computed on its own.
extern "C" __global__ void moe_align(const uint32_t* ids, int assignments, int first, int local, int bm, int* rows,
                                     int capacity, int* tile_expert, int* inv) {
  __shared__ int cursor[MOE_MAX_EXPERTS];
  for (int e = threadIdx.x; e < local; e += blockDim.x) cursor[e] = 0;
  for (int p = threadIdx.x; p < capacity; p += blockDim.x) rows[p] = -1;
  for (int i = threadIdx.x; i < capacity / bm; i += blockDim.x) tile_expert[i] = -1;
  __syncthreads();
  for (int a = threadIdx.x; a < assignments; a += blockDim.x) {
    const long long e = (long long)ids[a] - first;
    if (e >= 0 && e < local) atomicAdd(&cursor[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int start = 0;
    for (int e = 0; e < local; ++e) {
      const int tiles = (cursor[e] + bm - 1) / bm;
      cursor[e] = start;
      for (int i = 0; i < tiles; ++i) tile_expert[start / bm + i] = e;
      start += tiles * bm;
    }
  }
  __syncthreads();
  for (int a = threadIdx.x; a < assignments; a += blockDim.x) {
    const long long e = (long long)ids[a] - first;
    if (e >= 0 && e < local) {
      const int p = atomicAdd(&cursor[e], 1);
      rows[p] = a;
      inv[a] = p;
    } else {
      inv[a] = -1;
    }
  }
}

// counts[e] += assignments routed to expert e (the per-expert load, summed on the device and
// read by the host between steps).
extern "C" __global__ void moe_count(const uint32_t* ids, int assignments, int experts, uint32_t* counts) {
  for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < assignments; a += gridDim.x * blockDim.x) {
    if (ids[a] < (uint32_t)experts) atomicAdd(&counts[ids[a]], 1u);
  }
}

// One BM x BN tile of a grouped GEMM, 256 threads as 16 x 16, each owning rows ty + 16 i and
// columns tx + 16 j (strided, so shared-memory reads are conflict-free).
//   GATED: A row p is token rows[p] / top_k of x [T, K]; W is the expert's [2N, K] gate and up;
//          out[p, n] = silu(gate) * up, as `silu_mul` rounds it; out is [capacity, N].
//   else:  A row p is a[p] of [capacity, K]; W is the expert's [N, K]; out[p, n] = the product.
// K runs in order within each thread, as the reference sums it.
template <typename T, int BM, bool GATED>
__device__ void moe_gemm(const T* a, const T* w, const int* rows, const int* tile_expert, T* out, int top_k, int k_dim,
                         int n_dim) {
  constexpr int BN = 64, BK = 32, TM = BM / 16, TN = BN / 16, G = GATED ? 2 : 1;
  static_assert(BM % 16 == 0, "BM is a multiple of 16");
  const int tile = blockIdx.x, e = tile_expert[tile];
  if (e < 0) return;
  const int n0 = blockIdx.y * BN, tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  __shared__ float as[BK][BM + 1];
  __shared__ float ws[G][BK][BN + 1];
  __shared__ long long src[BM];
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    const int row = rows[tile * BM + r];
    src[r] = row < 0 ? -1 : (GATED ? (long long)(row / top_k) : (long long)tile * BM + r);
  }
  const T* we = w + (size_t)e * G * n_dim * k_dim;
  float acc[G][TM][TN];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[g][i][j] = 0.f;
  __syncthreads();
  for (int k0 = 0; k0 < k_dim; k0 += BK) {
    for (int idx = threadIdx.x; idx < BM * BK; idx += blockDim.x) {
      const int r = idx / BK, c = idx % BK;
      const long long s = src[r];
      as[c][r] = (s >= 0 && k0 + c < k_dim) ? to_f(a[s * k_dim + k0 + c]) : 0.f;
    }
    for (int idx = threadIdx.x; idx < G * BN * BK; idx += blockDim.x) {
      const int g = idx / (BN * BK), n = (idx / BK) % BN, c = idx % BK;
      const bool in = n0 + n < n_dim && k0 + c < k_dim;
      ws[g][c][n] = in ? to_f(we[((size_t)g * n_dim + n0 + n) * k_dim + k0 + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int c = 0; c < BK; ++c) {
      float av[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = as[c][ty + 16 * i];
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const float wv = ws[g][c][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < TM; ++i) acc[g][i][j] += av[i] * wv;
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const size_t p = (size_t)tile * BM + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n >= n_dim) continue;
      if (GATED) {
        // The unfused path stores gate and up in T, then silu in T, then the product.
        const float gate = round_to<T>(acc[0][i][j]), up = round_to<T>(acc[G - 1][i][j]);
        out[p * n_dim + n] = from_f<T>(round_to<T>(gate / (1.f + expf(-gate))) * up);
      } else {
        out[p * n_dim + n] = from_f<T>(acc[0][i][j]);
      }
    }
  }
}

// out[t] = sum over slots j of weights[t, j] * y[inv[t * top_k + j]] (slots held elsewhere
// skipped), summed in f32 in slot order and rounded once. One block per token.
template <typename T>
__device__ void moe_unpermute(const T* y, const int* inv, const float* weights, T* out, int top_k, int hidden) {
  const int t = blockIdx.x;
  for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const int p = inv[t * top_k + j];
      if (p >= 0) acc += weights[t * top_k + j] * to_f(y[(size_t)p * hidden + h]);
    }
    out[(size_t)t * hidden + h] = from_f<T>(acc);
  }
}

#define MOE_GEMMS(T, NAME, BM)                                                                                   \
  extern "C" __global__ void moe_gate_up_bm##BM##_##NAME(const T* x, const T* w, const int* rows,               \
                                                         const int* tile_expert, T* act, int top_k, int hidden, \
                                                         int ff) {                                              \
    moe_gemm<T, BM, true>(x, w, rows, tile_expert, act, top_k, hidden, ff);                                    \
  }                                                                                                             \
  extern "C" __global__ void moe_down_bm##BM##_##NAME(const T* act, const T* w, const int* rows,                \
                                                      const int* tile_expert, T* y, int top_k, int ff,          \
                                                      int hidden) {                                             \
    moe_gemm<T, BM, false>(act, w, rows, tile_expert, y, top_k, ff, hidden);                                   \
  }

#define MOE_ENTRIES(T, NAME)                                                                                    \
  MOE_GEMMS(T, NAME, 16)                                                                                        \
  MOE_GEMMS(T, NAME, 64)                                                                                        \
  extern "C" __global__ void moe_unpermute_##NAME(const T* y, const int* inv, const float* weights, T* out,     \
                                                  int top_k, int hidden) {                                      \
    moe_unpermute<T>(y, inv, weights, out, top_k, hidden);                                                      \
  }

QS_FOR_DTYPES(MOE_ENTRIES)
