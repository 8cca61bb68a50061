"""Prototype of a next chain term (docs/MODEL.md, "The backbone chain term"): bonds correlated with their
neighbours. The backbone's bond vectors are modelled as a stationary Gaussian with per-component covariance
c0 (a bond with itself), c1 (adjacent bonds) and c2 (bonds two apart), measured on 300 training chains, and the
chain term becomes 1/2 b^T (C + sigma^2 T)^-1 b - 1/2 b^T b / (c0 + 2 sigma^2); version 3 is C = c0 I. Dense
solves, 100-residue chains only: the prior alone as the sampler's flow (4 samples, 60 Heun steps, the
start, ChainSpread::start), with the d0, s0 of a checkpoint with a prior (argument 1).

    python benchmarks/prior_correlated_chain_prototype.py RUN/model.safetensors
"""
import math, sys, torch, numpy as np
from openmmflashipa import torch_twin as tt
from openmmflashipa.evaluation import DataSet
from openmmflashipa.openmmflashipa import _chainStart, UNKNOWN_AMINO_ACID
torch.set_num_threads(1)
d = DataSet('build/dataset/flashipa-dataset.safetensors')
cs = d.chains('protein', 'train', minLength=60, maxLength=300, singleSegment=True)[:300]
B0 = []; B1 = []; B2 = []
for c in cs:
    x = np.asarray(d.chain(c)[0]).reshape(-1, 3); b = x[1:] - x[:-1]
    B0.append((b * b).sum(1)); B1.append((b[1:] * b[:-1]).sum(1)); B2.append((b[2:] * b[:-2]).sum(1))
c0, c1, c2 = [np.mean(np.concatenate(v)) / 3 for v in (B0, B1, B2)]
print("c0 %.5f c1 %.5f (ratio %.3f) c2 %.5f (ratio %.3f)" % (c0, c1, c1 / c0, c2, c2 / c0))
m = tt.load_energy_model(sys.argv[1], dtype=torch.float64)
pairs, stats = m.geometryPriorPairs.detach(), m.geometryPriorStats.detach()
L, S, steps = 100, 4, 60
n = 3 * L; M = n - 1
T = 2 * torch.eye(M, dtype=torch.float64) - torch.diag(torch.ones(M - 1, dtype=torch.float64), 1) - torch.diag(torch.ones(M - 1, dtype=torch.float64), -1)
def Cmat(k1, k2):
    C = c0 * torch.eye(M, dtype=torch.float64)
    if k1: C = C + c1 * (torch.diag(torch.ones(M - 1, dtype=torch.float64), 1) + torch.diag(torch.ones(M - 1, dtype=torch.float64), -1))
    if k2: C = C + c2 * (torch.diag(torch.ones(M - 2, dtype=torch.float64), 2) + torch.diag(torch.ones(M - 2, dtype=torch.float64), -2))
    return C
types = torch.zeros(S, L, dtype=torch.int64); chains = torch.zeros(S, L, dtype=torch.int64); real = torch.ones(S, L, dtype=torch.bool)
def grad(x, s, C, a_sub):
    x = x.detach().requires_grad_(True)
    e = tt.geometry_prior(x, types, chains, real, torch.full((S,), s, dtype=torch.float64), pairs, stats, version=1)
    b = x.reshape(S, n, 3); b = b[:, 1:] - b[:, :-1]
    K = C + s * s * T
    y = torch.linalg.solve(K, b)
    e = e + 0.5 * ((y * b).sum((1, 2)) - (b * b).sum((1, 2)) / (a_sub + 2 * s * s))
    return torch.autograd.grad(e.sum(), x)[0]
for name, C, a_sub in [("freely jointed (v3)", Cmat(False, False), c0), ("c1", Cmat(True, False), c0), ("c1+c2", Cmat(True, True), c0)]:
    if torch.linalg.eigvalsh(C).min() <= 0: print(name, "not positive definite"); continue
    for smax in (1.2, 2.0):
        # Where the sampler starts (ChainSpread::start: the training chains' variance per cosine mode + smax).
        x = torch.from_numpy(np.frombuffer(_chainStart([UNKNOWN_AMINO_ACID] * L, [0] * L, smax, S, 0),
                                           dtype=np.float64).reshape(S, L, 3, 3).copy())
        lv = [smax * (0.01 / smax) ** (i / steps) for i in range(steps + 1)]
        for s, t in zip(lv[:-1], lv[1:]):
            d1 = s * grad(x, s, C, a_sub); d2 = t * grad(x + (t - s) * d1, t, C, a_sub)
            x = x + (t - s) * 0.5 * (d1 + d2)
        link = (x[:, 1:, 0] - x[:, :-1, 2]).norm(dim=-1); caca = (x[:, 1:, 1] - x[:, :-1, 1]).norm(dim=-1)
        nc = (x[:, :, 0] - x[:, :, 2]).norm(dim=-1)
        ca = x[:, :, 1]; rg = (ca - ca.mean(1, keepdim=True)).pow(2).sum(-1).mean(1).sqrt()
        print("%s smax %.1f: connected %.2f link %.3f N-C(intra) %.3f (0.246) CA-CA %.3f (0.38) Rg %.2f (1.43)" % (name, smax, (link < 0.2).double().mean(), link.median(), nc.median(), caca.median(), rg.mean()), flush=True)
