#ifndef FLASHIPA_GEOMETRY_PRIOR_STATISTICS_H_
#define FLASHIPA_GEOMETRY_PRIOR_STATISTICS_H_

#include "flashipa/GeometryPrior.h"
#include <torch/torch.h>

namespace FlashIPAPlugin {

class Dataset;

/**
 * The geometry prior's statistics, measured on a data set's training split by the trainer and stored in the
 * model's checkpoint (GeometryPrior.h holds the energy they parameterise; docs/MODEL.md, "Geometry prior" and
 * "The bond-correlated chain term"). In the training library: the model library reads checkpoints, never data sets.
 */
namespace GeometryPrior {
    /** (d0, s0) per kind [K, 2] (nm, float64, CPU): median and 1.4826 x median absolute deviation of each pair
     *  kind's distance over the training split. */
    torch::Tensor measure(const Dataset& data);
    /**
     * Version 4's bond covariances (c0, c1, c2) [3] (nm^2 per component, float64, CPU): the mean dot product,
     * divided by 3, of a protein backbone bond (N-CA, CA-C, C-N+1) with itself, with the next bond along the
     * path and with the one after, over the unbroken chain segments of a data set's training split. Where
     * the banded covariance these define would be nearly singular (its symbol c0 + 2 c1 cos t + 2 c2 cos 2t
     * below MinimumBondSpectrum c0 at some t, as a small data set can give), c1 and c2 are shrunk together
     * until it is not, so that every chain's covariance stays positive definite.
     */
    torch::Tensor measureBondCovariance(const Dataset& data);
    /** The smallest value of the bond covariance's symbol, in units of c0, that measureBondCovariance() allows. */
    constexpr double MinimumBondSpectrum = 0.005;
}

} // namespace FlashIPAPlugin

#endif
