// CUDA moe_align: a deterministic (stable) counting sort of the real-expert slots, in three launches (one when
// all slots fit one chunk) and with no host sync: (1) per-chunk expert counts, (2) one block scans chunks then experts into CSR
// offsets and the compact active list, (3) each slot's row = expert offset + earlier chunks' count +
// its rank among equal ids earlier in its own chunk. Ids >= E (zero experts) and < 0 get no row.
#include <cub/block/block_scan.cuh>

#include "../ops.h"
#include "common.cuh"

namespace longcat {
namespace {

constexpr int kChunk = 256;        // slots per block in kernels 1 and 3
constexpr int kScanThreads = 1024;
constexpr int kMaxExperts = 12288;  // counts live in shared memory (48 KB)

__global__ void count_chunks_kernel(const int32_t* __restrict__ ids, int num_slots, int num_experts,
                                    int32_t* __restrict__ chunk_counts) {
  extern __shared__ int32_t counts[];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int s = blockIdx.x * kChunk + threadIdx.x;
  if (s < num_slots) {
    const int e = ids[s];
    if (e >= 0 && e < num_experts) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  int32_t* out = chunk_counts + static_cast<int64_t>(blockIdx.x) * num_experts;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) out[e] = counts[e];
}

using Scan = cub::BlockScan<int, kScanThreads>;

// One block of kScanThreads: per-expert row counts (shared memory) -> each expert's first row, written to
// offsets[0..E] and back into `counts`; the compact list of experts with rows and its length. Each thread owns a
// contiguous run of experts and the block scans the run sums. Returns the total row count (to every thread).
__device__ int scan_expert_counts(int32_t* counts, int num_experts, int32_t* __restrict__ offsets,
                                  int32_t* __restrict__ active, int32_t* __restrict__ num_active,
                                  typename Scan::TempStorage& storage) {
  const int per = (num_experts + kScanThreads - 1) / kScanThreads;
  const int lo = min(static_cast<int>(threadIdx.x) * per, num_experts), hi = min(lo + per, num_experts);
  int rows = 0, hits = 0;
  for (int e = lo; e < hi; ++e) {
    rows += counts[e];
    hits += counts[e] > 0;
  }
  int row_base, hit_base, total_rows, total_hits;
  Scan(storage).ExclusiveSum(rows, row_base, total_rows);
  __syncthreads();
  Scan(storage).ExclusiveSum(hits, hit_base, total_hits);
  for (int e = lo; e < hi; ++e) {
    const int count = counts[e];
    offsets[e] = row_base;
    counts[e] = row_base;
    if (count > 0) active[hit_base++] = e;
    row_base += count;
  }
  for (int i = total_hits + threadIdx.x; i < num_experts; i += blockDim.x) active[i] = -1;
  if (threadIdx.x == 0) {
    offsets[num_experts] = total_rows;
    num_active[0] = total_hits;
  }
  return total_rows;
}

__global__ void __launch_bounds__(kScanThreads) scan_kernel(int num_chunks, int num_experts,
                                                            int32_t* __restrict__ chunk_counts,
                                                            int32_t* __restrict__ offsets,
                                                            int32_t* __restrict__ active,
                                                            int32_t* __restrict__ num_active) {
  extern __shared__ int32_t totals[];
  __shared__ typename Scan::TempStorage scan_storage;
  // Per expert: exclusive prefix over chunks (in place) and the expert's total.
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int running = 0;
    for (int c = 0; c < num_chunks; ++c) {
      int32_t* p = chunk_counts + static_cast<int64_t>(c) * num_experts + e;
      const int v = *p;
      *p = running;
      running += v;
    }
    totals[e] = running;
  }
  __syncthreads();
  scan_expert_counts(totals, num_experts, offsets, active, num_active, scan_storage);
}

__global__ void scatter_kernel(const int32_t* __restrict__ ids, int num_slots, int num_experts,
                               const int32_t* __restrict__ chunk_base, const int32_t* __restrict__ offsets,
                               int32_t* __restrict__ sorted_slots, int32_t* __restrict__ slot_rows) {
  __shared__ int32_t chunk_ids[kChunk];
  const int s = blockIdx.x * kChunk + threadIdx.x;
  const int e = s < num_slots ? ids[s] : -1;
  chunk_ids[threadIdx.x] = e;
  __syncthreads();
  if (s >= num_slots) return;
  const int total_rows = offsets[num_experts];
  if (s >= total_rows) sorted_slots[s] = -1;  // rows past the last real row; never a scatter target
  if (e < 0 || e >= num_experts) {
    slot_rows[s] = -1;
    return;
  }
  int rank = 0;  // equal ids earlier in this chunk: keeps ascending slot order within the expert
  for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) rank += chunk_ids[j] == e;
  const int row = offsets[e] + chunk_base[static_cast<int64_t>(blockIdx.x) * num_experts + e] + rank;
  sorted_slots[row] = s;
  slot_rows[s] = row;
}

// All three steps in one block when the slots fit one chunk (decode: T * k <= 256): at batch 1 the two extra
// launches cost more than the work, and this runs on the MoE's critical path.
__global__ void __launch_bounds__(kScanThreads) align_one_chunk_kernel(const int32_t* __restrict__ ids, int num_slots,
                                                                       int num_experts, int32_t* __restrict__ offsets,
                                                                       int32_t* __restrict__ active,
                                                                       int32_t* __restrict__ num_active,
                                                                       int32_t* __restrict__ sorted_slots,
                                                                       int32_t* __restrict__ slot_rows) {
  extern __shared__ int32_t starts[];  // per expert: its count, then (after the scan) its first row
  __shared__ int32_t chunk_ids[kChunk];
  __shared__ typename Scan::TempStorage scan_storage;
  const int tid = threadIdx.x;
  for (int e = tid; e < num_experts; e += blockDim.x) starts[e] = 0;
  if (tid < kChunk) chunk_ids[tid] = tid < num_slots ? ids[tid] : -1;
  __syncthreads();
  if (tid < num_slots) {
    const int e = chunk_ids[tid];
    if (e >= 0 && e < num_experts) atomicAdd(&starts[e], 1);
  }
  __syncthreads();
  const int total_rows = scan_expert_counts(starts, num_experts, offsets, active, num_active, scan_storage);
  __syncthreads();
  if (tid >= num_slots) return;
  if (tid >= total_rows) sorted_slots[tid] = -1;
  const int e = chunk_ids[tid];
  if (e < 0 || e >= num_experts) {
    slot_rows[tid] = -1;
    return;
  }
  int rank = 0;
  for (int j = 0; j < tid; ++j) rank += chunk_ids[j] == e;
  const int row = starts[e] + rank;
  sorted_slots[row] = tid;
  slot_rows[tid] = row;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& topk_ids_in,
                                                                                      int64_t num_experts) {
  check_align_args(topk_ids_in, num_experts);
  TORCH_CHECK(num_experts <= kMaxExperts, "moe_align: at most ", kMaxExperts, " experts on CUDA, got ", num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids_in.device());
  const at::Tensor ids = topk_ids_in.to(at::kInt).contiguous();
  const int64_t num_slots = ids.numel();
  TORCH_CHECK(num_slots < (int64_t{1} << 31), "moe_align: too many slots (", num_slots, ")");
  auto opts = ids.options().dtype(at::kInt);
  auto offsets = at::empty({num_experts + 1}, opts);
  auto sorted_slots = at::empty({num_slots}, opts);
  auto slot_rows = at::empty({num_slots}, opts);
  auto active = at::empty({num_experts}, opts);
  auto num_active = at::empty({1}, opts);
  const int num_chunks = static_cast<int>((num_slots + kChunk - 1) / kChunk);
  auto chunk_counts = at::empty({std::max(num_chunks, 1), num_experts}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t smem = num_experts * sizeof(int32_t);
  const int E = static_cast<int>(num_experts), S = static_cast<int>(num_slots);
  if (num_chunks == 1) {
    align_one_chunk_kernel<<<1, kScanThreads, smem, stream>>>(
        ids.data_ptr<int32_t>(), S, E, offsets.data_ptr<int32_t>(), active.data_ptr<int32_t>(),
        num_active.data_ptr<int32_t>(), sorted_slots.data_ptr<int32_t>(), slot_rows.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {offsets, sorted_slots, slot_rows, active, num_active};
  }
  if (num_chunks > 0) {
    count_chunks_kernel<<<num_chunks, kChunk, smem, stream>>>(ids.data_ptr<int32_t>(), S, E,
                                                              chunk_counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scan_kernel<<<1, kScanThreads, smem, stream>>>(num_chunks, E, chunk_counts.data_ptr<int32_t>(),
                                                 offsets.data_ptr<int32_t>(), active.data_ptr<int32_t>(),
                                                 num_active.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_chunks > 0) {
    scatter_kernel<<<num_chunks, kChunk, 0, stream>>>(ids.data_ptr<int32_t>(), S, E, chunk_counts.data_ptr<int32_t>(),
                                                      offsets.data_ptr<int32_t>(), sorted_slots.data_ptr<int32_t>(),
                                                      slot_rows.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {offsets, sorted_slots, slot_rows, active, num_active};
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CUDA, m) { m.impl("moe_align", &moe_align_cuda); }

}  // namespace longcat
