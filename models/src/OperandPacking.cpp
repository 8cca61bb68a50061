// The fused attention's call description and packed operands (see OperandPacking.h): the GPU packing
// the operator uses, and the LibTorch packing kept as the tests' reference.
#include "OperandPacking.h"
#ifdef FLASHIPA_HAVE_FUSED_KERNEL
#include "TensorCorePacking.h"
#include <ATen/cuda/CUDAContext.h>

namespace FlashIPAPlugin {
namespace packing {

kernels::FusedAttentionProblem describe(const std::vector<torch::Tensor>& t, double scalarScale, double biasScale) {
    // t: q k v biasLeft biasRight queryPoints keyPoints valuePoints pairValues pointWeight segment keyBegin keyEnd
    kernels::FusedAttentionProblem p;
    p.rows = (int) t[0].size(0);
    p.heads = (int) t[0].size(1);
    p.headDim = (int) t[0].size(2);
    p.biasRank = (int) t[3].size(2);
    p.queryPoints = (int) t[5].size(2);
    p.valuePoints = (int) t[7].size(2);
    p.pairRank = (int) t[8].size(1);
    p.pairValueDim = (int) t[8].size(2);
    p.scalarScale = (float) scalarScale;
    p.biasScale = (float) biasScale;
    p.element = t[0].scalar_type() == torch::kHalf ? kernels::ElementType::Float16 : kernels::ElementType::Float32;
    p.q = t[0].data_ptr();
    p.k = t[1].data_ptr();
    p.v = t[2].data_ptr();
    p.biasLeft = t[3].data_ptr();
    p.biasRight = t[4].data_ptr();
    p.queryPointsGlobal = t[5].data_ptr<float>();
    p.keyPointsGlobal = t[6].data_ptr<float>();
    p.valuePointsGlobal = t[7].data_ptr<float>();
    p.pairValues = t[8].data_ptr();
    p.pointWeight = t[9].data_ptr<float>();
    p.segment = t[10].data_ptr<int>();
    p.keyBegin = t[11].data_ptr<int>();
    p.keyEnd = t[12].data_ptr<int>();
    return p;
}


PackedOperands packForwardWithTorch(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p,
                                    kernels::TensorCorePack::Layout layout) {
    const torch::Tensor& pointWeight = t[9];
    const bool tiled = layout == kernels::TensorCorePack::Layout::CoreMatrixTiles;
    const int64_t N = p.rows, H = p.heads, Pq = p.queryPoints;
    const int64_t padded = (N + kernels::TensorCoreQueryTile - 1) / kernels::TensorCoreQueryTile * kernels::TensorCoreQueryTile;
    const int64_t keyColumns = kernels::tensorCoreForwardKeyColumns(p);
    const auto half = t[0].options().dtype(torch::kHalf);
    auto zeros = [&](int64_t columns) { return torch::zeros({N, H, columns}, half); };
    auto pad = [&](const torch::Tensor& x) { return padRows(x, padded); };
    // Points relative to their tile's centre (key tiles: the key points' centre, or the value points'
    // where there are no key points), split into fp16 hi + lo for the logits' cross term.
    torch::Tensor queryCentres, keyCentres;
    torch::Tensor a = relativeToTile(t[5], t[5], kernels::TensorCoreQueryTile, padded, queryCentres);
    torch::Tensor b = relativeToTile(t[6], Pq > 0 ? t[6] : t[7], kernels::TensorCoreKeyTile, padded, keyCentres);
    auto [aHi, aLo] = splitHalf(a.flatten(2));
    auto [bHi, bLo] = splitHalf(b.flatten(2) * pointWeight.view({1, H, 1}));
    const int64_t fill = keyColumns - p.liftedKeyDim() - 9 * Pq;
    torch::Tensor queries = pad(torch::cat({t[0].to(torch::kHalf), t[3].to(torch::kHalf), aHi, aLo, aHi, zeros(fill)}, -1));
    torch::Tensor keys = pad(torch::cat({(t[1].to(torch::kFloat32) * p.scalarScale).to(torch::kHalf),
                                         (t[4].to(torch::kFloat32) * p.biasScale).to(torch::kHalf), bHi, bHi, bLo, zeros(fill)}, -1));
    // Values: [1 | key tile centre hi | lo | 0 | value points - centre | v | pair values] (TensorCorePack).
    const int64_t width = kernels::tensorCoreForwardValueWidth(p), chunk = kernels::tensorCoreValueChunk((int) width);
    const int64_t valueColumns = (width + chunk - 1) / chunk * chunk;
    torch::Tensor tileOfRow = torch::arange(N, t[0].options().dtype(torch::kInt64)).floor_divide(kernels::TensorCoreKeyTile);
    torch::Tensor centre = keyCentres.index_select(0, tileOfRow); // [N, H, 3]
    auto [centreHi, centreLo] = splitHalf(centre);
    torch::Tensor relativeValuePoints = (t[7] - centre.unsqueeze(2)).flatten(2).to(torch::kHalf);
    torch::Tensor pair = t[8].to(torch::kHalf).flatten(1).unsqueeze(1).expand({N, H, p.pairRank * p.pairValueDim});
    torch::Tensor values = pad(torch::cat({torch::ones({N, H, 1}, half), centreHi, centreLo, zeros(1), relativeValuePoints,
                                           t[2].to(torch::kHalf), pair, zeros(valueColumns - width)}, -1));
    if (tiled) {
        queries = coreMatrixTiles(queries, kernels::TensorCoreQueryTile);
        keys = coreMatrixTiles(keys, kernels::TensorCoreKeyTile);
        values = transposedCoreMatrixTiles(values, kernels::TensorCoreKeyTile);
    } else {
        values = values.permute({1, 2, 0}).contiguous();
    }
    torch::Tensor segments = torch::constant_pad_nd(t[10], {0, padded - N}, -1).contiguous();
    torch::Tensor tileSegments = commonSegmentPerTile(segments, kernels::TensorCoreKeyTile);
    PackedOperands out;
    out.keepAlive = {queries, keys, pointStats(a, padded), pointStats(b, padded), queryCentres, keyCentres, values, segments, tileSegments};
    kernels::TensorCorePack& k = out.pack;
    k.layout = layout;
    k.paddedRows = (int) padded;
    k.keyColumns = (int) keyColumns;
    k.valueColumns = (int) valueColumns;
    k.queries = out.keepAlive[0].data_ptr();
    k.keys = out.keepAlive[1].data_ptr();
    k.queryStats = out.keepAlive[2].data_ptr<float>();
    k.keyStats = out.keepAlive[3].data_ptr<float>();
    k.queryCentres = out.keepAlive[4].data_ptr<float>();
    k.keyCentres = out.keepAlive[5].data_ptr<float>();
    k.values = out.keepAlive[6].data_ptr();
    k.segments = out.keepAlive[7].data_ptr<int>();
    k.tileSegments = out.keepAlive[8].data_ptr<int>();
    return out;
}


PackedBackwardOperands packBackwardWithTorch(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p,
                                                 const torch::Tensor& gradOut, const torch::Tensor& logSumExp, const torch::Tensor& delta,
                                                 kernels::TensorCoreBackwardPack::Layout layout) {
    const bool tiled = layout == kernels::TensorCoreBackwardPack::Layout::CoreMatrixTiles;
    const int64_t N = p.rows, H = p.heads, c = p.headDim, Rb = p.biasRank, Pq = p.queryPoints, Pv = p.valuePoints;
    const int64_t padded = (N + kernels::TensorCoreQueryTile - 1) / kernels::TensorCoreQueryTile * kernels::TensorCoreQueryTile;
    const int64_t scalarColumns = kernels::tensorCoreBackwardScalarColumns((int) (c + Rb));
    const int64_t pointBlock = (3 * Pq + 7) / 8 * 8, pointColumns = (3 * pointBlock + 15) / 16 * 16;
    const auto half = t[0].options().dtype(torch::kHalf), f32 = t[0].options().dtype(torch::kFloat32);
    auto zeros = [&](int64_t columns) { return torch::zeros({N, H, columns}, half); };
    auto pad = [&](const torch::Tensor& x) { return padRows(x, padded); };
    auto block = [&](const torch::Tensor& x) { return torch::cat({x, zeros(pointBlock - 3 * Pq)}, -1); };
    // Key tiles are centred on their key points, or on their value points where there are no key points.
    const torch::Tensor& keyCentreSource = Pq > 0 ? t[6] : t[7];
    torch::Tensor queryCentres, keyCentres;
    torch::Tensor a = relativeToTile(t[5], t[5], kernels::TensorCoreQueryTile, padded, queryCentres);
    torch::Tensor b = relativeToTile(t[6], keyCentreSource, kernels::TensorCoreKeyTile, padded, keyCentres);
    auto [aHi, aLo] = splitHalf(a.flatten(2));
    auto [bHi, bLo] = splitHalf(b.flatten(2));
    const int64_t scalarFill = scalarColumns - c - Rb, pointFill = pointColumns - 3 * pointBlock;
    torch::Tensor queries = pad(torch::cat({t[0].to(torch::kHalf), t[3].to(torch::kHalf), zeros(scalarFill), block(aHi),
                                            block(aLo), block(aHi), zeros(pointFill)}, -1));
    torch::Tensor keys = pad(torch::cat({(t[1].to(torch::kFloat32) * p.scalarScale).to(torch::kHalf),
                                         (t[4].to(torch::kFloat32) * p.biasScale).to(torch::kHalf), zeros(scalarFill), block(bHi),
                                         block(bHi), block(bLo), zeros(pointFill)}, -1));
    // Value rows with value points relative to their key tile's centre; the centre's share of dP is
    // added in fp32 by the kernel from the per-row sums of dOut over value points.
    const int64_t width = p.liftedValueDim(), chunk = kernels::tensorCoreValueChunk((int) width);
    const int64_t valueColumns = tiled ? kernels::wgmmaBackwardValueColumns((int) width) : (width + chunk - 1) / chunk * chunk;
    torch::Tensor tileOfRow = torch::arange(N, f32.dtype(torch::kInt64)).floor_divide(kernels::TensorCoreKeyTile);
    torch::Tensor valuePoints = (t[7] - keyCentres.index_select(0, tileOfRow).unsqueeze(2)).flatten(2);
    torch::Tensor pair = t[8].to(torch::kHalf).flatten(1).unsqueeze(1).expand({N, H, p.pairRank * p.pairValueDim});
    torch::Tensor values = pad(torch::cat({t[2].to(torch::kHalf), valuePoints.to(torch::kHalf), pair, zeros(valueColumns - width)}, -1));
    torch::Tensor gradRows = pad(torch::cat({gradOut.to(torch::kHalf), zeros(valueColumns - width)}, -1));
    torch::Tensor gradSums = gradOut.narrow(-1, c, 3 * Pv).reshape({N, H, Pv, 3}).sum(2);
    torch::Tensor rowTerms = pad(torch::cat({logSumExp.unsqueeze(-1), delta.unsqueeze(-1), gradSums, torch::zeros({N, H, 3}, f32)}, -1));
    // Per row: segment, key range; padding rows are segment -1. Per tile of rows: their common segment.
    auto int32 = t[10].options().dtype(torch::kInt32);
    torch::Tensor rowRanges = torch::stack({t[10], t[11], t[12], torch::zeros({N}, int32)}, 1);
    rowRanges = torch::cat({rowRanges, torch::tensor({-1, 0, 0, 0}, int32).expand({padded - N, 4})}).contiguous();
    torch::Tensor tileSegments =
        commonSegmentPerTile(rowRanges.select(1, 0), tiled ? kernels::TensorCoreKeyTile : kernels::TensorCoreBackwardTile);
    if (tiled) {
        queries = coreMatrixTiles(queries, kernels::TensorCoreKeyTile);
        keys = coreMatrixTiles(keys, kernels::TensorCoreKeyTile);
        gradRows = coreMatrixTiles(gradRows, kernels::TensorCoreKeyTile);
        values = coreMatrixTiles(values, kernels::TensorCoreKeyTile);
    }
    PackedBackwardOperands out;
    out.keepAlive = {queries,    keys,       pointStats(a, padded), pointStats(b, padded), queryCentres, keyCentres,
                     gradRows,   values,     rowTerms,              rowRanges,             tileSegments};
    kernels::TensorCoreBackwardPack& k = out.pack;
    k.layout = layout;
    k.paddedRows = (int) padded;
    k.scalarColumns = (int) scalarColumns;
    k.pointBlock = (int) pointBlock;
    k.keyColumns = (int) (scalarColumns + pointColumns);
    k.valueColumns = (int) valueColumns;
    k.queries = out.keepAlive[0].data_ptr();
    k.keys = out.keepAlive[1].data_ptr();
    k.queryStats = out.keepAlive[2].data_ptr<float>();
    k.keyStats = out.keepAlive[3].data_ptr<float>();
    k.queryCentres = out.keepAlive[4].data_ptr<float>();
    k.keyCentres = out.keepAlive[5].data_ptr<float>();
    k.gradOut = out.keepAlive[6].data_ptr();
    k.values = out.keepAlive[7].data_ptr();
    k.rowTerms = out.keepAlive[8].data_ptr<float>();
    k.rowRanges = out.keepAlive[9].data_ptr<int>();
    k.tileSegments = out.keepAlive[10].data_ptr<int>();
    return out;
}

namespace {

/** Rows padded to whole query tiles, as both packings pad them. */
int64_t paddedRowsOf(const kernels::FusedAttentionProblem& p) {
    return (p.rows + kernels::TensorCoreQueryTile - 1) / kernels::TensorCoreQueryTile * kernels::TensorCoreQueryTile;
}

} // namespace

PackedOperands packForward(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p, kernels::TensorCorePack::Layout layout) {
    const int64_t padded = paddedRowsOf(p), H = p.heads;
    const int64_t width = kernels::tensorCoreForwardValueWidth(p), chunk = kernels::tensorCoreValueChunk((int) width);
    PackedOperands out;
    kernels::TensorCorePack& pack = out.pack;
    pack.layout = layout;
    pack.paddedRows = (int) padded;
    pack.keyColumns = kernels::tensorCoreForwardKeyColumns(p);
    pack.valueColumns = (int) ((width + chunk - 1) / chunk * chunk);
    const auto half = t[0].options().dtype(torch::kHalf), f32 = t[0].options().dtype(torch::kFloat32), i32 = t[0].options().dtype(torch::kInt32);
    out.keepAlive = {torch::empty({padded * H * pack.keyColumns}, half),
                     torch::empty({padded * H * pack.keyColumns}, half),
                     torch::empty({padded, H, 4}, f32),
                     torch::empty({padded, H, 4}, f32),
                     torch::empty({padded / kernels::TensorCoreQueryTile, H, 3}, f32),
                     torch::empty({padded / kernels::TensorCoreKeyTile, H, 3}, f32),
                     torch::empty({padded * H * pack.valueColumns}, half),
                     torch::empty({padded}, i32),
                     torch::empty({padded / kernels::TensorCoreKeyTile}, i32)};
    pack.queries = out.keepAlive[0].data_ptr();
    pack.keys = out.keepAlive[1].data_ptr();
    pack.queryStats = out.keepAlive[2].data_ptr<float>();
    pack.keyStats = out.keepAlive[3].data_ptr<float>();
    pack.queryCentres = out.keepAlive[4].data_ptr<float>();
    pack.keyCentres = out.keepAlive[5].data_ptr<float>();
    pack.values = out.keepAlive[6].data_ptr();
    pack.segments = out.keepAlive[7].data_ptr<int>();
    pack.tileSegments = out.keepAlive[8].data_ptr<int>();
    kernels::launchForwardPacking(p, pack, at::cuda::getCurrentCUDAStream());
    return out;
}

PackedBackwardOperands packBackward(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p, const torch::Tensor& gradOut,
                                    const torch::Tensor& logSumExp, const torch::Tensor& delta, kernels::TensorCoreBackwardPack::Layout layout) {
    const bool tiled = layout == kernels::TensorCoreBackwardPack::Layout::CoreMatrixTiles;
    const int64_t padded = paddedRowsOf(p), H = p.heads, width = p.liftedValueDim(), chunk = kernels::tensorCoreValueChunk((int) width);
    PackedBackwardOperands out;
    kernels::TensorCoreBackwardPack& pack = out.pack;
    pack.layout = layout;
    pack.paddedRows = (int) padded;
    pack.scalarColumns = kernels::tensorCoreBackwardScalarColumns(p.liftedKeyDim());
    pack.pointBlock = (3 * p.queryPoints + 7) / 8 * 8;
    pack.keyColumns = pack.scalarColumns + (3 * pack.pointBlock + 15) / 16 * 16;
    pack.valueColumns = tiled ? kernels::wgmmaBackwardValueColumns((int) width) : (int) ((width + chunk - 1) / chunk * chunk);
    const int64_t segmentTile = tiled ? kernels::TensorCoreKeyTile : kernels::TensorCoreBackwardTile;
    const auto half = t[0].options().dtype(torch::kHalf), f32 = t[0].options().dtype(torch::kFloat32), i32 = t[0].options().dtype(torch::kInt32);
    out.keepAlive = {torch::empty({padded * H * pack.keyColumns}, half),
                     torch::empty({padded * H * pack.keyColumns}, half),
                     torch::empty({padded, H, 4}, f32),
                     torch::empty({padded, H, 4}, f32),
                     torch::empty({padded / kernels::TensorCoreQueryTile, H, 3}, f32),
                     torch::empty({padded / kernels::TensorCoreKeyTile, H, 3}, f32),
                     torch::empty({padded * H * pack.valueColumns}, half),
                     torch::empty({padded * H * pack.valueColumns}, half),
                     torch::empty({padded, H, 8}, f32),
                     torch::empty({padded, 4}, i32),
                     torch::empty({padded / segmentTile}, i32)};
    pack.queries = out.keepAlive[0].data_ptr();
    pack.keys = out.keepAlive[1].data_ptr();
    pack.queryStats = out.keepAlive[2].data_ptr<float>();
    pack.keyStats = out.keepAlive[3].data_ptr<float>();
    pack.queryCentres = out.keepAlive[4].data_ptr<float>();
    pack.keyCentres = out.keepAlive[5].data_ptr<float>();
    pack.gradOut = out.keepAlive[6].data_ptr();
    pack.values = out.keepAlive[7].data_ptr();
    pack.rowTerms = out.keepAlive[8].data_ptr<float>();
    pack.rowRanges = out.keepAlive[9].data_ptr<int>();
    pack.tileSegments = out.keepAlive[10].data_ptr<int>();
    kernels::launchBackwardPacking(p, pack, gradOut.data_ptr<float>(), logSumExp.data_ptr<float>(), delta.data_ptr<float>(),
                                   at::cuda::getCurrentCUDAStream());
    return out;
}

} // namespace packing
} // namespace FlashIPAPlugin

#endif
