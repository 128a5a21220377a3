// relfast_explain: serve a model + explainer exported by relfast.export.to_torchscript, from C++.
//
//   relfast_explain [--target N] [-o OUT.pt] <model_explained.pt> <input.pt> [<input.pt> ...]
//
// Each <input.pt> is one model input saved in Python with torch.save(tensor, path), in the order
// of the module's relfast_input_names (e.g. pixel_values; or input_ids then attention_mask). The
// program runs forward(inputs..., target) on the module's device, then prints per sample the
// predicted and explained classes and the most relevant patch (vision: row and column in the patch
// grid) or token (text: its position):
//
//   sample <i> predicted <c> explained <t> top_patch <row> <col> relevance <value>
//   sample <i> predicted <c> explained <t> top_token <pos> relevance <value>
//
// -o writes (logits, relevance, explained_target) with torch::pickle_save (torch.load reads it).
// The program links relfast_ops, whose operators register themselves when it is loaded.
// Exit status: 0 ok, 2 error (bad input included: the module's own checks name the input).
#include <torch/script.h>
#include <torch/serialize.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "example_io.h"

namespace {

using relfast_examples::read_file;
using relfast_examples::write_file;

constexpr const char* kProgram = "relfast_explain";

struct Options {
  std::string module_path;
  std::vector<std::string> input_paths;
  std::string output_path;
  int64_t target = -1;
};

[[noreturn]] void usage_error(const std::string& message, bool help = false) {
  std::fprintf(help ? stdout : stderr,
               "%s: %s\nusage: %s [--target N] [-o OUT.pt] <model_explained.pt> <input.pt> [<input.pt> ...]\n",
               kProgram, message.c_str(), kProgram);
  std::exit(help ? 0 : 2);
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
    } else if (arg == "--target") {
      const std::string text = value();
      try {
        size_t used = 0;
        opt.target = std::stoll(text, &used);
        if (used != text.size()) throw std::invalid_argument(text);
      } catch (const std::exception&) {
        usage_error("--target needs a class index (or -1 for the predicted class), got '" + text + "'");
      }
    } else if (arg == "-h" || arg == "--help") {
      usage_error("explain with a relfast-exported TorchScript file (see cpp/explain.cpp)", true);
    } else if (arg.size() > 1 && arg[0] == '-') {
      usage_error("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 2) usage_error("needs <model_explained.pt> and at least one <input.pt>");
  opt.module_path = positional.front();
  opt.input_paths.assign(positional.begin() + 1, positional.end());
  return opt;
}

// The module's device: where its weights were at export time (its first tensor attribute).
c10::Device module_device(const torch::jit::Module& module) {
  for (const auto& attribute : module.named_attributes(/*recurse=*/true)) {
    if (attribute.value.isTensor()) return attribute.value.toTensor().device();
  }
  return c10::Device(c10::kCPU);
}

int run(const Options& opt) {
  torch::jit::Module module = torch::jit::load(opt.module_path);
  module.eval();
  if (!module.hasattr("relfast_input_names")) {
    throw std::runtime_error("'" + opt.module_path + "' was not written by relfast.export.to_torchscript");
  }
  const auto input_names = module.attr("relfast_input_names").toListRef();
  if (opt.input_paths.size() != input_names.size()) {
    std::string names;
    for (const auto& name : input_names) names += (names.empty() ? "" : ", ") + name.toStringRef();
    throw std::runtime_error("the module takes " + std::to_string(input_names.size()) + " input(s) (" + names +
                             "), got " + std::to_string(opt.input_paths.size()) + " file(s)");
  }
  const c10::Device device = module_device(module);
  std::vector<c10::IValue> inputs;
  for (const auto& path : opt.input_paths) {
    const c10::IValue value = torch::pickle_load(read_file(path));
    if (!value.isTensor()) throw std::runtime_error("'" + path + "' does not hold a tensor (torch.save(tensor, path))");
    inputs.push_back(value.toTensor().to(device));
  }
  const int64_t batch = inputs.front().toTensor().dim() > 0 ? inputs.front().toTensor().size(0) : 0;
  inputs.push_back(torch::full({batch}, opt.target, torch::dtype(torch::kLong).device(device)));

  c10::IValue result;
  {
    torch::NoGradGuard no_grad;  // the explanation's own backward runs inside the graph
    result = module.forward(std::move(inputs));
  }
  const auto outputs = result.toTupleRef().elements();
  const at::Tensor logits = outputs[0].toTensor().to(at::kCPU);
  const at::Tensor relevance = outputs[1].toTensor().to(at::kCPU);
  const at::Tensor explained = outputs[2].toTensor().to(at::kCPU);

  const int64_t prefix = module.attr("relfast_num_prefix_tokens").toInt();
  const auto grid = module.attr("relfast_patch_grid").toIntVector();  // empty for text models
  const at::Tensor rows = relevance.dim() == 3 ? relevance.select(1, 0) : relevance;  // full matrix: CLS row
  for (int64_t i = 0; i < batch; ++i) {
    const at::Tensor scores = rows[i].slice(0, prefix);
    const int64_t best = scores.argmax().item<int64_t>();
    const double value = scores[best].item<double>();
    const int64_t predicted = logits[i].argmax().item<int64_t>();
    const int64_t target = explained[i].item<int64_t>();
    if (grid.size() == 2) {
      std::printf("sample %lld predicted %lld explained %lld top_patch %lld %lld relevance %.6g\n",
                  static_cast<long long>(i), static_cast<long long>(predicted), static_cast<long long>(target),
                  static_cast<long long>(best / grid[1]), static_cast<long long>(best % grid[1]), value);
    } else {
      std::printf("sample %lld predicted %lld explained %lld top_token %lld relevance %.6g\n",
                  static_cast<long long>(i), static_cast<long long>(predicted), static_cast<long long>(target),
                  static_cast<long long>(best + prefix), value);
    }
  }
  std::fflush(stdout);
  if (!opt.output_path.empty()) {
    write_file(opt.output_path, torch::pickle_save(c10::ivalue::Tuple::create({logits, relevance, explained})));
  }
  return 0;
}

}  // namespace

// A check of the exported module raised: its message, without the TorchScript traceback around it.
static std::string without_traceback(const std::string& message) {
  const std::string marker = "builtins.ValueError: ";
  const auto raised = message.rfind(marker);
  return raised == std::string::npos ? message : message.substr(raised + marker.size());
}

int main(int argc, char** argv) {
  const Options opt = parse_args(argc, argv);
  try {
    return run(opt);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", kProgram, without_traceback(e.what_without_backtrace()).c_str());
  } catch (const std::exception& e) {  // torch::jit::JITException (a raise in the module) included
    std::fprintf(stderr, "%s: error: %s\n", kProgram, without_traceback(e.what()).c_str());
  }
  return 2;
}
