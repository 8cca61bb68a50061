#ifndef FLASHIPA_MODEL_CONFIG_H_
#define FLASHIPA_MODEL_CONFIG_H_

#include <map>
#include <string>

namespace FlashIPAPlugin {

/**
 * The architecture of an EnergyModel. Every field is stored in a checkpoint's metadata, so a
 * checkpoint is enough to rebuild the model that wrote it.
 */
struct ModelConfig {
    int nodeDim = 64;              ///< c_s: width of the per-residue representation
    int headDim = 16;              ///< c: scalar query/key/value width per head
    int numHeads = 4;              ///< H
    int queryPoints = 4;           ///< P_q: query/key points per head
    int valuePoints = 8;           ///< P_v: value points per head
    int pairRank = 2;              ///< r: rank of the factorised pair representation (0 = no pair terms)
    int pairDim = 16;              ///< c_z: channels of each pair factor (pair values use c_z/4)
    int relPosFrequencies = 4;     ///< K: relative-position frequencies entering the bias exactly (0 = none)
    int numBlocks = 2;             ///< trunk blocks
    int transitionFactor = 2;      ///< hidden width of the transition MLP = transitionFactor * nodeDim
    int sigmaFeatures = 8;         ///< Fourier features of log(sigma)
    int geometryPrior = 0;         ///< 1: add the analytic geometry prior (GeometryPrior.h) to the energy; 2: the
                                   ///< same with its chain weight; 3: with the backbone chain term; 4: with the
                                   ///< correlated (bond-angle) chain term instead; 5: 4 with the exclusion
                                   ///< between non-neighbouring residues; 6: 5 with the exclusion only between
                                   ///< residues at least three apart along a chain segment; absent from older
                                   ///< checkpoints' metadata (read as 0)
    double sigmaMin = 0.01;        ///< nm; smallest noise level the model is meant for
    double sigmaMax = 2.0;         ///< nm; largest noise level the model is meant for

    /** Width of the pair-value channels, c_z / 4 (at least 1 when pairRank > 0). */
    int pairValueDim() const;
    /** Rank of the attention bias: the learned pair rank plus two per relative-position frequency. */
    int biasRank() const;
    /** Throws std::invalid_argument naming the first field that is out of range. */
    void validate() const;
    /** The fields as "config.<name>" -> decimal string, for checkpoint metadata. */
    std::map<std::string, std::string> toMetadata() const;
    /** Inverse of toMetadata(); throws std::invalid_argument on a missing or malformed field. */
    static ModelConfig fromMetadata(const std::map<std::string, std::string>& metadata);
};

} // namespace FlashIPAPlugin

#endif
