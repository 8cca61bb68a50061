// Safetensors reading/writing and SHA-256 for FlashIPA checkpoints.
//
// Checkpoints are untrusted input (they may be downloaded), so the reader is a plain data parser:
// it never executes anything, bounds every size before allocating, and reports the first defect
// with the file name and a cause a user can act on.

#include "flashipa/Checkpoint.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <unistd.h>

namespace FlashIPAPlugin {
namespace {

// Tensor bytes are copied verbatim between memory and the file, which is only right when the host
// byte order matches the format's little-endian order.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

// A defect in the file being parsed; Safetensors::parse prefixes it with the file name.
class FormatError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------
// A minimal JSON reader, enough for safetensors headers. Numbers keep their literal text so that
// shapes and offsets can be checked as exact 64-bit integers rather than lossy doubles.
// ---------------------------------------------------------------------------------------------

struct Json {
    enum class Kind { Null, Bool, Number, String, Array, Object };
    Kind kind = Kind::Null;
    bool boolean = false;
    std::string text;           // string value, or a number's literal text
    std::vector<Json> items;    // array elements, or object values (parallel to keys)
    std::vector<std::string> keys;

    const Json* find(const std::string& key) const {
        for (size_t i = 0; i < keys.size(); i++)
            if (keys[i] == key)
                return &items[i];
        return nullptr;
    }
};

const char* kindName(Json::Kind kind) {
    switch (kind) {
    case Json::Kind::Null: return "null";
    case Json::Kind::Bool: return "a boolean";
    case Json::Kind::Number: return "a number";
    case Json::Kind::String: return "a string";
    case Json::Kind::Array: return "an array";
    case Json::Kind::Object: return "an object";
    }
    return "?";
}

class JsonParser {
public:
    JsonParser(const char* data, size_t size) : data_(data), size_(size) {}

    /** Parses one value surrounded by optional whitespace (which covers the header's space padding). */
    Json parseDocument() {
        skipWhitespace();
        Json value = parseValue(0);
        skipWhitespace();
        if (pos_ != size_)
            fail("unexpected " + describeChar() + " after the top-level value");
        return value;
    }

private:
    // Bounds recursion so a hostile header like "[[[[..." cannot overflow the stack.
    static constexpr int MaxDepth = 64;

    [[noreturn]] void fail(const std::string& cause) const {
        throw FormatError("invalid JSON header at byte " + std::to_string(pos_) + ": " + cause);
    }

    std::string describeChar() const {
        if (pos_ >= size_)
            return "end of header";
        unsigned char c = data_[pos_];
        if (c >= 0x20 && c < 0x7f)
            return std::string("character '") + static_cast<char>(c) + "'";
        char buf[16];
        std::snprintf(buf, sizeof(buf), "byte 0x%02x", c);
        return buf;
    }

    void skipWhitespace() {
        while (pos_ < size_ && (data_[pos_] == ' ' || data_[pos_] == '\t' || data_[pos_] == '\n' || data_[pos_] == '\r'))
            pos_++;
    }

    void expect(char c) {
        if (pos_ >= size_ || data_[pos_] != c)
            fail(std::string("expected '") + c + "' but found " + describeChar());
        pos_++;
    }

    Json parseValue(int depth) {
        if (depth > MaxDepth)
            fail("nesting deeper than " + std::to_string(MaxDepth) + " levels");
        if (pos_ >= size_)
            fail("unexpected end of header");
        char c = data_[pos_];
        if (c == '{')
            return parseObject(depth);
        if (c == '[')
            return parseArray(depth);
        Json value;
        if (c == '"') {
            value.kind = Json::Kind::String;
            value.text = parseString();
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            value.kind = Json::Kind::Number;
            value.text = parseNumber();
        } else if (matchLiteral("true")) {
            value.kind = Json::Kind::Bool;
            value.boolean = true;
        } else if (matchLiteral("false")) {
            value.kind = Json::Kind::Bool;
        } else if (matchLiteral("null")) {
            value.kind = Json::Kind::Null;
        } else {
            fail("unexpected " + describeChar());
        }
        return value;
    }

    bool matchLiteral(const char* literal) {
        size_t n = std::strlen(literal);
        if (size_ - pos_ < n || std::memcmp(data_ + pos_, literal, n) != 0)
            return false;
        pos_ += n;
        return true;
    }

    Json parseObject(int depth) {
        Json value;
        value.kind = Json::Kind::Object;
        expect('{');
        skipWhitespace();
        if (pos_ < size_ && data_[pos_] == '}') {
            pos_++;
            return value;
        }
        while (true) {
            skipWhitespace();
            if (pos_ >= size_ || data_[pos_] != '"')
                fail("expected a string key but found " + describeChar());
            size_t keyPos = pos_;
            std::string key = parseString();
            // A duplicate key would make "which tensor is meant" ambiguous; refuse rather than guess.
            if (value.find(key) != nullptr) {
                pos_ = keyPos;
                fail("duplicate key '" + key + "'");
            }
            skipWhitespace();
            expect(':');
            skipWhitespace();
            value.keys.push_back(std::move(key));
            value.items.push_back(parseValue(depth + 1));
            skipWhitespace();
            if (pos_ < size_ && data_[pos_] == ',') {
                pos_++;
                continue;
            }
            expect('}');
            return value;
        }
    }

    Json parseArray(int depth) {
        Json value;
        value.kind = Json::Kind::Array;
        expect('[');
        skipWhitespace();
        if (pos_ < size_ && data_[pos_] == ']') {
            pos_++;
            return value;
        }
        while (true) {
            skipWhitespace();
            value.items.push_back(parseValue(depth + 1));
            skipWhitespace();
            if (pos_ < size_ && data_[pos_] == ',') {
                pos_++;
                continue;
            }
            expect(']');
            return value;
        }
    }

    // Follows the JSON grammar exactly: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
    std::string parseNumber() {
        size_t start = pos_;
        auto isDigit = [&](size_t i) { return i < size_ && data_[i] >= '0' && data_[i] <= '9'; };
        if (data_[pos_] == '-')
            pos_++;
        if (!isDigit(pos_))
            fail("expected a digit but found " + describeChar());
        if (data_[pos_] == '0')
            pos_++;
        else
            while (isDigit(pos_))
                pos_++;
        if (pos_ < size_ && data_[pos_] == '.') {
            pos_++;
            if (!isDigit(pos_))
                fail("expected a digit after '.' but found " + describeChar());
            while (isDigit(pos_))
                pos_++;
        }
        if (pos_ < size_ && (data_[pos_] == 'e' || data_[pos_] == 'E')) {
            pos_++;
            if (pos_ < size_ && (data_[pos_] == '+' || data_[pos_] == '-'))
                pos_++;
            if (!isDigit(pos_))
                fail("expected a digit in the exponent but found " + describeChar());
            while (isDigit(pos_))
                pos_++;
        }
        return std::string(data_ + start, pos_ - start);
    }

    unsigned parseHex4() {
        unsigned value = 0;
        for (int i = 0; i < 4; i++, pos_++) {
            if (pos_ >= size_)
                fail("unexpected end of header in a \\u escape");
            char c = data_[pos_];
            unsigned digit;
            if (c >= '0' && c <= '9')
                digit = c - '0';
            else if (c >= 'a' && c <= 'f')
                digit = c - 'a' + 10;
            else if (c >= 'A' && c <= 'F')
                digit = c - 'A' + 10;
            else
                fail("invalid hex digit in a \\u escape: " + describeChar());
            value = value * 16 + digit;
        }
        return value;
    }

    static void appendUtf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    std::string parseString() {
        expect('"');
        std::string out;
        while (true) {
            if (pos_ >= size_)
                fail("unterminated string");
            unsigned char c = data_[pos_];
            if (c == '"') {
                pos_++;
                return out;
            }
            if (c < 0x20)
                fail("unescaped control " + describeChar() + " in a string");
            if (c != '\\') {
                out += static_cast<char>(c);
                pos_++;
                continue;
            }
            pos_++;
            if (pos_ >= size_)
                fail("unterminated string");
            char e = data_[pos_++];
            switch (e) {
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            case '/': out += '/'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u': {
                unsigned cp = parseHex4();
                // Characters outside the BMP arrive as a UTF-16 surrogate pair.
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    if (size_ - pos_ < 2 || data_[pos_] != '\\' || data_[pos_ + 1] != 'u')
                        fail("high surrogate not followed by a low surrogate");
                    pos_ += 2;
                    unsigned low = parseHex4();
                    if (low < 0xDC00 || low > 0xDFFF)
                        fail("high surrogate not followed by a low surrogate");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    fail("unpaired low surrogate");
                }
                appendUtf8(out, cp);
                break;
            }
            default:
                pos_--;
                fail("invalid escape \\" + describeChar());
            }
        }
    }

    const char* data_;
    size_t size_;
    size_t pos_ = 0;
};

/** Writes s as a JSON string literal. */
std::string jsonQuote(const std::string& s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "\\u%04x", c);
            out += buf;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + "\"";
}

// ---------------------------------------------------------------------------------------------
// Safetensors
// ---------------------------------------------------------------------------------------------

struct DtypeInfo {
    const char* name;
    torch::ScalarType type;
    size_t size;
};

const DtypeInfo Dtypes[] = {
    {"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4}, {"F16", torch::kFloat16, 2},
    {"BF16", torch::kBFloat16, 2}, {"I64", torch::kInt64, 8}, {"I32", torch::kInt32, 4},
    {"U8", torch::kUInt8, 1}, {"BOOL", torch::kBool, 1},
};

const DtypeInfo* dtypeByName(const std::string& name) {
    for (const DtypeInfo& d : Dtypes)
        if (name == d.name)
            return &d;
    return nullptr;
}

const DtypeInfo* dtypeByType(torch::ScalarType type) {
    for (const DtypeInfo& d : Dtypes)
        if (type == d.type)
            return &d;
    return nullptr;
}

/** Reads a JSON number as an exact non-negative integer; `what` names it in the error. */
uint64_t toUnsigned(const Json& value, const std::string& what) {
    if (value.kind != Json::Kind::Number)
        throw FormatError(what + " is " + kindName(value.kind) + ", not an integer");
    const std::string& t = value.text;
    if (t[0] == '-')
        throw FormatError(what + " is negative (" + t + ")");
    if (t.find_first_of(".eE") != std::string::npos)
        throw FormatError(what + " is not an integer (" + t + ")");
    uint64_t result = 0;
    for (char c : t) {
        uint64_t digit = c - '0';
        if (result > (std::numeric_limits<uint64_t>::max() - digit) / 10)
            throw FormatError(what + " is too large (" + t + ")");
        result = result * 10 + digit;
    }
    return result;
}

std::string shapeString(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++)
        s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

struct Entry {
    std::string name;
    const DtypeInfo* dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
};

/** Validates one tensor entry of the header against a data section of dataSize bytes. */
Entry parseEntry(const std::string& name, const Json& value, uint64_t dataSize) {
    const std::string label = "tensor '" + name + "'";
    if (value.kind != Json::Kind::Object)
        throw FormatError(label + " is " + kindName(value.kind) + ", not an object");
    Entry entry;
    entry.name = name;

    const Json* dtype = value.find("dtype");
    if (dtype == nullptr)
        throw FormatError("header entry '" + name + "' is neither '__metadata__' nor a tensor (it has no dtype): the header is "
                          "damaged or this is not a safetensors file");
    if (dtype->kind != Json::Kind::String)
        throw FormatError(label + ": dtype is " + kindName(dtype->kind) + ", not a string");
    entry.dtype = dtypeByName(dtype->text);
    if (entry.dtype == nullptr)
        throw FormatError(label + " has unknown dtype '" + dtype->text +
                          "' (supported: F64, F32, F16, BF16, I64, I32, U8, BOOL)");

    const Json* shape = value.find("shape");
    if (shape == nullptr)
        throw FormatError(label + " has no shape");
    if (shape->kind != Json::Kind::Array)
        throw FormatError(label + ": shape is " + kindName(shape->kind) + ", not an array");
    // Count elements with overflow checks, so a forged shape cannot wrap around to match a small range.
    // Like torch's own size check, the running product must never overflow (even if a later dimension
    // is zero), and the byte count must fit in int64_t, or torch::empty would throw its own error.
    const uint64_t maxBytes = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    uint64_t numel = 1;
    bool tooLarge = false;
    for (size_t i = 0; i < shape->items.size(); i++) {
        uint64_t dim = toUnsigned(shape->items[i], label + ": shape entry " + std::to_string(i));
        if (dim > maxBytes || (dim != 0 && numel > maxBytes / dim)) {
            tooLarge = true;
            break;
        }
        entry.shape.push_back(static_cast<int64_t>(dim));
        numel *= dim;
    }
    if (tooLarge || numel > maxBytes / entry.dtype->size)
        throw FormatError(label + ": shape has too many elements");
    uint64_t needed = numel * entry.dtype->size;

    const Json* offsets = value.find("data_offsets");
    if (offsets == nullptr)
        throw FormatError(label + " has no data_offsets");
    if (offsets->kind != Json::Kind::Array || offsets->items.size() != 2)
        throw FormatError(label + ": data_offsets must be [begin, end]");
    entry.begin = toUnsigned(offsets->items[0], label + ": data_offsets begin");
    entry.end = toUnsigned(offsets->items[1], label + ": data_offsets end");
    const std::string range = "[" + std::to_string(entry.begin) + ", " + std::to_string(entry.end) + "]";
    if (entry.begin > entry.end)
        throw FormatError(label + ": data_offsets " + range + " end before they begin");
    if (entry.end > dataSize)
        throw FormatError(label + ": data_offsets " + range + " lie outside the data section of " +
                          std::to_string(dataSize) + " bytes (file truncated?)");
    if (entry.end - entry.begin != needed)
        throw FormatError(label + ": data_offsets " + range + " hold " + std::to_string(entry.end - entry.begin) +
                          " bytes but shape " + shapeString(entry.shape) + " of " + entry.dtype->name + " needs " +
                          std::to_string(needed));
    return entry;
}

SafetensorsContents parseContents(const std::string& bytes) {
    if (bytes.size() < 8)
        throw FormatError("file is " + std::to_string(bytes.size()) +
                          " bytes long, too short for the 8-byte header length");
    uint64_t headerSize = 0;
    for (int i = 0; i < 8; i++)
        headerSize |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
    // Check the size before touching the header, so a forged length cannot trigger a huge allocation or read.
    if (headerSize > Safetensors::MaxHeaderSize)
        throw FormatError("header size " + std::to_string(headerSize) + " exceeds the maximum of " +
                          std::to_string(Safetensors::MaxHeaderSize) + " bytes");
    if (headerSize > bytes.size() - 8)
        throw FormatError("header size " + std::to_string(headerSize) + " exceeds the " +
                          std::to_string(bytes.size() - 8) + " bytes that follow the length field");

    Json header = JsonParser(bytes.data() + 8, headerSize).parseDocument();
    if (header.kind != Json::Kind::Object)
        throw FormatError(std::string("header is ") + kindName(header.kind) + ", not a JSON object");

    const char* data = bytes.data() + 8 + headerSize;
    const uint64_t dataSize = bytes.size() - 8 - headerSize;
    SafetensorsContents contents;
    std::vector<Entry> entries;
    for (size_t i = 0; i < header.keys.size(); i++) {
        const std::string& key = header.keys[i];
        const Json& value = header.items[i];
        if (key == "__metadata__") {
            if (value.kind != Json::Kind::Object)
                throw FormatError(std::string("__metadata__ is ") + kindName(value.kind) + ", not an object");
            for (size_t j = 0; j < value.keys.size(); j++) {
                if (value.items[j].kind != Json::Kind::String)
                    throw FormatError("metadata value '" + value.keys[j] + "' is " + kindName(value.items[j].kind) +
                                      ", not a string");
                contents.metadata[value.keys[j]] = value.items[j].text;
            }
        } else {
            entries.push_back(parseEntry(key, value, dataSize));
        }
    }

    // File order is data order. Sorting also lets one pass find overlaps: every non-empty range must
    // start at or after the furthest end seen so far. Empty ranges hold no bytes, so they cannot overlap.
    std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    const Entry* furthest = nullptr;
    for (const Entry& e : entries) {
        if (e.begin == e.end)
            continue;
        if (furthest != nullptr && e.begin < furthest->end)
            throw FormatError("tensors '" + furthest->name + "' [" + std::to_string(furthest->begin) + ", " +
                              std::to_string(furthest->end) + "] and '" + e.name + "' [" + std::to_string(e.begin) +
                              ", " + std::to_string(e.end) + "] overlap");
        if (furthest == nullptr || e.end > furthest->end)
            furthest = &e;
    }

    for (const Entry& e : entries) {
        // Copy out of the file buffer so the tensors own their memory and outlive `bytes`.
        torch::Tensor t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype->type));
        if (e.end > e.begin)
            std::memcpy(t.data_ptr(), data + e.begin, e.end - e.begin);
        // Any byte other than 0/1 in a bool tensor is undefined behaviour for the code that reads it.
        if (e.dtype->type == torch::kBool) {
            for (uint64_t k = e.begin; k < e.end; k++)
                if (static_cast<unsigned char>(data[k]) > 1)
                    throw FormatError("tensor '" + e.name + "' is BOOL but holds a byte other than 0 or 1");
        }
        contents.tensors.emplace_back(e.name, std::move(t));
    }
    return contents;
}

// ---------------------------------------------------------------------------------------------
// SHA-256 (FIPS 180-4)
// ---------------------------------------------------------------------------------------------

class Sha256 {
public:
    void update(const unsigned char* data, size_t size) {
        totalBytes_ += size;
        while (size > 0) {
            size_t take = std::min(size, sizeof(buffer_) - buffered_);
            std::memcpy(buffer_ + buffered_, data, take);
            buffered_ += take;
            data += take;
            size -= take;
            if (buffered_ == sizeof(buffer_)) {
                compress(buffer_);
                buffered_ = 0;
            }
        }
    }

    /** Pads the message (FIPS 180-4 section 5.1.1) and returns the digest as lower-case hex. */
    std::string finishHex() {
        uint64_t bitLength = totalBytes_ * 8;
        unsigned char pad[72] = {0x80};
        // Pad to 56 mod 64, leaving room for the 8-byte length.
        size_t padLength = (buffered_ < 56 ? 56 - buffered_ : 120 - buffered_);
        for (int i = 0; i < 8; i++)
            pad[padLength + i] = static_cast<unsigned char>(bitLength >> (56 - 8 * i));
        update(pad, padLength + 8);
        std::string hex;
        for (uint32_t word : state_) {
            char buf[9];
            std::snprintf(buf, sizeof(buf), "%08x", word);
            hex += buf;
        }
        return hex;
    }

private:
    static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

    void compress(const unsigned char* block) {
        // First 32 bits of the fractional parts of the cube roots of the first 64 primes.
        static const uint32_t K[64] = {
            0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
            0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
            0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
            0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
            0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
            0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
            0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
            0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
        };
        uint32_t w[64];
        for (int t = 0; t < 16; t++)
            w[t] = (uint32_t(block[4 * t]) << 24) | (uint32_t(block[4 * t + 1]) << 16) |
                   (uint32_t(block[4 * t + 2]) << 8) | uint32_t(block[4 * t + 3]);
        for (int t = 16; t < 64; t++) {
            uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
            uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16] + s0 + w[t - 7] + s1;
        }
        uint32_t a = state_[0], b = state_[1], c = state_[2], d = state_[3];
        uint32_t e = state_[4], f = state_[5], g = state_[6], h = state_[7];
        for (int t = 0; t < 64; t++) {
            uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[t] + w[t];
            uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            h = g;
            g = f;
            f = e;
            e = d + t1;
            d = c;
            c = b;
            b = a;
            a = t1 + t2;
        }
        state_[0] += a; state_[1] += b; state_[2] += c; state_[3] += d;
        state_[4] += e; state_[5] += f; state_[6] += g; state_[7] += h;
    }

    // Initial hash value: first 32 bits of the fractional parts of the square roots of the first 8 primes.
    std::array<uint32_t, 8> state_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                      0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    unsigned char buffer_[64];
    size_t buffered_ = 0;
    uint64_t totalBytes_ = 0;
};

} // namespace

void Safetensors::write(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                        const std::map<std::string, std::string>& metadata) {
    // Build the header and gather contiguous CPU copies first, so nothing touches the disk if a tensor is rejected.
    std::set<std::string> names;
    std::vector<torch::Tensor> data;
    std::string header = "{";
    if (!metadata.empty()) {
        header += "\"__metadata__\":{";
        bool first = true;
        for (const auto& [key, value] : metadata) {
            header += (first ? "" : ",") + jsonQuote(key) + ":" + jsonQuote(value);
            first = false;
        }
        header += "}";
    }
    uint64_t offset = 0;
    for (const auto& [name, tensor] : tensors) {
        if (name == "__metadata__")
            throw std::runtime_error(path + ": '__metadata__' is reserved and cannot name a tensor");
        if (!names.insert(name).second)
            throw std::runtime_error(path + ": duplicate tensor name '" + name + "'");
        if (!tensor.defined() || tensor.layout() != torch::kStrided)
            throw std::runtime_error(path + ": tensor '" + name + "' is undefined or not a dense tensor");
        const DtypeInfo* dtype = dtypeByType(tensor.scalar_type());
        if (dtype == nullptr)
            throw std::runtime_error(path + ": tensor '" + name + "' has unsupported dtype " +
                                     std::string(c10::toString(tensor.scalar_type())));
        torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
        uint64_t size = static_cast<uint64_t>(t.numel()) * dtype->size;
        header += (header.size() > 1 ? "," : "") + jsonQuote(name) + ":{\"dtype\":\"" + dtype->name +
                  "\",\"shape\":" + shapeString(t.sizes().vec()) + ",\"data_offsets\":[" + std::to_string(offset) +
                  "," + std::to_string(offset + size) + "]}";
        offset += size;
        data.push_back(std::move(t));
    }
    header += "}";
    // Pad so the data section starts 8-byte aligned, as the reference implementation does.
    header.append((8 - header.size() % 8) % 8, ' ');
    if (header.size() > MaxHeaderSize)
        throw std::runtime_error(path + ": header of " + std::to_string(header.size()) +
                                 " bytes exceeds the maximum of " + std::to_string(MaxHeaderSize));

    // Write a temporary file and rename it over the target, so readers never see a half-written checkpoint.
    const std::string tmp = path + ".tmp";
    std::FILE* file = std::fopen(tmp.c_str(), "wb");
    if (file == nullptr)
        throw std::runtime_error(path + ": cannot open " + tmp + " for writing: " + std::strerror(errno));
    unsigned char length[8];
    for (int i = 0; i < 8; i++)
        length[i] = static_cast<unsigned char>(static_cast<uint64_t>(header.size()) >> (8 * i));
    bool ok = std::fwrite(length, 1, 8, file) == 8 &&
              std::fwrite(header.data(), 1, header.size(), file) == header.size();
    for (const torch::Tensor& t : data) {
        size_t size = t.numel() * t.element_size();
        if (ok && size > 0)
            ok = std::fwrite(t.data_ptr(), 1, size, file) == size;
    }
    // Flush to disk before the rename, so a crash cannot leave the new name pointing at missing data.
    ok = ok && std::fflush(file) == 0 && ::fsync(fileno(file)) == 0;
    int savedErrno = errno;
    ok = (std::fclose(file) == 0) && ok;
    if (!ok) {
        std::remove(tmp.c_str());
        throw std::runtime_error(path + ": error writing " + tmp + ": " + std::strerror(savedErrno));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        savedErrno = errno;
        std::remove(tmp.c_str());
        throw std::runtime_error(path + ": cannot rename " + tmp + " to it: " + std::strerror(savedErrno));
    }
}

SafetensorsContents Safetensors::read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in)
        throw std::runtime_error(path + ": cannot open file for reading");
    std::ostringstream buffer;
    buffer << in.rdbuf();
    if (in.bad())
        throw std::runtime_error(path + ": error while reading the file");
    return parse(buffer.str(), path);
}

SafetensorsContents Safetensors::parse(const std::string& bytes, const std::string& name) {
    try {
        return parseContents(bytes);
    } catch (const FormatError& e) {
        throw std::runtime_error(name + ": " + e.what());
    }
}

std::string sha256Hex(const std::string& bytes) {
    Sha256 hash;
    hash.update(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
    return hash.finishHex();
}

std::string sha256File(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in)
        throw std::runtime_error(path + ": cannot open file for hashing");
    // Stream in chunks so hashing a large checkpoint does not need it all in memory.
    Sha256 hash;
    std::vector<char> chunk(1 << 16);
    while (in) {
        in.read(chunk.data(), chunk.size());
        hash.update(reinterpret_cast<const unsigned char*>(chunk.data()), static_cast<size_t>(in.gcount()));
    }
    if (in.bad())
        throw std::runtime_error(path + ": error while reading the file for hashing");
    return hash.finishHex();
}

} // namespace FlashIPAPlugin
