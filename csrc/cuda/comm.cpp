// NCCL transport of the federation: one communicator per process over all ranks, bootstrapped
// from a unique id that Python passes through torch.distributed's store; per holder group a
// communicator split from it, on which an fp32 bucket is one ncclAllReduce (NCCL reduces as
// it moves the data: on two NVLink-connected H200s its all-reduce reached 327 GB/s of bus
// bandwidth where send/recv rings stopped near 230); and the ring all-reduce among any subset
// of ranks as ncclSend/ncclRecv groups over the full communicator (the bf16 wire, and any
// group without a communicator of its own). Plus the pack / unpack of pseudo-gradient buckets
// (comm_kernels.cu).
//
// Ops live in their own namespace, torch.ops.fomoe_comm, registered here because they exist
// only in CUDA builds. The ring schedule itself comes from Python (fomoe.comm.ring_plan) as a
// table of chunk ranges; this file only executes it.
//
// Streams: NCCL calls run on the communicator's own stream; reductions and conversions on the
// caller's current stream; events order the two, so the add of one slice overlaps the
// transfer of the next. Nothing synchronises the host. The world communicator is non-blocking:
// its setup, its splits and its send/recv groups report "in progress" and are polled with a
// deadline, so a peer missing there ends in an error (and an aborted communicator) instead of a
// hang. A holder group's communicator is blocking (see nccl_split): its first all-reduce
// connects the group's peers within the call, with no deadline of its own.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <nccl.h>

#include "checks.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cuda/comm_kernels.h"
#include "cuda/glue.h"

#if NCCL_VERSION_CODE < 21400
#error "fomoe's NCCL transport needs NCCL >= 2.14 (non-blocking communicators)"
#endif

namespace fomoe::cuda::comm {
namespace {

struct Communicator {
  ncclComm_t comm = nullptr;
  int device = -1;
  int rank = -1;
  int world_size = 0;
  double timeout_s = 300.0;
  bool broken = false;
  cudaStream_t stream = nullptr;      // where every NCCL call of this communicator runs
  cudaEvent_t to_nccl = nullptr;      // caller's stream -> NCCL stream
  cudaEvent_t from_nccl[2] = {};      // NCCL stream -> caller's stream (alternating: slices in flight)

  ~Communicator() {
    if (stream != nullptr) {
      cudaEventDestroy(to_nccl);
      cudaEventDestroy(from_nccl[0]);
      cudaEventDestroy(from_nccl[1]);
      cudaStreamDestroy(stream);
    }
    if (comm != nullptr) {
      if (broken) ncclCommAbort(comm); else ncclCommDestroy(comm);
    }
  }
};

std::mutex g_mutex;
// Never destroyed: tearing communicators down during static destruction at exit can race the
// CUDA driver's own shutdown. nccl_destroy releases one explicitly.
auto& g_comms = *new std::unordered_map<int64_t, std::shared_ptr<Communicator>>();
int64_t g_next_handle = 1;

std::shared_ptr<Communicator> get_comm(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_comms.find(handle);
  FOMOE_CHECK(it != g_comms.end(), "fomoe NCCL: unknown communicator handle ", handle, " (destroyed?)");
  FOMOE_CHECK(!it->second->broken, "fomoe NCCL: communicator ", handle, " was aborted after an earlier error; "
              "create a new one");
  return it->second;
}

// Polls `done()` until it returns true; past the communicator's timeout the communicator is
// marked broken and the call throws (a missing or stuck peer ends in an error, not a hang). The
// first ~200 µs spin with a yield: a collective that reports "in progress" usually finishes
// enqueueing within microseconds, and a sleep there costs tens of µs of timer slack per call,
// host time the GPU may wait for. Longer waits (communicator setup, splits) sleep between polls.
template <class Done>
void wait_bounded(Communicator& c, const char* what, Done done) {
  const auto start = std::chrono::steady_clock::now();
  const auto spin_until = start + std::chrono::microseconds(200);
  const auto deadline = start + std::chrono::duration<double>(c.timeout_s);
  while (!done()) {
    const auto now = std::chrono::steady_clock::now();
    if (now > deadline) {
      c.broken = true;
      FOMOE_CHECK(false, "fomoe NCCL: ", what, " did not complete within ", c.timeout_s,
                  " s (a peer is missing or stuck); the communicator is aborted");
    }
    if (now < spin_until) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
}

// Waits (bounded) until a non-blocking NCCL call has finished enqueueing, then checks it.
void finish(Communicator& c, ncclResult_t result, const char* what) {
  if (result == ncclInProgress) {
    wait_bounded(c, what, [&] {
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(c.comm, &state);
      result = state;
      return result != ncclInProgress;
    });
  }
  if (result != ncclSuccess) {
    c.broken = true;
    const char* detail = c.comm != nullptr ? ncclGetLastError(c.comm) : "";
    FOMOE_CHECK(false, "fomoe NCCL: ", what, " failed: ", ncclGetErrorString(result),
                (detail && *detail) ? " (" : "", detail ? detail : "", (detail && *detail) ? ")" : "");
  }
}

void record_then_wait(cudaEvent_t event, cudaStream_t signaler, cudaStream_t waiter) {
  C10_CUDA_CHECK(cudaEventRecord(event, signaler));
  C10_CUDA_CHECK(cudaStreamWaitEvent(waiter, event, 0));
}

void check_peer(const Communicator& c, int64_t peer, const char* what) {
  FOMOE_CHECK(peer >= 0 && peer < c.world_size, "fomoe NCCL: ", what, " rank ", peer, " out of range for ",
              c.world_size, " ranks");
}

// One grouped send + receive (either may be empty) of raw bytes on the NCCL stream.
std::pair<int64_t, int64_t> send_recv_bytes(Communicator& c, const void* send, int64_t send_bytes, int64_t dst,
                                            void* recv, int64_t recv_bytes, int64_t src) {
  if (send_bytes == 0 && recv_bytes == 0) return {0, 0};
  finish(c, ncclGroupStart(), "ncclGroupStart");
  if (send_bytes > 0) {
    finish(c, ncclSend(send, static_cast<size_t>(send_bytes), ncclUint8, static_cast<int>(dst), c.comm, c.stream),
           "ncclSend");
  }
  if (recv_bytes > 0) {
    finish(c, ncclRecv(recv, static_cast<size_t>(recv_bytes), ncclUint8, static_cast<int>(src), c.comm, c.stream),
           "ncclRecv");
  }
  finish(c, ncclGroupEnd(), "send/receive group");
  return {send_bytes, recv_bytes};
}

// ---- communicator lifecycle -----------------------------------------------------------------------

std::vector<int64_t> nccl_version() {
  int runtime = 0;
  FOMOE_CHECK(ncclGetVersion(&runtime) == ncclSuccess, "fomoe NCCL: ncclGetVersion failed");
  return {runtime, NCCL_VERSION_CODE};
}

at::Tensor nccl_unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  FOMOE_CHECK(r == ncclSuccess, "fomoe NCCL: ncclGetUniqueId failed: ", ncclGetErrorString(r));
  at::Tensor out = at::empty({NCCL_UNIQUE_ID_BYTES}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(out.data_ptr<uint8_t>(), id.internal, NCCL_UNIQUE_ID_BYTES);
  return out;
}

// A set-up communicator gets its stream and events and a handle for Python.
int64_t register_communicator(std::shared_ptr<Communicator> c) {
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&c->to_nccl, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&c->from_nccl[0], cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&c->from_nccl[1], cudaEventDisableTiming));
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t handle = g_next_handle++;
  g_comms[handle] = std::move(c);
  return handle;
}

int64_t nccl_init(const at::Tensor& unique_id, int64_t rank, int64_t world_size, int64_t device, double timeout_s) {
  FOMOE_CHECK(unique_id.device().is_cpu() && unique_id.scalar_type() == at::kByte &&
                  unique_id.numel() == NCCL_UNIQUE_ID_BYTES && unique_id.is_contiguous(),
              "fomoe NCCL: unique_id must be a contiguous CPU uint8 tensor of ", NCCL_UNIQUE_ID_BYTES, " bytes");
  FOMOE_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "fomoe NCCL: rank ", rank,
              " out of range for world size ", world_size);
  FOMOE_CHECK(device >= 0 && device < c10::cuda::device_count(), "fomoe NCCL: no CUDA device ", device);
  FOMOE_CHECK(timeout_s > 0, "fomoe NCCL: timeout must be positive");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data_ptr<uint8_t>(), NCCL_UNIQUE_ID_BYTES);
  auto c = std::make_shared<Communicator>();
  c->device = static_cast<int>(device);
  c->rank = static_cast<int>(rank);
  c->world_size = static_cast<int>(world_size);
  c->timeout_s = timeout_s;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  const ncclResult_t r = ncclCommInitRankConfig(&c->comm, static_cast<int>(world_size), id, static_cast<int>(rank),
                                                &config);
  FOMOE_CHECK(c->comm != nullptr || r == ncclSuccess, "fomoe NCCL: ncclCommInitRankConfig failed: ",
              ncclGetErrorString(r));
  finish(*c, r, "communicator initialisation");
  return register_communicator(std::move(c));
}

// A communicator of the ranks that pass the same color >= 0 (ordered by key), split from
// `handle`; every rank of `handle` must call it, in the same order, with color -1 when it is
// not a member (it then gets 0, no handle). It runs once, at a sync manager's setup. The parent
// is non-blocking, so the split runs as the parent's asynchronous job and NCCL stores the
// child's handle only when that job ends: wait for the handle (bounded, like every call here),
// then for the child's own initialisation.
int64_t nccl_split(int64_t handle, int64_t color, int64_t key) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
  auto parent = get_comm(handle);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(parent->device));
  auto c = std::make_shared<Communicator>();
  c->device = parent->device;
  c->timeout_s = parent->timeout_s;
  // The split itself runs as the non-blocking parent's job (bounded below); the child is
  // blocking, so each all-reduce enqueues on the calling thread. A non-blocking communicator
  // hands every call to a new thread and reports "in progress": on two H200s that cost 90-160
  // µs of host time per all-reduce (25-50 µs blocking), which a caller that waits for its sum
  // sees as latency (0.83x torch's bus bandwidth at 64 MiB).
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 1;
  const bool member = color >= 0;
  ncclResult_t r = ncclCommSplit(parent->comm, member ? static_cast<int>(color) : NCCL_SPLIT_NOCOLOR,
                                 static_cast<int>(key), &c->comm, &config);
  if (!member) {
    finish(*parent, r, "communicator split");
    return 0;
  }
  if (r != ncclInProgress) finish(*parent, r, "communicator split");  // throws unless it succeeded
  wait_bounded(*parent, "communicator split", [&] {
    if (__atomic_load_n(&c->comm, __ATOMIC_ACQUIRE) != nullptr) return true;
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(parent->comm, &state);
    if (state != ncclSuccess && state != ncclInProgress) finish(*parent, state, "communicator split");
    return false;
  });
  finish(*c, ncclInProgress, "communicator split (the new communicator's setup)");
  int rank = -1, size = 0;
  finish(*c, ncclCommUserRank(c->comm, &rank), "ncclCommUserRank");
  finish(*c, ncclCommCount(c->comm, &size), "ncclCommCount");
  c->rank = rank;
  c->world_size = size;
  return register_communicator(std::move(c));
#else
  FOMOE_CHECK(false, "fomoe NCCL: communicator splits need NCCL >= 2.18; this build has ", NCCL_VERSION_CODE);
#endif
}

void nccl_destroy(int64_t handle) {
  std::shared_ptr<Communicator> c;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_comms.find(handle);
    if (it == g_comms.end()) return;
    c = std::move(it->second);
    g_comms.erase(it);
  }
  if (c->stream != nullptr && !c->broken) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(c->device));
    cudaStreamSynchronize(c->stream);  // pending transfers finish before the communicator goes
  }
}

// ---- point-to-point --------------------------------------------------------------------------------

void check_buffer(const Communicator& c, const at::Tensor& t, const char* name) {
  FOMOE_CHECK(t.is_cuda() && t.device().index() == c.device, "fomoe NCCL: ", name, " must be on cuda:", c.device,
              " (the communicator's device), got ", t.device());
  FOMOE_CHECK(t.is_contiguous(), "fomoe NCCL: ", name, " must be contiguous");
}

std::vector<int64_t> nccl_sendrecv(int64_t handle, const at::Tensor& send, int64_t dst, at::Tensor recv, int64_t src) {
  auto c = get_comm(handle);
  check_buffer(*c, send, "send");
  check_buffer(*c, recv, "recv");
  check_peer(*c, dst, "destination");
  check_peer(*c, src, "source");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(c->device));
  const cudaStream_t cs = current_stream();
  record_then_wait(c->to_nccl, cs, c->stream);
  const auto moved = send_recv_bytes(*c, send.data_ptr(), send.nbytes(), dst, recv.data_ptr(), recv.nbytes(), src);
  record_then_wait(c->from_nccl[0], c->stream, cs);
  return {moved.first, moved.second};
}

// ---- all-reduce over a whole communicator -----------------------------------------------------------

// buffer (1-D fp32) summed in place over every rank of the communicator, asynchronously on the
// caller's stream; every rank ends with the same values.
void nccl_allreduce(int64_t handle, at::Tensor buffer) {
  auto c = get_comm(handle);
  check_buffer(*c, buffer, "buffer");
  FOMOE_CHECK(buffer.scalar_type() == at::kFloat && buffer.dim() == 1, "fomoe NCCL: the all-reduce sums a 1-D fp32 "
              "buffer, got ", buffer.scalar_type(), " of shape ", buffer.sizes());
  if (buffer.numel() == 0) return;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(c->device));
  const cudaStream_t cs = current_stream();
  record_then_wait(c->to_nccl, cs, c->stream);
  float* data = buffer.data_ptr<float>();
  finish(*c, ncclAllReduce(data, data, static_cast<size_t>(buffer.numel()), ncclFloat32, ncclSum, c->comm,
                           c->stream),
         "ncclAllReduce");
  record_then_wait(c->from_nccl[0], c->stream, cs);
}

// ---- ring all-reduce -------------------------------------------------------------------------------

struct Range {
  int64_t start, len;
};

// Slice j of S of a range; slices of the same range line up across steps.
Range slice_of(Range r, int64_t j, int64_t S) {
  const int64_t lo = r.len * j / S, hi = r.len * (j + 1) / S;
  return {r.start + lo, hi - lo};
}

// plan: CPU int64 [2*(n-1)+1, 4]. Rows 0..n-2: reduce-scatter steps (send start, send len,
// recv start, recv len); rows n-1..2n-3: all-gather steps; last row: (owned start, owned len,
// 0, 0). fomoe.comm.ring_plan is the one place that decides these.
std::vector<int64_t> nccl_ring_allreduce(int64_t handle, at::Tensor acc, const at::Tensor& plan, int64_t next,
                                         int64_t prev, bool bf16_wire, int64_t slice_elems) {
  auto c = get_comm(handle);
  check_buffer(*c, acc, "buffer");
  FOMOE_CHECK(acc.scalar_type() == at::kFloat && acc.dim() == 1, "fomoe NCCL: the ring all-reduce sums a 1-D "
              "fp32 buffer, got ", acc.scalar_type(), " of shape ", acc.sizes());
  FOMOE_CHECK(plan.device().is_cpu() && plan.scalar_type() == at::kLong && plan.dim() == 2 && plan.size(1) == 4 &&
                  plan.size(0) % 2 == 1 && plan.is_contiguous(),
              "fomoe NCCL: plan must be a contiguous CPU int64 [2*(n-1)+1, 4] table, got ", plan.sizes());
  check_peer(*c, next, "next");
  check_peer(*c, prev, "previous");
  FOMOE_CHECK(slice_elems >= 1, "fomoe NCCL: slice_elems must be >= 1");
  const int64_t numel = acc.numel();
  const int64_t steps = (plan.size(0) - 1) / 2;
  const int64_t* p = plan.data_ptr<int64_t>();
  auto row = [&](int64_t i, int64_t col) { return p[i * 4 + col]; };
  int64_t max_len = 0;
  for (int64_t i = 0; i < plan.size(0); ++i) {
    for (int col = 0; col < 4; col += 2) {
      const int64_t start = row(i, col), len = row(i, col + 1);
      FOMOE_CHECK(start >= 0 && len >= 0 && start + len <= numel, "fomoe NCCL: plan row ", i, " names elements [",
                  start, ", ", start + len, ") of a buffer of ", numel);
      max_len = std::max(max_len, len);
    }
  }
  if (steps == 0 || numel == 0) return {0, 0};

  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(c->device));
  const cudaStream_t cs = current_stream();
  const cudaStream_t ns = c->stream;
  const int64_t wire_bytes = bf16_wire ? 2 : 4;
  // Slices per chunk: transfers of one slice overlap the add of the previous one.
  const int64_t S = std::max<int64_t>(1, (max_len + slice_elems - 1) / slice_elems);
  const int64_t cap = (max_len + S - 1) / S + 1;
  const at::ScalarType wire_type = bf16_wire ? at::kBFloat16 : at::kFloat;
  at::Tensor tmp = at::empty({2 * cap}, acc.options().dtype(wire_type));
  at::Tensor wire = bf16_wire ? at::empty({numel}, acc.options().dtype(at::kBFloat16)) : at::Tensor();
  float* a = acc.data_ptr<float>();
  auto* w = bf16_wire ? reinterpret_cast<uint16_t*>(wire.data_ptr()) : nullptr;
  char* t = static_cast<char*>(tmp.data_ptr());
  int64_t sent = 0, received = 0;

  const int64_t K = steps * S;
  auto send_range = [&](int64_t k) { return slice_of({row(k / S, 0), row(k / S, 1)}, k % S, S); };
  auto recv_range = [&](int64_t k) { return slice_of({row(k / S, 2), row(k / S, 3)}, k % S, S); };
  // The slice to send is final on the caller's stream: convert it for a bf16 wire, hand over.
  auto ready = [&](int64_t k) {
    const Range r = send_range(k);
    if (bf16_wire) check_launch(f32_to_bf16(w + r.start, a + r.start, r.len, cs), "comm f32_to_bf16");
    record_then_wait(c->to_nccl, cs, ns);
  };
  auto transfer = [&](int64_t k) {
    const Range s = send_range(k), r = recv_range(k);
    const void* src = bf16_wire ? static_cast<const void*>(w + s.start) : static_cast<const void*>(a + s.start);
    const auto moved = send_recv_bytes(*c, src, s.len * wire_bytes, next, t + (k % 2) * cap * wire_bytes,
                                       r.len * wire_bytes, prev);
    sent += moved.first;
    received += moved.second;
    C10_CUDA_CHECK(cudaEventRecord(c->from_nccl[k % 2], ns));
  };
  auto add = [&](int64_t k) {
    const Range r = recv_range(k);
    C10_CUDA_CHECK(cudaStreamWaitEvent(cs, c->from_nccl[k % 2], 0));
    const void* in = t + (k % 2) * cap * wire_bytes;
    check_launch(bf16_wire ? add_bf16(a + r.start, static_cast<const uint16_t*>(in), r.len, cs)
                           : add_f32(a + r.start, static_cast<const float*>(in), r.len, cs),
                 "comm ring add");
  };

  // Reduce-scatter, software-pipelined: slice k+1 is handed to NCCL before slice k is added.
  // The send of slice k+1 needs the add of slice k+1-S (same slice, previous step), already
  // enqueued when S >= 2; with one slice per chunk the add must come first.
  ready(0);
  transfer(0);
  for (int64_t k = 0; k < K; ++k) {
    if (k + 1 < K && S >= 2) {
      ready(k + 1);
      transfer(k + 1);
      add(k);
    } else {
      add(k);
      if (k + 1 < K) {
        ready(k + 1);
        transfer(k + 1);
      }
    }
  }

  // The owned chunk is final: fix it in the wire format so every member ends bitwise equal.
  const Range owned{row(2 * steps, 0), row(2 * steps, 1)};
  if (bf16_wire) {
    check_launch(f32_to_bf16(w + owned.start, a + owned.start, owned.len, cs), "comm f32_to_bf16");
    check_launch(bf16_to_f32(a + owned.start, w + owned.start, owned.len, cs), "comm bf16_to_f32");
  }
  record_then_wait(c->to_nccl, cs, ns);
  // All-gather: forwarding only, in order on the NCCL stream.
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t i = steps + s;
    const Range snd{row(i, 0), row(i, 1)}, rcv{row(i, 2), row(i, 3)};
    void* base = bf16_wire ? static_cast<void*>(w) : static_cast<void*>(a);
    char* b = static_cast<char*>(base);
    const auto moved = send_recv_bytes(*c, b + snd.start * wire_bytes, snd.len * wire_bytes, next,
                                       b + rcv.start * wire_bytes, rcv.len * wire_bytes, prev);
    sent += moved.first;
    received += moved.second;
  }
  record_then_wait(c->from_nccl[0], ns, cs);
  if (bf16_wire) check_launch(bf16_to_f32(a, w, numel, cs), "comm bf16_to_f32");
  // tmp and wire return to the caching allocator on the caller's stream, which now waits for
  // the NCCL stream: nothing reuses them before the transfers are done.
  return {sent, received};
}

// ---- bucket pack / unpack ----------------------------------------------------------------------------

// Validates a CPU segment table against the bucket and copies it (with the block prefix) to
// the device; returns the device copy and the number of blocks.
std::pair<at::Tensor, int64_t> device_table(const char* op, const at::Tensor& bucket, const at::Tensor& table,
                                            int64_t num_expert_values, bool reads_b) {
  FOMOE_CHECK(bucket.is_cuda() && bucket.scalar_type() == at::kFloat && bucket.dim() == 1 && bucket.is_contiguous(),
              "fomoe.", op, ": bucket must be a contiguous 1-D fp32 CUDA tensor");
  FOMOE_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.size(1) == 6 && table.is_contiguous(),
              "fomoe.", op, ": table must be a contiguous CPU int64 [segments, 6] tensor, got ", table.sizes());
  const int64_t S = table.size(0);
  const auto* rows = reinterpret_cast<const Segment*>(table.data_ptr<int64_t>());
  at::Tensor host = at::empty({S * 6 + S + 1}, table.options().pinned_memory(true));
  int64_t* out = host.data_ptr<int64_t>();
  std::memcpy(out, rows, sizeof(Segment) * S);
  int64_t* prefix = out + S * 6;
  int64_t blocks = 0;
  for (int64_t s = 0; s < S; ++s) {
    const Segment& g = rows[s];
    FOMOE_CHECK(g.numel >= 0 && g.offset >= 0 && g.offset + g.numel <= bucket.numel(), "fomoe.", op, ": segment ",
                s, " covers [", g.offset, ", ", g.offset + g.numel, ") of a bucket of ", bucket.numel());
    FOMOE_CHECK(g.numel == 0 || (g.a != 0 && (g.b != 0 || !reads_b)), "fomoe.", op,
                ": segment ", s, " has a null address");
    FOMOE_CHECK(g.b_dtype == int64_t(DType::kFloat32) || g.b_dtype == int64_t(DType::kBFloat16), "fomoe.", op,
                ": segment ", s, " has an unknown dtype code ", g.b_dtype);
    FOMOE_CHECK(g.expert < num_expert_values, "fomoe.", op, ": segment ", s, " names expert slot ", g.expert,
                " but only ", num_expert_values, " per-expert values were given");
    prefix[s] = blocks;
    blocks += (g.numel + kElemsPerBlock - 1) / kElemsPerBlock;
  }
  prefix[S] = blocks;
  return {host.to(bucket.device(), /*non_blocking=*/true), blocks};
}

void check_per_expert(const char* op, const at::Tensor& bucket, const std::optional<at::Tensor>& values) {
  if (!values) return;
  FOMOE_CHECK(values->device() == bucket.device() && values->scalar_type() == at::kFloat && values->dim() == 1 &&
                  values->is_contiguous(),
              "fomoe.", op, ": per-expert values must be a contiguous 1-D fp32 tensor on ", bucket.device());
}

void pack_delta_op(at::Tensor bucket, const at::Tensor& table, const std::optional<at::Tensor>& scales) {
  check_per_expert("pack_delta", bucket, scales);
  c10::cuda::CUDAGuard guard(bucket.device());
  const auto [dev, blocks] = device_table("pack_delta", bucket, table, scales ? scales->numel() : INT64_MAX, true);
  const int64_t S = table.size(0);
  const int64_t* base = dev.data_ptr<int64_t>();
  check_launch(pack_delta(bucket.data_ptr<float>(), reinterpret_cast<const Segment*>(base), base + S * 6, S, blocks,
                          scales ? scales->data_ptr<float>() : nullptr, current_stream()),
               "pack_delta");
}

void unpack_average_op(const at::Tensor& bucket, const at::Tensor& table, const std::optional<at::Tensor>& divisors,
                       double uniform_divisor) {
  check_per_expert("unpack_average", bucket, divisors);
  c10::cuda::CUDAGuard guard(bucket.device());
  const auto [dev, blocks] = device_table("unpack_average", bucket, table, divisors ? divisors->numel() : INT64_MAX,
                                           false);
  const int64_t S = table.size(0);
  const int64_t* base = dev.data_ptr<int64_t>();
  check_launch(unpack_average(bucket.data_ptr<float>(), reinterpret_cast<const Segment*>(base), base + S * 6, S,
                              blocks, divisors ? divisors->data_ptr<float>() : nullptr,
                              static_cast<float>(uniform_divisor), current_stream()),
               "unpack_average");
}

}  // namespace
}  // namespace fomoe::cuda::comm

TORCH_LIBRARY(fomoe_comm, m) {
  namespace c = fomoe::cuda::comm;
  m.def("nccl_version() -> int[]", &c::nccl_version);
  m.def("nccl_unique_id() -> Tensor", &c::nccl_unique_id);
  m.def("nccl_init(Tensor unique_id, int rank, int world_size, int device, float timeout_s) -> int", &c::nccl_init);
  m.def("nccl_destroy(int handle) -> ()", &c::nccl_destroy);
  m.def("nccl_split(int handle, int color, int key) -> int", &c::nccl_split);
  m.def("nccl_allreduce(int handle, Tensor(a!) buffer) -> ()", &c::nccl_allreduce);
  m.def("nccl_sendrecv(int handle, Tensor send, int dst, Tensor(a!) recv, int src) -> int[]", &c::nccl_sendrecv);
  m.def("nccl_ring_allreduce(int handle, Tensor(a!) buffer, Tensor plan, int next, int prev, bool bf16_wire, "
        "int slice_elems) -> int[]",
        &c::nccl_ring_allreduce);
  m.def("pack_delta(Tensor(a!) bucket, Tensor table, Tensor? scales) -> ()", &c::pack_delta_op);
  m.def("unpack_average(Tensor bucket, Tensor table, Tensor? divisors, float uniform_divisor) -> ()",
        &c::unpack_average_op);
}
