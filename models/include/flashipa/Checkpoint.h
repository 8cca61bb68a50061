#ifndef FLASHIPA_CHECKPOINT_H_
#define FLASHIPA_CHECKPOINT_H_

#include <map>
#include <string>
#include <torch/torch.h>
#include <vector>

namespace FlashIPAPlugin {

/** The contents of a safetensors file: named tensors (in file order) and string metadata. */
struct SafetensorsContents {
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    std::map<std::string, std::string> metadata;
};

/**
 * Reads and writes the safetensors format (an 8-byte little-endian header length, a JSON header, then
 * raw little-endian tensor data). Reading never executes code; it validates the header size against the
 * file size, the JSON syntax, every dtype, shape and byte range, and throws std::runtime_error with
 * the path and the cause on any defect. Supported dtypes: F64, F32, F16, BF16, I64, I32, U8, BOOL.
 */
class Safetensors {
public:
    /** Largest header accepted (100 MB, as the reference implementation). */
    static constexpr uint64_t MaxHeaderSize = 100000000;
    /** Writes tensors (made contiguous, on CPU) and metadata to path, atomically (temp file + rename). */
    static void write(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata);
    /** Reads a whole file. */
    static SafetensorsContents read(const std::string& path);
    /** Parses an in-memory file (name is used in error messages). */
    static SafetensorsContents parse(const std::string& bytes, const std::string& name);
};

/** Lower-case hex SHA-256 of a byte string. */
std::string sha256Hex(const std::string& bytes);
/** Lower-case hex SHA-256 of a file's contents; throws std::runtime_error if it cannot be read. */
std::string sha256File(const std::string& path);

} // namespace FlashIPAPlugin

#endif
