// Runtime of the CUDA emulator (cuda_emu.h): fibers, the block scheduler, barriers.
//
// A launch runs its blocks one after another on the calling thread. For each block, every CUDA
// thread is a fiber on its own stack (a pool of up to 1024 stacks of 128 KiB, mmap'ed once with
// a guard page each, reused by every block and launch). The scheduler resumes runnable fibers
// round-robin; a fiber runs until it waits at a barrier or returns. A barrier completes, and its
// fibers become runnable again, as soon as its last participant arrives:
//   block barrier: every not-yet-exited thread of the block waits at it (same statement);
//   warp op:       every existing lane named in the mask waits at a warp op (same mask, kind).
// A pass over the block that finds nothing runnable is a deadlock: an error, never a hang.
//
// Context switch: a few instructions of assembly on x86-64 (callee-saved registers, MXCSR, x87
// control word, stack pointer: what the SysV ABI says survives a call), else POSIX ucontext
// (swapcontext costs a signal-mask syscall per switch: correct but ~50x slower).
// NFT_FAST_CUDA_EMU_UCONTEXT=1 forces ucontext on x86-64 too (to test that path).
#include "cuda_emu.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#ifndef NFT_EMU_RACECHECK
#define NFT_EMU_RACECHECK 0
#endif

// AddressSanitizer builds (tests/tools/test_asan.py): every fiber switch is announced, so ASan
// knows which stack is current (else it reports false stack overflows and cannot unwind throws).
#if defined(__SANITIZE_ADDRESS__)
#define NFT_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NFT_EMU_ASAN 1
#endif
#endif
#ifndef NFT_EMU_ASAN
#define NFT_EMU_ASAN 0
#endif
#if NFT_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif


uint3 threadIdx = {0, 0, 0};
uint3 blockIdx = {0, 0, 0};
dim3 blockDim;
dim3 gridDim;
const int warpSize = 32;

#if defined(__x86_64__) && defined(__ELF__)
#define NFT_EMU_ASM_SWITCH 1
extern "C" {
// Saves the callee-saved state on the current stack, stores its stack pointer to *save, and
// continues on the stack `load` (saved by an earlier switch, or prepared by init_context).
void nft_emu_switch(void** save, void* load);
// First code a fresh fiber runs: calls r13(r12) on a 16-byte aligned stack; never returns.
void nft_emu_trampoline();
}
__asm__(
    ".pushsection .text\n"
    ".globl nft_emu_switch\n"
    ".hidden nft_emu_switch\n"
    ".type nft_emu_switch,@function\n"
    ".p2align 4\n"
    "nft_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size nft_emu_switch,.-nft_emu_switch\n"
    ".globl nft_emu_trampoline\n"
    ".hidden nft_emu_trampoline\n"
    ".type nft_emu_trampoline,@function\n"
    ".p2align 4\n"
    "nft_emu_trampoline:\n"
    "  .cfi_startproc\n"
    "  .cfi_undefined rip\n"  // the outermost frame of a fiber: unwinders and debuggers stop here
    "  movq %r12, %rdi\n"
    "  callq *%r13\n"
    "  ud2\n"
    "  .cfi_endproc\n"
    ".size nft_emu_trampoline,.-nft_emu_trampoline\n"
    ".popsection\n");
#else
#define NFT_EMU_ASM_SWITCH 0
#endif

namespace nft_emu {
namespace detail {
namespace {

constexpr int kMaxThreads = 1024;
// Every NFT_SHARED variable of the module, each at its own place (the sum of all kernels' shared
// memory; a GPU block may use at most 48 KiB of it at once: checked per launch).
constexpr std::size_t kArenaBytes = std::size_t(4) << 20;
constexpr std::size_t kBlockSharedMax = 48 * 1024;
alignas(64) unsigned char g_arena[kArenaBytes];
constexpr std::size_t kStackBytes = 128 * 1024;

enum State : unsigned char { kRunnable, kWaitBlock, kWaitWarp, kExited };

struct Fiber {
  void* sp = nullptr;      // asm switch: saved stack pointer
  ucontext_t* uc = nullptr;  // ucontext switch
  State state = kExited;
  int lin = 0;  // linear thread index in the block
  uint3 tid{0, 0, 0};
  unsigned wep = 0;  // __syncwarp()s passed in this block (racecheck)
  // block barrier
  int bkind = 0, bpred = 0, bres = 0;
  const char* file = nullptr;
  int line = 0;
  // warp op
  int wkind = 0, wsrc = 0, wsize = 0;
  unsigned wmask = 0;
  bool wsigned = false;
  alignas(16) unsigned char wval[16];
  alignas(16) unsigned char wres[16];
  std::exception_ptr error;
  // its stack (for ASan's fiber annotations)
  const void* stack_lo = nullptr;
  std::size_t stack_size = 0;
  void* asan_fake = nullptr;
};

struct Warp {
  unsigned exist = 0, waiting = 0, exited = 0;
};

enum Schedule : int { kForward = 0, kReverse, kRandom };
const char* const kScheduleNames[] = {"forward", "reverse", "random"};

// Index of a schedule name in kScheduleNames, -1 for another name.
int schedule_index(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kScheduleNames[i]) return i;
  return -1;
}

// splitmix64: seeds and drives the random schedule (reproducible from seed and launch number).
inline std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct Runtime {
  std::mutex mu;  // one launch at a time (process-wide): __shared__ statics, the fiber pool
  bool use_ucontext = !NFT_EMU_ASM_SWITCH;
  bool ready = false;
  char* stacks = nullptr;
  std::size_t slot = 0, page = 4096;
  Fiber fibers[kMaxThreads];
  ucontext_t* ucs = nullptr;
  void* sched_sp = nullptr;
  ucontext_t sched_uc;
  const void* sched_lo = nullptr;  // the scheduler's stack, as ASan reports it to a fiber
  std::size_t sched_size = 0;
  unsigned mxcsr = 0x1f80, fpucw = 0x037f;
  // the launch in progress
  const char* name = "";
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  int nthreads = 0;
  Fiber* cur = nullptr;
  int n_wait_block = 0, n_exited = 0;
  Warp warps[kMaxThreads / 32];
  unsigned long long launches = 0;
  // schedule (set_schedule / NFT_FAST_CUDA_EMU_SCHEDULE)
  int schedule = kForward;
  unsigned long long seed = 0;
  std::uint64_t rng = 0;                 // per launch: from seed and launch number
  unsigned long long since_schedule = 0;  // launches since set_schedule: the same calls replay
  int order[kMaxThreads];
  // racecheck (NFT_EMU_RACECHECK builds): on for later launches; the block in progress
  bool racecheck = false;
  unsigned block_epoch = 0;        // __syncthreads completed in the block in progress
  std::uint32_t block_seq = 0;     // blocks run so far, all launches (names the block's accesses)
  std::uint32_t launch_first = 0;  // block_seq of the launch's first block
  std::vector<unsigned long long> block_lin;  // linear block index of each block of the launch, in run order
  // shared memory
  std::size_t arena_used = 0;
  std::vector<SharedSlot*> launch_slots;  // the variables the launch has used so far
  std::size_t launch_shared = 0;           // their bytes
};

Runtime& rt() {
  static Runtime* r = new Runtime;  // never destroyed: a failed launch abandons fibers mid-kernel
  return *r;
}

thread_local int t_last_error = 0;
thread_local bool t_in_launch = false;

#if NFT_EMU_ASAN
// Not instrumented: ASan would call __asan_handle_no_return before the (never returning)
// fiber_main, i.e. before fiber_main has told it that this fiber's stack is now current.
#define NFT_EMU_FIBER_ENTRY __attribute__((no_sanitize_address))
#else
#define NFT_EMU_FIBER_ENTRY
#endif
__attribute__((noinline)) void fiber_main();
extern "C" NFT_EMU_FIBER_ENTRY void nft_emu_fiber_entry(void*) { fiber_main(); }
NFT_EMU_FIBER_ENTRY void uc_entry() { fiber_main(); }

void setup(Runtime& r) {
  if (r.ready) return;
  const char* force = std::getenv("NFT_FAST_CUDA_EMU_UCONTEXT");
  if (force && *force && std::string(force) != "0") r.use_ucontext = true;
  if (const char* sch = std::getenv("NFT_FAST_CUDA_EMU_SCHEDULE"); sch && *sch) {
    const std::string v(sch);
    const std::size_t colon = v.find(':');
    const int k = schedule_index(v.substr(0, colon));
    if (k < 0)
      throw std::invalid_argument("NFT_FAST_CUDA_EMU_SCHEDULE=" + v + ": expected forward, reverse or random[:seed]");
    r.schedule = k;
    if (colon != std::string::npos) r.seed = std::stoull(v.substr(colon + 1));
  }
  if (const char* rcv = std::getenv("NFT_FAST_CUDA_EMU_RACECHECK"); rcv && *rcv && std::string(rcv) != "0") {
    if (!NFT_EMU_RACECHECK)
      throw std::logic_error("NFT_FAST_CUDA_EMU_RACECHECK is set, but this nft_fast._cuda_emu was built without the "
                             "race checker (CMake option NFT_FAST_CUDA_EMU_RACECHECK=ON)");
    r.racecheck = true;
  }
  const long pg = sysconf(_SC_PAGESIZE);
  r.page = pg > 0 ? (std::size_t)pg : 4096;
  r.slot = kStackBytes + r.page;  // guard page below each stack
  void* mem = mmap(nullptr, r.slot * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  if (mem == MAP_FAILED) throw std::runtime_error("CUDA emulator: cannot map the fiber stacks");
  r.stacks = static_cast<char*>(mem);
  for (int i = 0; i < kMaxThreads; ++i) mprotect(r.stacks + i * r.slot, r.page, PROT_NONE);
  if (r.use_ucontext) {
    r.ucs = new ucontext_t[kMaxThreads];
    for (int i = 0; i < kMaxThreads; ++i) r.fibers[i].uc = &r.ucs[i];
  }
  r.ready = true;
}

void init_context(Runtime& r, int i) {
  Fiber& f = r.fibers[i];
  char* lo = r.stacks + i * r.slot + r.page;
  // Stagger the stack tops (64-byte steps over 4 KiB) so the fibers' hot frames do not all map
  // to the same L1 cache sets.
  char* top = lo + kStackBytes - (std::size_t)(i % 64) * 64;
  f.stack_lo = lo;
  f.stack_size = (std::size_t)(top - lo);
  if (r.use_ucontext) {
    getcontext(f.uc);
    f.uc->uc_stack.ss_sp = lo;
    f.uc->uc_stack.ss_size = (std::size_t)(top - lo);
    f.uc->uc_link = nullptr;
    makecontext(f.uc, uc_entry, 0);
    return;
  }
#if NFT_EMU_ASM_SWITCH
  auto* sp = reinterpret_cast<std::uint64_t*>(reinterpret_cast<std::uintptr_t>(top) & ~std::uintptr_t(15));
  sp[-1] = reinterpret_cast<std::uint64_t>(&nft_emu_trampoline);  // "return address"
  sp[-2] = 0;                                                     // rbp
  sp[-3] = 0;                                                     // rbx
  sp[-4] = reinterpret_cast<std::uint64_t>(&f);                   // r12: argument
  sp[-5] = reinterpret_cast<std::uint64_t>(&nft_emu_fiber_entry);  // r13: function
  sp[-6] = 0;                                                     // r14
  sp[-7] = 0;                                                     // r15
  std::uint64_t csr = (std::uint64_t)r.mxcsr | ((std::uint64_t)(r.fpucw & 0xffffu) << 32);
  sp[-8] = csr;  // MXCSR at +0, x87 control word at +4
  f.sp = sp - 8;
#endif
}

inline void switch_to_fiber(Runtime& r, Fiber& f) {
  r.cur = &f;
  threadIdx = f.tid;
#if NFT_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack_lo, f.stack_size);
#endif
#if NFT_EMU_ASM_SWITCH
  if (!r.use_ucontext)
    nft_emu_switch(&r.sched_sp, f.sp);
  else
#endif
    swapcontext(&r.sched_uc, f.uc);
#if NFT_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void switch_to_scheduler(Runtime& r, Fiber& f) {
#if NFT_EMU_ASAN
  // an exited fiber's stack is done with: no fake stack to keep
  __sanitizer_start_switch_fiber(f.state == kExited ? nullptr : &f.asan_fake, r.sched_lo, r.sched_size);
#endif
#if NFT_EMU_ASM_SWITCH
  if (!r.use_ucontext)
    nft_emu_switch(&f.sp, r.sched_sp);
  else
#endif
    swapcontext(f.uc, &r.sched_uc);
#if NFT_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake, &r.sched_lo, &r.sched_size);
#endif
}

void fiber_main() {
  Runtime& r = rt();
  Fiber* f = r.cur;
#if NFT_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_lo, &r.sched_size);
#endif
  try {
    r.body(r.ctx);
  } catch (...) {
    f->error = std::current_exception();
  }
  f->state = kExited;
  switch_to_scheduler(r, *f);
  std::abort();  // an exited fiber is never resumed
}

Fiber& current(const char* what) {
  Runtime& r = rt();
  if (!t_in_launch || r.cur == nullptr) throw std::logic_error(std::string(what) + " called outside an emulated kernel");
  return *r.cur;
}

// ------------------------------------------------------------------------------ messages
std::string base(const char* file) {
  std::string s = file ? file : "?";
  const std::size_t k = s.find_last_of("/\\");
  return k == std::string::npos ? s : s.substr(k + 1);
}

std::string xyz(uint3 v) { return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")"; }

std::string lanes(unsigned m) {
  std::string s;
  for (int i = 0; i < 32;) {
    if (!(m >> i & 1u)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && (m >> (j + 1) & 1u)) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(i);
    if (j > i) s += "-" + std::to_string(j);
    i = j + 1;
  }
  return "{" + (s.empty() ? std::string("none") : s) + "}";
}

const char* warp_kind_name(int k) {
  switch (k) {
    case kShfl: return "__shfl*_sync";
    case kBallot: return "__ballot_sync";
    case kAll: return "__all_sync";
    case kAny: return "__any_sync";
    case kSyncWarp: return "__syncwarp";
    default: return "__reduce_*_sync";
  }
}

std::string where(const Runtime& r) {
  return "kernel '" + std::string(r.name) + "', block " + xyz(blockIdx) + " of grid " + xyz(gridDim) +
         ", blockDim " + xyz(blockDim);
}

[[noreturn]] void deadlock(Runtime& r) {
  const int T = r.nthreads;
  std::string msg = "emulated kernel deadlock: " + where(r) + ": no thread can proceed. ";
  int nb = 0, nw = 0;
  const Fiber* at = nullptr;
  for (int i = 0; i < T; ++i) {
    if (r.fibers[i].state == kWaitBlock) {
      ++nb;
      if (!at) at = &r.fibers[i];
    }
    if (r.fibers[i].state == kWaitWarp) ++nw;
  }
  msg += std::to_string(nb) + " thread(s) wait at __syncthreads";
  if (at) msg += " (" + base(at->file) + ":" + std::to_string(at->line) + ")";
  msg += ", " + std::to_string(nw) + " at warp ops, " + std::to_string(r.n_exited) + " exited.";
  int shown = 0;
  for (int w = 0; w < (T + 31) / 32 && shown < 4; ++w) {
    const Warp& wp = r.warps[w];
    if (!wp.waiting) continue;
    ++shown;
    const Fiber& f = r.fibers[w * 32 + __builtin_ctz(wp.waiting)];
    const unsigned need = f.wmask & wp.exist & ~wp.waiting;
    unsigned at_block = 0;
    for (int l = 0; l < 32; ++l)
      if ((need >> l & 1u) && r.fibers[w * 32 + l].state == kWaitBlock) at_block |= 1u << l;
    msg += " Warp " + std::to_string(w) + ": lanes " + lanes(wp.waiting) + " wait at " + warp_kind_name(f.wkind) +
           " (mask 0x";
    char hex[16];
    std::snprintf(hex, sizeof hex, "%08x", f.wmask);
    msg += std::string(hex) + ") for lanes " + lanes(need & wp.exited) + " that exited and " + lanes(at_block) +
           " that wait at __syncthreads.";
  }
  throw std::runtime_error(msg);
}

// --------------------------------------------------------------------------- barriers
void release_block(Runtime& r) {
  const int T = r.nthreads;
  const Fiber* first = nullptr;
  int n = 0, ones = 0;
  for (int i = 0; i < T; ++i) {
    const Fiber& f = r.fibers[i];
    if (f.state != kWaitBlock) continue;
    if (!first) {
      first = &f;
    } else if (f.line != first->line || f.bkind != first->bkind ||
               (f.file != first->file && std::string(f.file) != first->file)) {
      throw std::runtime_error(
          "emulated kernel error: divergent __syncthreads in " + where(r) + ": thread " + xyz(first->tid) +
          " waits at " + base(first->file) + ":" + std::to_string(first->line) + ", thread " + xyz(f.tid) +
          " at " + base(f.file) + ":" + std::to_string(f.line) +
          " (every thread of a block that has not exited must reach the same __syncthreads: undefined "
          "behaviour on a GPU)");
    }
    ++n;
    ones += f.bpred;
  }
  int res = 0;
  if (first) {
    switch (first->bkind) {
      case kCount: res = ones; break;
      case kAnd: res = ones == n; break;
      case kOr: res = ones > 0; break;
      default: break;
    }
  }
  for (int i = 0; i < T; ++i) {
    Fiber& f = r.fibers[i];
    if (f.state != kWaitBlock) continue;
    f.bres = res;
    f.state = kRunnable;
  }
  r.n_wait_block = 0;
  ++r.block_epoch;
}

void try_release_warp(Runtime& r, int w) {
  Warp& wp = r.warps[w];
  const unsigned W = wp.waiting;
  Fiber* F = &r.fibers[w * 32];
  unsigned G = 0;
  for (unsigned m = W; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    const unsigned M = (F[l].wmask | (1u << l)) & wp.exist;
    if ((M & ~W) == 0) G |= 1u << l;
  }
  if (!G) return;
  for (unsigned m = G; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    const Fiber& f = F[l];
    const unsigned M = (f.wmask | (1u << l)) & wp.exist;
    for (unsigned mm = M; mm; mm &= mm - 1) {
      const int j = __builtin_ctz(mm);
      const unsigned Mj = (F[j].wmask | (1u << j)) & wp.exist;
      if (Mj != M || F[j].wkind != f.wkind || F[j].wsize != f.wsize) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "mask 0x%08x, %d bytes", f.wmask, f.wsize);
        std::string a = std::string(warp_kind_name(f.wkind)) + " (" + buf + ")";
        std::snprintf(buf, sizeof buf, "mask 0x%08x, %d bytes", F[j].wmask, F[j].wsize);
        std::string b = std::string(warp_kind_name(F[j].wkind)) + " (" + buf + ")";
        throw std::runtime_error("emulated kernel error: mismatched warp ops in " + where(r) + ", warp " +
                                 std::to_string(w) + ": lane " + std::to_string(l) + " waits at " + a + ", lane " +
                                 std::to_string(j) + " at " + b +
                                 " (every lane named in the mask must execute the same warp op with the same "
                                 "mask: undefined behaviour on a GPU)");
      }
    }
  }
  for (unsigned m = G; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    Fiber& f = F[l];
    const unsigned M = (f.wmask | (1u << l)) & wp.exist;
    switch (f.wkind) {
      case kShfl: {
        const int s = f.wsrc;
        const bool ok = s >= 0 && s < 32 && (M >> s & 1u);
        std::memcpy(f.wres, ok ? F[s].wval : f.wval, (std::size_t)f.wsize);
        break;
      }
      case kBallot:
      case kAll:
      case kAny: {
        unsigned b = 0;
        for (unsigned mm = M; mm; mm &= mm - 1) {
          const int j = __builtin_ctz(mm);
          int p;
          std::memcpy(&p, F[j].wval, 4);
          if (p) b |= 1u << j;
        }
        const int v = f.wkind == kAll ? (b == M) : (b != 0);
        if (f.wkind == kBallot)
          std::memcpy(f.wres, &b, 4);
        else
          std::memcpy(f.wres, &v, 4);
        break;
      }
      case kSyncWarp: break;
      default: {  // __reduce_*_sync on 32-bit integers
        std::uint32_t acc = 0;
        bool firstv = true;
        for (unsigned mm = M; mm; mm &= mm - 1) {
          const int j = __builtin_ctz(mm);
          std::uint32_t v;
          std::memcpy(&v, F[j].wval, 4);
          if (firstv) {
            acc = v;
            firstv = false;
            continue;
          }
          switch (f.wkind) {
            case kRedAdd: acc += v; break;
            case kRedAnd: acc &= v; break;
            case kRedOr: acc |= v; break;
            case kRedXor: acc ^= v; break;
            case kRedMin:
              acc = f.wsigned ? (std::uint32_t)std::min((std::int32_t)acc, (std::int32_t)v) : std::min(acc, v);
              break;
            case kRedMax:
              acc = f.wsigned ? (std::uint32_t)std::max((std::int32_t)acc, (std::int32_t)v) : std::max(acc, v);
              break;
            default: break;
          }
        }
        std::memcpy(f.wres, &acc, 4);
        break;
      }
    }
  }
  for (unsigned m = G; m; m &= m - 1) {
    Fiber& f = F[__builtin_ctz(m)];
    f.state = kRunnable;
    if (f.wkind == kSyncWarp) ++f.wep;  // orders memory among its lanes (a shuffle does not)
  }
  wp.waiting &= ~G;
}

[[noreturn]] void kernel_failed(Runtime& r, const Fiber& f) {
  std::string what = "unknown exception";
  try {
    std::rethrow_exception(f.error);
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
  }
  throw std::runtime_error("emulated kernel failed: " + where(r) + ", thread " + xyz(f.tid) + ": " + what);
}

// A GPU starts a block with undefined shared memory: fill the variable with poison (0xff bytes;
// random ones under the random schedule).
void poison(Runtime& r, const SharedSlot& v) {
  unsigned char* p = g_arena + v.offset;
  if (r.schedule != kRandom) {
    std::memset(p, 0xff, v.size);
    return;
  }
  for (std::size_t k = 0; k < v.size; k += 8) {
    const std::uint64_t x = splitmix(r.rng);
    std::memcpy(p + k, &x, std::min<std::size_t>(8, v.size - k));
  }
}

// Every shared variable the launch has used: the others are poisoned when first used.
void poison_shared(Runtime& r) {
  for (const SharedSlot* v : r.launch_slots) poison(r, *v);
}
// ---------------------------------------------------------------------------- racecheck
// A data-race detector for the emulated kernels, in builds whose kernel sources are compiled
// with -fsanitize=thread (CMake option NFT_FAST_CUDA_EMU_RACECHECK): the compiler then calls
// __tsan_read4(addr), __tsan_write16(addr), ... before every load and store of the kernels, and
// this file (not ThreadSanitizer's runtime, which is never linked) implements those hooks. Every
// byte a launch touches gets a shadow cell: its last write, up to two reads since, and its last
// atomic update, each as (block, thread, barrier epoch, __syncwarp epoch, code address). Two
// accesses to one byte race when at least one is a write (or one is atomic and the other not)
// and they are unordered on a GPU: in different blocks of the launch (global memory), or in
// different threads of the block in the same barrier interval (no __syncthreads completed
// between them; for two lanes of one warp, no __syncwarp either). Unlike the schedule checks,
// this sees a race whether or not it changes the result. Shared memory is per block; fiber stacks
// (locals) are private; launches are ordered. The first race of a launch fails it (after the
// launch ends) with both accesses' source lines (addr2line). Not seen: memcpy/memset calls
// (libc is not instrumented). Two unordered reads are kept per byte (a third one is dropped):
// enough to see every write racing with a read, though it may be reported against another of
// the reads.
#if NFT_EMU_RACECHECK
namespace rc {

struct Access {
  const void* pc = nullptr;
  std::uint32_t blk = 0;  // Runtime::block_seq of the access (0: none)
  std::uint16_t thr = 0, ep = 0, wep = 0;
  std::uint16_t kind = 0;  // 0 read, 1 write, 2 atomic
};
struct Cell {
  Access w, r1, r2, a;
};
constexpr std::uintptr_t kPageBits = 12;
struct Page {
  Cell c[std::size_t(1) << kPageBits];
};

struct State {
  bool active = false;  // a launch with the checker on is running
  std::unordered_map<std::uintptr_t, std::unique_ptr<Page>> pages;  // global memory, per launch
  std::uintptr_t last_key = ~std::uintptr_t(0);
  Page* last_page = nullptr;
  std::vector<Cell> shared;  // the shared arena; stale cells are told apart by block
  bool raced = false;
  Access first, second;  // the first race: the later access, the earlier one
  std::uintptr_t addr = 0;
  int size = 0;
  bool in_shared = false;
};
State st;

// Ordered on a GPU? o (earlier) and c (now) race when neither is ordered before the other.
inline bool concurrent(const Runtime& r, const Access& o, const Access& c, bool shared) {
  if (o.blk == 0 || o.blk < r.launch_first) return false;  // none, or an earlier launch
  if (o.blk != c.blk) return !shared;                        // shared: another block's (stale)
  if (o.thr == c.thr || o.ep != c.ep) return false;
  if ((o.thr >> 5) != (c.thr >> 5)) return true;
  return o.wep == c.wep;
}

void note_race(const Access& now, const Access& then, std::uintptr_t addr, int size, bool shared) {
  if (st.raced) return;
  st.raced = true;
  st.first = now;
  st.second = then;
  st.addr = addr;
  st.size = size;
  st.in_shared = shared;
}

void access(const void* p, int size, int kind, const void* pc) {
  Runtime& r = rt();
  if (!st.active || !t_in_launch || r.cur == nullptr) return;  // host code of a kernel source
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t stacks = reinterpret_cast<std::uintptr_t>(r.stacks);
  if (a >= stacks && a < stacks + r.slot * kMaxThreads) return;  // a fiber's locals
  const std::uintptr_t lo = reinterpret_cast<std::uintptr_t>(g_arena), hi = lo + r.arena_used;
  const Fiber& f = *r.cur;
  Access c;
  c.pc = pc;
  c.blk = r.block_seq;
  c.thr = (std::uint16_t)f.lin;
  c.ep = (std::uint16_t)r.block_epoch;
  c.wep = (std::uint16_t)f.wep;
  c.kind = (std::uint16_t)kind;
  for (int i = 0; i < size; ++i) {
    const std::uintptr_t b = a + (std::uintptr_t)i;
    const bool shared = b >= lo && b < hi;
    Cell* cell;
    if (shared) {
      if (st.shared.size() < hi - lo) st.shared.resize(hi - lo);  // new variables: fresh cells
      cell = &st.shared[b - lo];
    } else {
      const std::uintptr_t key = b >> kPageBits;
      if (key != st.last_key) {
        auto& pg = st.pages[key];
        if (!pg) pg.reset(new Page());
        st.last_key = key;
        st.last_page = pg.get();
      }
      cell = &st.last_page->c[b & ((std::uintptr_t(1) << kPageBits) - 1)];
    }
    // the conflicting earlier accesses: a write races with everything, a read with writes and
    // atomics, an atomic with plain reads and writes
    const Access* against[3] = {kind == 2 ? nullptr : &cell->a, &cell->w, nullptr};
    if (kind != 0) against[2] = &cell->r1;
    for (const Access* o : against)
      if (o && concurrent(r, *o, c, shared)) note_race(c, *o, a, size, shared);
    if (kind != 0 && concurrent(r, cell->r2, c, shared)) note_race(c, cell->r2, a, size, shared);
    switch (kind) {
      case 1:
        cell->w = c;
        cell->r1 = cell->r2 = Access{};
        break;
      case 2: cell->a = c; break;
      default:  // keep two readers that are unordered with this one, else replace an ordered one
        if (!concurrent(r, cell->r1, c, shared))
          cell->r1 = c;
        else if (!concurrent(r, cell->r2, c, shared))
          cell->r2 = c;
        break;
    }
  }
}

// A demangled name without its namespaces' anonymous parts and its parameter list.
std::string short_function(std::string f) {
  for (std::size_t k; (k = f.find("(anonymous namespace)::")) != std::string::npos;) f.erase(k, 23);
  if (f.rfind("nft_fast::", 0) == 0) f.erase(0, 10);
  if (!f.empty() && f.back() == ')') {  // cut "(float const*, ...)" at its matching parenthesis
    int depth = 0;
    for (std::size_t k = f.size(); k-- > 0;) {
      depth += f[k] == ')' ? 1 : f[k] == '(' ? -1 : 0;
      if (depth == 0) {
        f.resize(k);
        break;
      }
    }
  }
  return f;
}

// "function at file:line" of code addresses, through addr2line (binutils); else module+offset.
std::vector<std::string> symbolize(const std::vector<const void*>& pcs) {
  std::vector<std::string> out(pcs.size());
  std::string cmd;
  Dl_info info{};
  for (std::size_t i = 0; i < pcs.size(); ++i) {
    if (!pcs[i] || !dladdr(pcs[i], &info) || !info.dli_fname) {
      out[i] = "?";
      continue;
    }
    // the return address is the instruction after the call: step back into it
    const std::uintptr_t off =
        reinterpret_cast<std::uintptr_t>(pcs[i]) - 1 - reinterpret_cast<std::uintptr_t>(info.dli_fbase);
    char hex[32];
    std::snprintf(hex, sizeof hex, "0x%zx", (std::size_t)off);
    out[i] = base(info.dli_fname) + "+" + hex;
    if (!std::getenv("NFT_FAST_CUDA_EMU_NO_ADDR2LINE")) {
      cmd = std::string("addr2line -C -f -e '") + info.dli_fname + "' " + hex + " 2>/dev/null";
      if (FILE* pipe = popen(cmd.c_str(), "r")) {
        char fn[4096] = {0}, line[4096] = {0};
        if (std::fgets(fn, sizeof fn, pipe) && std::fgets(line, sizeof line, pipe)) {
          std::string f(fn), l(line);
          while (!f.empty() && (f.back() == '\n' || f.back() == '\r')) f.pop_back();
          while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
          const std::size_t disc = l.find(" (discriminator");
          if (disc != std::string::npos) l.resize(disc);
          if (l.rfind("??", 0) != 0) out[i] = short_function(f) + " at " + base(l.c_str());
        }
        pclose(pipe);
      }
    }
  }
  return out;
}

std::string race_message(const Runtime& r) {
  auto thread = [&](const Access& x) {
    const unsigned bx = blockDim.x, by = blockDim.y;
    const unsigned t = x.thr;
    const unsigned long long bl = r.block_lin[x.blk - r.launch_first];
    const uint3 tid{t % bx, (t / bx) % by, t / (bx * by)};
    const uint3 bid{(unsigned)(bl % gridDim.x), (unsigned)(bl / gridDim.x % gridDim.y),
                    (unsigned)(bl / gridDim.x / gridDim.y)};
    return "thread " + xyz(tid) + " of block " + xyz(bid);
  };
  const char* verb_now[] = {"reads", "writes", "atomically updates"};
  const char* verb_then[] = {"read", "wrote", "atomically updated"};
  const std::vector<std::string> at = symbolize({st.first.pc, st.second.pc});
  char where_buf[96];
  if (st.in_shared)
    std::snprintf(where_buf, sizeof where_buf, "shared memory (byte %zu of the emulator's shared arena)",
                  (std::size_t)(st.addr - reinterpret_cast<std::uintptr_t>(g_arena)));
  else
    std::snprintf(where_buf, sizeof where_buf, "global memory at 0x%zx", (std::size_t)st.addr);
  return "emulated kernel data race in kernel '" + std::string(r.name) + "' (grid " + xyz(gridDim) + ", blockDim " +
         xyz(blockDim) + ") on " + where_buf + ": " + thread(st.first) + " " + verb_now[st.first.kind] + " " +
         std::to_string(st.size) + " byte(s) at " + at[0] + ", and " + thread(st.second) + " " +
         verb_then[st.second.kind] + " it at " + at[1] +
         (st.first.blk != st.second.blk ? " (blocks of one launch are not ordered: no barrier orders them)"
                         : " in the same barrier interval (no __syncthreads, or __syncwarp within a warp, "
                           "between them)");
}

}  // namespace rc
#endif

void run_block(Runtime& r) {
  const int T = r.nthreads;
  const unsigned bx = blockDim.x, by = blockDim.y;
  for (int i = 0; i < T; ++i) {
    Fiber& f = r.fibers[i];
    f.state = kRunnable;
    f.lin = i;
    f.tid = uint3{(unsigned)i % bx, ((unsigned)i / bx) % by, (unsigned)i / (bx * by)};
    f.wep = 0;
    if (f.error) f.error = nullptr;
    init_context(r, i);
  }
  for (int w = 0; w < (T + 31) / 32; ++w) {
    const int n = T - w * 32 < 32 ? T - w * 32 : 32;
    r.warps[w].exist = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
    r.warps[w].waiting = r.warps[w].exited = 0;
  }
  r.n_wait_block = 0;
  r.n_exited = 0;
  r.block_epoch = 0;
  ++r.block_seq;
  if (r.racecheck)
    r.block_lin.push_back(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * (unsigned long long)blockIdx.z));
  poison_shared(r);
  for (int i = 0; i < T; ++i) r.order[i] = r.schedule == kReverse ? T - 1 - i : i;
  int live = T;
  while (live > 0) {
    bool ran = false;
    if (r.schedule == kRandom)  // Fisher-Yates: a fresh resume order for every pass
      for (int i = T - 1; i > 0; --i) std::swap(r.order[i], r.order[splitmix(r.rng) % (std::uint64_t)(i + 1)]);
    for (int k = 0; k < T; ++k) {
      const int i = r.order[k];
      Fiber& f = r.fibers[i];
      if (f.state != kRunnable) continue;
      ran = true;
      switch_to_fiber(r, f);
      switch (f.state) {
        case kExited:
          --live;
          ++r.n_exited;
          r.warps[i >> 5].exited |= 1u << (i & 31);
          if (f.error) kernel_failed(r, f);
          if (r.n_wait_block > 0 && r.n_wait_block + r.n_exited == T) release_block(r);
          break;
        case kWaitBlock:
          if (++r.n_wait_block + r.n_exited == T) release_block(r);
          break;
        case kWaitWarp:
          r.warps[i >> 5].waiting |= 1u << (i & 31);
          try_release_warp(r, i >> 5);
          break;
        default: break;
      }
    }
    if (!ran) deadlock(r);
  }
  r.cur = nullptr;
}

struct InLaunch {
  InLaunch() { t_in_launch = true; }
  ~InLaunch() {
    t_in_launch = false;
    rt().cur = nullptr;
  }
};

void run_blocks(Runtime& r, dim3 grid, unsigned long long nb) {
  auto run_linear = [&](unsigned long long b) {
    blockIdx = uint3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y)};
    run_block(r);
  };
  if (r.schedule == kRandom) {
    if (nb > (1ull << 26)) throw std::runtime_error("CUDA emulator: the random schedule takes at most 2^26 blocks");
    std::vector<unsigned long long> blocks(nb);
    for (unsigned long long b = 0; b < nb; ++b) blocks[b] = b;
    for (unsigned long long i = nb - 1; i > 0; --i) std::swap(blocks[i], blocks[splitmix(r.rng) % (i + 1)]);
    for (unsigned long long b : blocks) run_linear(b);
  } else if (r.schedule == kReverse) {
    for (unsigned long long b = nb; b-- > 0;) run_linear(b);
  } else {
    for (unsigned long long b = 0; b < nb; ++b) run_linear(b);
  }
}

}  // namespace

int block_barrier(int kind, int pred, const char* file, int line) {
  Fiber& f = current("__syncthreads");
  f.bkind = kind;
  f.bpred = pred;
  f.file = file;
  f.line = line;
  f.state = kWaitBlock;
  switch_to_scheduler(rt(), f);
  return f.bres;
}

void warp_op(int kind, unsigned mask, int src, const void* in, void* out, int size, bool is_signed) {
  Fiber& f = current(warp_kind_name(kind));
  f.wkind = kind;
  f.wmask = mask;
  f.wsrc = src;
  f.wsize = size;
  f.wsigned = is_signed;
  if (size > 0) std::memcpy(f.wval, in, (std::size_t)size);
  f.state = kWaitWarp;
  switch_to_scheduler(rt(), f);
  if (out && size > 0) std::memcpy(out, f.wres, (std::size_t)size);
}

void* shared_slot(SharedSlot* slot, std::size_t size, std::size_t align) {
  Runtime& r = rt();
  current("shared memory");
  if (!slot->placed) {
    const std::size_t at = (r.arena_used + align - 1) / align * align;
    if (at + size > kArenaBytes)
      throw std::runtime_error("CUDA emulator: the kernels' shared variables exceed its arena of " +
                               std::to_string(kArenaBytes >> 10) + " KiB");
    slot->offset = at;
    slot->size = size;
    slot->placed = true;
    r.arena_used = at + size;
  }
  if (slot->launch != r.launches) {  // its first use in this launch: in its first block
    slot->launch = r.launches;
    r.launch_slots.push_back(slot);
    r.launch_shared += size;
    if (r.launch_shared > kBlockSharedMax)
      throw std::runtime_error("kernel '" + std::string(r.name) + "' uses " + std::to_string(r.launch_shared) +
                               " bytes of shared memory: a CUDA block has at most 48 KiB of static shared memory");
    poison(r, *slot);
  }
  return g_arena + slot->offset;
}

int lane_id() { return current("lane id").lin & 31; }

unsigned active_lanes() {
  const Fiber& f = current("__activemask");
  const Warp& w = rt().warps[f.lin >> 5];
  return w.exist & ~w.exited;
}

void trap(const char* what) { throw std::runtime_error(what); }

void set_last_error(int err) { t_last_error = err; }

void run_kernel(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  if (t_in_launch)
    throw std::runtime_error(std::string("emulated launch of '") + name +
                             "' from inside a kernel (dynamic parallelism) is not supported");
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > (unsigned long long)kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    t_last_error = cudaErrorInvalidConfiguration;  // as the CUDA runtime: nothing runs
    return;
  }
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  setup(r);
  InLaunch guard;
#if NFT_EMU_ASM_SWITCH
  __asm__ __volatile__("stmxcsr %0" : "=m"(r.mxcsr));
  unsigned short cw;
  __asm__ __volatile__("fnstcw %0" : "=m"(cw));
  r.fpucw = cw;
#endif
  r.name = name;
  r.body = body;
  r.ctx = ctx;
  r.nthreads = (int)threads;
  blockDim = block;
  gridDim = grid;
  ++r.launches;
  r.launch_slots.clear();
  r.launch_shared = 0;
  std::uint64_t s0 = r.seed * 0x100000001b3ull ^ ++r.since_schedule;
  r.rng = splitmix(s0);
  const unsigned long long nb = (unsigned long long)grid.x * grid.y * grid.z;
#if NFT_EMU_RACECHECK
  struct RcGuard {
    explicit RcGuard(Runtime& rr) {
      rc::st.active = rr.racecheck;
      if (!rr.racecheck) return;
      rc::st.pages.clear();
      rc::st.last_key = ~std::uintptr_t(0);
      rc::st.last_page = nullptr;
      rc::st.raced = false;
      rr.launch_first = rr.block_seq + 1;
      rr.block_lin.clear();
    }
    ~RcGuard() { rc::st.active = false; }
  } rc_guard(r);
#endif
  try {
    run_blocks(r, grid, nb);
#if NFT_EMU_RACECHECK
    if (rc::st.active && rc::st.raced) throw std::runtime_error(rc::race_message(r));
#endif
  } catch (...) {
#if NFT_EMU_ASAN
    // the failed launch abandoned frames, with their redzones, on the fiber stacks
    __asan_unpoison_memory_region(r.stacks, r.slot * kMaxThreads);
#endif
    throw;
  }
}


void set_schedule(const char* kind, unsigned long long seed) {
  const std::string k = kind ? kind : "";
  const int v = schedule_index(k);
  if (v < 0) throw std::invalid_argument("CUDA emulator schedule '" + k + "': expected forward, reverse or random");
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  setup(r);
  r.schedule = v;
  r.seed = seed;
  r.since_schedule = 0;
}

const char* schedule() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  setup(r);
  return kScheduleNames[r.schedule];
}

unsigned long long schedule_seed() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  setup(r);
  return r.seed;
}

bool racecheck_available() { return NFT_EMU_RACECHECK != 0; }

void set_racecheck(bool on) {
  if (on && !NFT_EMU_RACECHECK)
    throw std::logic_error(
        "this nft_fast._cuda_emu was built without the race checker: build it with the CMake option "
        "NFT_FAST_CUDA_EMU_RACECHECK=ON (tests/cuda_emu/test_racecheck.py does)");
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  setup(r);
  r.racecheck = on;
}

bool racecheck() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  setup(r);
  return r.racecheck;
}

void racecheck_atomic(const void* addr, int size, const void* pc) {
#if NFT_EMU_RACECHECK
  rc::access(addr, size, 2, pc);
#else
  (void)addr, (void)size, (void)pc;
#endif
}

const char* switch_backend() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  setup(r);
  return r.use_ucontext ? "ucontext" : "asm-x86_64";
}

unsigned long long launch_count() { return rt().launches; }

}  // namespace detail
}  // namespace nft_emu

cudaError_t cudaGetLastError() {
  const int e = nft_emu::detail::t_last_error;
  nft_emu::detail::t_last_error = 0;
  return (cudaError_t)e;
}
cudaError_t cudaPeekAtLastError() { return (cudaError_t)nft_emu::detail::t_last_error; }
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unrecognized error code";
}
const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

#if NFT_EMU_RACECHECK
// The hooks GCC / Clang's -fsanitize=thread instrumentation calls (see "racecheck" above).
#define NFT_EMU_HOOK extern "C" __attribute__((visibility("hidden")))
#define NFT_EMU_RW(N)                                                                                       \
  NFT_EMU_HOOK void __tsan_read##N(void* p) { nft_emu::detail::rc::access(p, N, 0, __builtin_return_address(0)); } \
  NFT_EMU_HOOK void __tsan_write##N(void* p) { nft_emu::detail::rc::access(p, N, 1, __builtin_return_address(0)); } \
  NFT_EMU_HOOK void __tsan_unaligned_read##N(void* p) {                                                     \
    nft_emu::detail::rc::access(p, N, 0, __builtin_return_address(0));                                      \
  }                                                                                                         \
  NFT_EMU_HOOK void __tsan_unaligned_write##N(void* p) {                                                    \
    nft_emu::detail::rc::access(p, N, 1, __builtin_return_address(0));                                      \
  }
NFT_EMU_RW(1)
NFT_EMU_RW(2)
NFT_EMU_RW(4)
NFT_EMU_RW(8)
NFT_EMU_RW(16)
#undef NFT_EMU_RW
NFT_EMU_HOOK void __tsan_read_range(void* p, unsigned long n) {
  nft_emu::detail::rc::access(p, (int)n, 0, __builtin_return_address(0));
}
NFT_EMU_HOOK void __tsan_write_range(void* p, unsigned long n) {
  nft_emu::detail::rc::access(p, (int)n, 1, __builtin_return_address(0));
}
NFT_EMU_HOOK void __tsan_init() {}
NFT_EMU_HOOK void __tsan_func_entry(void*) {}
NFT_EMU_HOOK void __tsan_func_exit() {}
NFT_EMU_HOOK void __tsan_vptr_update(void**, void*) {}
NFT_EMU_HOOK void __tsan_vptr_read(void**) {}
#undef NFT_EMU_HOOK
#endif
