// The error message of ferrotune's CPU kernels (common.h) and the one function that reads it from Rust.
#include "common.h"

namespace ft {
thread_local std::string last_error;
}

extern "C" const char* ferrotune_kernel_error() { return ft::last_error.c_str(); }
