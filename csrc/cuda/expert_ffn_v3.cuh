// expert_ffn decode GEMV, variant v3 (LONGCAT_FFN_DECODE_KERNEL=v3): same math and launch contract as v1
// (grouped_gemv_kernel in expert_ffn.cu: SwiGLU launch h = silu(x.w_gate) * (x.w_up) with x read in place through
// sorted_slots, then down launch y = h.w2; w13 [E, 2I, H] = gate rows then up rows, w2 [E, H, I]; no routing
// weights here, combine applies them), built to keep more weight bytes in flight and to spend almost no
// instructions per byte:
//  - tensor cores instead of FMAs: one warp owns a tile of 16 weight rows (SwiGLU: 8 gate + the matching 8 up rows,
//    so SiLU(gate) * up is lane-local; down: 16 output columns) and up to 8 token rows, and issues
//    mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate). K is permuted inside each 32-wide step so that every lane's
//    weight operand is ONE 16-byte load per row (lane (g, t) reads row g and row g+8 at k = 32 s + 8 t, and the
//    token row g at the same k): no shuffles, no bf16->fp32 conversions, 2 MMAs per 2 x 16-byte weight loads;
//  - register double buffering: a warp walks its steps in batches of U; batch j+1's 2U weight loads (+ U token
//    loads) are issued before batch j's MMAs, so 2U..4U 16-byte weight loads per lane are always outstanding;
//  - the first batch of weights is requested right after the block reads its expert id (num_active and
//    active[block] are read together), before the offsets -> sorted_slots -> x chain of dependent loads;
//  - WK warps split K inside a block (narrow experts: TP shards) and NG column tiles are chained in one warp's
//    pipeline (short K: the down GEMV of a TP shard); partial sums meet in shared memory once per 8-row pass and
//    all threads run the epilogue. Grid = (max active experts, column tiles); blocks past num_active exit.
// Token rows per expert: 8 per pass over the weights (more rows: more passes, the weights are re-read).
// Supported: bf16 / fp16, K (H for SwiGLU, I for down) a multiple of 8 elements and 16-byte aligned rows; any N.
// Anything else (fp32, odd sizes) is run by v1 (dispatch in expert_ffn.cu). Used only when included from
// expert_ffn.cu.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace longcat {
namespace v3 {

constexpr int kTokens = 8;  // token rows per pass (the MMA's N)

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 32-wide K step of one lane: 16 bytes of weight row g, of weight row g + 8, and of token row g.
struct Frag {
  uint4 lo, hi, x;
};

// Lane (g = lane / 4, t = lane % 4) holds 8 consecutive k of the step (kstep() in the kernel) in lo/hi/x words w0..w3 (2 elements each).
// MMA j in {0, 1} takes logical columns {2t, 2t+1, 2t+8, 2t+9} = physical k0 + 4j + {0, 1, 2, 3} (k0: the lane's first k): A fragment
// {lo.w[2j], hi.w[2j], lo.w[2j+1], hi.w[2j+1]}, B fragment {x.w[2j], x.w[2j+1]}. The same permutation on both
// operands, so the two MMAs sum exactly the 32 products of the step.
template <typename T>
__device__ __forceinline__ void mma_step(float (&c)[4], const Frag& f) {
  mma_16816<T>(c, f.lo.x, f.hi.x, f.lo.y, f.hi.y, f.x.x, f.x.y);
  mma_16816<T>(c, f.lo.z, f.hi.z, f.lo.w, f.hi.w, f.x.z, f.x.w);
}

__device__ __forceinline__ uint4 ld_stream(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint4 ld_keep(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Block = WK x WN warps (warp = wk + WK * wn). Warp wn owns NG consecutive column tiles of CG outputs
// (CG = 8 for SwiGLU: gate rows n and up rows I + n; CG = 16 for down) and K steps [wk * Sw, (wk + 1) * Sw).
// >= 16 resident warps per SM (<= 128 registers): 16 x 32 lanes x 2U..4U x 16 B = 32..64 KB in flight per SM (U = 2).
template <typename T, int WK, int WN, int NG, int U, bool SWIGLU>
__global__ void __launch_bounds__(WK * WN * kWarp, (16 + WK * WN - 1) / (WK * WN))
    grouped_gemv_v3_kernel(const T* __restrict__ a, const T* __restrict__ w, T* __restrict__ out,
                           const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted_slots,
                           const int32_t* __restrict__ active, const int32_t* __restrict__ num_active, int K, int N,
                           int top_k, int64_t w_expert_stride, bool early_prefetch) {
  constexpr int CG = SWIGLU ? 8 : 16;
  __shared__ float red[WN * NG][WK][4][kWarp];

  int expert;
  if (early_prefetch) {  // compact active list: both reads in flight together; active[] is -1 past num_active
    const int na = num_active[0];
    expert = active[blockIdx.x];
    if (static_cast<int>(blockIdx.x) >= na) return;  // block-uniform
  } else {  // walking all experts: check for rows before touching weights
    if (static_cast<int>(blockIdx.x) >= num_active[0]) return;
    expert = active[blockIdx.x];
    if (offsets[expert] == offsets[expert + 1]) return;
  }

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wk = warp % WK, wn = warp / WK;
  const int g = lane >> 2, t = lane & 3;
  // K steps of 32, in pairs: step s covers k = 64 (s / 2) + 16 t + 8 (s % 2) + [0, 8) on lane (g, t), so the two
  // steps of a pair (always issued together: U is even, slices hold whole pairs) read whole 128-byte lines.
  const int P = (K + 63) / 64;
  const int S = 2 * P;
  const int Sw = 2 * ((P + WK - 1) / WK);  // steps per K slice
  const int s_begin = wk * Sw;
  const int s_count = max(0, min(S, s_begin + Sw) - s_begin);
  const int tile_col0 = blockIdx.y * (WN * NG * CG);
  const int col0 = tile_col0 + wn * NG * CG;  // first output column of this warp
  // Column tiles of this warp that hold at least one real column (later ones are skipped: no loads).
  const int ng = col0 >= N ? 0 : min(NG, (N - col0 + CG - 1) / CG);
  const int nsteps = ng * s_count;
  const T* wexp = w + static_cast<int64_t>(expert) * w_expert_stride;
  auto kstep = [&](int s) { return 64 * (s >> 1) + 16 * t + 8 * (s & 1); };  // this lane's k in step s

  // Weight pointers for flat step j = cgi * s_count + s (cgi: column tile, s: step in this warp's K slice).
  auto load_w = [&](Frag(&f)[U], int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < nsteps) {
        const int cgi = NG == 1 ? 0 : j / s_count;
        const int s = j - cgi * s_count;
        const int k = kstep(s_begin + s);
        const int c = col0 + cgi * CG + g;
        int64_t r_lo, r_hi;
        if constexpr (SWIGLU) {
          r_lo = min(c, N - 1);  // clamp: duplicated columns are computed but not stored
          r_hi = r_lo + N;       // up row of the same column
        } else {
          r_lo = min(c, N - 1);
          r_hi = min(c + 8, N - 1);
        }
        if (k < K) {
          f[u].lo = ld_stream(wexp + r_lo * K + k);
          f[u].hi = ld_stream(wexp + r_hi * K + k);
        } else {
          f[u].lo = make_uint4(0, 0, 0, 0);
          f[u].hi = make_uint4(0, 0, 0, 0);
        }
      }
    }
  };
  const T* xrow = nullptr;  // this lane's token row (lanes g >= m: none, zeros)
  auto load_x = [&](Frag(&f)[U], int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < nsteps) {
        const int cgi = NG == 1 ? 0 : j / s_count;
        const int k = kstep(s_begin + j - cgi * s_count);
        f[u].x = (xrow != nullptr && k < K) ? ld_keep(xrow + k) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  float acc[4];
  auto compute = [&](const Frag(&f)[U], int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < nsteps) {
        mma_step<T>(acc, f[u]);
        const int cgi = NG == 1 ? 0 : j / s_count;
        if (j - cgi * s_count == s_count - 1) {  // last step of a column tile: park the partial sums
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            red[wn * NG + cgi][wk][r][lane] = acc[r];
            acc[r] = 0.f;
          }
        }
      }
    }
  };

  Frag fa[U], fb[U];
  if (early_prefetch) load_w(fa, 0);  // before the offsets -> sorted_slots -> x chain

  const int start = offsets[expert], end = offsets[expert + 1];
  for (int r0 = start; r0 < end; r0 += kTokens) {
    const int m = min(kTokens, end - r0);
    if (g < m) {
      const int r = r0 + g;
      const int src = SWIGLU ? sorted_slots[r] / top_k : r;  // SwiGLU reads token rows in place (no permute)
      xrow = a + static_cast<int64_t>(src) * K;
    } else {
      xrow = nullptr;
    }
    if (r0 != start || !early_prefetch) load_w(fa, 0);
    load_x(fa, 0);
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[r] = 0.f;
    // Tiles this warp never parks (no real column, or an empty K slice) get defined partials.
    for (int cgi = s_count > 0 ? ng : 0; cgi < NG; ++cgi)
#pragma unroll
      for (int r = 0; r < 4; ++r) red[wn * NG + cgi][wk][r][lane] = 0.f;

    for (int j = 0; j < nsteps; j += 2 * U) {
      load_w(fb, j + U);
      load_x(fb, j + U);
      compute(fa, j);
      load_w(fa, j + 2 * U);
      load_x(fa, j + 2 * U);
      compute(fb, j + U);
    }
    __syncthreads();

    // Epilogue: one thread per (column tile, lane of the MMA layout) sums the WK partials. Lane (g, t) of the
    // accumulator holds rows g / g+8 of the 16-row tile for tokens 2t and 2t+1.
    for (int it = threadIdx.x; it < WN * NG * kWarp; it += WK * WN * kWarp) {
      const int tile = it / kWarp, ln = it % kWarp;
      const int gg = ln >> 2, tt = ln & 3;
      float c[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        c[r] = 0.f;
#pragma unroll
        for (int q = 0; q < WK; ++q) c[r] += red[tile][q][r][ln];
      }
      const int n = tile_col0 + tile * CG + gg;
      const int i0 = 2 * tt, i1 = 2 * tt + 1;
      if constexpr (SWIGLU) {
        if (n < N) {
          if (i0 < m) out[static_cast<int64_t>(r0 + i0) * N + n] = from_float<T>(silu(c[0]) * c[2]);
          if (i1 < m) out[static_cast<int64_t>(r0 + i1) * N + n] = from_float<T>(silu(c[1]) * c[3]);
        }
      } else {
        if (n < N) {
          if (i0 < m) out[static_cast<int64_t>(r0 + i0) * N + n] = from_float<T>(c[0]);
          if (i1 < m) out[static_cast<int64_t>(r0 + i1) * N + n] = from_float<T>(c[1]);
        }
        if (n + 8 < N) {
          if (i0 < m) out[static_cast<int64_t>(r0 + i0) * N + n + 8] = from_float<T>(c[2]);
          if (i1 < m) out[static_cast<int64_t>(r0 + i1) * N + n + 8] = from_float<T>(c[3]);
        }
      }
    }
    __syncthreads();  // red is reused by the next pass
  }
}

template <typename T, int WK, int WN, int NG, int U, bool SWIGLU>
void launch(const T* a, const T* w, T* out, const at::Tensor& offsets, const at::Tensor& sorted_slots,
            const at::Tensor& active, const at::Tensor& num_active, int max_active, int K, int N, int top_k,
            int64_t w_expert_stride, bool early_prefetch, cudaStream_t stream) {
  constexpr int cols = WN * NG * (SWIGLU ? 8 : 16);
  const dim3 grid(max_active, (N + cols - 1) / cols);
  grouped_gemv_v3_kernel<T, WK, WN, NG, U, SWIGLU><<<grid, WK * WN * kWarp, 0, stream>>>(
      a, w, out, offsets.data_ptr<int32_t>(), sorted_slots.data_ptr<int32_t>(), active.data_ptr<int32_t>(),
      num_active.data_ptr<int32_t>(), K, N, top_k, w_expert_stride, early_prefetch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// v3 runs a shape when the element type has an MMA (bf16, fp16) and every weight / activation row is a whole
// number of 16-byte vectors (H and I multiples of 8, 16-byte aligned bases); otherwise the caller uses v1.
template <typename T>
constexpr bool kHasMma = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

// Shapes. "Warps wanted" ~ 132 SMs x 12-16 resident warps; max_active is the host's bound on active experts
// (T * k with the align outputs: 12 at batch 1, where ~8 are real).
//  SwiGLU (K = H, 8 columns = 16 weight rows per warp tile): whole-K warps (WK = 1, 4 warps a block) when
//   max_active * I / 8 gives >= 2048 warp tiles (I = 2048: 12 x 256); else split K over 8 warps (I = 256 TP shard:
//   12 x 32 tiles x 8 slices), or over 2 at intermediate counts.
//  Down (K = I, 16 columns per warp tile): K = 2048 is 64 steps, K = 256 only 8, so chain NG tiles per warp
//   (the largest NG in {4, 2, 1} that still leaves >= 1536 warps).
template <typename T>
void run_ffn(const T* x, const T* w13, const T* w2, T* h, T* y, const at::Tensor& offsets,
             const at::Tensor& sorted_slots, const at::Tensor& active, const at::Tensor& num_active, int max_active,
             int H, int I, int top_k, bool early_prefetch, cudaStream_t stream) {
  if constexpr (kHasMma<T>) {
    // U = 2 steps a batch (one 128-byte line pair per row): on the H200 U = 4 (more registers, 12 warps / SM) was
    // 2-15% slower at I = 2048 and 256, B = 1..256.
    constexpr int U = 2;
    const int64_t s13 = int64_t{2} * I * H, s2 = int64_t{H} * I;
    const int64_t tiles13 = int64_t{max_active} * ((I + 7) / 8);
    if (tiles13 >= 2048) {
      launch<T, 1, 4, 1, U, true>(x, w13, h, offsets, sorted_slots, active, num_active, max_active, H, I, top_k, s13,
                                  early_prefetch, stream);
    } else if (tiles13 >= 768) {
      launch<T, 2, 4, 1, U, true>(x, w13, h, offsets, sorted_slots, active, num_active, max_active, H, I, top_k, s13,
                                  early_prefetch, stream);
    } else {
      launch<T, 8, 1, 1, U, true>(x, w13, h, offsets, sorted_slots, active, num_active, max_active, H, I, top_k, s13,
                                  early_prefetch, stream);
    }
    const int64_t tiles2 = int64_t{max_active} * ((H + 15) / 16);
    if (tiles2 >= 4 * 1536) {
      launch<T, 1, 4, 4, U, false>(h, w2, y, offsets, sorted_slots, active, num_active, max_active, I, H, top_k, s2,
                                   early_prefetch, stream);
    } else if (tiles2 >= 2 * 1536) {
      launch<T, 1, 4, 2, U, false>(h, w2, y, offsets, sorted_slots, active, num_active, max_active, I, H, top_k, s2,
                                   early_prefetch, stream);
    } else {
      launch<T, 1, 4, 1, U, false>(h, w2, y, offsets, sorted_slots, active, num_active, max_active, I, H, top_k, s2,
                                   early_prefetch, stream);
    }
  } else {
    TORCH_CHECK(false, "expert_ffn v3: bf16 / fp16 only (dispatch should have used v1)");
  }
}

}  // namespace v3
}  // namespace longcat
