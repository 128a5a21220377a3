// relfast_run_script: run a TorchScript module that calls relfast ops, from C++, without Python.
//
//   relfast_run_script [options] <module.pt> [<input.pt> ...]
//   relfast_run_script --list-ops
//
// <module.pt> is a module saved in Python with torch.jit.save(torch.jit.script(m), path). Each
// <input.pt> is one argument of its forward(), saved in Python with torch.save(obj, path): a tensor,
// a number, or a (nested) list/tuple of them. Arguments are converted to the types of the forward()
// schema (a Python list of tensors becomes a List[Tensor]); missing trailing arguments take their
// defaults. The program links relfast_ops, whose operators register themselves when it is loaded.
//
// Options:
//   -o, --output FILE  write the result with torch::pickle_save; Python reads it with torch.load(FILE)
//   --expect FILE      compare the result with the object in FILE (torch.save); exit 1 if they differ
//   --rtol X, --atol X tolerances of --expect: |out - exp| <= atol + rtol * |exp| (1e-5 and 1e-6)
//   --method NAME      run this method instead of forward
//   --threads N        at::set_num_threads(N) first
//   --quiet            print the header of each output line but not its values
//   --list-ops         print the registered relfast:: operators; exit 1 if there are none
//
// Standard output, one line per leaf of the result (a tensor or a scalar), depth-first:
//   output <index> <dtype> [<d0>,<d1>,...] <v0> <v1> ...
// with the values in row-major order, printed with %.17g (exact for float64 and every narrower
// type). A scalar leaf prints as `output <index> <int|float|bool|none> [] <value>`.
// Exit status: 0 ok, 1 result differs from --expect (or no relfast ops for --list-ops), 2 error.
#include <torch/script.h>
#include <torch/serialize.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "example_io.h"

namespace {

using relfast_examples::read_file;
using relfast_examples::write_file;

constexpr const char* kProgram = "relfast_run_script";

struct Options {
  std::string module_path;
  std::vector<std::string> input_paths;
  std::string output_path;
  std::string expect_path;
  std::string method = "forward";
  double rtol = 1e-5;
  double atol = 1e-6;
  int threads = 0;
  bool quiet = false;
  bool list_ops = false;
};

[[noreturn]] void usage_error(const std::string& message, bool help = false) {
  std::fprintf(help ? stdout : stderr,
               "%s: %s\nusage: %s [-o OUT.pt] [--expect EXP.pt] [--rtol X] [--atol X] [--method NAME] "
               "[--threads N] [--quiet] <module.pt> [<input.pt> ...]\n       %s --list-ops\n",
               kProgram, message.c_str(), kProgram, kProgram);
  std::exit(help ? 0 : 2);
}

double parse_number(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    const double value = std::stod(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  usage_error("option " + flag + " needs a number, got '" + text + "'");
}

Options parse_args(int argc, char** argv) {
  Options opt;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error("option " + arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-o" || arg == "--output") {
      opt.output_path = value();
    } else if (arg == "--expect") {
      opt.expect_path = value();
    } else if (arg == "--rtol") {
      opt.rtol = parse_number(arg, value());
    } else if (arg == "--atol") {
      opt.atol = parse_number(arg, value());
    } else if (arg == "--method") {
      opt.method = value();
    } else if (arg == "--threads") {
      opt.threads = static_cast<int>(parse_number(arg, value()));
    } else if (arg == "--quiet") {
      opt.quiet = true;
    } else if (arg == "--list-ops") {
      opt.list_ops = true;
    } else if (arg == "-h" || arg == "--help") {
      usage_error("run a TorchScript module that calls relfast ops (see cpp/run_script.cpp)", true);
    } else if (arg.size() > 1 && arg[0] == '-') {
      usage_error("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (opt.list_ops) return opt;
  if (positional.empty()) usage_error("missing <module.pt>");
  opt.module_path = positional.front();
  opt.input_paths.assign(positional.begin() + 1, positional.end());
  return opt;
}

// The relfast:: operators known to the dispatcher, i.e. registered by the loaded relfast_ops.
std::vector<c10::OperatorName> relfast_op_names() {
  std::vector<c10::OperatorName> names;
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("relfast::", 0) == 0) names.push_back(name);
  }
  std::sort(names.begin(), names.end(), [](const auto& a, const auto& b) {
    return a.name != b.name ? a.name < b.name : a.overload_name < b.overload_name;
  });
  return names;
}

int list_ops() {
  const auto names = relfast_op_names();
  for (const auto& name : names) {
    auto handle = c10::Dispatcher::singleton().findSchema(name);
    if (!handle || !handle->hasSchema()) continue;
    std::ostringstream line;
    line << handle->schema();
    // "Computed": a kernel for that key, or a composite/catch-all one that serves it.
    const bool cpu = handle->hasComputedKernelForDispatchKey(c10::DispatchKey::CPU);
    const bool cuda = handle->hasComputedKernelForDispatchKey(c10::DispatchKey::CUDA);
    std::printf("%s  [CPU:%s CUDA:%s]\n", line.str().c_str(), cpu ? "yes" : "no", cuda ? "yes" : "no");
  }
  if (names.empty()) {
    std::fprintf(stderr, "%s: no relfast:: operators are registered (was relfast_ops linked with "
                 "-Wl,--no-as-needed?)\n", kProgram);
    return 1;
  }
  return 0;
}

// Converts a value loaded from a torch.save file to `type` where the pickle lost the type: Python
// lists load as List[Any], ints where floats are expected stay ints, etc.
c10::IValue coerce(const c10::IValue& value, const c10::TypePtr& type) {
  if (value.isNone()) return value;
  if (auto optional = type->cast<c10::OptionalType>()) return coerce(value, optional->getElementType());
  if (auto list_type = type->cast<c10::ListType>()) {
    if (!value.isList() && !value.isTuple()) return value;
    const auto& element_type = list_type->getElementType();
    c10::impl::GenericList list(element_type);
    if (value.isList()) {
      for (const c10::IValue& item : value.toListRef()) list.push_back(coerce(item, element_type));
    } else {
      for (const c10::IValue& item : value.toTupleRef().elements()) list.push_back(coerce(item, element_type));
    }
    return list;
  }
  if (auto tuple_type = type->cast<c10::TupleType>()) {
    std::vector<c10::IValue> items;
    if (value.isTuple()) {
      items = value.toTupleRef().elements().vec();
    } else if (value.isList()) {
      items = value.toListRef().vec();
    } else {
      return value;
    }
    const auto& element_types = tuple_type->elements();
    if (items.size() != element_types.size()) return value;
    for (size_t i = 0; i < items.size(); ++i) items[i] = coerce(items[i], element_types[i]);
    return c10::ivalue::Tuple::create(std::move(items));
  }
  if (type->kind() == c10::TypeKind::FloatType && value.isInt()) return static_cast<double>(value.toInt());
  if (type->kind() == c10::TypeKind::TensorType && (value.isDouble() || value.isInt() || value.isBool())) {
    return at::scalar_tensor(value.toScalar());
  }
  return value;
}

// Depth-first leaves of a result: tensors and scalars inside tuples, lists and dict values.
void flatten(const c10::IValue& value, std::vector<c10::IValue>& leaves) {
  if (value.isTuple()) {
    for (const auto& item : value.toTupleRef().elements()) flatten(item, leaves);
  } else if (value.isList()) {
    for (const c10::IValue& item : value.toListRef()) flatten(item, leaves);
  } else if (value.isGenericDict()) {
    for (const auto& entry : value.toGenericDict()) flatten(entry.value(), leaves);
  } else {
    leaves.push_back(value);
  }
}

std::string dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(s);
  }
}

std::string shape_string(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

void print_leaf(size_t index, const c10::IValue& leaf, bool quiet) {
  char buffer[64];
  if (leaf.isTensor()) {
    const at::Tensor t = leaf.toTensor();
    std::string line = "output " + std::to_string(index) + " " + dtype_name(t.scalar_type()) + " " +
                       shape_string(t.sizes());
    if (!quiet) {
      if (t.is_complex()) {
        line += " (complex values not printed)";
      } else {
        const at::Tensor values = t.detach().to(at::kCPU).to(at::kDouble).contiguous();
        const double* data = values.const_data_ptr<double>();
        for (int64_t i = 0; i < values.numel(); ++i) {
          std::snprintf(buffer, sizeof(buffer), " %.17g", data[i]);
          line += buffer;
        }
      }
    }
    std::printf("%s\n", line.c_str());
  } else if (leaf.isNone()) {
    std::printf("output %zu none []\n", index);
  } else if (leaf.isBool()) {
    std::printf("output %zu bool [] %s\n", index, leaf.toBool() ? "true" : "false");
  } else if (leaf.isInt()) {
    std::printf("output %zu int [] %" PRId64 "\n", index, leaf.toInt());
  } else if (leaf.isDouble()) {
    std::printf("output %zu float [] %.17g\n", index, leaf.toDouble());
  } else {
    std::printf("output %zu %s []\n", index, leaf.tagKind().c_str());
  }
}

// Compares the leaves of `actual` and `expected`; prints each difference to stderr.
bool matches(const c10::IValue& actual, const c10::IValue& expected, double rtol, double atol) {
  std::vector<c10::IValue> got, want;
  flatten(actual, got);
  flatten(expected, want);
  if (got.size() != want.size()) {
    std::fprintf(stderr, "%s: the result has %zu outputs, --expect has %zu\n", kProgram, got.size(), want.size());
    return false;
  }
  bool ok = true;
  for (size_t i = 0; i < got.size(); ++i) {
    const auto as_tensor = [](const c10::IValue& v) -> at::Tensor {
      if (v.isTensor()) return v.toTensor().detach().to(at::kCPU);
      if (v.isDouble() || v.isInt() || v.isBool()) return at::scalar_tensor(v.toScalar());
      return at::Tensor();
    };
    const at::Tensor a = as_tensor(got[i]);
    const at::Tensor e = as_tensor(want[i]);
    if (!a.defined() || !e.defined()) {
      if (got[i].isNone() != want[i].isNone()) {
        std::fprintf(stderr, "%s: output %zu: unsupported or mismatched kinds\n", kProgram, i);
        ok = false;
      }
      continue;
    }
    if (a.sizes() != e.sizes()) {
      std::fprintf(stderr, "%s: output %zu: shape %s, expected %s\n", kProgram, i, shape_string(a.sizes()).c_str(),
                   shape_string(e.sizes()).c_str());
      ok = false;
      continue;
    }
    if (a.numel() == 0) continue;
    const at::Tensor ad = a.to(at::kDouble), ed = e.to(at::kDouble);
    if (!at::allclose(ad, ed, rtol, atol, /*equal_nan=*/true)) {
      const double max_diff = (ad - ed).abs().nan_to_num(INFINITY).max().item<double>();
      std::fprintf(stderr, "%s: output %zu differs from the expected value: max |diff| %.3g (rtol %.3g, atol %.3g)\n",
                   kProgram, i, max_diff, rtol, atol);
      ok = false;
    }
  }
  return ok;
}

int run(const Options& opt) {
  if (opt.threads > 0) at::set_num_threads(opt.threads);
  if (relfast_op_names().empty()) {
    std::fprintf(stderr, "%s: warning: no relfast:: operators are registered; modules that call them will "
                 "fail to load\n", kProgram);
  }

  torch::jit::Module module = torch::jit::load(opt.module_path, c10::Device(c10::kCPU));
  module.eval();
  const torch::jit::Method method = module.get_method(opt.method);
  const auto& arguments = method.function().getSchema().arguments();  // arguments[0] is self

  std::vector<c10::IValue> inputs;
  for (size_t i = 0; i < opt.input_paths.size(); ++i) {
    c10::IValue value = torch::pickle_load(read_file(opt.input_paths[i]));
    if (i + 1 < arguments.size()) value = coerce(value, arguments[i + 1].type());
    inputs.push_back(std::move(value));
  }

  c10::IValue result;
  {
    torch::NoGradGuard no_grad;
    result = method(std::move(inputs));
  }

  std::vector<c10::IValue> leaves;
  flatten(result, leaves);
  for (size_t i = 0; i < leaves.size(); ++i) print_leaf(i, leaves[i], opt.quiet);
  std::fflush(stdout);

  if (!opt.output_path.empty()) write_file(opt.output_path, torch::pickle_save(result));
  if (!opt.expect_path.empty()) {
    const c10::IValue expected = torch::pickle_load(read_file(opt.expect_path));
    if (!matches(result, expected, opt.rtol, opt.atol)) return 1;
    std::fprintf(stderr, "%s: result matches %s\n", kProgram, opt.expect_path.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse_args(argc, argv);
  try {
    return opt.list_ops ? list_ops() : run(opt);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", kProgram, e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", kProgram, e.what());
  }
  return 2;
}
