#ifndef CUDA_FLASHIPA_KERNEL_FACTORY_H_
#define CUDA_FLASHIPA_KERNEL_FACTORY_H_

#include "openmm/KernelFactory.h"

namespace FlashIPAPlugin {

/** Creates the CUDA platform's FlashIPA kernels. */
class CudaFlashIPAKernelFactory : public OpenMM::KernelFactory {
public:
    OpenMM::KernelImpl* createKernelImpl(std::string name, const OpenMM::Platform& platform, OpenMM::ContextImpl& context) const override;
};

} // namespace FlashIPAPlugin

#endif
