#ifndef FLASHIPA_THREADING_DECOYS_H_
#define FLASHIPA_THREADING_DECOYS_H_

#include "flashipa/EnergyModel.h"
#include <ATen/core/Generator.h>
#include <torch/torch.h>

namespace FlashIPAPlugin {

/** A batch's threading decoys (threadingDecoys()), double on the CPU. */
struct ThreadingDecoys {
    torch::Tensor atoms;  ///< [B, L, 3, 3] nm: the donor's window, centred, plus sigma x eps of the structure itself
    torch::Tensor chains; ///< [B, L] the donor's chain ids over the window (where its backbone breaks)
    torch::Tensor use;    ///< [B] 1 where the structure has a decoy, 0 where no donor exists
};

/**
 * The threading decoys of the trainer's threading contrast (TrainerOptions::threadedWeight, docs/MODEL.md
 * "Threading contrast"): for structure b of a batch (real residues first, the rest padding), a random
 * contiguous window of the clean backbone of another structure d of the same molecule type with at least as
 * many real residues, centred over its atoms, noised with b's own sigma [B] and eps [B, L, 3, 3], to be
 * scored with b's sequence and mask. clean [B, L, 3, 3] are the structures before noise. The draws come
 * from the generator (a donor, then a window start, per structure that has a donor).
 */
ThreadingDecoys threadingDecoys(const StructureBatch& batch, const torch::Tensor& clean, const torch::Tensor& sigma,
                                const torch::Tensor& eps, at::Generator& generator);

} // namespace FlashIPAPlugin

#endif
