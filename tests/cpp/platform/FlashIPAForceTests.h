// The body of the FlashIPAForce tests, shared by every platform. The including file defines
//   const char* const TestPlatform;               the OpenMM platform name
//   bool platformAvailable();                     registers the plugin's kernels; false skips every test
//   std::map<std::string, std::string> properties();  Context properties (e.g. double precision on CUDA)
#include "FlashIPAForce.h"
#include "TestStructures.h"
#include "flashipa/EnergyModel.h"
#include "flashipa/GeometryPrior.h"
#include "flashipa/ResidueTypes.h"
#include "openmm/Context.h"
#include "openmm/CustomExternalForce.h"
#include "openmm/OpenMMException.h"
#include "openmm/Platform.h"
#include "openmm/System.h"
#include "openmm/VerletIntegrator.h"
#include "openmm/serialization/XmlSerializer.h"
#include <gtest/gtest.h>
#include <filesystem>
#include <memory>
#include <unistd.h>
#include <sstream>

using namespace FlashIPAPlugin;
using namespace OpenMM;

namespace {

struct TestSystem {
    System system;
    FlashIPAForce* force; // owned by system
    std::vector<Vec3> positions;
};

/** L residues (first half protein, second half RNA), three particles each, helical geometry. */
std::unique_ptr<TestSystem> makeSystem(int L, unsigned seed = 1) {
    auto test = std::make_unique<TestSystem>();
    torch::Tensor atoms = FlashIPATest::helixAtoms(L, seed).view({-1, 3});
    test->force = new FlashIPAForce();
    for (int i = 0; i < L; i++) {
        bool rna = i >= L / 2;
        for (int k = 0; k < 3; k++) {
            test->system.addParticle(12.0);
            test->positions.emplace_back(atoms[3 * i + k][0].item<double>(), atoms[3 * i + k][1].item<double>(),
                                         atoms[3 * i + k][2].item<double>());
        }
        test->force->addResidue(3 * i, 3 * i + 1, 3 * i + 2, rna ? ResidueType::FirstNucleotide + i % 4 : i % 20, rna ? 1 : 0);
    }
    test->system.addForce(test->force);
    return test;
}

Platform& platform() {
    return Platform::getPlatformByName(TestPlatform);
}

/** Skips every test where the platform cannot run (no GPU on a CI machine). */
class FlashIPAForceTest : public ::testing::Test {
protected:
    void SetUp() override {
        if (!platformAvailable())
            GTEST_SKIP() << TestPlatform << " platform not available here";
    }
};

double energyOf(Context& context, const std::vector<Vec3>& positions) {
    context.setPositions(positions);
    return context.getState(State::Energy).getPotentialEnergy();
}

/**
 * Relative RMS difference between the platform's forces on every `stride`-th particle and central differences
 * of its energy (step 1e-5 nm); NaN where the energy is not finite or the forces vanish.
 */
double finiteDifferenceForceError(TestSystem& test, size_t stride = 1) {
    VerletIntegrator integrator(0.001);
    Context context(test.system, integrator, platform(), properties());
    context.setPositions(test.positions);
    State state = context.getState(State::Forces | State::Energy);
    if (!std::isfinite(state.getPotentialEnergy()))
        return NAN;
    const double h = 1e-5;
    double errorSquared = 0, normSquared = 0;
    for (size_t i = 0; i < test.positions.size(); i += stride)
        for (int d = 0; d < 3; d++) {
            std::vector<Vec3> plus = test.positions, minus = test.positions;
            plus[i][d] += h;
            minus[i][d] -= h;
            double fd = -(energyOf(context, plus) - energyOf(context, minus)) / (2 * h);
            double analytic = state.getForces()[i][d];
            errorSquared += (fd - analytic) * (fd - analytic);
            normSquared += analytic * analytic;
        }
    return normSquared > 0 ? std::sqrt(errorSquared / normSquared) : NAN;
}

TEST_F(FlashIPAForceTest, ForcesMatchFiniteDifferences) {
    auto test = makeSystem(8);
    EXPECT_LT(finiteDifferenceForceError(*test), 1e-4);  // NaN fails too
}

TEST_F(FlashIPAForceTest, ParameterDerivativesMatchFiniteDifferences) {
    auto test = makeSystem(6);
    VerletIntegrator integrator(0.001);
    Context context(test->system, integrator, platform(), properties());
    context.setPositions(test->positions);
    context.setParameter(FlashIPAForce::Sigma(), 0.2);
    context.setParameter(FlashIPAForce::Scale(), 1.5);
    auto derivatives = context.getState(State::ParameterDerivatives).getEnergyParameterDerivatives();
    for (const std::string& name : {FlashIPAForce::Scale(), FlashIPAForce::Sigma(), FlashIPAForce::Temperature()}) {
        double value = context.getParameter(name), h = 1e-5 * value;
        context.setParameter(name, value + h);
        double plus = context.getState(State::Energy).getPotentialEnergy();
        context.setParameter(name, value - h);
        double minus = context.getState(State::Energy).getPotentialEnergy();
        context.setParameter(name, value);
        double fd = (plus - minus) / (2 * h);
        ASSERT_TRUE(derivatives.count(name)) << name;
        EXPECT_NEAR(derivatives[name], fd, 1e-4 * std::abs(fd) + 1e-10) << name;
    }
}

/**
 * A small model with random weights and the analytic geometry prior of the given version (GeometryPrior.h;
 * version 3 adds the protein backbone chain term that the v2 model trains with, version 4 its bond-correlated
 * form), written to a temporary
 * file whose path is returned. The prior's statistics are plausible bond lengths and widths, not fitted.
 */
std::string writeGeometryPriorModel(int version) {
    ModelConfig config;
    config.geometryPrior = version;
    EnergyModel model(config);
    randomizeParameters(*model, 11, 0.5);
    const int64_t K = (int64_t) GeometryPrior::pairKinds().size();
    model->setGeometryPriorStats(torch::stack({torch::linspace(0.13, 0.4, K), torch::full({K}, 0.01)}, 1));
    if (version >= 4) // the training split's bond covariances (docs/MODEL.md)
        model->setGeometryPriorBondCovariance(torch::tensor({0.00692, 0.00302, 0.00307}, torch::kFloat64));
    const std::string path = (std::filesystem::temp_directory_path() /
                              ("flashipa-prior" + std::to_string(version) + "-" + std::to_string(::getpid()) + ".safetensors")).string();
    saveEnergyModel(model, path);
    return path;
}

/** makeSystem's residues with a model of the given geometry-prior version instead of the shipped one. */
std::unique_ptr<TestSystem> makePriorSystem(int L, int version) {
    auto test = makeSystem(L);
    FlashIPAForce* force = new FlashIPAForce(writeGeometryPriorModel(version));
    for (int i = 0; i < test->force->getNumResidues(); i++) {
        int n, ca, c, type, chain;
        test->force->getResidueParameters(i, n, ca, c, type, chain);
        force->addResidue(n, ca, c, type, chain);
    }
    test->system.removeForce(test->system.getNumForces() - 1);
    test->system.addForce(force);
    test->force = force;
    return test;
}

// Models with the geometry prior (the v2 model's energy is network + prior; versions 3 and 4 solve a
// (block-)tridiagonal system per chain): forces are -dE/dx by central differences on this platform.
TEST_F(FlashIPAForceTest, GeometryPriorModelForcesMatchFiniteDifferences) {
    for (int version : {1, 3, 4, 5, 6}) {
        auto test = makePriorSystem(16, version);
        EXPECT_LT(finiteDifferenceForceError(*test, 2), 1e-4) << "geometry prior version " << version;
    }
}

TEST_F(FlashIPAForceTest, ScaleAndTemperatureAreLinear) {
    auto test = makeSystem(6);
    VerletIntegrator integrator(0.001);
    Context context(test->system, integrator, platform(), properties());
    context.setPositions(test->positions);
    double base = context.getState(State::Energy).getPotentialEnergy();
    EXPECT_NE(base, 0.0);
    context.setParameter(FlashIPAForce::Scale(), 0.0);
    EXPECT_EQ(context.getState(State::Energy).getPotentialEnergy(), 0.0);
    context.setParameter(FlashIPAForce::Scale(), 2.0);
    EXPECT_NEAR(context.getState(State::Energy).getPotentialEnergy(), 2 * base, 1e-12 * std::abs(base));
    context.setParameter(FlashIPAForce::Temperature(), 600.0);
    EXPECT_NEAR(context.getState(State::Energy).getPotentialEnergy(), 4 * base, 1e-12 * std::abs(base));
}

TEST_F(FlashIPAForceTest, InvariantFarFromOrigin) {
    auto test = makeSystem(10);
    VerletIntegrator integrator(0.001);
    Context context(test->system, integrator, platform(), properties());
    context.setPositions(test->positions);
    State before = context.getState(State::Energy | State::Forces);
    torch::Tensor R = FlashIPATest::randomRotation(5);
    auto r = [&](int a, int b) { return R[a][b].item<double>(); };
    auto rotate = [&](const Vec3& v) {
        return Vec3(r(0, 0) * v[0] + r(0, 1) * v[1] + r(0, 2) * v[2], r(1, 0) * v[0] + r(1, 1) * v[1] + r(1, 2) * v[2],
                    r(2, 0) * v[0] + r(2, 1) * v[1] + r(2, 2) * v[2]);
    };
    Vec3 shift(60.0, -60.0, 48.0); // 100 nm from the origin
    std::vector<Vec3> moved;
    for (const Vec3& p : test->positions)
        moved.push_back(rotate(p) + shift);
    context.setPositions(moved);
    State after = context.getState(State::Energy | State::Forces);
    EXPECT_NEAR(after.getPotentialEnergy(), before.getPotentialEnergy(), 1e-6 * std::abs(before.getPotentialEnergy()));
    double error = 0, norm = 0;
    for (size_t i = 0; i < moved.size(); i++) {
        Vec3 diff = after.getForces()[i] - rotate(before.getForces()[i]);
        error += diff.dot(diff);
        norm += before.getForces()[i].dot(before.getForces()[i]);
    }
    EXPECT_LT(std::sqrt(error / norm), 1e-6);
}

// A force made with a relative model path is written with the absolute path, so the XML can be read from
// any working directory (it failed from another folder).
TEST_F(FlashIPAForceTest, SerializedRelativeModelPathIsReadFromAnotherFolder) {
    namespace fs = std::filesystem;
    const fs::path folder = fs::temp_directory_path() / ("flashipa-relative-" + std::to_string(::getpid()));
    fs::create_directories(folder);
    fs::copy_file(FlashIPAForce().getResolvedModelPath(), folder / "model.safetensors", fs::copy_options::overwrite_existing);
    const fs::path original = fs::current_path();
    std::stringstream buffer;
    fs::current_path(folder);
    {
        FlashIPAForce relative("model.safetensors");
        relative.addResidue(0, 1, 2, 0, 0);
        XmlSerializer::serialize<Force>(&relative, "Force", buffer);
    }
    fs::current_path(fs::temp_directory_path());
    std::unique_ptr<Force> copy;
    EXPECT_NO_THROW(copy.reset(XmlSerializer::deserialize<Force>(buffer)));
    fs::current_path(original);
    if (copy)
        EXPECT_EQ(fs::path(dynamic_cast<FlashIPAForce&>(*copy).getModelPath()), folder / "model.safetensors");
    fs::remove_all(folder);
}

// The XML's fields are tested without a platform (serialization/tests); here a restored force must compute the
// same energy on this platform as the original.
TEST_F(FlashIPAForceTest, SerializationRoundTrip) {
    auto test = makeSystem(6);
    test->force->setAttentionBackend("math");
    test->force->setProperty("useCUDAGraphs", "false");
    std::stringstream buffer;
    XmlSerializer::serialize<Force>(test->force, "Force", buffer);
    std::unique_ptr<Force> copy(XmlSerializer::deserialize<Force>(buffer));
    ASSERT_NE(dynamic_cast<FlashIPAForce*>(copy.get()), nullptr);
    // Identical energy in a new Context with the restored force.
    System other;
    for (int i = 0; i < test->system.getNumParticles(); i++)
        other.addParticle(12.0);
    other.addForce(copy.release());
    VerletIntegrator i1(0.001), i2(0.001);
    Context c1(test->system, i1, platform(), properties()), c2(other, i2, platform(), properties());
    double e1 = energyOf(c1, test->positions), e2 = energyOf(c2, test->positions);
    EXPECT_NEAR(e1, e2, 1e-12 * std::abs(e1)); // GPU reductions may differ in the last bits
}

TEST_F(FlashIPAForceTest, ForceGroupsAndUpdateParameters) {
    auto test = makeSystem(6);
    test->force->setForceGroup(2);
    VerletIntegrator integrator(0.001);
    Context context(test->system, integrator, platform(), properties());
    context.setPositions(test->positions);
    double energy = context.getState(State::Energy, false, 1 << 2).getPotentialEnergy();
    EXPECT_NE(energy, 0.0);
    EXPECT_EQ(context.getState(State::Energy, false, 1 << 1).getPotentialEnergy(), 0.0);
    // Change one residue's type: the energy changes, and equals a fresh Context's.
    int a, b, c, type, chain;
    test->force->getResidueParameters(0, a, b, c, type, chain);
    test->force->setResidueParameters(0, a, b, c, (type + 5) % 20, chain);
    test->force->updateParametersInContext(context);
    double updated = context.getState(State::Energy).getPotentialEnergy();
    EXPECT_NE(updated, energy);
    VerletIntegrator integrator2(0.001);
    Context fresh(test->system, integrator2, platform(), properties());
    EXPECT_NEAR(energyOf(fresh, test->positions), updated, 1e-12 * std::abs(updated));
}

TEST_F(FlashIPAForceTest, PeriodicSystemSeesWholeChains) {
    // A small periodic box: the chain spans several boxes. The model is non-periodic, and OpenMM's
    // wrapping moves whole molecules (the force bonds each chain), so energies are unchanged.
    auto test = makeSystem(12);
    test->system.setDefaultPeriodicBoxVectors(Vec3(1.0, 0, 0), Vec3(0, 1.0, 0), Vec3(0, 0, 1.0));
    VerletIntegrator integrator(0.001);
    Context context(test->system, integrator, platform(), properties());
    double energy = energyOf(context, test->positions);
    std::vector<Vec3> wrapped = context.getState(State::Positions, true).getPositions();
    EXPECT_NEAR(energyOf(context, wrapped), energy, 1e-9 * std::abs(energy));
    auto plain = makeSystem(12);
    VerletIntegrator integrator2(0.001);
    Context nonPeriodic(plain->system, integrator2, platform(), properties());
    EXPECT_NEAR(energyOf(nonPeriodic, test->positions), energy, 1e-12 * std::abs(energy));
}

void expectError(const std::function<void()>& action, const std::string& text) {
    try {
        action();
        ADD_FAILURE() << "expected an OpenMMException containing '" << text << "'";
    } catch (const OpenMMException& e) {
        EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
}

// The default is "auto". "auto" in the shared body's precision
// (double, on every platform) is the SDPA path, bit for bit; the fused backends are refused there with a
// message naming the backend.
TEST_F(FlashIPAForceTest, AutoBackendIsSDPAInDoublePrecision) {
    auto test = makeSystem(10);
    EXPECT_EQ(test->force->getAttentionBackend(), "auto");
    auto evaluate = [&] {
        VerletIntegrator integrator(0.001);
        Context context(test->system, integrator, platform(), properties());
        context.setPositions(test->positions);
        return context.getState(State::Energy | State::Forces);
    };
    State automatic = evaluate();
    test->force->setAttentionBackend("sdpa");
    State sdpa = evaluate();
    EXPECT_EQ(automatic.getPotentialEnergy(), sdpa.getPotentialEnergy());
    for (size_t i = 0; i < sdpa.getForces().size(); i++)
        EXPECT_EQ(automatic.getForces()[i], sdpa.getForces()[i]) << i;
    for (const std::string name : {"fused", "fused-fp32"}) {
        test->force->setAttentionBackend(name);
        expectError([&] { evaluate(); }, "\"" + name + "\" attention backend");
    }
}

TEST_F(FlashIPAForceTest, BadInputGivesClearErrors) {
    auto makeContext = [](TestSystem& test) {
        VerletIntegrator integrator(0.001);
        Context context(test.system, integrator, platform(), properties());
        context.setPositions(test.positions);
        context.getState(State::Energy | State::Forces);
    };
    {
        auto test = makeSystem(4);
        test->positions[4] = test->positions[5]; // residue 1: b == c
        expectError([&] { makeContext(*test); }, "coincident");
    }
    {
        auto test = makeSystem(4);
        test->positions[3] = test->positions[4] + (test->positions[5] - test->positions[4]) * 2.0; // a, b, c on a line
        expectError([&] { makeContext(*test); }, "collinear");
    }
    {
        // A labelled residue is named by its label (createForce labels residues after the input file).
        auto test = makeSystem(4);
        test->force->setResidueLabel(2, "LYS 25 of chain B");
        test->positions[8] = test->positions[7];
        expectError([&] { makeContext(*test); }, "frame atoms of residue 2 (LYS 25 of chain B) are coincident");
    }
    {
        auto test = makeSystem(4);
        test->positions[7] = Vec3(NAN, 0, 0);
        expectError([&] { makeContext(*test); }, "non-finite");
    }
    {
        auto test = makeSystem(4);
        test->force->setResidueParameters(1, 3, 4, 99, 2, 0);
        expectError([&] { makeContext(*test); }, "out of range");
    }
    {
        auto test = makeSystem(4);
        test->force->setResidueParameters(1, 3, 4, 4, 2, 0);
        expectError([&] { makeContext(*test); }, "used twice");
    }
    {
        auto test = makeSystem(4);
        test->force->setResidueParameters(1, 3, 4, 1, 2, 0);
        expectError([&] { makeContext(*test); }, "already belongs");
    }
    {
        auto test = makeSystem(4);
        test->force->setResidueParameters(1, 3, 4, 5, 26, 0);
        expectError([&] { makeContext(*test); }, "residue type 26");
    }
    {
        TestSystem empty;
        empty.system.addParticle(1.0);
        empty.positions.emplace_back(0, 0, 0);
        empty.system.addForce(new FlashIPAForce());
        expectError([&] { makeContext(empty); }, "no residues");
    }
    expectError([] { FlashIPAForce("/nonexistent/model.safetensors"); }, "model.safetensors");
    expectError([] { FlashIPAForce().setAttentionBackend("flash"); }, "unknown attention backend");
    expectError([] { FlashIPAForce().setDefaultSigma(-1.0); }, "sigma");
    {
        auto test = makeSystem(4);
        VerletIntegrator integrator(0.001);
        Context context(test->system, integrator, platform(), properties());
        context.setPositions(test->positions);
        context.setParameter(FlashIPAForce::Sigma(), 0.0);
        expectError([&] { context.getState(State::Energy); }, "must be a positive, finite");
        context.setParameter(FlashIPAForce::Sigma(), INFINITY);
        expectError([&] { context.getState(State::Energy); }, "must be a positive, finite");
        context.setParameter(FlashIPAForce::Sigma(), 0.1);
        context.setParameter(FlashIPAForce::Scale(), NAN);
        expectError([&] { context.getState(State::Energy); }, "must be finite");
        context.setParameter(FlashIPAForce::Scale(), 1.0);
        context.setParameter(FlashIPAForce::Temperature(), INFINITY);
        expectError([&] { context.getState(State::Energy | State::Forces); }, "must be a positive, finite");
    }
    expectError([] { FlashIPAForce().setDegenerateFramePolicy("ignore"); }, "\"error\" or \"skip\"");
}

// The "skip" degenerate-frame policy: a degenerate residue drops out of the model (masked as padding), so
// the energy no longer depends on where its atoms are, its atoms get no force, the rest still obey
// -dE/dx (finite differences), and every skipped evaluation is counted. Without degenerate residues "skip"
// computes exactly what "error" does.
TEST_F(FlashIPAForceTest, SkipPolicyLeavesDegenerateResiduesOut) {
    auto test = makeSystem(8);
    auto evaluate = [&](const std::vector<Vec3>& positions, const std::string& policy, long long* skipped = nullptr) {
        test->force->setDegenerateFramePolicy(policy);
        VerletIntegrator integrator(0.001);
        Context context(test->system, integrator, platform(), properties());
        context.setPositions(positions);
        State state = context.getState(State::Energy | State::Forces);
        if (skipped)
            *skipped = test->force->getNumSkippedResidues(context);
        return state;
    };
    State error = evaluate(test->positions, "error"), skip = evaluate(test->positions, "skip");
    EXPECT_EQ(error.getPotentialEnergy(), skip.getPotentialEnergy());

    // Residue 2 (particles 6-8, protein): c on b. Then moved elsewhere, still degenerate, and made non-finite.
    std::vector<Vec3> collapsed = test->positions;
    collapsed[8] = collapsed[7];
    std::vector<Vec3> moved = collapsed;
    for (int k = 6; k < 9; k++)
        moved[k] = Vec3(3.0, -2.0, 1.0);
    std::vector<Vec3> nonFinite = collapsed;
    nonFinite[6] = Vec3(NAN, 0, 0);
    expectError([&] { evaluate(collapsed, "error"); }, "coincident");
    long long skipped = 0;
    State a = evaluate(collapsed, "skip", &skipped);
    EXPECT_EQ(skipped, 1);
    State b = evaluate(moved, "skip"), c = evaluate(nonFinite, "skip");
    ASSERT_TRUE(std::isfinite(a.getPotentialEnergy()));
    EXPECT_NE(a.getPotentialEnergy(), error.getPotentialEnergy());
    const double tolerance = 1e-6 * std::abs(a.getPotentialEnergy()) + 1e-9;
    EXPECT_NEAR(b.getPotentialEnergy(), a.getPotentialEnergy(), tolerance);
    EXPECT_NEAR(c.getPotentialEnergy(), a.getPotentialEnergy(), tolerance);
    for (int k = 6; k < 9; k++) {
        EXPECT_EQ(a.getForces()[k], Vec3(0, 0, 0)) << k;
        EXPECT_EQ(c.getForces()[k], Vec3(0, 0, 0)) << k;
    }
    for (size_t k = 0; k < collapsed.size(); k++)
        for (int d = 0; d < 3; d++)
            ASSERT_TRUE(std::isfinite(c.getForces()[k][d])) << k;

    // Finite differences on the residues that remain, in one Context (the count grows with each evaluation).
    test->force->setDegenerateFramePolicy("skip");
    VerletIntegrator integrator(0.001);
    Context context(test->system, integrator, platform(), properties());
    const double h = 1e-5;
    double errorSquared = 0, normSquared = 0;
    int evaluations = 0;
    for (int i : {0, 4, 10, 14, 20}) {
        for (int d = 0; d < 3; d++) {
            std::vector<Vec3> plus = collapsed, minus = collapsed;
            plus[i][d] += h;
            minus[i][d] -= h;
            double fd = -(energyOf(context, plus) - energyOf(context, minus)) / (2 * h);
            evaluations += 2;
            errorSquared += (fd - a.getForces()[i][d]) * (fd - a.getForces()[i][d]);
            normSquared += a.getForces()[i][d] * a.getForces()[i][d];
        }
    }
    ASSERT_GT(normSquared, 0.0);
    EXPECT_LT(std::sqrt(errorSquared / normSquared), 1e-4);
    EXPECT_EQ(test->force->getNumSkippedResidues(context), evaluations);

    // The policy survives XML.
    std::stringstream xml;
    XmlSerializer::serialize<Force>(test->force, "Force", xml);
    std::unique_ptr<Force> copy(XmlSerializer::deserialize<Force>(xml));
    EXPECT_EQ(dynamic_cast<const FlashIPAForce&>(*copy).getDegenerateFramePolicy(), "skip");
}

} // namespace
