// openmmflashipa._training: the processes of a data-parallel flashipa-train run. openmmflashipa/train.py
// creates torch.distributed's process group (Gloo on the CPU, NCCL on GPUs) and hands it to this module,
// whose communicator runs the C++ Trainer's all-reduces on it (docs/DESIGN-DECISIONS.md, "Data-parallel
// training"). Built like LibTorch's own C++ extensions, against torch's bundled pybind11 and
// libtorch_python, so that the ProcessGroup object crosses from Python to C++ as LibTorch's own type.
#include "flashipa/TrainCommand.h"
#include <stdexcept>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/extension.h>
#include <vector>

namespace py = pybind11;
using namespace FlashIPAPlugin;

namespace {

// The Trainer's collectives on a c10d process group: every call waits for its result, and a collective
// that fails (a process exited; none answered within the group's timeout) throws with that cause.
class ProcessGroupCommunicator : public TrainingCommunicator {
public:
    explicit ProcessGroupCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group) : group_(std::move(group)) {}
    int rank() const override { return group_->getRank(); }
    int worldSize() const override { return group_->getSize(); }
    void allReduceSum(torch::Tensor& tensor) override { allReduce(tensor, c10d::ReduceOp::SUM, "sum"); }
    void allReduceMax(torch::Tensor& tensor) override { allReduce(tensor, c10d::ReduceOp::MAX, "max"); }

private:
    void allReduce(torch::Tensor& tensor, c10d::ReduceOp::RedOpType op, const char* what) {
        std::vector<at::Tensor> tensors = {tensor};
        c10d::AllreduceOptions options;
        options.reduceOp = c10d::ReduceOp(op);
        try {
            group_->allreduce(tensors, options)->wait();
        } catch (const std::exception& e) {
            throw std::runtime_error(std::string("the all-reduce (") + what + ") of the data-parallel run failed: another process " +
                                     "exited or did not answer within the run's timeout (--dist-timeout); its own error, if it " +
                                     "printed one, names the cause. The collective reported: " + e.what());
        }
    }
    c10::intrusive_ptr<c10d::ProcessGroup> group_;
};

int run(const std::vector<std::string>& args, const py::object& group, const std::string& commandLine) {
    std::shared_ptr<TrainingCommunicator> communicator;
    if (!group.is_none()) {
        c10::intrusive_ptr<c10d::ProcessGroup> processGroup;
        try {
            processGroup = group.cast<c10::intrusive_ptr<c10d::ProcessGroup>>();
        } catch (const py::cast_error&) {
            throw py::type_error("process_group must be a torch.distributed ProcessGroup (or None), not " +
                                 std::string(py::str(py::type::of(group))));
        }
        communicator = std::make_shared<ProcessGroupCommunicator>(processGroup);
    }
    py::gil_scoped_release release; // training runs in C++ alone
    return runTrainCommand(args, communicator, commandLine);
}

py::dict parse(const std::vector<std::string>& args) {
    TrainCommandLine parsed = parseTrainCommandLine(args); // std::invalid_argument -> ValueError
    py::dict out;
    out["help"] = parsed.help;
    out["device"] = parsed.options.device;
    out["out_dir"] = parsed.options.outDir;
    out["resume"] = parsed.options.resume;
    out["batch_size"] = parsed.options.batchSize;
    return out;
}

} // namespace

PYBIND11_MODULE(_training, m) {
    m.doc() = "The processes of a data-parallel flashipa-train run (openmmflashipa.train).";
    m.def("run", &run, py::arg("args"), py::arg("process_group"), py::arg("command_line") = "",
          "Runs flashipa-train with args (its options, without the program name) as this process of the run "
          "of process_group (a torch.distributed ProcessGroup; None: a single process). Returns the exit code.");
    m.def("parse", &parse, py::arg("args"),
          "Checks flashipa-train's options; returns help, device, out_dir, resume and batch_size, or raises "
          "ValueError naming the bad option.");
    m.def("usage", []() { return trainUsage(); }, "flashipa-train's usage text.");
}
