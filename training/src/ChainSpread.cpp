#include "flashipa/ChainSpread.h"
#include "flashipa/ResidueTypes.h"
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace FlashIPAPlugin {

namespace {
/** One length bin of the training chains' mode table. */
struct ModeBin {
    double length;                             ///< geometric-mean length of the bin's chains (residues)
    int chains;                                ///< how many chains the bin averages
    double total;                              ///< mean variance per coordinate summed over all modes (nm^2)
    double modes[ChainSpread::ModeCount];      ///< mean variance per coordinate of modes 1 .. ModeCount (nm^2)
};
#include "ChainModes.inc"

template <size_t N>
ChainSpread::Modes interpolate(const ModeBin (&bins)[N], int64_t length, bool rna) {
    const double L = double(length);
    const int count = (int) std::min<int64_t>(ChainSpread::ModeCount, 3 * length - 1);
    ChainSpread::Modes result;
    double total;
    std::vector<double> modes(ChainSpread::ModeCount);
    if (L <= bins[0].length || L >= bins[N - 1].length) {
        // Outside the table: the nearest bin's shares of its variance, times this chain's total variance (3L atoms
        // spreading ofChain per coordinate) over the bin's.
        const ModeBin& edge = L <= bins[0].length ? bins[0] : bins[N - 1];
        const double scale = (L * std::pow(ChainSpread::ofChain(length, rna), 2)) /
                             (edge.length * std::pow(ChainSpread::ofChain((int64_t) std::lround(edge.length), rna), 2));
        total = edge.total * scale;
        for (int k = 0; k < ChainSpread::ModeCount; k++)
            modes[k] = edge.modes[k] * scale;
    } else {
        size_t upper = 1;
        while (bins[upper].length < L)
            upper++;
        const ModeBin &a = bins[upper - 1], &b = bins[upper];
        const double t = std::log(L / a.length) / std::log(b.length / a.length);
        auto between = [t](double x, double y) { return std::exp((1 - t) * std::log(x) + t * std::log(y)); };
        total = between(a.total, b.total);
        for (int k = 0; k < ChainSpread::ModeCount; k++)
            modes[k] = between(a.modes[k], b.modes[k]);
    }
    result.variances.assign(modes.begin(), modes.begin() + count);
    double inModes = 0;
    for (double v : result.variances)
        inModes += v;
    // The rest, spread over 3L atoms (centring leaves 3L - 1 degrees of freedom per coordinate).
    result.rest = std::max(0.0, total - inModes) / double(3 * length - 1);
    return result;
}
} // namespace

double ChainSpread::ofChain(int64_t length, bool rna) {
    if (length < 1)
        throw std::invalid_argument("ChainSpread: a chain needs at least one residue, got " + std::to_string(length));
    return rna ? RnaPrefactor * std::pow(double(length), RnaExponent)
               : ProteinPrefactor * std::pow(double(length), ProteinExponent);
}

double ChainSpread::noised(int64_t length, bool rna, double sigma) {
    if (!(sigma >= 0) || !std::isfinite(sigma))
        throw std::invalid_argument("ChainSpread: sigma must be finite and non-negative");
    const double spread = ofChain(length, rna);
    return std::sqrt(sigma * sigma + spread * spread);
}

ChainSpread::Modes ChainSpread::modesOfChain(int64_t length, bool rna) {
    if (length < 1)
        throw std::invalid_argument("ChainSpread: a chain needs at least one residue, got " + std::to_string(length));
    return rna ? interpolate(RnaModeBins, length, rna) : interpolate(ProteinModeBins, length, rna);
}

torch::Tensor ChainSpread::start(const torch::Tensor& types, const torch::Tensor& chains, double sigma,
                                 int64_t numSamples, torch::Generator& generator) {
    if (!(sigma >= 0) || !std::isfinite(sigma))
        throw std::invalid_argument("ChainSpread: sigma must be finite and non-negative");
    if (numSamples < 1)
        throw std::invalid_argument("ChainSpread: numSamples must be at least 1");
    if (types.dim() != 1 || chains.dim() != 1 || types.size(0) != chains.size(0) || types.size(0) < 1)
        throw std::invalid_argument("ChainSpread: types and chains must be 1-D with one entry per residue");
    const torch::Tensor typesCpu = types.to(torch::kCPU, torch::kInt64), chainsCpu = chains.to(torch::kCPU, torch::kInt64);
    const int64_t L = typesCpu.size(0);
    const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    torch::Tensor x = torch::randn({numSamples, 3 * L, 3}, generator, f64) * sigma;
    // The runs of equal chain ids.
    std::vector<std::pair<int64_t, int64_t>> runs;
    const int64_t* id = chainsCpu.data_ptr<int64_t>();
    for (int64_t i = 0; i < L; i++)
        if (i == 0 || id[i] != id[i - 1])
            runs.emplace_back(i, i + 1);
        else
            runs.back().second = i + 1;
    const bool allRna = (typesCpu >= ResidueType::FirstNucleotide).all().item<bool>();
    for (const auto& [begin, end] : runs) {
        const int64_t m = end - begin, n = 3 * m;
        const bool rna = (typesCpu.slice(0, begin, end) >= ResidueType::FirstNucleotide).all().item<bool>();
        const Modes modes = modesOfChain(m, rna);
        const int64_t K = (int64_t) modes.variances.size();
        torch::Tensor chain = torch::randn({numSamples, n, 3}, generator, f64);
        chain = (chain - chain.mean(1, true)) * std::sqrt(modes.rest);
        if (K > 0) {
            torch::Tensor k = torch::arange(1, K + 1, f64).view({K, 1});
            torch::Tensor i = torch::arange(n, f64).view({1, n}) + 0.5;
            torch::Tensor phi = std::sqrt(2.0 / n) * torch::cos(M_PI * k * i / double(n));  // [K, n], orthonormal rows
            torch::Tensor amplitude = torch::tensor(modes.variances, f64).sqrt().view({1, K, 1});
            chain = chain + torch::einsum("kn,skc->snc", {phi, torch::randn({numSamples, K, 3}, generator, f64) * amplitude});
        }
        if (runs.size() > 1)
            chain = chain + torch::randn({numSamples, 1, 3}, generator, f64) * ofChain(L, allRna);
        x.slice(1, 3 * begin, 3 * end).add_(chain);
    }
    x = x - x.mean(1, true);
    return x.view({numSamples, L, 3, 3});
}

} // namespace FlashIPAPlugin
