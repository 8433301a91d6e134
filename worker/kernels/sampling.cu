// Sampling on the device: one block per row of logits, only the chosen token id leaves the GPU.
//
// params per row (f32): temperature, top_k, top_p, min_p, u (a uniform draw in [0, 1) made on
// the host from the request's seeded stream). temperature < 1e-5 is greedy (lowest id among
// equal maxima). Otherwise, with p_i = exp((x_i - max) / temperature) (so the best token has
// p = 1): top-k, min-p and top-p become one threshold on p, found by bisection (30 steps, so
// tokens within ~2e-9 of the cut-off may fall either side), and the token is the first, in id
// order, where the running kept mass passes u * (kept mass). The CPU reference in
// worker/src/kernels/reference.rs runs the same steps.
#include "common.cuh"

#define QS_SAMPLE_THREADS 1024
#define QS_BISECT_STEPS 30

template <typename T>
__device__ void sample_rows(const T* logits, int vocab, const float* params, float* scratch, uint32_t* out) {
  __shared__ float sh[32];
  __shared__ float s_best_v[32];
  __shared__ int s_best_i[32];
  __shared__ int s_found;
  const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* x = logits + (size_t)row * vocab;
  float* p = scratch + (size_t)row * vocab;
  const float temperature = params[row * 5], top_p = params[row * 5 + 2], min_p = params[row * 5 + 3];
  const int top_k = (int)params[row * 5 + 1];
  const float u = params[row * 5 + 4];

  // Argmax, lowest id on ties.
  // Lowest id among equal maxima; a row with nothing above -inf picks id 0, as the host does.
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  for (int i = tid; i < vocab; i += blockDim.x) {
    const float v = to_f(x[i]);
    if (v > bv) {
      bv = v;
      bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) {
    s_best_v[warp] = bv;
    s_best_i[warp] = bi;
  }
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < (int)((blockDim.x + 31) / 32); ++w) {
      if (s_best_v[w] > bv || (s_best_v[w] == bv && s_best_i[w] < bi)) {
        bv = s_best_v[w];
        bi = s_best_i[w];
      }
    }
    s_best_v[0] = bv;
    s_best_i[0] = bi;
  }
  __syncthreads();
  const float maxv = s_best_v[0];
  const int best = s_best_i[0] == 0x7fffffff ? 0 : s_best_i[0];
  if (temperature < 1e-5f) {
    if (tid == 0) out[row] = (uint32_t)best;
    return;
  }
  const float inv_t = 1.f / temperature;
  for (int i = tid; i < vocab; i += blockDim.x) p[i] = expf((to_f(x[i]) - maxv) * inv_t);
  __syncthreads();

  float base = 0.f;
  if (top_k > 0 && top_k < vocab) {
    // Largest t with at least k tokens at or above it: the k-th largest p (from below).
    float lo = 0.f, hi = 2.f;
    for (int s = 0; s < QS_BISECT_STEPS; ++s) {
      const float mid = 0.5f * (lo + hi);
      float c = 0.f;
      for (int i = tid; i < vocab; i += blockDim.x) c += p[i] >= mid ? 1.f : 0.f;
      if (block_sum(c, sh) >= (float)top_k) lo = mid; else hi = mid;
    }
    base = lo;
  }
  if (min_p > 0.f) base = fmaxf(base, min_p);  // min_p times the best p, which is 1
  float thr = base;
  if (top_p < 1.f) {
    float z = 0.f;
    for (int i = tid; i < vocab; i += blockDim.x) z += p[i] >= base ? p[i] : 0.f;
    const float target = top_p * block_sum(z, sh);
    // Largest t whose tokens at or above it still hold top_p of the mass kept so far.
    float lo = base, hi = 2.f;
    for (int s = 0; s < QS_BISECT_STEPS; ++s) {
      const float mid = 0.5f * (lo + hi);
      float m = 0.f;
      for (int i = tid; i < vocab; i += blockDim.x) m += p[i] >= mid ? p[i] : 0.f;
      if (block_sum(m, sh) >= target) lo = mid; else hi = mid;
    }
    thr = lo;
  }
  float kept = 0.f;
  for (int i = tid; i < vocab; i += blockDim.x) kept += p[i] >= thr ? p[i] : 0.f;
  const float r = u * block_sum(kept, sh);

  // Walk the kept tokens in id order, a block-wide inclusive scan per chunk.
  if (tid == 0) s_found = -1;
  float running = 0.f;
  int last_kept = -1;
  for (int c0 = 0; c0 < vocab; c0 += blockDim.x) {
    const int i = c0 + tid;
    const float v = (i < vocab && p[i] >= thr) ? p[i] : 0.f;
    if (v > 0.f) last_kept = i;
    float incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) sh[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int warps = (blockDim.x + 31) >> 5;
      float w = lane < warps ? sh[lane] : 0.f;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += n;
      }
      if (lane < warps) sh[lane] = w;  // inclusive prefix of warp totals
    }
    __syncthreads();
    const float before_warp = warp > 0 ? sh[warp - 1] : 0.f;
    const float total = sh[((blockDim.x + 31) >> 5) - 1];
    const float hi_edge = running + before_warp + incl;
    // The first kept token whose running mass passes r: within a chunk the lowest such id,
    // and earlier chunks had none (or the loop would have stopped).
    if (v > 0.f && r < hi_edge) atomicMin(reinterpret_cast<unsigned*>(&s_found), (unsigned)i);
    __syncthreads();
    if (s_found >= 0) break;
    running += total;
  }
  if (s_found < 0) {
    // Rounding left r at or past the total: the last kept token, as the CPU walk does.
    float lk = (float)last_kept;
    lk = block_max(lk, sh);
    // Nothing kept at all (an infinite or NaN best logit): the argmax, as the host does.
    if (tid == 0) out[row] = lk < 0.f ? (uint32_t)best : (uint32_t)lk;
  } else if (tid == 0) {
    out[row] = (uint32_t)s_found;
  }
}

#define SAMPLE_ENTRIES(T, NAME)                                                                              \
  extern "C" __global__ void __launch_bounds__(QS_SAMPLE_THREADS)                                          \
      sample_rows_##NAME(const T* logits, int vocab, const float* params,                                     \
                                                 float* scratch, uint32_t* out) {                            \
    sample_rows<T>(logits, vocab, params, scratch, out);                                                    \
  }

QS_FOR_DTYPES(SAMPLE_ENTRIES)
