#ifndef FLASHIPA_DATASET_H_
#define FLASHIPA_DATASET_H_

#include "flashipa/EnergyModel.h"
#include <ATen/core/Generator.h>
#include <string>
#include <torch/torch.h>
#include <vector>

namespace FlashIPAPlugin {

/** Which part of a dataset: the "split" tensor holds 0 for training chains and 1 for validation chains. */
enum class DatasetSplit { Train = 0, Validation = 1 };

/**
 * A training set of protein and RNA chains (the file scripts/build_dataset.py writes), held in memory.
 *
 * File format (safetensors, metadata "format" = "openmm-flashipa-dataset", "version" = "1"), with N
 * residues in C chains:
 *   atoms          F32 [N, 3, 3]  frame atoms (a, b, c) per residue, nm
 *   types          I64 [N]        residue types (ResidueTypes.h); amino acids in protein chains, nucleotides in RNA
 *   segment        I64 [N]        segment index within its chain (non-decreasing; a new segment after each break)
 *   chain_offsets  I64 [C + 1]    chain c holds residues [chain_offsets[c], chain_offsets[c + 1])
 *   is_rna         U8  [C]        1 for RNA chains
 *   split          U8  [C]        0 train, 1 validation
 *   protein_O      F32 [N, 3]     carbonyl O of protein residues (not used for training)
 * Everything is validated on load; any defect is a std::runtime_error naming the file and the cause.
 */
class Dataset {
public:
    static constexpr const char* FormatName = "openmm-flashipa-dataset";
    static constexpr const char* FormatVersion = "1";
    /** Default probability that a sampled structure is an RNA chain (RNA is only ~5% of residues). */
    static constexpr double DefaultRnaProbability = 0.3;

    /** Loads and validates a dataset file. */
    explicit Dataset(const std::string& path);

    const std::string& path() const { return path_; }
    int64_t numResidues() const { return types_.size(0); }
    int64_t numChains() const { return static_cast<int64_t>(isRna_.size()); }
    /** Residues of chain c. */
    int64_t chainLength(int64_t c) const { return offsets_[c + 1] - offsets_[c]; }
    bool chainIsRna(int64_t c) const { return isRna_[c]; }
    /** Indices of the non-empty chains of a split. */
    const std::vector<int64_t>& chains(DatasetSplit split) const;
    /** Number of residues in a split's chains. */
    int64_t splitResidues(DatasetSplit split) const;
    /** First residue of chain c (c = numChains() gives numResidues()). */
    int64_t chainOffset(int64_t c) const { return offsets_[c]; }
    /** Every residue's frame atoms [N, 3, 3] (float32, nm), types [N] and segment indices [N] (int64). */
    const torch::Tensor& atoms() const { return atoms_; }
    const torch::Tensor& types() const { return types_; }
    const torch::Tensor& segments() const { return segment_; }

    /**
     * A batch of batchSize random structures from a split, on the CPU: each a random chain (RNA with
     * probability rnaProbability when the split has both kinds, otherwise whichever kind it has; chains
     * uniformly within a kind) cropped to a random window of at most maxLength contiguous residues.
     * Padded to the longest crop: atoms [B, L, 3, 3] (float32; zeros where padded), types [B, L],
     * chains [B, L] (the segment ids, so no neighbour crosses a chain break; -1 where padded), mask [B, L].
     * Deterministic given the generator's state (a CPU generator).
     */
    StructureBatch sampleBatch(DatasetSplit split, int batchSize, int maxLength, at::Generator& generator,
                               double rnaProbability = DefaultRnaProbability) const;

private:
    std::string path_;
    torch::Tensor atoms_;    // [N, 3, 3] float32
    torch::Tensor types_;    // [N] int64
    torch::Tensor segment_;  // [N] int64
    std::vector<int64_t> offsets_;
    std::vector<bool> isRna_;
    std::vector<int64_t> train_, validation_;
    std::vector<int64_t> trainProtein_, trainRna_, validationProtein_, validationRna_;
};

} // namespace FlashIPAPlugin

#endif
