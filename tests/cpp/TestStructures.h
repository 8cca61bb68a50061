#ifndef FLASHIPA_TEST_STRUCTURES_H_
#define FLASHIPA_TEST_STRUCTURES_H_
// Synthetic but physically shaped inputs shared by the C++ tests.

#include <cmath>
#include <functional>
#include <random>
#include <torch/torch.h>
#include <vector>

namespace FlashIPATest {

/**
 * Frame atoms [1, L, 3, 3] (nm) of a helical chain: CA on an alpha-helix-like spiral, N and C offset
 * by bond-length vectors plus seeded noise, so no residue is degenerate.
 */
inline torch::Tensor helixAtoms(int L, unsigned seed, torch::Dtype dtype = torch::kFloat64) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> noise(0.0, 0.01);
    std::vector<double> xyz;
    for (int i = 0; i < L; i++) {
        double angle = i * 100.0 * M_PI / 180.0;
        double ca[3] = {0.23 * std::cos(angle), 0.23 * std::sin(angle), 0.15 * i};
        double n[3] = {ca[0] - 0.10 * std::cos(angle + 0.9), ca[1] - 0.10 * std::sin(angle + 0.9), ca[2] - 0.10};
        double c[3] = {ca[0] + 0.08 * std::sin(angle), ca[1] - 0.08 * std::cos(angle), ca[2] + 0.12};
        for (double* atom : {n, ca, c})
            for (int d = 0; d < 3; d++)
                xyz.push_back(atom[d] + noise(rng));
    }
    return torch::tensor(xyz, torch::kFloat64).view({1, L, 3, 3}).to(dtype);
}

/** A random proper rotation matrix [3, 3] (double) from a seeded generator. */
inline torch::Tensor randomRotation(unsigned seed) {
    torch::manual_seed(seed);
    torch::Tensor q = torch::randn({4}, torch::kFloat64);
    q = q / q.norm();
    double w = q[0].item<double>(), x = q[1].item<double>(), y = q[2].item<double>(), z = q[3].item<double>();
    return torch::tensor({1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                          2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                          2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)}, torch::kFloat64).view({3, 3});
}

/** Relative error |a - b| / |b| over whole tensors. */
inline double relativeError(const torch::Tensor& a, const torch::Tensor& b) {
    return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).norm().item<double>() / std::max(b.to(torch::kFloat64).norm().item<double>(), 1e-300);
}

/** The gradient of a scalar function of x by central differences of step h, one entry of x at a time. */
inline torch::Tensor centralDifferences(const std::function<double(const torch::Tensor&)>& f, const torch::Tensor& x, double h) {
    torch::NoGradGuard noGrad;
    torch::Tensor gradient = torch::zeros_like(x);
    for (int64_t i = 0; i < x.numel(); i++) {
        torch::Tensor plus = x.clone(), minus = x.clone();
        plus.view({-1})[i] += h;
        minus.view({-1})[i] -= h;
        gradient.view({-1})[i] = (f(plus) - f(minus)) / (2 * h);
    }
    return gradient;
}

} // namespace FlashIPATest

#endif
