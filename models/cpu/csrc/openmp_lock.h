// The lock that every handler running an OpenMP team holds while it runs. XLA calls handlers
// from several of its threads at once; two teams on the same few cores spin against each
// other, each several times slower than alone.
#pragma once

#include <mutex>

namespace transferlab {

inline std::mutex& OpenMpLock() {
  static std::mutex lock;
  return lock;
}

}  // namespace transferlab
