// The training dataset: loading, validation and random cropped batches.
#include "flashipa/Dataset.h"
#include "flashipa/Checkpoint.h"
#include "flashipa/FrameBuilder.h"
#include "flashipa/ResidueTypes.h"
#include <algorithm>
#include <map>
#include <stdexcept>

namespace FlashIPAPlugin {

using torch::indexing::Slice;

namespace {

std::string shapeText(const torch::Tensor& t) { return c10::str(t.sizes()); }

std::string dtypeName(torch::ScalarType type) {
    switch (type) {
    case torch::kFloat64: return "F64";
    case torch::kFloat32: return "F32";
    case torch::kFloat16: return "F16";
    case torch::kBFloat16: return "BF16";
    case torch::kInt64: return "I64";
    case torch::kInt32: return "I32";
    case torch::kUInt8: return "U8";
    case torch::kBool: return "BOOL";
    default: return c10::toString(type);
    }
}

// A uniform integer in [0, n) from the generator.
int64_t uniformIndex(int64_t n, at::Generator& generator) {
    return torch::randint(n, {1}, generator, torch::kInt64).item<int64_t>();
}

} // namespace

Dataset::Dataset(const std::string& path) : path_(path) {
    auto fail = [&](const std::string& cause) { throw std::runtime_error("dataset '" + path + "': " + cause); };
    SafetensorsContents contents;
    try {
        contents = Safetensors::read(path);
    } catch (const std::exception& e) {
        throw std::runtime_error(std::string("cannot read dataset: ") + e.what());
    }
    // Metadata.
    auto format = contents.metadata.find("format");
    if (format == contents.metadata.end())
        fail(std::string("metadata lacks 'format' (expected '") + FormatName + "'): not a FlashIPA dataset");
    if (format->second != FormatName)
        fail("metadata 'format' is '" + format->second + "', expected '" + FormatName + "': not a FlashIPA dataset");
    auto version = contents.metadata.find("version");
    if (version == contents.metadata.end())
        fail("metadata lacks 'version'");
    if (version->second != FormatVersion)
        fail("unsupported dataset version '" + version->second + "' (this build reads version " + FormatVersion + ")");

    // Tensors: presence, dtype, rank.
    std::map<std::string, torch::Tensor> tensors(contents.tensors.begin(), contents.tensors.end());
    auto get = [&](const std::string& name, torch::ScalarType dtype, int64_t rank) {
        auto it = tensors.find(name);
        if (it == tensors.end())
            fail("missing tensor '" + name + "'");
        const torch::Tensor& t = it->second;
        if (t.scalar_type() != dtype)
            fail("tensor '" + name + "' has dtype " + dtypeName(t.scalar_type()) + ", expected " + dtypeName(dtype));
        if (t.dim() != rank)
            fail("tensor '" + name + "' has shape " + shapeText(t) + ", expected rank " + std::to_string(rank));
        return t;
    };
    torch::Tensor atoms = get("atoms", torch::kFloat32, 3);
    torch::Tensor types = get("types", torch::kInt64, 1);
    torch::Tensor segment = get("segment", torch::kInt64, 1);
    torch::Tensor offsets = get("chain_offsets", torch::kInt64, 1);
    torch::Tensor isRna = get("is_rna", torch::kUInt8, 1);
    torch::Tensor split = get("split", torch::kUInt8, 1);
    torch::Tensor protein_O = get("protein_O", torch::kFloat32, 2);

    // Shapes.
    const int64_t N = atoms.size(0);
    if (atoms.size(1) != 3 || atoms.size(2) != 3)
        fail("tensor 'atoms' has shape " + shapeText(atoms) + ", expected [N, 3, 3]");
    if (N == 0)
        fail("the dataset holds no residues");
    if (types.size(0) != N)
        fail("tensor 'types' has shape " + shapeText(types) + ", expected [" + std::to_string(N) + "] (one per residue of 'atoms')");
    if (segment.size(0) != N)
        fail("tensor 'segment' has shape " + shapeText(segment) + ", expected [" + std::to_string(N) + "]");
    if (protein_O.size(0) != N || protein_O.size(1) != 3)
        fail("tensor 'protein_O' has shape " + shapeText(protein_O) + ", expected [" + std::to_string(N) + ", 3]");
    const int64_t C = offsets.size(0) - 1;
    if (C < 1)
        fail("tensor 'chain_offsets' has shape " + shapeText(offsets) + ", expected [C + 1] with C >= 1 chains");
    if (isRna.size(0) != C)
        fail("tensor 'is_rna' has shape " + shapeText(isRna) + ", expected [" + std::to_string(C) + "] (one per chain)");
    if (split.size(0) != C)
        fail("tensor 'split' has shape " + shapeText(split) + ", expected [" + std::to_string(C) + "] (one per chain)");

    // Chain offsets.
    offsets_.assign(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + C + 1);
    if (offsets_[0] != 0)
        fail("chain_offsets[0] = " + std::to_string(offsets_[0]) + ", expected 0");
    if (offsets_[C] != N)
        fail("chain_offsets[" + std::to_string(C) + "] = " + std::to_string(offsets_[C]) + ", expected the number of residues " +
             std::to_string(N));
    for (int64_t c = 0; c < C; c++)
        if (offsets_[c + 1] < offsets_[c])
            fail("chain_offsets decrease at chain " + std::to_string(c));

    // Per-chain flags.
    const uint8_t* rnaData = isRna.data_ptr<uint8_t>();
    const uint8_t* splitData = split.data_ptr<uint8_t>();
    for (int64_t c = 0; c < C; c++) {
        if (rnaData[c] > 1)
            fail("is_rna[" + std::to_string(c) + "] = " + std::to_string(rnaData[c]) + ", expected 0 or 1");
        if (splitData[c] > 1)
            fail("split[" + std::to_string(c) + "] = " + std::to_string(splitData[c]) + ", expected 0 (train) or 1 (validation)");
        isRna_.push_back(rnaData[c] == 1);
    }

    // Residue types match the chain kind; segments are non-negative and non-decreasing within a chain.
    const int64_t* typeData = types.data_ptr<int64_t>();
    const int64_t* segmentData = segment.data_ptr<int64_t>();
    for (int64_t c = 0; c < C; c++) {
        for (int64_t i = offsets_[c]; i < offsets_[c + 1]; i++) {
            int64_t t = typeData[i];
            bool valid = isRna_[c] ? ResidueType::isNucleotide(static_cast<int>(t)) : (t >= 0 && t <= ResidueType::UnknownAminoAcid);
            if (!valid)
                fail("residue " + std::to_string(i) + " (chain " + std::to_string(c) + ", " + (isRna_[c] ? "RNA" : "protein") +
                     ") has type " + std::to_string(t) + ", expected " +
                     (isRna_[c] ? "a nucleotide type (21-25)" : "an amino-acid type (0-20)"));
            if (segmentData[i] < 0)
                fail("residue " + std::to_string(i) + " has negative segment " + std::to_string(segmentData[i]));
            if (i > offsets_[c] && segmentData[i] < segmentData[i - 1])
                fail("segment ids decrease within chain " + std::to_string(c) + " at residue " + std::to_string(i));
        }
    }

    // Coordinates: finite, and every residue gives a frame.
    torch::Tensor bad = FrameBuilder::degenerate(atoms);
    if (bad.any().item<bool>()) {
        int64_t i = bad.nonzero()[0][0].item<int64_t>();
        int64_t c = std::upper_bound(offsets_.begin(), offsets_.end(), i) - offsets_.begin() - 1;
        fail(std::to_string(bad.sum().item<int64_t>()) + " residue(s) have non-finite, coincident or collinear frame atoms; the first is residue " +
             std::to_string(i) + " (chain " + std::to_string(c) + ", residue " + std::to_string(i - offsets_[c]) + " of the chain)");
    }

    atoms_ = atoms;
    types_ = types;
    segment_ = segment;
    for (int64_t c = 0; c < C; c++) {
        if (chainLength(c) == 0)
            continue;
        bool validation = splitData[c] == 1;
        (validation ? validation_ : train_).push_back(c);
        if (validation)
            (isRna_[c] ? validationRna_ : validationProtein_).push_back(c);
        else
            (isRna_[c] ? trainRna_ : trainProtein_).push_back(c);
    }
    if (train_.empty())
        fail("no training chains (every chain has split = 1 or no residues)");
}

const std::vector<int64_t>& Dataset::chains(DatasetSplit split) const {
    return split == DatasetSplit::Train ? train_ : validation_;
}

int64_t Dataset::splitResidues(DatasetSplit split) const {
    int64_t total = 0;
    for (int64_t c : chains(split))
        total += chainLength(c);
    return total;
}

StructureBatch Dataset::sampleBatch(DatasetSplit split, int batchSize, int maxLength, at::Generator& generator,
                                    double rnaProbability) const {
    if (batchSize < 1)
        throw std::invalid_argument("sampleBatch: batchSize must be >= 1");
    if (maxLength < 1)
        throw std::invalid_argument("sampleBatch: maxLength must be >= 1");
    if (!(rnaProbability >= 0 && rnaProbability <= 1))
        throw std::invalid_argument("sampleBatch: rnaProbability must lie in [0, 1]");
    const bool train = split == DatasetSplit::Train;
    const std::vector<int64_t>& protein = train ? trainProtein_ : validationProtein_;
    const std::vector<int64_t>& rna = train ? trainRna_ : validationRna_;
    if (protein.empty() && rna.empty())
        throw std::runtime_error("dataset '" + path_ + "': the " + (train ? "training" : "validation") + " split has no chains");

    // Choose chains and crop windows.
    std::vector<std::pair<int64_t, int64_t>> windows; // [begin, end) residue ranges
    int64_t L = 0;
    for (int b = 0; b < batchSize; b++) {
        // Draw the kind even when only one kind exists, so the stream of draws does not depend on it.
        bool pickRna = torch::rand({1}, generator, torch::kFloat64).item<double>() < rnaProbability;
        if (rna.empty())
            pickRna = false;
        else if (protein.empty())
            pickRna = true;
        const std::vector<int64_t>& pool = pickRna ? rna : protein;
        int64_t c = pool[uniformIndex(static_cast<int64_t>(pool.size()), generator)];
        int64_t length = chainLength(c), begin = offsets_[c];
        if (length > maxLength) {
            begin += uniformIndex(length - maxLength + 1, generator);
            length = maxLength;
        }
        windows.emplace_back(begin, begin + length);
        L = std::max(L, length);
    }

    StructureBatch batch;
    batch.atoms = torch::zeros({batchSize, L, 3, 3}, torch::kFloat32);
    batch.types = torch::zeros({batchSize, L}, torch::kInt64);
    batch.chains = torch::full({batchSize, L}, -1, torch::kInt64);
    batch.mask = torch::zeros({batchSize, L}, torch::kBool);
    for (int b = 0; b < batchSize; b++) {
        auto [begin, end] = windows[b];
        Slice rows(0, end - begin);
        batch.atoms[b].index_put_({rows}, atoms_.index({Slice(begin, end)}));
        batch.types[b].index_put_({rows}, types_.index({Slice(begin, end)}));
        batch.chains[b].index_put_({rows}, segment_.index({Slice(begin, end)}));
        batch.mask[b].index_put_({rows}, true);
    }
    return batch;
}

} // namespace FlashIPAPlugin
