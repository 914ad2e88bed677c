// ThreadSanitizer builds only (JOULE_SANITIZE_THREAD, the tsan preset): linked
// into every executable there.
//
// Debian's Abseil is compiled without TSan, so TSan cannot see absl::Mutex,
// CondVar and Notification synchronize: every member an absl::Mutex guards
// would be reported as a data race. This file gives the executable its own
// definitions of their out-of-line members. Each makes the annotation calls
// Abseil's own TSan build compiles in (sanitizer/tsan_interface.h) and calls
// Abseil's definition, found with dlsym(RTLD_NEXT). Abseil and gRPC call these
// members through the PLT, so their calls come here too.
//
// Conditions (Await, LockWhen) run inside Abseil between the pre- and
// post-annotations, where TSan ignores memory accesses, as in Abseil's build.
// ~Mutex is not annotated: a mutex inside a gRPC object is destroyed on
// whichever thread drops the last reference, ordered by gRPC's (invisible)
// atomics, and TSan would take the destruction for a racing write.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace {

#define JOULE_STR2(x) #x
#define JOULE_STR(x) JOULE_STR2(x)

// Abseil's definition of the member whose mangled name, after
// "_ZN4absl<inline namespace>" (or "_ZNK4absl..." for const members), is `rest`.
void* Real(bool is_const, const char* rest) {
  const std::string ns = JOULE_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string name =
      std::string(is_const ? "_ZNK4absl" : "_ZN4absl") + std::to_string(ns.size()) + ns + rest;
  void* f = dlsym(RTLD_NEXT, name.c_str());
  if (f == nullptr) {
    std::fprintf(stderr, "tsan_absl_sync: %s not found in Abseil\n", name.c_str());
    std::abort();
  }
  return f;
}

#define JOULE_REAL(type, is_const, rest) \
  static const auto real = reinterpret_cast<type>(Real(is_const, rest))

// Set while this thread is inside one of the members below, so that Abseil's
// own nested calls (Notification -> Mutex, the timeout forms -> the deadline
// forms) are passed through without annotating twice.
thread_local int depth = 0;

struct Scope {
  Scope() { ++depth; }
  ~Scope() { --depth; }
  bool outermost() const { return depth == 1; }
};

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  JOULE_REAL(void (*)(Mutex*), false, "5Mutex4LockEv");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, 0);
  real(this);
  if (scope.outermost()) __tsan_mutex_post_lock(this, 0, 0);
}

void Mutex::Unlock() {
  JOULE_REAL(void (*)(Mutex*), false, "5Mutex6UnlockEv");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_unlock(this, 0);
  real(this);
  if (scope.outermost()) __tsan_mutex_post_unlock(this, 0);
}

bool Mutex::TryLock() {
  JOULE_REAL(bool (*)(Mutex*), false, "5Mutex7TryLockEv");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, __tsan_mutex_try_lock);
  const bool locked = real(this);
  if (scope.outermost()) {
    __tsan_mutex_post_lock(this, __tsan_mutex_try_lock | (locked ? 0 : __tsan_mutex_try_lock_failed), 0);
  }
  return locked;
}

void Mutex::ReaderLock() {
  JOULE_REAL(void (*)(Mutex*), false, "5Mutex10ReaderLockEv");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  real(this);
  if (scope.outermost()) __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
}

void Mutex::ReaderUnlock() {
  JOULE_REAL(void (*)(Mutex*), false, "5Mutex12ReaderUnlockEv");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_unlock(this, __tsan_mutex_read_lock);
  real(this);
  if (scope.outermost()) __tsan_mutex_post_unlock(this, __tsan_mutex_read_lock);
}

bool Mutex::ReaderTryLock() {
  JOULE_REAL(bool (*)(Mutex*), false, "5Mutex13ReaderTryLockEv");
  Scope scope;
  const unsigned flags = __tsan_mutex_read_lock | __tsan_mutex_try_lock;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, flags);
  const bool locked = real(this);
  if (scope.outermost()) __tsan_mutex_post_lock(this, flags | (locked ? 0 : __tsan_mutex_try_lock_failed), 0);
  return locked;
}

// The LockWhen forms: the lock is held on return, whatever the result.
void Mutex::LockWhen(const Condition& cond) {
  JOULE_REAL(void (*)(Mutex*, const Condition&), false, "5Mutex8LockWhenERKNS0_9ConditionE");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, 0);
  real(this, cond);
  if (scope.outermost()) __tsan_mutex_post_lock(this, 0, 0);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  JOULE_REAL(void (*)(Mutex*, const Condition&), false, "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  real(this, cond);
  if (scope.outermost()) __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  JOULE_REAL(bool (*)(Mutex*, const Condition&, absl::Duration), false,
             "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, 0);
  const bool result = real(this, cond, timeout);
  if (scope.outermost()) __tsan_mutex_post_lock(this, 0, 0);
  return result;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  JOULE_REAL(bool (*)(Mutex*, const Condition&, absl::Time), false,
             "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, 0);
  const bool result = real(this, cond, deadline);
  if (scope.outermost()) __tsan_mutex_post_lock(this, 0, 0);
  return result;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  JOULE_REAL(bool (*)(Mutex*, const Condition&, absl::Duration), false,
             "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  const bool result = real(this, cond, timeout);
  if (scope.outermost()) __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
  return result;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  JOULE_REAL(bool (*)(Mutex*, const Condition&, absl::Time), false,
             "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Scope scope;
  if (scope.outermost()) __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  const bool result = real(this, cond, deadline);
  if (scope.outermost()) __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
  return result;
}

// Await and CondVar::Wait release the held lock, wait, and take it again: to
// TSan an unlock before, a lock after (the pre-lock covers the wait, so the
// condition runs where accesses are ignored).
namespace {
void ReleaseAndWait(Mutex* mu) {
  __tsan_mutex_pre_unlock(mu, 0);
  __tsan_mutex_post_unlock(mu, 0);
  __tsan_mutex_pre_lock(mu, 0);
}
}  // namespace

void Mutex::Await(const Condition& cond) {
  JOULE_REAL(void (*)(Mutex*, const Condition&), false, "5Mutex5AwaitERKNS0_9ConditionE");
  Scope scope;
  if (scope.outermost()) ReleaseAndWait(this);
  real(this, cond);
  if (scope.outermost()) __tsan_mutex_post_lock(this, 0, 0);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  JOULE_REAL(bool (*)(Mutex*, const Condition&, absl::Duration), false,
             "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Scope scope;
  if (scope.outermost()) ReleaseAndWait(this);
  const bool result = real(this, cond, timeout);
  if (scope.outermost()) __tsan_mutex_post_lock(this, 0, 0);
  return result;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  JOULE_REAL(bool (*)(Mutex*, const Condition&, absl::Time), false,
             "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Scope scope;
  if (scope.outermost()) ReleaseAndWait(this);
  const bool result = real(this, cond, deadline);
  if (scope.outermost()) __tsan_mutex_post_lock(this, 0, 0);
  return result;
}

void CondVar::Wait(Mutex* mu) {
  JOULE_REAL(void (*)(CondVar*, Mutex*), false, "7CondVar4WaitEPNS0_5MutexE");
  Scope scope;
  if (scope.outermost()) ReleaseAndWait(mu);
  real(this, mu);
  if (scope.outermost()) __tsan_mutex_post_lock(mu, 0, 0);
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  JOULE_REAL(bool (*)(CondVar*, Mutex*, absl::Duration), false,
             "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Scope scope;
  if (scope.outermost()) ReleaseAndWait(mu);
  const bool result = real(this, mu, timeout);
  if (scope.outermost()) __tsan_mutex_post_lock(mu, 0, 0);
  return result;
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  JOULE_REAL(bool (*)(CondVar*, Mutex*, absl::Time), false,
             "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Scope scope;
  if (scope.outermost()) ReleaseAndWait(mu);
  const bool result = real(this, mu, deadline);
  if (scope.outermost()) __tsan_mutex_post_lock(mu, 0, 0);
  return result;
}

// Notification: Notify releases; a wait that saw the notification acquires.
// HasBeenNotified() is inline (an acquire load of notified_yet_, compiled with
// TSan here), so Notify also releases at that member's address.
static_assert(sizeof(Notification) == 2 * sizeof(Mutex),
              "Notification is {Mutex mutex_; std::atomic<bool> notified_yet_;}");

namespace {
void* NotifiedYet(const Notification* n) {
  return const_cast<char*>(reinterpret_cast<const char*>(n)) + sizeof(Mutex);
}
}  // namespace

void Notification::Notify() {
  JOULE_REAL(void (*)(Notification*), false, "12Notification6NotifyEv");
  Scope scope;
  __tsan_release(this);
  __tsan_release(NotifiedYet(this));
  real(this);
}

void Notification::WaitForNotification() const {
  JOULE_REAL(void (*)(const Notification*), true, "12Notification19WaitForNotificationEv");
  Scope scope;
  real(this);
  __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(absl::Duration timeout) const {
  JOULE_REAL(bool (*)(const Notification*, absl::Duration), true,
             "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  Scope scope;
  const bool notified = real(this, timeout);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(absl::Time deadline) const {
  JOULE_REAL(bool (*)(const Notification*, absl::Time), true,
             "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  Scope scope;
  const bool notified = real(this, deadline);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl
