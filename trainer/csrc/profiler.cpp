// libtorch's own operator profiler (the Kineto profiler behind torch.profiler), which tch does not
// bind: start it, run the code of interest, stop it, and get every recorded operator event back as
// tab-separated lines (name, thread, start ns, duration ns, device type) plus, optionally, the Chrome
// trace that torch.profiler's export_chrome_trace writes. Compiled by trainer/build.rs when the
// libtorch headers declare this interface; trainer/src/profile.rs calls it and computes self times.
// No exception crosses into Rust: every failure returns -1 and leaves the message for
// ferrotune_profile_error.
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <string>

namespace prof = torch::autograd::profiler;
namespace impl = torch::profiler::impl;

namespace {
std::string last_error;
}

extern "C" {

const char* ferrotune_profile_error() { return last_error.c_str(); }

// Starts recording every operator (CPU, plus CUDA kernels when `cuda` is non-zero).
int ferrotune_profile_start(int cuda) {
  try {
    std::set<impl::ActivityType> activities{impl::ActivityType::CPU};
    if (cuda != 0) activities.insert(impl::ActivityType::CUDA);
    impl::ProfilerConfig config(impl::ProfilerState::KINETO, /*report_input_shapes=*/false);
    prof::prepareProfiler(config, activities);
    prof::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  } catch (...) {
    last_error = "unknown C++ exception";
    return -1;
  }
}

// Stops recording; writes the events to `events_path` (one per line: name, start thread, start ns,
// duration ns, device type as c10::DeviceType's number) and, when `trace_path` is not null, the
// Chrome trace.
int ferrotune_profile_stop(const char* events_path, const char* trace_path) {
  try {
    std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
    if (!result) {
      last_error = "the profiler returned no result";
      return -1;
    }
    std::ofstream out(events_path);
    for (const auto& e : result->events()) {
      std::string name = e.name();
      for (char& c : name) {
        if (c == '\t' || c == '\n') c = ' ';
      }
      out << name << '\t' << e.startThreadId() << '\t' << e.startNs() << '\t' << e.durationNs() << '\t'
          << static_cast<int>(e.deviceType()) << '\n';
    }
    out.close();
    if (!out) {
      last_error = std::string("cannot write ") + events_path;
      return -1;
    }
    if (trace_path != nullptr && std::strlen(trace_path) > 0) result->save(trace_path);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  } catch (...) {
    last_error = "unknown C++ exception";
    return -1;
  }
}

}  // extern "C"
