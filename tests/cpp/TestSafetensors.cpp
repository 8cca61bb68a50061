// Tests of the safetensors reader/writer and SHA-256 (models/src/Checkpoint.cpp).

#include "flashipa/Checkpoint.h"

#include <cstdint>
#include <cstdio>
#include <dirent.h>
#include <fstream>
#include <gtest/gtest.h>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

using namespace FlashIPAPlugin;

namespace {

bool exists(const std::string& path) {
    struct stat info;
    return ::stat(path.c_str(), &info) == 0;
}

/**
 * A scratch directory removed when the test ends. POSIX calls rather than std::filesystem: the
 * LibTorch wheel exports its own copies of those symbols, and remove_all() through them crashes.
 */
class SafetensorsTest : public ::testing::Test {
protected:
    void SetUp() override {
        std::string pattern = "/tmp/flashipa_safetensors_XXXXXX";
        ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
        dir_ = pattern;
    }
    void TearDown() override {
        // The tests only create plain files directly inside dir_.
        if (DIR* d = ::opendir(dir_.c_str())) {
            while (dirent* entry = ::readdir(d))
                if (std::string(entry->d_name) != "." && std::string(entry->d_name) != "..")
                    ::unlink(path(entry->d_name).c_str());
            ::closedir(d);
        }
        ::rmdir(dir_.c_str());
    }
    std::string path(const std::string& name) const { return dir_ + "/" + name; }

    std::string dir_;
};

std::string readBytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

void writeBytes(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(bytes.data(), bytes.size());
}

std::string le64(uint64_t n) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; i++)
        s[i] = static_cast<char>(n >> (8 * i));
    return s;
}

/** A file assembled by hand: length prefix, the given JSON header, then the data bytes. */
std::string makeFile(const std::string& json, const std::string& data) { return le64(json.size()) + json + data; }

/** Expects parse() to throw std::runtime_error whose message contains every given substring. */
void expectRejected(const std::string& bytes, const std::vector<std::string>& fragments) {
    try {
        Safetensors::parse(bytes, "bad.safetensors");
        ADD_FAILURE() << "parse() accepted a defective file; expected an error containing '" << fragments[0] << "'";
    } catch (const std::runtime_error& e) {
        std::string message = e.what();
        EXPECT_EQ(message.rfind("bad.safetensors: ", 0), 0u) << message;
        for (const std::string& f : fragments)
            EXPECT_NE(message.find(f), std::string::npos) << "message '" << message << "' lacks '" << f << "'";
    }
}

/** A valid one-tensor file, as a base for the corruption tests: F32 [2] = {1.5, -2.0}. */
const std::string TwoFloats("\x00\x00\xc0\x3f\x00\x00\x00\xc0", 8);

} // namespace

TEST_F(SafetensorsTest, RoundTripEveryDtype) {
    torch::manual_seed(7);
    std::vector<std::pair<std::string, torch::Tensor>> tensors = {
        {"f64", torch::randn({3, 2}, torch::kFloat64)},
        {"f32", torch::randn({4}, torch::kFloat32)},
        {"f16", torch::randn({2, 3}, torch::kFloat16)},
        {"bf16", torch::randn({5}, torch::kBFloat16)},
        {"i64", torch::tensor({int64_t(-1) << 40, int64_t(0), int64_t(7)}, torch::kInt64)},
        {"i32", torch::randint(-1000, 1000, {2, 2, 2}, torch::kInt32)},
        {"u8", torch::arange(0, 256, torch::kInt64).to(torch::kUInt8)},
        {"bool", torch::tensor({true, false, true})},
        {"scalar", torch::tensor(3.25, torch::kFloat32)},                 // 0-d
        {"empty", torch::empty({0, 3}, torch::kFloat32)},                 // no bytes at all
        {"transposed", torch::arange(6, torch::kFloat32).reshape({2, 3}).t()}, // non-contiguous input
        {"a name with \"quotes\" and \\", torch::ones({1}, torch::kInt32)},   // needs JSON escaping
    };
    std::map<std::string, std::string> metadata = {{"format", "pt"}, {"config", "{\"nodeDim\": 64}\n"}};
    const std::string file = path("all.safetensors");
    Safetensors::write(file, tensors, metadata);
    EXPECT_FALSE(exists(file + ".tmp"));

    SafetensorsContents read = Safetensors::read(file);
    EXPECT_EQ(read.metadata, metadata);
    ASSERT_EQ(read.tensors.size(), tensors.size());
    for (size_t i = 0; i < tensors.size(); i++) {
        SCOPED_TRACE(tensors[i].first);
        EXPECT_EQ(read.tensors[i].first, tensors[i].first); // file order = order given to write()
        const torch::Tensor& got = read.tensors[i].second;
        EXPECT_EQ(got.scalar_type(), tensors[i].second.scalar_type());
        EXPECT_EQ(got.sizes(), tensors[i].second.sizes());
        EXPECT_TRUE(got.device().is_cpu());
        EXPECT_TRUE(torch::equal(got, tensors[i].second));
    }
    EXPECT_EQ(read.tensors[8].second.dim(), 0);
    EXPECT_FLOAT_EQ(read.tensors[8].second.item<float>(), 3.25f);
}

TEST_F(SafetensorsTest, RoundTripWithoutMetadataOrTensors) {
    const std::string file = path("empty.safetensors");
    Safetensors::write(file, {}, {});
    SafetensorsContents read = Safetensors::read(file);
    EXPECT_TRUE(read.tensors.empty());
    EXPECT_TRUE(read.metadata.empty());
}

TEST_F(SafetensorsTest, ReadTensorsOwnTheirMemory) {
    std::string bytes = makeFile(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", TwoFloats);
    SafetensorsContents read = Safetensors::parse(bytes, "mem");
    bytes.assign(bytes.size(), '\xff'); // clobber the buffer; the tensor must not alias it
    EXPECT_FLOAT_EQ(read.tensors[0].second[0].item<float>(), 1.5f);
}

TEST_F(SafetensorsTest, FileStartsWithHeaderLength) {
    const std::string file = path("layout.safetensors");
    torch::Tensor x = torch::arange(5, torch::kFloat64);
    Safetensors::write(file, {{"x", x}}, {{"k", "v"}});
    const std::string bytes = readBytes(file);
    ASSERT_GE(bytes.size(), 8u);
    uint64_t n = 0;
    for (int i = 0; i < 8; i++)
        n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
    EXPECT_EQ(n % 8, 0u);                           // padded so data is 8-byte aligned
    EXPECT_EQ(bytes.size(), 8 + n + 5 * sizeof(double)); // nothing but header and data
    EXPECT_EQ(bytes[8], '{');
    const std::string header = bytes.substr(8, n);
    EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}')); // only spaces after the JSON object
    EXPECT_NE(header.find("\"dtype\":\"F64\""), std::string::npos);
    EXPECT_NE(header.find("\"data_offsets\":[0,40]"), std::string::npos);
    // Raw data: the doubles 0..4 in little-endian order right after the header.
    double values[5];
    std::memcpy(values, bytes.data() + 8 + n, sizeof(values));
    for (int i = 0; i < 5; i++)
        EXPECT_EQ(values[i], static_cast<double>(i));
}

TEST_F(SafetensorsTest, ParseHandWrittenFile) {
    // An oracle independent of write(): JSON written by hand, padded with spaces, keys out of data order.
    const std::string json = R"({"__metadata__":{"who":"hand"},)"
                             R"("b":{"dtype":"I64","shape":[1,1],"data_offsets":[8,16]},)"
                             R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("flag":{"dtype":"BOOL","shape":[],"data_offsets":[16,17]}}   )";
    const std::string data = TwoFloats + std::string("\xfe\xff\xff\xff\xff\xff\xff\xff", 8) + std::string("\x01", 1);
    SafetensorsContents read = Safetensors::parse(makeFile(json, data), "hand");
    EXPECT_EQ(read.metadata, (std::map<std::string, std::string>{{"who", "hand"}}));
    ASSERT_EQ(read.tensors.size(), 3u);
    EXPECT_EQ(read.tensors[0].first, "a"); // ordered by data offset, not by JSON order
    EXPECT_EQ(read.tensors[1].first, "b");
    EXPECT_EQ(read.tensors[2].first, "flag");
    const torch::Tensor& a = read.tensors[0].second;
    EXPECT_EQ(a.scalar_type(), torch::kFloat32);
    EXPECT_EQ(a.sizes(), torch::IntArrayRef({2}));
    EXPECT_EQ(a[0].item<float>(), 1.5f);
    EXPECT_EQ(a[1].item<float>(), -2.0f);
    const torch::Tensor& b = read.tensors[1].second;
    EXPECT_EQ(b.scalar_type(), torch::kInt64);
    EXPECT_EQ(b.sizes(), torch::IntArrayRef({1, 1}));
    EXPECT_EQ(b.item<int64_t>(), -2);
    EXPECT_EQ(read.tensors[2].second.dim(), 0);
    EXPECT_TRUE(read.tensors[2].second.item<bool>());
}

TEST_F(SafetensorsTest, ParseJsonEscapes) {
    // \u escapes, including a surrogate pair, decode to UTF-8.
    const std::string json = R"({"__metadata__":{"k":"\u00e9\ud83d\ude00\n\"\/"}})";
    SafetensorsContents read = Safetensors::parse(makeFile(json, ""), "esc");
    EXPECT_EQ(read.metadata.at("k"), "\xc3\xa9\xf0\x9f\x98\x80\n\"/");
}

TEST_F(SafetensorsTest, WriteRejectsBadInput) {
    const std::string file = path("w.safetensors");
    torch::Tensor x = torch::zeros({2});
    EXPECT_THROW(Safetensors::write(file, {{"x", x}, {"x", x}}, {}), std::runtime_error);
    EXPECT_THROW(Safetensors::write(file, {{"__metadata__", x}}, {}), std::runtime_error);
    EXPECT_THROW(Safetensors::write(file, {{"c", torch::zeros({2}, torch::kComplexFloat)}}, {}), std::runtime_error);
    EXPECT_FALSE(exists(file));
    EXPECT_FALSE(exists(file + ".tmp"));
}

TEST_F(SafetensorsTest, WriteToUnwritablePathNamesIt) {
    const std::string file = path("no/such/dir/w.safetensors");
    try {
        Safetensors::write(file, {{"x", torch::zeros({2})}}, {});
        FAIL() << "write() to a missing directory succeeded";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
    }
}

TEST_F(SafetensorsTest, WriteReplacesExistingFile) {
    const std::string file = path("r.safetensors");
    Safetensors::write(file, {{"x", torch::zeros({100})}}, {});
    Safetensors::write(file, {{"y", torch::ones({1})}}, {});
    SafetensorsContents read = Safetensors::read(file);
    ASSERT_EQ(read.tensors.size(), 1u);
    EXPECT_EQ(read.tensors[0].first, "y");
}

TEST_F(SafetensorsTest, ReadMissingFileNamesIt) {
    const std::string file = path("missing.safetensors");
    try {
        Safetensors::read(file);
        FAIL() << "read() of a missing file succeeded";
    } catch (const std::runtime_error& e) {
        EXPECT_EQ(std::string(e.what()).rfind(file + ": ", 0), 0u) << e.what();
    }
}

TEST_F(SafetensorsTest, RejectsTruncatedFile) {
    const std::string file = path("t.safetensors");
    Safetensors::write(file, {{"x", torch::arange(10, torch::kFloat32)}}, {});
    const std::string bytes = readBytes(file);
    writeBytes(file, bytes.substr(0, bytes.size() - 4)); // cut the data
    EXPECT_THROW(Safetensors::read(file), std::runtime_error);
    try {
        Safetensors::read(file);
    } catch (const std::runtime_error& e) {
        std::string message = e.what();
        EXPECT_EQ(message.rfind(file + ": ", 0), 0u) << message;
        EXPECT_NE(message.find("tensor 'x'"), std::string::npos) << message;
        EXPECT_NE(message.find("outside the data section"), std::string::npos) << message;
    }
    expectRejected(bytes.substr(0, 5), {"too short"});
    expectRejected("", {"too short"});
}

TEST_F(SafetensorsTest, RejectsHeaderSizeLargerThanFile) {
    expectRejected(le64(1000) + "{}", {"header size 1000 exceeds"});
    EXPECT_THROW(Safetensors::parse(le64(3) + "{}", "x"), std::runtime_error);
}

TEST_F(SafetensorsTest, RejectsHeaderSizeAboveLimit) {
    expectRejected(le64(Safetensors::MaxHeaderSize + 1) + "{}", {"header size 100000001 exceeds the maximum"});
    expectRejected(le64(~uint64_t(0)) + "{}", {"exceeds the maximum"});
}

TEST_F(SafetensorsTest, RejectsGarbageJson) {
    expectRejected(makeFile("not json at all", ""), {"invalid JSON header at byte 0"});
    expectRejected(makeFile(R"({"x": {"dtype": "F32",)", ""), {"invalid JSON header"});
    expectRejected(makeFile(R"({"a":1,})", ""), {"invalid JSON header at byte 7"});
    expectRejected(makeFile(R"({"a":01})", ""), {"invalid JSON header"});
    expectRejected(makeFile(R"({"a":"x"} trailing)", ""), {"invalid JSON header", "after the top-level value"});
    expectRejected(makeFile(R"({"a":"\q"})", ""), {"invalid escape"});
    expectRejected(makeFile(R"({"a":"\ud800"})", ""), {"surrogate"});
    expectRejected(makeFile(R"({"a":1,"a":2})", ""), {"duplicate key 'a'"});
    expectRejected(makeFile(std::string(1000, '[') + std::string(1000, ']'), ""), {"nesting"});
    expectRejected(makeFile("[]", ""), {"not a JSON object"});
}

TEST_F(SafetensorsTest, RejectsUnknownDtype) {
    expectRejected(makeFile(R"({"x":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", std::string(16, '\0')),
                   {"tensor 'x'", "unknown dtype 'F128'"});
}

TEST_F(SafetensorsTest, RejectsMissingOrMalformedFields) {
    expectRejected(makeFile(R"({"x":{"shape":[2],"data_offsets":[0,8]}})", TwoFloats), {"header entry 'x' is neither '__metadata__' nor a tensor (it has no dtype)"});
    expectRejected(makeFile(R"({"x":{"dtype":"F32","data_offsets":[0,8]}})", TwoFloats), {"tensor 'x' has no shape"});
    expectRejected(makeFile(R"({"x":{"dtype":"F32","shape":[2]}})", TwoFloats), {"tensor 'x' has no data_offsets"});
    expectRejected(makeFile(R"({"x":[1,2]})", TwoFloats), {"tensor 'x' is an array, not an object"});
    expectRejected(makeFile(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", TwoFloats),
                   {"shape entry 0 is negative"});
    expectRejected(makeFile(R"({"x":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", TwoFloats),
                   {"shape entry 0 is not an integer"});
    expectRejected(makeFile(R"({"x":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", TwoFloats),
                   {"shape entry 0 is a string"});
    expectRejected(makeFile(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", TwoFloats),
                   {"data_offsets must be [begin, end]"});
    expectRejected(makeFile(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", TwoFloats),
                   {"end before they begin"});
    expectRejected(makeFile(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", TwoFloats),
                   {"data_offsets begin is negative"});
    // A shape whose element count wraps around 2^64 must not be mistaken for a small tensor.
    expectRejected(makeFile(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", ""),
                   {"too many elements"});
    expectRejected(makeFile(R"({"x":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", "\x01\x02"),
                   {"BOOL"});
}

TEST_F(SafetensorsTest, RejectsShapeOffsetMismatch) {
    expectRejected(makeFile(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", TwoFloats),
                   {"tensor 'w'", "hold 8 bytes", "needs 12"});
    expectRejected(makeFile(R"({"w":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", TwoFloats),
                   {"tensor 'w'", "needs 16"});
}

TEST_F(SafetensorsTest, RejectsOverlappingOffsets) {
    expectRejected(makeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                            TwoFloats),
                   {"'a'", "'b'", "overlap"});
    // Identical ranges overlap too, and so does a range nested inside an earlier, longer one.
    expectRejected(makeFile(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                            R"("b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},)"
                            R"("c":{"dtype":"U8","shape":[2],"data_offsets":[5,7]}})",
                            TwoFloats),
                   {"overlap"});
    // Empty tensors hold no bytes, so sharing an offset with others is fine.
    SafetensorsContents ok = Safetensors::parse(
        makeFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                 R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                 TwoFloats),
        "ok");
    EXPECT_EQ(ok.tensors.size(), 2u);
}

TEST_F(SafetensorsTest, RejectsNonStringMetadata) {
    expectRejected(makeFile(R"({"__metadata__":{"epoch":3}})", ""), {"metadata value 'epoch' is a number, not a string"});
    expectRejected(makeFile(R"({"__metadata__":["x"]})", ""), {"__metadata__ is an array"});
}

TEST(Sha256, PublishedTestVectors) {
    // FIPS 180-2 appendix B / NIST CSRC examples.
    EXPECT_EQ(sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    EXPECT_EQ(sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    EXPECT_EQ(sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    EXPECT_EQ(sha256Hex(std::string(1000000, 'a')),
              "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, PaddingBoundaries) {
    // The published 896-bit (two-block) vector, then lengths on either side of the 56- and 64-byte
    // padding edges (expected digests from Python's hashlib).
    EXPECT_EQ(sha256Hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrs"
                        "mnopqrstnopqrstu"),
              "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
    const std::pair<size_t, const char*> cases[] = {
        {55, "d5e285683cd4efc02d021a5c62014694958901005d6f71e89e0989fac77e4072"},
        {56, "04c26261370ee7541549d16dee320c723e3fd14671e66a099afe0a377c16888e"},
        {63, "75220b47218278e656f2013bb8f0c455a25eaf01e86c64924e9d48d89776d6f2"},
        {64, "7ce100971f64e7001e8fe5a51973ecdfe1ced42befe7ee8d5fd6219506b5393c"},
        {119, "000b48d4edf0fa7bee3c6236ecd2785baa5db4eeb8bb54341b029e0d9fa5fb0c"},
        {120, "13f05a0b594787f5ecd315edc96141bd3243203d1b7d4f0836f37308b276ba98"},
    };
    for (const auto& [length, digest] : cases)
        EXPECT_EQ(sha256Hex(std::string(length, 'x')), digest) << length << " bytes";
}

TEST_F(SafetensorsTest, Sha256FileMatchesBytes) {
    const std::string file = path("h.safetensors");
    Safetensors::write(file, {{"x", torch::randn({50000})}}, {{"k", "v"}}); // > one 64 KiB read chunk
    EXPECT_EQ(sha256File(file), sha256Hex(readBytes(file)));
    writeBytes(path("empty"), "");
    EXPECT_EQ(sha256File(path("empty")), sha256Hex(""));
    EXPECT_THROW(sha256File(path("missing")), std::runtime_error);
}
