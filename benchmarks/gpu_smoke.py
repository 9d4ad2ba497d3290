"""Quick forward/backward check of the kernels against the oracle on every device present."""
import sys
import time

import torch

import kernels
from kernels import mods
import oracle
from torch.nn.attention.flex_attention import create_block_mask


def case(dev, B, Hq, Hkv, L, S, E, Ev, dtype, score=None, mask=None, bs=128, opts=None, Bk=None):
    torch.manual_seed(0)
    Bk = Bk or B
    q = torch.randn(B, Hq, L, E, device=dev).to(dtype).requires_grad_()
    k = torch.randn(Bk, Hkv, S, E, device=dev).to(dtype).requires_grad_()
    v = torch.randn(Bk, Hkv, S, Ev, device=dev).to(dtype).requires_grad_()
    bm = create_block_mask(mask, B, Hq, L, S, device=dev, BLOCK_SIZE=bs) if mask is not None else None
    do = torch.randn(B, Hq, L, Ev, device=dev).to(dtype)
    dl = torch.randn(B, Hq, L, device=dev)
    learn = [t for t in (score.tensors() if score else []) if t.requires_grad]
    t0 = time.time()
    o, lse = kernels.flex_attention(q, k, v, score_mod=score, block_mask=bm, enable_gqa=Hq != Hkv,
                                    return_lse=True, kernel_options=opts)
    fin = torch.isfinite(lse).detach()
    g = torch.autograd.grad((o.float() * do.float()).sum() + (lse * dl)[fin].sum(), [q, k, v] + learn)
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    ro, rl = oracle.flex_attention(q, k, v, score_mod=score, block_mask=bm, enable_gqa=Hq != Hkv, return_lse=True)
    rg = torch.autograd.grad((ro * do.double()).sum() + (rl * dl.double())[fin].sum(), [q, k, v] + learn)
    errs = " ".join(f"{n}={(a.double() - b.double()).abs().max().item():.1e}"
                    for n, a, b in zip(["dq", "dk", "dv", "dbias"], g, rg))
    print(f"{dev} {(B, Hq, Hkv, L, S, E, Ev)} {str(dtype)[6:]} {score} {mask} "
          f"out={(o.double() - ro).abs().max().item():.1e} lse={(lse.double()-rl)[fin].abs().max().item():.1e} "
          f"{errs} nan={any(x.isnan().any().item() for x in g)} t={dt:.2f}s", flush=True)


def main(devs):
    for dev in devs:
        big = dev == "cuda"
        case(dev, 1, 2, 2, 128, 128, 64, 64, torch.float16)
        case(dev, 2, 4, 2, 200, 77, 40, 24, torch.bfloat16, mask=mods.causal(), bs=64)
        case(dev, 1, 3, 1, 300, 260, 16, 32, torch.float32, score=mods.tanh_softcap(5.0), mask=mods.sliding_window(50), bs=32)
        case(dev, 2, 2, 2, 130, 131, 64, 64, torch.float16, score=mods.bias.from_seed([2, 130, 131], 1, requires_grad=True, device=dev), Bk=1)
        case(dev, 1, 4, 4, 17, 300, 64, 64, torch.bfloat16, mask=mods.causal())
        if big:
            case(dev, 2, 8, 2, 1024, 1024, 128, 128, torch.bfloat16, mask=mods.causal())
            case(dev, 1, 8, 8, 2048, 2048, 64, 64, torch.float16, score=mods.alibi.standard(8, device=dev), mask=mods.document.from_seed(2048, 5, 0, device=dev))
            case(dev, 1, 4, 4, 1000, 1000, 128, 128, torch.float32, mask=mods.causal())


if __name__ == "__main__":
    main(sys.argv[1:] or (["cuda"] if torch.cuda.is_available() else ["cpu"]))
