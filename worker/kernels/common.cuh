// Shared helpers for qwen-serve's kernels: dtype conversion and warp/block reductions.
// Every kernel computes in f32 and rounds once when it stores.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Rounds through T and back: matches the precision of a value stored in T.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct QsSum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  __device__ __forceinline__ float warp(float v) const { return warp_sum(v); }
  static constexpr float identity = 0.f;
};

struct QsMax {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ float warp(float v) const { return warp_max(v); }
  static constexpr float identity = -INFINITY;
};

// `Op` over the block; every thread gets the result. `sh` holds at least 32 floats. The leading
// barrier lets callers reuse `sh` back to back.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* sh) {
  const Op op;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = op.warp(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? sh[lane] : Op::identity;
    w = op.warp(w);
    if (lane == 0) sh[0] = w;
  }
  __syncthreads();
  return sh[0];
}

__device__ __forceinline__ float block_sum(float v, float* sh) { return block_reduce<QsSum>(v, sh); }
__device__ __forceinline__ float block_max(float v, float* sh) { return block_reduce<QsMax>(v, sh); }

// Instantiates `extern "C"` entry points NAME_f32/_f16/_bf16 of a templated kernel body.
#define QS_FOR_DTYPES(MACRO) \
  MACRO(float, f32)          \
  MACRO(__half, f16)         \
  MACRO(__nv_bfloat16, bf16)
