// What the attention handlers (attention.cc) share with the rest of the library.
#pragma once

#include <string>

namespace transferlab {

// The kernels of the attention products built so far, one "attention <kernel>" line each;
// call with the OpenMP lock held.
std::string AttentionImplementations();

}  // namespace transferlab
