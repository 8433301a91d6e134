// Elementwise and row kernels fused to save launches and round trips through memory:
// residual-add + RMSNorm, SiLU-and-multiply, rotary in place, and writing new K/V into the paged
// cache. Each has a CPU reference in worker/src/kernels/reference.rs that the GPU tests compare
// against; the numerics (f32 inside, one rounding per stored value) follow the unfused path.
#include "common.cuh"

// out[0] = x + residual (rounded to T: the new residual stream), out[1] = rmsnorm(out[0]) * w.
// One block per row of `hidden` values.
template <typename T>
__device__ void add_rms_norm(const T* x, const T* res, const T* w, T* out, int rows, int hidden, float eps) {
  __shared__ float sh[32];
  const int row = blockIdx.x;
  const T* xr = x + (size_t)row * hidden;
  const T* rr = res + (size_t)row * hidden;
  T* sum = out + (size_t)row * hidden;
  T* normed = out + (size_t)rows * hidden + (size_t)row * hidden;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T s = from_f<T>(to_f(xr[i]) + to_f(rr[i]));
    sum[i] = s;
    const float f = to_f(s);
    ss += f * f;
  }
  ss = block_sum(ss, sh);
  const float inv = rsqrtf(ss / (float)hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    normed[i] = from_f<T>(to_f(sum[i]) * inv * to_f(w[i]));
  }
}

// out[t, j] = silu(x[t, j]) * x[t, f + j]: gate and up projections side by side in one [rows, 2f]
// tensor (one GEMM makes both); silu is rounded to T first, as the unfused path stores it.
template <typename T>
__device__ void silu_mul(const T* x, T* out, size_t rows, size_t f) {
  const size_t n = rows * f;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t t = i / f, j = i % f;
    const float g = to_f(x[t * 2 * f + j]);
    const float s = round_to<T>(g / (1.f + expf(-g)));
    out[i] = from_f<T>(s * to_f(x[t * 2 * f + f + j]));
  }
}

// Rotate-half rotary over the first `rot` dims of each head of x [T, H, D] (row strides st, sh;
// dims contiguous), in place. cos/sin: [T, rot/2], already selected per token (so a sequence's
// own NTK base is in its rows). `qscale` (nullable, f32 [T]): the original Qwen's LogN factor,
// applied to the whole head after rotation. One block per (token, head).
template <typename T>
__device__ void rotary_inplace(T* x, const T* cos, const T* sin, const float* qscale, int heads, int head_dim,
                               int rot, long long st, long long sh) {
  const int t = blockIdx.x / heads, h = blockIdx.x % heads;
  T* row = x + t * st + h * sh;
  const int half = rot / 2;
  const float scale = qscale ? qscale[t] : 1.f;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float c = to_f(cos[(size_t)t * half + i]), s = to_f(sin[(size_t)t * half + i]);
    const float x1 = to_f(row[i]), x2 = to_f(row[i + half]);
    float a = round_to<T>(x1 * c - x2 * s), b = round_to<T>(x2 * c + x1 * s);
    if (qscale) {
      a *= scale;
      b *= scale;
    }
    row[i] = from_f<T>(a);
    row[i + half] = from_f<T>(b);
  }
  if (qscale) {
    for (int i = rot + threadIdx.x; i < head_dim; i += blockDim.x) row[i] = from_f<T>(to_f(row[i]) * scale);
  }
}

// cache[slots[t], h, :] = src[t, h, :] for every new token t. cache: [num_slots, kv_heads,
// head_dim] contiguous; src rows strided (st, sh). One block per token.
template <typename T>
__device__ void kv_write(T* cache, const T* src, const uint32_t* slots, int kv_heads, int head_dim, long long st,
                         long long sh) {
  const int t = blockIdx.x;
  const size_t dst = (size_t)slots[t] * kv_heads * head_dim;
  const int n = kv_heads * head_dim;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / head_dim, d = i % head_dim;
    cache[dst + i] = src[t * st + h * sh + d];
  }
}

#define FUSED_ENTRIES(T, NAME)                                                                                    \
  extern "C" __global__ void add_rms_norm_##NAME(const T* x, const T* res, const T* w, T* out, int rows,       \
                                                  int hidden, float eps) {                                       \
    add_rms_norm<T>(x, res, w, out, rows, hidden, eps);                                                         \
  }                                                                                                              \
  extern "C" __global__ void silu_mul_##NAME(const T* x, T* out, size_t rows, size_t f) {                      \
    silu_mul<T>(x, out, rows, f);                                                                               \
  }                                                                                                              \
  extern "C" __global__ void rotary_inplace_##NAME(T* x, const T* cos, const T* sin, const float* qscale,        \
                                                    int heads, int head_dim, int rot, long long st, long long sh) { \
    rotary_inplace<T>(x, cos, sin, qscale, heads, head_dim, rot, st, sh);                                       \
  }                                                                                                              \
  extern "C" __global__ void kv_write_##NAME(T* cache, const T* src, const uint32_t* slots, int kv_heads,        \
                                              int head_dim, long long st, long long sh) {                        \
    kv_write<T>(cache, src, slots, kv_heads, head_dim, st, sh);                                                 \
  }

QS_FOR_DTYPES(FUSED_ENTRIES)
