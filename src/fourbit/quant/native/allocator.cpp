// A CPU allocator for torch that keeps large tensors out of glibc's heap and reuses their pages.
//
// Why: a training step allocates and frees thousands of activation-sized tensors among small, longer-lived
// allocations (autograd nodes, small tensors). glibc carves both from one heap, the small ones pin the freed space
// around them, and the heap's resident size grows to about twice what is live (measured with mallinfo2: 314 MB in
// use, 420 MB free but resident, on the bundled model). Lowering glibc's mmap threshold fixes the memory but faults
// every large tensor's pages in afresh, which cost 25-130% of the step time.
//
// Here every allocation of at least kMinPooled bytes gets its own mapping, rounded up to a size class (at most 1/8
// wasted). A freed mapping goes into a cache of at most `cap` bytes, and the next request of the same class takes
// it back without a page fault; past the cap it is unmapped at once, so resident memory stays within
// live + cap. Smaller requests go to c10's default allocation, as before.

#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <ATen/EmptyTensor.h>

#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kMinPooled = 128 << 10;
constexpr size_t kDefaultCap = 64 << 20;  // while not installed: what dequantize's outputs may keep cached

size_t size_class(size_t n) {
  // round up to a multiple of max(64 KiB, 2^floor(log2 n) / 8): classes are coarse enough that the varying shapes
  // of packed batches land in the same few, fine enough to waste at most 1/8
  size_t top = size_t{1} << (63 - __builtin_clzll(n));
  size_t step = std::max<size_t>(64 << 10, top / 8);
  return (n + step - 1) / step * step;
}

struct Cached {
  size_t size;
  void* ptr;
};

struct Pool {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;  // pooled pointer -> its mapping's size
  std::list<Cached> lru;                   // freed mappings kept for reuse, oldest first
  std::multimap<size_t, std::list<Cached>::iterator> by_size;
  size_t cached_bytes = 0;
  size_t cap = kDefaultCap;
  int64_t hits = 0, misses = 0;
};

Pool& pool() {
  static Pool* p = [] {
    Pool* made = new Pool();  // never destroyed: tensors may be freed during interpreter shutdown
    // a fork while another thread holds the lock would leave the child's lock held for good
    pthread_atfork([] { pool().mu.lock(); }, [] { pool().mu.unlock(); }, [] { pool().mu.unlock(); });
    return made;
  }();
  return *p;
}

void pooled_free(void* ptr);

// `always`: dequantize's outputs, pooled whether or not the pool is in force; otherwise torch's CPU allocator, which
// pools only while `routing` is on (between pool_install and pool_uninstall).
class PooledCPUAllocator final : public c10::Allocator {
 public:
  explicit PooledCPUAllocator(bool always) : always_(always) {}
  std::atomic<bool> routing{false};

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinPooled || !(always_ || routing.load(std::memory_order_relaxed))) {
      void* p = c10::alloc_cpu(n);  // freed by free_cpu directly; raw_deleter's pooled_free also takes it
      return {p, p, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    size_t size = size_class(n);
    Pool& pl = pool();
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(pl.mu);
      // the smallest cached mapping that fits, if it wastes at most a quarter of itself
      auto it = pl.by_size.lower_bound(size);
      if (it != pl.by_size.end() && it->first <= size + size / 4) {
        size = it->first;
        it = std::prev(pl.by_size.upper_bound(size));  // of equal sizes the last freed: its pages are warmest
        p = it->second->ptr;
        pl.lru.erase(it->second);
        pl.by_size.erase(it);
        pl.cached_bytes -= size;
        ++pl.hits;
      } else {
        ++pl.misses;
      }
    }
    if (p == nullptr) {
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "fourbit allocator: out of memory mapping ", size, " bytes");
    }
    {
      std::lock_guard<std::mutex> lock(pl.mu);
      pl.live.emplace(p, size);
    }
    return {p, p, &pooled_free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &pooled_free; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  const bool always_;
};

// Drop the oldest cached mapping from the index (the caller unmaps it outside the lock).
Cached pop_oldest(Pool& pl) {
  Cached oldest = pl.lru.front();
  auto range = pl.by_size.equal_range(oldest.size);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == pl.lru.begin()) {
      pl.by_size.erase(it);
      break;
    }
  }
  pl.lru.pop_front();
  pl.cached_bytes -= oldest.size;
  return oldest;
}

void pooled_free(void* ptr) {
  if (ptr == nullptr) return;
  Pool& pl = pool();
  std::vector<Cached> drop;
  {
    std::lock_guard<std::mutex> lock(pl.mu);
    auto it = pl.live.find(ptr);
    if (it == pl.live.end()) {
      c10::free_cpu(ptr);  // a small allocation released through raw_deleter()
      return;
    }
    size_t size = it->second;
    pl.live.erase(it);
    if (size > pl.cap) {
      drop.push_back({size, ptr});
    } else {
      // the most recently freed sizes are the likeliest to be asked for next: evict the oldest to make room
      while (pl.cached_bytes + size > pl.cap) drop.push_back(pop_oldest(pl));
      pl.lru.push_back({size, ptr});
      pl.by_size.emplace(size, std::prev(pl.lru.end()));
      pl.cached_bytes += size;
    }
  }
  for (auto& c : drop) munmap(c.ptr, c.size);
}

PooledCPUAllocator& cpu_allocator() {
  static PooledCPUAllocator* a = new PooledCPUAllocator(/*always=*/false);
  return *a;
}

PooledCPUAllocator& dequantize_allocator() {
  static PooledCPUAllocator* a = new PooledCPUAllocator(/*always=*/true);
  return *a;
}

}  // namespace

// Route torch's CPU allocations of kMinPooled bytes and more through the pool (cap: bytes of freed mappings kept
// for reuse). Returns false, doing nothing, when another allocator than c10's default is in force. The first call
// installs the pool as torch's CPU allocator for good: ideep (oneDNN) frees its buffers through whichever allocator
// is current when it frees them, so swapping c10's default back would hand it pool mappings to free(). Between
// calls of pool_install and pool_uninstall it pools; otherwise it passes every request to c10::alloc_cpu, as
// c10's default does (without the profiler's memory reports).
bool pool_install(int64_t cap_bytes) {
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current != &cpu_allocator() && current != c10::GetDefaultCPUAllocator()) return false;
  {
    std::lock_guard<std::mutex> lock(pool().mu);
    pool().cap = static_cast<size_t>(std::max<int64_t>(cap_bytes, 0));
  }
  cpu_allocator().routing = true;
  if (current != &cpu_allocator()) c10::SetCPUAllocator(&cpu_allocator(), /*priority=*/10);
  return true;
}

// Stop pooling new allocations; pooled tensors still alive are freed through the pool later.
void pool_uninstall() {
  cpu_allocator().routing = false;
  std::lock_guard<std::mutex> lock(pool().mu);
  pool().cap = kDefaultCap;
}

// A fresh 1-D tensor from the pool whether or not it is in force: dequantize's outputs, so that decoding a weight
// again (merging layer after layer, a benchmark's loop) reuses the pages of the last freed output instead of
// faulting in new ones, which on a 32 MB output costs ten times the decode.
torch::Tensor pool_empty(int64_t numel, at::ScalarType dtype) {
  return at::detail::empty_generic({numel}, &dequantize_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

// Unmap every cached mapping.
void pool_release() {
  std::list<Cached> drop;
  {
    std::lock_guard<std::mutex> lock(pool().mu);
    drop.swap(pool().lru);
    pool().by_size.clear();
    pool().cached_bytes = 0;
  }
  for (auto& c : drop) munmap(c.ptr, c.size);
}

// {live bytes, cached bytes, hits, misses, pooling torch's allocations now}
std::vector<int64_t> pool_stats() {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.mu);
  int64_t live = 0;
  for (auto& kv : pl.live) live += static_cast<int64_t>(kv.second);
  return {live, static_cast<int64_t>(pl.cached_bytes), pl.hits, pl.misses, cpu_allocator().routing ? 1 : 0};
}
