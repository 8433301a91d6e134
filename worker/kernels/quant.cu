// Quantized linears on the GPU, weights kept quantized in device memory. Each weight is
// dequantized as the format defines ((q - zero) * scale for GPTQ/AWQ, e4m3(q) * scale_inv for
// block FP8) in f32 and used at once:
//   - qgemv_*: up to QGEMV_MAX_ROWS activation rows (decode); each weight is read once for all
//     rows, so a step reads the packed bytes (4x fewer than bf16 at 4 bits) instead of bf16;
//   - qdequant_*: the whole weight in T for cuBLAS (prefill, where the GEMM's work dwarfs one
//     pass over the weight).
// W4A16 / W8A16: activations stay in T. The CPU path (worker/src/quant/mod.rs) computes the same
// weights, which the GPU tests compare against.
#include "common.cuh"

constexpr int QGEMV_MAX_ROWS = 8;
constexpr int QGEMV_SLICES = 8;  // warps per block splitting the input dimension

// The weight of input row i, output column o, of a GPTQ (along_out = 0: [in / per, out] words,
// row i in bits (i % per) * bits) or AWQ (along_out = 1: [in, out / 8] words, column o in nibble
// AWQ_NIBBLE[o % 8]) linear; zeros and scales [groups, out] (f32), group[i] the row's group.
__device__ __forceinline__ float int_weight(const uint32_t* packed, const float* zeros, const float* scales,
                                            const uint32_t* group, int bits, int along_out, int out, int i, int o) {
  const int per = 32 / bits;
  uint32_t q;
  if (along_out) {
    // AWQ's nibble order 0, 4, 1, 5, 2, 6, 3, 7 for columns 0..8 of a word.
    const int j = o % 8, nibble = ((j & 1) << 2) | (j >> 1);
    q = (packed[(size_t)i * (out / 8) + o / 8] >> (4 * nibble)) & 0xFu;
  } else {
    q = (packed[(size_t)(i / per) * out + o] >> ((i % per) * bits)) & ((1u << bits) - 1u);
  }
  const size_t g = (size_t)group[i] * out + o;
  return ((float)q - zeros[g]) * scales[g];
}

// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; NaN at S.1111.111.
__device__ __forceinline__ float e4m3(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 0x7;
  float v = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
  if (e == 0xF && m == 0x7) v = NAN;
  return (b & 0x80) ? -v : v;
}

// y[r, o] = sum_i x[r, i] * w(i, o) for r < rows. Block: 32 columns x QGEMV_SLICES slices of the
// inputs; the slices' partial sums are added in slice order through shared memory.
template <typename T>
__device__ void qgemv_int(const T* x, const uint32_t* packed, const float* zeros, const float* scales,
                          const uint32_t* group, T* y, int rows, int in, int out, int bits, int along_out) {
  __shared__ float part[QGEMV_SLICES][QGEMV_MAX_ROWS][32];
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int o = blockIdx.x * 32 + lane;
  float acc[QGEMV_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < QGEMV_MAX_ROWS; ++r) acc[r] = 0.f;
  if (o < out) {
    for (int i = slice; i < in; i += QGEMV_SLICES) {
      const float w = int_weight(packed, zeros, scales, group, bits, along_out, out, i, o);
#pragma unroll
      for (int r = 0; r < QGEMV_MAX_ROWS; ++r)
        if (r < rows) acc[r] += to_f(x[(size_t)r * in + i]) * w;
    }
  }
#pragma unroll
  for (int r = 0; r < QGEMV_MAX_ROWS; ++r) part[slice][r][lane] = acc[r];
  __syncthreads();
  if (slice == 0 && o < out) {
    for (int r = 0; r < rows; ++r) {
      float s = 0.f;
      for (int k = 0; k < QGEMV_SLICES; ++k) s += part[k][r][lane];
      y[(size_t)r * out + o] = from_f<T>(s);
    }
  }
}

// wt[i, o] = w(i, o): the transposed weight [in, out] in T, for x @ wt. Grid-stride.
template <typename T>
__device__ void qdequant_int(const uint32_t* packed, const float* zeros, const float* scales, const uint32_t* group,
                             T* wt, int in, int out, int bits, int along_out) {
  const size_t n = (size_t)in * out;
  for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
    const int i = (int)(k / out), o = (int)(k % out);
    wt[k] = from_f<T>(int_weight(packed, zeros, scales, group, bits, along_out, out, i, o));
  }
}

// The FP8 weight of output row o, input i: rows_[o] is its checkpoint row, col0 the checkpoint
// column of input 0; scale_inv [ceil(out / br), scale_cols].
__device__ __forceinline__ float fp8_weight(const uint8_t* w, const float* scale_inv, const uint32_t* rows_, int in,
                                            int br, int bc, int scale_cols, int col0, int o, int i) {
  const float s = scale_inv[(size_t)(rows_[o] / br) * scale_cols + (col0 + i) / bc];
  return e4m3(w[(size_t)o * in + i]) * s;
}

// y[r, o] = x[r] . w(o): one warp per output row, lanes over the inputs.
template <typename T>
__device__ void qgemv_fp8(const T* x, const uint8_t* w, const float* scale_inv, const uint32_t* rows_, T* y, int rows,
                          int in, int out, int br, int bc, int scale_cols, int col0) {
  const int lane = threadIdx.x % 32, o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (o >= out) return;
  float acc[QGEMV_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < QGEMV_MAX_ROWS; ++r) acc[r] = 0.f;
  for (int i = lane; i < in; i += 32) {
    const float wv = fp8_weight(w, scale_inv, rows_, in, br, bc, scale_cols, col0, o, i);
#pragma unroll
    for (int r = 0; r < QGEMV_MAX_ROWS; ++r)
      if (r < rows) acc[r] += to_f(x[(size_t)r * in + i]) * wv;
  }
  for (int r = 0; r < rows; ++r) {
    const float s = warp_sum(acc[r]);
    if (lane == 0) y[(size_t)r * out + o] = from_f<T>(s);
  }
}

// w_out[o, i] = w(o, i) in T ([out, in], for x @ w_out^T). Grid-stride.
template <typename T>
__device__ void qdequant_fp8(const uint8_t* w, const float* scale_inv, const uint32_t* rows_, T* w_out, int in,
                             int out, int br, int bc, int scale_cols, int col0) {
  const size_t n = (size_t)in * out;
  for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
    const int o = (int)(k / in), i = (int)(k % in);
    w_out[k] = from_f<T>(fp8_weight(w, scale_inv, rows_, in, br, bc, scale_cols, col0, o, i));
  }
}

#define QUANT_ENTRIES(T, NAME)                                                                                    \
  extern "C" __global__ void qgemv_int_##NAME(const T* x, const uint32_t* packed, const float* zeros,            \
                                              const float* scales, const uint32_t* group, T* y, int rows, int in, \
                                              int out, int bits, int along_out) {                                 \
    qgemv_int<T>(x, packed, zeros, scales, group, y, rows, in, out, bits, along_out);                            \
  }                                                                                                               \
  extern "C" __global__ void qdequant_int_##NAME(const uint32_t* packed, const float* zeros, const float* scales, \
                                                 const uint32_t* group, T* wt, int in, int out, int bits,         \
                                                 int along_out) {                                                 \
    qdequant_int<T>(packed, zeros, scales, group, wt, in, out, bits, along_out);                                 \
  }                                                                                                               \
  extern "C" __global__ void qgemv_fp8_##NAME(const T* x, const uint8_t* w, const float* scale_inv,              \
                                              const uint32_t* rows_, T* y, int rows, int in, int out, int br,     \
                                              int bc, int scale_cols, int col0) {                                 \
    qgemv_fp8<T>(x, w, scale_inv, rows_, y, rows, in, out, br, bc, scale_cols, col0);                            \
  }                                                                                                               \
  extern "C" __global__ void qdequant_fp8_##NAME(const uint8_t* w, const float* scale_inv, const uint32_t* rows_, \
                                                 T* w_out, int in, int out, int br, int bc, int scale_cols,       \
                                                 int col0) {                                                      \
    qdequant_fp8<T>(w, scale_inv, rows_, w_out, in, out, br, bc, scale_cols, col0);                              \
  }

QS_FOR_DTYPES(QUANT_ENTRIES)
