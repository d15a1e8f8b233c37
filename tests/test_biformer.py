"""BiLevelRoutingAttention and BiFormer against a pure-PyTorch reimplementation of upstream's
legacy module (rayleizhu/BiFormer ops/bra_legacy.py), run on the same weights."""
import pytest
import torch
import torch.nn.functional as F

from tokred_ext.models import biformer_small, biformer_tiny
from tokred_ext.models.biformer import set_backend
from tokred_ext.nn import BiLevelRoutingAttention


def upstream_bra(m: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """Upstream's forward, step by step, reading m's weights: pad, window partition, qkv,
    kv_down, window means, lepe, torch.topk routing, expand + gather, matmul attention."""
    sd = dict(m.named_parameters())
    p, qk, C, heads = m.n_win, m.qk_dim, m.dim, m.num_heads
    N, H_in, W_in, _ = x.shape
    if m.auto_pad:
        pad_r, pad_b = (p - W_in % p) % p, (p - H_in % p) % p
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    else:
        pad_r = pad_b = 0
    H, W = x.shape[1], x.shape[2]
    h, w = H // p, W // p
    wins = torch.stack([x[:, j * h:(j + 1) * h, i * w:(i + 1) * w] for j in range(p)
                        for i in range(p)], dim=1)  # n p2 h w c
    qkv = F.linear(wins, sd["qkv.qkv.weight"], sd["qkv.qkv.bias"])
    q, kv = qkv[..., :qk], qkv[..., qk:]
    q_pix = q.flatten(2, 3)
    pooled = m.kv_down(kv.flatten(0, 1).permute(0, 3, 1, 2))  # (n p2) c hk wk
    kv_pix = pooled.flatten(2).transpose(1, 2).reshape(N, p * p, -1, qk + C)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk].mean([2, 3])
    v_img = torch.cat([torch.cat([kv[:, j * p + i, ..., qk:] for i in range(p)], dim=2)
                       for j in range(p)], dim=1)  # n H W c
    if m.lepe is not None:
        lepe = F.conv2d(v_img.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias,
                        padding=m.lepe.padding, groups=C).permute(0, 2, 3, 1)
    else:
        lepe = torch.zeros_like(v_img)
    # TopkRouting
    qr, kr = (q_win, k_win) if m.diff_routing else (q_win.detach(), k_win.detach())
    if m.param_routing:
        qr = F.linear(qr, sd["router.emb.weight"], sd["router.emb.bias"])
        kr = F.linear(kr, sd["router.emb.weight"], sd["router.emb.bias"])
    logit = (qr * m.scale) @ kr.transpose(-2, -1)
    top_logit, r_idx = torch.topk(logit, k=m.topk, dim=-1)
    r_weight = torch.softmax(top_logit, dim=-1)
    # KVGather
    n, p2, w2, ckv = kv_pix.shape
    sel = torch.gather(kv_pix.view(n, 1, p2, w2, ckv).expand(-1, p2, -1, -1, -1), 2,
                       r_idx.view(n, p2, m.topk, 1, 1).expand(-1, -1, -1, w2, ckv))
    if m.soft_routing:
        sel = r_weight.view(n, p2, m.topk, 1, 1) * sel
    k_sel, v_sel = sel[..., :qk], sel[..., qk:]
    hk, hv = qk // heads, C // heads
    k_sel = k_sel.reshape(n, p2, m.topk, w2, heads, hk).permute(0, 1, 4, 5, 2, 3)
    k_sel = k_sel.reshape(n * p2, heads, hk, m.topk * w2)
    v_sel = v_sel.reshape(n, p2, m.topk, w2, heads, hv).permute(0, 1, 4, 2, 3, 5)
    v_sel = v_sel.reshape(n * p2, heads, m.topk * w2, hv)
    qh = q_pix.reshape(n * p2, h * w, heads, hk).transpose(1, 2)
    attn = torch.softmax((qh * m.scale) @ k_sel, dim=-1)
    out = (attn @ v_sel).transpose(1, 2).reshape(n, p, p, h, w, C)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(n, H, W, C) + lepe
    if m.param_attention == "qkvo":
        out = F.linear(out, sd["wo.weight"], sd["wo.bias"])
    return out[:, :H_in, :W_in].contiguous()


CONFIGS = [
    dict(),
    dict(kv_downsample_mode="avgpool", kv_downsample_ratio=2),
    dict(kv_downsample_mode="maxpool", kv_downsample_ratio=2),
    dict(kv_downsample_mode="ada_avgpool", kv_per_win=1),
    dict(kv_downsample_mode="ada_maxpool", kv_per_win=2),
    dict(kv_downsample_mode="avgpool", kv_downsample_ratio=1),
    dict(soft_routing=True),
    dict(soft_routing=True, diff_routing=True, param_routing=True),
    dict(side_dwconv=0, param_attention="qkv", qk_dim=12, qk_scale=0.3),
    dict(topk=9),
    dict(topk=1, num_heads=4),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("hw", [(12, 12), (11, 14)])
def test_module_matches_upstream(cfg, hw):
    torch.manual_seed(0)
    kwargs = dict(dim=16, num_heads=2, n_win=3, topk=4, side_dwconv=3, auto_pad=True)
    kwargs.update(cfg)
    m = BiLevelRoutingAttention(**kwargs).double()
    x = torch.randn(2, *hw, 16, dtype=torch.float64, requires_grad=True)
    out = m(x)
    want = upstream_bra(m, x)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    params = [p for p in m.parameters()]
    got_g = torch.autograd.grad(out, [x] + params, grad, allow_unused=True)
    want_g = torch.autograd.grad(want, [x] + params, grad, allow_unused=True)
    for a, b in zip(got_g, want_g):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)


def test_module_reference_backend_float32():
    torch.manual_seed(1)
    m = BiLevelRoutingAttention(32, num_heads=4, n_win=4, topk=3)
    x = torch.randn(2, 16, 16, 32)
    a = m(x)
    m.backend = "reference"
    torch.testing.assert_close(m(x), a, atol=1e-5, rtol=1e-5)


def test_module_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BiLevelRoutingAttention(16, num_heads=3)
    with pytest.raises(ValueError, match="param_routing=True requires diff_routing"):
        BiLevelRoutingAttention(16, num_heads=2, param_routing=True)
    with pytest.raises(ValueError, match="'fracpool' is not implemented"):
        BiLevelRoutingAttention(16, num_heads=2, kv_downsample_mode="fracpool")
    with pytest.raises(ValueError, match="kv_downsample_mode"):
        BiLevelRoutingAttention(16, num_heads=2, kv_downsample_mode="bogus")
    for topk in (-1, 10):  # n_win 3: 9 regions
        with pytest.raises(ValueError, match=r"topk must be in \[0, n_win\*\*2 = 9\]"):
            BiLevelRoutingAttention(16, num_heads=2, n_win=3, topk=topk)
    with pytest.raises(ValueError, match="must be >= 1"):
        BiLevelRoutingAttention(16, num_heads=2, n_win=0)
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=3)
    with pytest.raises(ValueError, match="multiples of n_win"):
        m(torch.randn(1, 10, 9, 16))
    with pytest.raises(ValueError, match="hard routing"):
        BiLevelRoutingAttention(16, num_heads=2, n_win=2, diff_routing=True)
    with pytest.raises(ValueError, match="backend"):
        m.backend = "cuda"


UPSTREAM_BLOCK_KEYS = {  # a BRA block of a released checkpoint (stages.0.0) and stage 4 (3.0)
    "stages.0.0.pos_embed.weight", "stages.0.0.norm1.weight", "stages.0.0.attn.lepe.weight",
    "stages.0.0.attn.lepe.bias", "stages.0.0.attn.qkv.qkv.weight", "stages.0.0.attn.qkv.qkv.bias",
    "stages.0.0.attn.wo.weight", "stages.0.0.attn.wo.bias", "stages.0.0.mlp.0.weight",
    "stages.0.0.mlp.3.weight", "stages.3.0.attn.qkv.weight", "stages.3.0.attn.proj.weight",
    "stages.3.0.attn.lepe.weight", "downsample_layers.0.0.weight", "downsample_layers.0.1.running_mean",
    "downsample_layers.0.3.weight", "downsample_layers.3.1.weight", "norm.weight", "head.weight",
}


def test_model_configs_and_keys():
    m = biformer_small()
    keys = set(m.state_dict())
    assert UPSTREAM_BLOCK_KEYS <= keys
    assert sum(p.numel() for p in m.parameters()) == 25_536_232  # 25.5M as released
    assert [len(s) for s in m.stages] == [4, 4, 18, 4]
    bra = [s[0].attn for s in m.stages[:3]]
    assert [a.topk for a in bra] == [1, 4, 16]
    assert [a.num_heads for a in bra] == [2, 4, 8]
    assert all(a.n_win == 7 and a.kv_downsample_mode == "identity" for a in bra)
    assert m.stages[3][0].attn.num_heads == 8 and m.stages[3][0].attn.lepe.kernel_size == (5, 5)
    # A state dict round-trips into a fresh model under upstream's names.
    m2 = biformer_small()
    m2.load_state_dict(m.state_dict())


def test_model_backends_agree_and_train_deterministically():
    torch.manual_seed(2)
    m = biformer_tiny(n_win=2, topks=(1, 2, 3, -2), num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    m.eval()
    with torch.no_grad():
        a = m(x)
        set_backend(m, "reference")
        b = m(x)
        set_backend(m, "tokred")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    m.train()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        losses = []
        for _ in range(2):
            torch.manual_seed(3)
            mm = biformer_tiny(n_win=2, topks=(1, 2, 3, -2), num_classes=10)
            opt = torch.optim.SGD(mm.parameters(), lr=0.01)
            loss = F.cross_entropy(mm(x), torch.tensor([1, 2]))
            loss.backward()
            opt.step()
            losses.append((loss.detach(), [p.detach().clone() for p in mm.parameters()]))
        assert torch.equal(losses[0][0], losses[1][0])
        for p, q in zip(losses[0][1], losses[1][1]):
            assert torch.equal(p, q)
    finally:
        torch.use_deterministic_algorithms(prev)


def test_ret_attn_mask_matches_upstream_weights():
    torch.manual_seed(4)
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2).double()
    x = torch.randn(1, 6, 6, 16, dtype=torch.float64)
    out, r_weight, r_idx, attn = m(x, ret_attn_mask=True)
    torch.testing.assert_close(out, m(x))
    torch.testing.assert_close(out, upstream_bra(m, x))
    assert r_idx.shape == (1, 4, 2) and r_weight.shape == (1, 4, 2)
    assert attn.shape == (4, 2, 9, 2 * 9)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, 2, 9, dtype=torch.float64))


def test_module_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(5)
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=3, side_dwconv=3)
    cm = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for hw in [(6, 10), (8, 4)]:
        x = torch.randn(2, *hw, 16, requires_grad=True)
        got, want = cm(x), m(x)
        torch.testing.assert_close(got, want)
        ga = torch.autograd.grad(got.sum(), x)[0]
        gb = torch.autograd.grad(want.sum(), x)[0]
        torch.testing.assert_close(ga, gb)
    torch._dynamo.reset()
