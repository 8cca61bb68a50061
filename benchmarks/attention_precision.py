"""Which operand precision can the fused attention use and still give forces within 2e-3 of double precision?

Emulates, on the CPU, the rounding the tensor-core kernels apply: the scalar operands (q, k, v, the bias and
pair factors) rounded to a 16-bit type, the unnormalised probabilities rounded before the P.V product, and the
gradients flowing back through those operands rounded likewise; everything else (points, softmax, sums) in
float64. The shipped model's learned force on the shipped structures is compared with the exact float64
evaluation (relative RMS over all frame-atom force components). A measurement for a design choice, not a
test: the GPU kernels' own errors are measured by benchmarks/backend_md_accuracy.py on the device.

    .venv/bin/python benchmarks/attention_precision.py examples/data/protein.pdb examples/data/rna.pdb
"""
import math
import sys

import numpy as np
import openmm.unit as unit
import torch
import openmm.app as app
from openmmflashipa import torch_twin as tt
from openmmflashipa import selectFrameResidues
torch.set_num_threads(1)

class Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype, grad_dtype):
        ctx.grad_dtype = grad_dtype
        return x if dtype is None else x.to(dtype).to(x.dtype)
    @staticmethod
    def backward(ctx, g):
        return (g if ctx.grad_dtype is None else g.to(ctx.grad_dtype).to(g.dtype)), None, None

def split_round(x, dtype):   # hi + lo, each in dtype: what a two-term split carries
    hi = x.to(dtype).to(x.dtype)
    return hi + (x - hi).to(dtype).to(x.dtype)

MODE = {"operand": None, "prob": None, "grad": None, "split": False}

def R(x):
    if x is None:
        return None
    if MODE["split"]:  # value of the two-term split, exact gradient
        return x + (split_round(x.detach(), MODE["operand"]) - x.detach())
    return Round.apply(x, MODE["operand"], MODE["grad"])

def attend(self, p):
    cfg = self.config
    wL, wC = math.sqrt(1.0 / 3.0), math.sqrt(2.0 / (9.0 * cfg.queryPoints))
    q, k, v = R(p["q"]), R(p["k"]), R(p["v"])
    logits = torch.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(cfg.headDim)
    if p["biasLeft"] is not None:
        logits = logits + torch.einsum("bihr,bjhr->bhij", R(p["biasLeft"]), R(p["biasRight"]))
    diff = p["qPoints"].unsqueeze(2) - p["kPoints"].unsqueeze(1)
    distance2 = diff.pow(2).sum((-1, -2)).permute(0, 3, 1, 2)
    logits = wL * (logits - (p["gamma"] * (wC / 2)).view(1, -1, 1, 1) * distance2)
    e = torch.exp(logits - logits.max(-1, keepdim=True).values.detach())
    if MODE["prob"] is not None:
        e = Round.apply(e, MODE["prob"], MODE["grad"])
    a = e / e.sum(-1, keepdim=True)
    scalar = torch.einsum("bhij,bjhc->bihc", a, v)
    points = torch.einsum("bhij,bjhpx->bihpx", a, p["vPoints"])
    pair = torch.einsum("bhij,bjrd->bihrd", a, R(p["pairRight"])) if p["pairRight"] is not None else None
    return scalar, points, pair

tt.FlashIPALayer._attend_math = attend  # the twin's math path, with the emulated rounding

model = tt.load_energy_model(dtype=torch.float64)
def inputs(path):
    pdb = app.PDBFile(path)
    frames, _ = selectFrameResidues(pdb.topology)
    xyz = np.array(pdb.positions.value_in_unit(unit.nanometer))
    atoms = torch.tensor(np.stack([xyz[list(f.atoms)] for f in frames]))[None]
    types = torch.tensor([f.residueType for f in frames])[None]
    chains = torch.zeros_like(types)
    return atoms, types, chains
def forces(atoms, types, chains, backend):
    x = atoms.clone().requires_grad_(True)
    E = tt.energy(model, x, types, chains, torch.tensor([0.05], dtype=torch.float64), backend=backend).sum()
    (g,) = torch.autograd.grad(E, x)
    return -g, E.item()
print("| structure | L | rounding | force error (rel. RMS) | energy error (rel.) |")
print("|---|---|---|---|---|")
for path in sys.argv[1:]:
    a, t, c = inputs(path)
    MODE.update(operand=None, prob=None, grad=None, split=False)
    ref, e0 = forces(a, t, c, "math")
    for name, mode in [("exact-emulated", dict(operand=None, prob=None, grad=None, split=False)),
                       ("bf16 operands", dict(operand=torch.bfloat16, prob=None, grad=None, split=False)),
                       ("bf16 operands+P", dict(operand=torch.bfloat16, prob=torch.bfloat16, grad=None, split=False)),
                       ("bf16 operands+P+grads", dict(operand=torch.bfloat16, prob=torch.bfloat16, grad=torch.bfloat16, split=False)),
                       ("fp16 operands+P+grads", dict(operand=torch.float16, prob=torch.float16, grad=torch.float16, split=False)),
                       ("fp16 operands+P", dict(operand=torch.float16, prob=torch.float16, grad=None, split=False)),
                       ("bf16 split operands, bf16 P", dict(operand=torch.bfloat16, prob=torch.bfloat16, grad=None, split=True)),
                       ("bf16 split operands, fp16 P", dict(operand=torch.bfloat16, prob=torch.float16, grad=None, split=True)),
                       ("fp32 operands, bf16 P", dict(operand=torch.float32, prob=torch.bfloat16, grad=None, split=False)),
                       ]:
        MODE.update(mode)
        f, e = forces(a, t, c, "math")
        err = ((f - ref).pow(2).sum() / ref.pow(2).sum()).sqrt().item()
        print("| %s | %d | %-32s | %.2e | %.1e |" % (path.split("/")[-1], a.shape[1], name, err, abs(e - e0) / abs(e0)), flush=True)
