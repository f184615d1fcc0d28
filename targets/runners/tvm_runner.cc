// onnxprune bundle runner: loads a TVM Relax VM library, feeds it .npy inputs, writes .npy outputs.
//
// Usage: runner LIB OUT_DIR IN0.npy [IN1.npy ...] [--weights weights.bin] [--repeat N]
//        runner LIB OUT_DIR IN0.npy [IN1.npy ...] --time NAME:I[,NAME:I ...] [--rounds R]
//   LIB is the bundle's compiled library (model.so) or "system" for a statically linked system library
//   (the wasm build). --weights loads the model's weights (TVM parameter-dict format, keys w0000, w0001 …)
//   and passes them to main after the inputs. Outputs go to OUT_DIR/output_<i>.npy; with --repeat N the
//   runner times N calls of main and prints "median_ms <value>" on stdout.
//   --time times VM functions of one input each (function NAME called on input I), interleaved batch by
//   batch (5 x R passes over the list, R = --rounds, default 3), and prints each function's fastest time per
//   call as "time_us NAME <value>" (the per-layer dense-or-sparse choice of the wasm target, which can
//   only be timed inside its own runtime). main is not called and no outputs are written.
//
// Depends only on the tvm-ffi headers (tvm/ffi/*, dlpack) and, at run time, on libtvm_runtime (which
// registers the Relax VM loader) and libtvm_ffi.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#if defined(__linux__) && !defined(__EMSCRIPTEN__)
#include <sched.h>
#endif

namespace ffi = tvm::ffi;

namespace {

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

[[noreturn]] void Fail(const std::string& msg) {
  std::cerr << "runner: " << msg << std::endl;
  std::exit(1);
}

// numpy descr <-> DLDataType (little-endian only).
DLDataType DescrToDType(const std::string& d) {
  struct Row { const char* descr; uint8_t code; uint8_t bits; };
  static const Row rows[] = {{"<f4", kDLFloat, 32}, {"<f8", kDLFloat, 64}, {"<f2", kDLFloat, 16},
                             {"<i8", kDLInt, 64},   {"<i4", kDLInt, 32},   {"<i2", kDLInt, 16},
                             {"|i1", kDLInt, 8},    {"|u1", kDLUInt, 8},   {"|b1", kDLBool, 8}};
  for (const Row& r : rows) {
    if (d == r.descr) return DLDataType{r.code, r.bits, 1};
  }
  Fail("unsupported npy dtype " + d);
}

std::string DTypeToDescr(DLDataType t) {
  if (t.code == kDLFloat) return t.bits == 16 ? "<f2" : (t.bits == 64 ? "<f8" : "<f4");
  if (t.code == kDLInt) return t.bits == 8 ? "|i1" : "<i" + std::to_string(t.bits / 8);
  if (t.code == kDLUInt) return "|u1";
  if (t.code == kDLBool) return "|b1";
  Fail("unsupported output dtype");
}

std::string HeaderField(const std::string& h, const std::string& key) {
  size_t p = h.find("'" + key + "'");
  if (p == std::string::npos) Fail("npy header lacks " + key);
  p = h.find(':', p) + 1;
  while (h[p] == ' ') ++p;
  size_t e = h[p] == '(' ? h.find(')', p) + 1 : h.find_first_of(",}", p);
  return h.substr(p, e - p);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (std::memcmp(magic, "\x93NUMPY", 6) != 0) Fail(path + " is not a .npy file");
  uint32_t hlen = 0;
  if (magic[6] == 1) {
    uint16_t h16;
    f.read(reinterpret_cast<char*>(&h16), 2);
    hlen = h16;
  } else {
    f.read(reinterpret_cast<char*>(&hlen), 4);
  }
  std::string header(hlen, '\0');
  f.read(&header[0], hlen);
  std::string descr = HeaderField(header, "descr");
  descr = descr.substr(1, descr.size() - 2);
  if (HeaderField(header, "fortran_order") != "False") Fail(path + ": fortran order not supported");
  std::string shp = HeaderField(header, "shape");
  std::vector<int64_t> shape;
  std::stringstream ss(shp.substr(1, shp.size() - 2));
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    if (tok.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(tok));
  }
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           DescrToDType(descr), DLDevice{kDLCPU, 0});
  f.read(static_cast<char*>(t.data_ptr()), ffi::GetDataSize(t));
  if (!f) Fail(path + " is truncated");
  return t;
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  std::string shape = "(";
  for (int i = 0; i < t.ndim(); ++i) {
    shape += std::to_string(t.shape()[i]) + (t.ndim() == 1 ? "," : (i + 1 < t.ndim() ? ", " : ""));
  }
  shape += ")";
  std::string header = "{'descr': '" + DTypeToDescr(t.dtype()) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::ofstream f(path, std::ios::binary);
  if (!f) Fail("cannot write " + path);
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t hlen = static_cast<uint16_t>(header.size());
  f.write(reinterpret_cast<const char*>(&hlen), 2);
  f.write(header.data(), header.size());
  f.write(static_cast<const char*>(t.data_ptr()), ffi::GetDataSize(t));
}

// Loads weights.bin (written by tvm.runtime.save_param_dict) with the runtime's own reader.
std::vector<ffi::Tensor> ReadWeights(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail("cannot open " + path);
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto params = ffi::Function::GetGlobalRequired("runtime.LoadParams")(ffi::Bytes(data))
                    .cast<ffi::Map<ffi::String, ffi::Tensor>>();
  std::vector<ffi::Tensor> out;
  for (size_t i = 0;; ++i) {
    char key[16];
    std::snprintf(key, sizeof(key), "w%04zu", i);
    auto it = params.find(ffi::String(key));
    if (it == params.end()) break;
    out.push_back((*it).second);
  }
  if (out.size() != params.size()) Fail(path + ": weight names are not w0000, w0001, ...");
  return out;
}

// One TVM worker per CPU this process may run on, unless TVM_NUM_THREADS says otherwise. TVM's own default
// (measured on a 2-vCPU VM) ran the Fashion-MNIST model 2x slower than an explicit TVM_NUM_THREADS=2.
void DefaultThreadCount() {
#if defined(__linux__) && !defined(__EMSCRIPTEN__)
  if (std::getenv("TVM_NUM_THREADS") != nullptr) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) {
    setenv("TVM_NUM_THREADS", std::to_string(CPU_COUNT(&set)).c_str(), 0);
  }
#endif
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Calls of f(arg) per timed batch: enough for one batch to last >= 5 ms (timer resolution, and node's
// performance.now() coarsening), after one warm-up call (first-call allocations, caches).
int BatchSize(const ffi::Function& f, const ffi::AnyView& arg) {
  ffi::Any tmp;
  f.CallPacked(&arg, 1, &tmp);
  int number = 1;
  for (;;) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < number; ++i) f.CallPacked(&arg, 1, &tmp);
    double s = Seconds(t0);
    if (s >= 0.005 || number >= (1 << 20)) return number;
    number = s <= 0 ? number * 10 : std::max(number + 1, static_cast<int>(number * 0.006 / s));
  }
}

// --time NAME:I,... : 5 x rounds passes, each timing one batch of every function in turn (interleaved at
// batch granularity, so a load change hits all functions alike); per function the fastest batch's time per
// call is kept: other processes only ever add time (on a loaded 2-core VM a median was off by 8x).
void TimeFunctions(ffi::Module vm, const std::string& list, const std::vector<ffi::Any>& inputs, int rounds) {
  std::vector<std::pair<std::string, size_t>> jobs;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t colon = item.rfind(':');
    if (colon == std::string::npos) Fail("--time expects NAME:INPUT_INDEX items, got " + item);
    size_t idx = std::stoul(item.substr(colon + 1));
    if (idx >= inputs.size()) Fail("--time " + item + ": no input " + std::to_string(idx));
    jobs.emplace_back(item.substr(0, colon), idx);
  }
  std::vector<ffi::Function> fns;
  std::vector<int> number;
  for (auto& j : jobs) {
    auto f = vm->GetFunction(j.first);
    if (!f.has_value()) Fail("--time: the library has no function " + j.first);
    fns.push_back(f.value());
    number.push_back(BatchSize(fns.back(), ffi::AnyView(inputs[j.second])));
  }
  std::vector<double> best(jobs.size(), 1e300);
  for (int pass = 0; pass < 5 * rounds; ++pass) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      ffi::AnyView arg(inputs[jobs[i].second]);
      ffi::Any tmp;
      auto t0 = std::chrono::steady_clock::now();
      for (int k = 0; k < number[i]; ++k) fns[i].CallPacked(&arg, 1, &tmp);
      best[i] = std::min(best[i], Seconds(t0) * 1e6 / number[i]);
    }
  }
  for (size_t i = 0; i < jobs.size(); ++i) std::printf("time_us %s %.3f\n", jobs[i].first.c_str(), best[i]);
}

}  // namespace

int main(int argc, char** argv) {
  DefaultThreadCount();
  std::vector<std::string> pos;
  int repeat = 0;
  int rounds = 3;
  std::string weights;
  std::string time_list;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--repeat" && i + 1 < argc) {
      repeat = std::atoi(argv[++i]);
    } else if (a == "--time" && i + 1 < argc) {
      time_list = argv[++i];
    } else if (a == "--rounds" && i + 1 < argc) {
      rounds = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--weights" && i + 1 < argc) {
      weights = argv[++i];
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() < 2) Fail("usage: runner LIB OUT_DIR IN0.npy [IN1.npy ...] [--weights FILE] [--repeat N]");
  try {
    ffi::Module lib = pos[0] == "system"
                          ? ffi::Function::GetGlobalRequired("ffi.SystemLib")().cast<ffi::Module>()
                          : ffi::Module::LoadFromFile(pos[0]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    // device type, device id, allocator type (2 = pooled), for the host device.
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    if (!time_list.empty()) {
      std::vector<ffi::Any> inputs;
      for (size_t i = 2; i < pos.size(); ++i) inputs.push_back(ReadNpy(pos[i]));
      TimeFunctions(vm, time_list, inputs, rounds);
      return 0;
    }
    ffi::Function main_fn = vm->GetFunction("main").value();
    std::vector<ffi::Any> args;
    for (size_t i = 2; i < pos.size(); ++i) args.push_back(ReadNpy(pos[i]));
    if (!weights.empty()) {
      for (ffi::Tensor& w : ReadWeights(weights)) args.push_back(w);
    }
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any ret;
    main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &ret);
    if (repeat > 0) {
      // Warm up for ~0.2 s first: on a VM the idle vCPU of TVM's worker thread wakes slowly until the host has
      // seen it busy (measured: the first ~100 calls of a 0.06 ms model take 0.12 ms), like a long-running server.
      auto w0 = std::chrono::steady_clock::now();
      while (std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count() < 0.2) {
        ffi::Any tmp;
        main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &tmp);
      }
      std::vector<double> ms;
      for (int r = 0; r < repeat; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        ffi::Any tmp;
        main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &tmp);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      std::printf("median_ms %.6f\n", ms[ms.size() / 2]);
    }
    std::vector<ffi::Tensor> outs;
    if (auto t = ret.as<ffi::Tensor>()) {
      outs.push_back(*t);
    } else if (auto arr = ret.as<ffi::Array<ffi::Any>>()) {
      for (const ffi::Any& v : *arr) outs.push_back(v.cast<ffi::Tensor>());
    } else {
      Fail("main returned neither a tensor nor a tuple of tensors");
    }
    for (size_t i = 0; i < outs.size(); ++i) WriteNpy(pos[1] + "/output_" + std::to_string(i) + ".npy", outs[i]);
  } catch (const std::exception& e) {
    Fail(e.what());
  }
  return 0;
}
