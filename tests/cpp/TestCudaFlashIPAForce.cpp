// FlashIPAForce on the CUDA platform: the shared body (in double precision, against the same oracles
// as Reference) plus CUDA-only behaviour. The plugin libraries are loaded at run time, so this program
// starts on machines without a GPU or driver and reports every test as skipped there.
#include "openmm/Context.h"
#include "openmm/CustomCVForce.h"
#include "openmm/HarmonicBondForce.h"
#include "openmm/System.h"
#include "openmm/VerletIntegrator.h"
#include <cmath>
#include <cstdio>
#include "openmm/LocalEnergyMinimizer.h"
#include "openmm/NonbondedForce.h"
#include "openmm/Platform.h"
#include "openmm/reference/ReferencePlatform.h"
#include <map>
#include <string>

extern "C" void registerFlashIPAReferenceKernelFactories();
static const char* const TestPlatform = "CUDA";

static bool platformAvailable() {
    static int state = -1;
    if (state < 0) {
        state = 0;
        try {
            registerFlashIPAReferenceKernelFactories();
            OpenMM::Platform::loadPluginLibrary(FLASHIPA_OPENMM_PLUGIN_DIR "/libOpenMMCUDA.so");
            OpenMM::Platform::loadPluginLibrary(FLASHIPA_LIB_DIR "/libOpenMMFlashIPACUDA.so");
            OpenMM::System system;
            system.addParticle(1.0);
            OpenMM::VerletIntegrator integrator(0.001);
            OpenMM::Context context(system, integrator, OpenMM::Platform::getPlatformByName("CUDA"));
            state = 1;
        } catch (const std::exception& e) {
            std::printf("CUDA tests skipped: %s\n", e.what());
        }
    }
    return state == 1;
}

static std::map<std::string, std::string> properties() {
    return {{"Precision", "double"}};
}

#include "platform/FlashIPAForceTests.h"

namespace {

struct Evaluation {
    double energy;
    std::vector<Vec3> forces;
};

Evaluation evaluate(System& system, const std::vector<Vec3>& positions, const std::string& platformName,
                    const std::map<std::string, std::string>& props = {}) {
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, Platform::getPlatformByName(platformName), props);
    context.setPositions(positions);
    State state = context.getState(State::Energy | State::Forces);
    return {state.getPotentialEnergy(), state.getForces()};
}

double relativeForceError(const std::vector<Vec3>& a, const std::vector<Vec3>& b) {
    double error = 0, norm = 0;
    for (size_t i = 0; i < a.size(); i++) {
        error += (a[i] - b[i]).dot(a[i] - b[i]);
        norm += b[i].dot(b[i]);
    }
    return std::sqrt(error / norm);
}

// The platform's precision modes with the SDPA path ("auto" runs the fused kernels in
// single and mixed precision: tested below).
TEST_F(FlashIPAForceTest, MatchesReferenceInEveryPrecision) {
    auto test = makeSystem(40);
    test->force->setAttentionBackend("sdpa");
    Evaluation reference = evaluate(test->system, test->positions, "Reference");
    const std::map<std::string, double> tolerance = {{"double", 1e-9}, {"mixed", 1e-4}, {"single", 1e-4}};
    for (const auto& [precision, tol] : tolerance) {
        for (const std::string graphs : {"true", "false"}) {
            test->force->setProperty("useCUDAGraphs", graphs);
            Evaluation cuda = evaluate(test->system, test->positions, "CUDA", {{"Precision", precision}});
            EXPECT_NEAR(cuda.energy, reference.energy, tol * std::abs(reference.energy)) << precision << " graphs=" << graphs;
            EXPECT_LT(relativeForceError(cuda.forces, reference.forces), tol) << precision << " graphs=" << graphs;
        }
    }
}

// The fused attention kernels as the force's backend: energies and forces against the Reference
// platform (sdpa, double), eager and replayed from CUDA graphs, over a few MD steps; refused with a
// clear message in double precision, where they do not run. Tolerances (relative): "fused-fp32" 1e-4,
// as the SDPA path in mixed precision; "fused" and "auto" round the attention's scalar
// operands and probabilities to fp16 (relative rounding 2^-12 per operand), 3e-3 on energy and forces.
TEST_F(FlashIPAForceTest, FusedBackendMatchesReference) {
    auto test = makeSystem(40);
    Evaluation reference = evaluate(test->system, test->positions, "Reference");
    const std::vector<std::pair<std::string, double>> backends = {{"fused-fp32", 1e-4}, {"fused", 3e-3}, {"auto", 3e-3}};
    for (const auto& [backend, tol] : backends) {
        test->force->setAttentionBackend(backend);
        for (const std::string precision : {"single", "mixed"})
            for (const std::string graphs : {"true", "false"}) {
                test->force->setProperty("useCUDAGraphs", graphs);
                Evaluation cuda = evaluate(test->system, test->positions, "CUDA", {{"Precision", precision}});
                const double energyError = std::abs(cuda.energy - reference.energy) / std::abs(reference.energy);
                const double forceError = relativeForceError(cuda.forces, reference.forces);
                std::printf("%s %s graphs=%s: relative energy error %.3g, force error %.3g\n", backend.c_str(), precision.c_str(),
                            graphs.c_str(), energyError, forceError);
                EXPECT_LT(energyError, tol) << backend << " " << precision << " graphs=" << graphs;
                EXPECT_LT(forceError, tol) << backend << " " << precision << " graphs=" << graphs;
            }
        VerletIntegrator integrator(0.0005);
        Context context(test->system, integrator, platform(), {{"Precision", "mixed"}});
        context.setPositions(test->positions);
        integrator.step(20); // captured and replayed
        State state = context.getState(State::Energy | State::Forces | State::Positions);
        test->force->setAttentionBackend("sdpa"); // for the Reference oracle; the running context keeps its backend
        EXPECT_LT(relativeForceError(state.getForces(), evaluate(test->system, state.getPositions(), "Reference").forces), tol) << backend;
        test->force->setAttentionBackend(backend);
        if (backend == "auto") // double precision: "auto" is sdpa there (the shared body checks it)
            continue;
        try {
            evaluate(test->system, test->positions, "CUDA", {{"Precision", "double"}});
            FAIL() << "the " << backend << " backend ran in double precision";
        } catch (const OpenMMException& e) {
            EXPECT_NE(std::string(e.what()).find("single precision"), std::string::npos) << e.what();
        }
    }
}

// "auto" in single and mixed precision is the "fused" backend: the same kernels, so the same numbers up
// to the order of the backward's atomic additions.
TEST_F(FlashIPAForceTest, AutoIsFusedInMixedPrecision) {
    auto test = makeSystem(40);
    test->force->setAttentionBackend("auto");
    Evaluation automatic = evaluate(test->system, test->positions, "CUDA", {{"Precision", "mixed"}});
    test->force->setAttentionBackend("fused");
    Evaluation fused = evaluate(test->system, test->positions, "CUDA", {{"Precision", "mixed"}});
    test->force->setAttentionBackend("sdpa");
    Evaluation sdpa = evaluate(test->system, test->positions, "CUDA", {{"Precision", "mixed"}});
    EXPECT_NEAR(automatic.energy, fused.energy, 1e-6 * std::abs(fused.energy));
    EXPECT_LT(relativeForceError(automatic.forces, fused.forces), 1e-5);
    // ... and not the SDPA path: fp16 rounding moves the forces far more than the atomics' order does.
    EXPECT_GT(relativeForceError(automatic.forces, sdpa.forces), 1e-4);
}

TEST_F(FlashIPAForceTest, GraphReplayEqualsEagerOver100Steps) {
    auto withGraphs = makeSystem(24), eager = makeSystem(24);
    eager->force->setProperty("useCUDAGraphs", "false");
    VerletIntegrator i1(0.0005), i2(0.0005);
    Context c1(withGraphs->system, i1, platform(), {{"Precision", "mixed"}});
    Context c2(eager->system, i2, platform(), {{"Precision", "mixed"}});
    c1.setPositions(withGraphs->positions);
    c2.setPositions(eager->positions);
    for (int step = 0; step < 100; step++) {
        i1.step(1);
        i2.step(1);
        if (step % 10 == 9) {
            State s1 = c1.getState(State::Energy | State::Forces), s2 = c2.getState(State::Energy | State::Forces);
            EXPECT_NEAR(s1.getPotentialEnergy(), s2.getPotentialEnergy(), 1e-5 * std::abs(s2.getPotentialEnergy())) << step;
            EXPECT_LT(relativeForceError(s1.getForces(), s2.getForces()), 1e-5) << step;
        }
    }
}

// Geometry-prior models of versions 3 (the v2 model's energy) and 4 in mixed precision, eager and replayed from
// a CUDA graph over MD steps, against the Reference platform in double at the same positions: the prior's
// tridiagonal (version 3) and block-tridiagonal (version 4) solves run inside the captured graph. Tolerance
// 1e-4 relative, as the SDPA path in mixed precision.
TEST_F(FlashIPAForceTest, GeometryPriorModelInGraphsMatchesReference) {
    for (int version : {3, 4}) {
        SCOPED_TRACE("geometry prior version " + std::to_string(version));
        auto test = makePriorSystem(40, version);
        test->force->setAttentionBackend("sdpa");
        for (const std::string graphs : {"true", "false"}) {
            test->force->setProperty("useCUDAGraphs", graphs);
            VerletIntegrator integrator(0.0002);
            Context context(test->system, integrator, platform(), {{"Precision", "mixed"}});
            context.setPositions(test->positions);
            for (int round = 0; round < 3; round++) {
                integrator.step(5);
                State state = context.getState(State::Positions | State::Energy | State::Forces);
                Evaluation reference = evaluate(test->system, state.getPositions(), "Reference");
                EXPECT_NEAR(state.getPotentialEnergy(), reference.energy, 1e-4 * std::abs(reference.energy)) << "graphs=" << graphs;
                EXPECT_LT(relativeForceError(state.getForces(), reference.forces), 1e-4) << "graphs=" << graphs;
            }
        }
    }
}

TEST_F(FlashIPAForceTest, ParameterChangesBetweenStepsTakeEffect) {
    auto test = makeSystem(16);
    test->force->setAttentionBackend("sdpa"); // fp32 attention: the 1e-4 bar tests the parameters, not fp16 rounding
    VerletIntegrator integrator(0.0005);
    Context context(test->system, integrator, platform(), {{"Precision", "mixed"}});
    context.setPositions(test->positions);
    integrator.step(5); // the graph is captured by now
    std::vector<Vec3> positions = context.getState(State::Positions).getPositions();
    for (double sigma : {0.05, 0.3, 1.0}) {
        context.setParameter(FlashIPAForce::Sigma(), sigma);
        context.setParameter(FlashIPAForce::Scale(), 2 * sigma);
        integrator.step(1);
        context.setPositions(positions);
        double graphed = context.getState(State::Energy).getPotentialEnergy();
        test->force->setDefaultSigma(sigma);
        test->force->setDefaultScale(2 * sigma);
        Evaluation reference = evaluate(test->system, positions, "Reference");
        EXPECT_NEAR(graphed, reference.energy, 1e-4 * std::abs(reference.energy)) << sigma;
    }
}

TEST_F(FlashIPAForceTest, TwoContextsOnOneGPU) {
    auto a = makeSystem(12, 1), b = makeSystem(20, 2);
    VerletIntegrator i1(0.001), i2(0.001);
    Context c1(a->system, i1, platform(), properties()), c2(b->system, i2, platform(), properties());
    c1.setPositions(a->positions);
    c2.setPositions(b->positions);
    for (int round = 0; round < 3; round++) {
        double e1 = c1.getState(State::Energy).getPotentialEnergy();
        double e2 = c2.getState(State::Energy).getPotentialEnergy();
        EXPECT_NEAR(e1, evaluate(a->system, a->positions, "Reference").energy, 1e-6 * std::abs(e1));
        EXPECT_NEAR(e2, evaluate(b->system, b->positions, "Reference").energy, 1e-6 * std::abs(e2));
    }
}

TEST_F(FlashIPAForceTest, SolvatedPeriodicBoxWithReordering) {
    // PME solvent around the chain in a box smaller than the chain: OpenMM reorders and wraps molecules
    // every so often; the force must still see the chain whole and match Reference on the same positions.
    auto test = makeSystem(30);
    const double box = 3.0;
    test->system.setDefaultPeriodicBoxVectors(Vec3(box, 0, 0), Vec3(0, box, 0), Vec3(0, 0, box));
    auto* nonbonded = new NonbondedForce();
    nonbonded->setNonbondedMethod(NonbondedForce::PME);
    nonbonded->setCutoffDistance(0.9);
    nonbonded->setForceGroup(1);
    std::mt19937 rng(3);
    std::uniform_real_distribution<double> uniform(0.0, box);
    for (int i = 0; i < test->system.getNumParticles(); i++)
        nonbonded->addParticle(0.0, 0.3, 0.1);
    for (int i = 0; i < 600; i++) {
        test->system.addParticle(18.0);
        nonbonded->addParticle(i % 2 ? 0.4 : -0.4, 0.3, 0.5);
        test->positions.emplace_back(uniform(rng), uniform(rng), uniform(rng));
    }
    test->system.addForce(nonbonded);
    test->force->setForceGroup(2);
    test->force->setAttentionBackend("sdpa"); // fp32 attention: the 1e-4 bar tests the reordering, not fp16 rounding
    VerletIntegrator integrator(0.0002);
    Context context(test->system, integrator, platform(), {{"Precision", "mixed"}});
    context.setPositions(test->positions);
    LocalEnergyMinimizer::minimize(context, 100.0, 200);
    integrator.step(300); // several reorderings
    std::vector<Vec3> positions = context.getState(State::Positions).getPositions();
    double cuda = context.getState(State::Energy, false, 1 << 2).getPotentialEnergy();
    auto plain = makeSystem(30);
    std::vector<Vec3> chain(positions.begin(), positions.begin() + plain->positions.size());
    double reference = evaluate(plain->system, chain, "Reference").energy;
    EXPECT_NEAR(cuda, reference, 1e-4 * std::abs(reference));
}

TEST_F(FlashIPAForceTest, InsideCustomCVForceAndMinimizer) {
    auto test = makeSystem(10);
    double direct = evaluate(test->system, test->positions, "Reference").energy;
    System system;
    for (int i = 0; i < test->system.getNumParticles(); i++)
        system.addParticle(12.0);
    auto* cv = new CustomCVForce("2*learned");
    auto* learned = new FlashIPAForce();
    for (int i = 0; i < test->force->getNumResidues(); i++) {
        int a, b, c, type, chain;
        test->force->getResidueParameters(i, a, b, c, type, chain);
        learned->addResidue(a, b, c, type, chain);
    }
    cv->addCollectiveVariable("learned", learned);
    system.addForce(cv);
    // The learned energy alone is not bounded away from degenerate frames (docs/DESIGN-DECISIONS.md): keep each
    // residue's frame at its starting geometry with stiff bonds, as any real System's force field does.
    auto* bonds = new HarmonicBondForce();
    for (int i = 0; i < test->force->getNumResidues(); i++) {
        int atoms[3], type, chain;
        test->force->getResidueParameters(i, atoms[0], atoms[1], atoms[2], type, chain);
        for (int j = 0; j < 3; j++)
            for (int k = j + 1; k < 3; k++) {
                Vec3 d = test->positions[atoms[j]] - test->positions[atoms[k]];
                bonds->addBond(atoms[j], atoms[k], std::sqrt(d.dot(d)), 2e5);
            }
    }
    system.addForce(bonds);
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, platform(), properties());
    context.setPositions(test->positions);
    EXPECT_NEAR(context.getState(State::Energy).getPotentialEnergy(), 2 * direct, 1e-6 * std::abs(direct));
    LocalEnergyMinimizer::minimize(context, 10.0, 50);
    double minimised = context.getState(State::Energy).getPotentialEnergy();
    EXPECT_TRUE(std::isfinite(minimised));
    EXPECT_LE(minimised, 2 * direct);
}

} // namespace
