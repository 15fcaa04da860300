"""Absorbed MLA decode: Triton kernel vs PyTorch reference vs a naive per-sequence softmax loop.

On CPU tensors the launcher runs the kernel through the Triton interpreter (no TRITON_INTERPRET
needed, whatever imported Triton first); fp32 and fp16 only there, since the interpreter gets
tl.dot on bf16 wrong. On a GPU the same cases run compiled, in bf16 as well.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xecomla_cli.kernels import ENV_VAR, decode_backend, mla_decode_auto
from xecomla_cli.kernels.reference import mla_decode_einsum, mla_decode_reference

triton = pytest.importorskip("triton")
from xecomla_cli.kernels.mla_decode import default_num_splits, mla_decode  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"cpu": [torch.float32, torch.float16], "cuda": [torch.bfloat16, torch.float16, torch.float32]}
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
BLOCK_SIZE = 16  # rows per page of the paged cache


def make_case(B, H, r, p, L, dtype, device, paged, seed=0):
    """Random queries, cache and lengths (one sequence of length 1, one full); paged layout if asked."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, r + p, generator=g)
    q_lat, q_rope = q[..., :r], q[..., r:]  # views with row stride r + p, as the model's split gives
    kv = torch.randn(B, L, r, generator=g)
    k_rope = torch.randn(B, L, p, generator=g)
    seq_lens = torch.randint(1, L + 1, (B,), generator=g, dtype=torch.int32)
    seq_lens[0] = 1
    seq_lens[-1] = L
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    args = dict(q_lat=cast(q_lat), q_rope=cast(q_rope), kv=cast(kv), k_rope=cast(k_rope),
                seq_lens=seq_lens.to(device), sm_scale=1.0 / math.sqrt(r + p))
    if paged:
        args.update(paginate(args["kv"], args["k_rope"], seq_lens, g))
    return args


def paginate(kv, k_rope, seq_lens, g):
    """Scatter a contiguous cache into shuffled pages; table entries past a sequence's end are -1."""
    B, L, _ = kv.shape
    max_blocks = -(-L // BLOCK_SIZE)
    num_blocks = B * max_blocks + 3  # a few spare pages nobody owns
    perm = torch.randperm(num_blocks, generator=g)[: B * max_blocks].view(B, max_blocks)
    pad = max_blocks * BLOCK_SIZE - L
    kv_pages = torch.randn(num_blocks, BLOCK_SIZE, kv.shape[-1], generator=g).to(kv)
    kr_pages = torch.randn(num_blocks, BLOCK_SIZE, k_rope.shape[-1], generator=g).to(k_rope)
    kv_pages[perm.flatten()] = torch.nn.functional.pad(kv, (0, 0, 0, pad)).view(-1, BLOCK_SIZE, kv.shape[-1])
    kr_pages[perm.flatten()] = torch.nn.functional.pad(k_rope, (0, 0, 0, pad)).view(-1, BLOCK_SIZE, k_rope.shape[-1])
    used = torch.arange(max_blocks)[None, :] * BLOCK_SIZE < seq_lens[:, None]
    block_table = torch.where(used, perm, -1).to(device=kv.device, dtype=torch.int32)
    return dict(kv=kv_pages, k_rope=kr_pages, block_table=block_table)


def naive_decode(q_lat, q_rope, kv, k_rope, seq_lens, sm_scale):
    """One sequence and one head at a time, fp64, contiguous cache: out [B, H, r], lse [B, H]."""
    B, H, r = q_lat.shape
    out = torch.zeros(B, H, r, dtype=torch.float64)
    lse = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        keys_lat, keys_rope = kv[b, :n].double(), k_rope[b, :n].double()
        for h in range(H):
            s = sm_scale * (keys_lat @ q_lat[b, h].double() + keys_rope @ q_rope[b, h].double())  # [n]
            out[b, h] = torch.softmax(s, dim=0) @ keys_lat
            lse[b, h] = torch.logsumexp(s, dim=0)
    return out, lse


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("H,r,p", [(9, 64, 32), (1, 48, 16), (16, 72, 8)])
def test_reference_matches_naive_loop(H, r, p, paged):
    contiguous = make_case(3, H, r, p, 37, torch.float32, "cpu", paged=False, seed=1)
    args = make_case(3, H, r, p, 37, torch.float32, "cpu", paged=paged, seed=1)
    out, lse = mla_decode_reference(**args, return_lse=True)
    want_out, want_lse = naive_decode(**contiguous)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("paged", [False, True])
def test_einsum_reference_matches_reference(paged):
    args = make_case(4, 9, 64, 32, 50, torch.float32, "cpu", paged=paged, seed=2)
    out, lse = mla_decode_einsum(**args, return_lse=True)
    want_out, want_lse = mla_decode_reference(**args, return_lse=True)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


KERNEL_CASES = [
    # (B, H, r, p, L, num_splits): L long enough for several BLOCK_N tiles per split
    (3, 9, 64, 32, 80, 1),
    (3, 9, 64, 32, 200, 3),
    (2, 1, 48, 16, 70, 1),
    (2, 1, 48, 16, 300, 4),  # all but one split of the length-1 sequence are empty
    (2, 16, 72, 8, 150, 2),
    (2, 32, 128, 32, 64, None),  # heuristic split count
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("B,H,r,p,L,num_splits", KERNEL_CASES)
def test_kernel_matches_reference(B, H, r, p, L, num_splits, paged, device):
    for dtype in DTYPES[device]:
        args = make_case(B, H, r, p, L, dtype, device, paged, seed=B * H + L)
        out, lse = mla_decode(**args, num_splits=num_splits, return_lse=True)
        want_out, want_lse = mla_decode_reference(**args, return_lse=True)
        assert out.shape == (B, H, r) and out.dtype == dtype and lse.shape == (B, H)
        atol = ATOL[dtype]
        torch.testing.assert_close(out.float(), want_out.float(), atol=atol, rtol=atol, msg=lambda m: f"{dtype}: {m}")
        torch.testing.assert_close(lse, want_lse, atol=atol, rtol=atol, msg=lambda m: f"{dtype} lse: {m}")


def test_kernel_on_views_of_one_cache_buffer():
    """kv and k_rope as views of one [B, L, r + p] buffer (strides r + p) give the same result."""
    args = make_case(2, 9, 64, 32, 100, torch.float32, DEVICES[-1], paged=False, seed=5)
    buffer = torch.cat([args["kv"], args["k_rope"]], dim=-1)
    views = dict(args, kv=buffer[..., :64], k_rope=buffer[..., 64:])
    torch.testing.assert_close(mla_decode(**views, num_splits=2), mla_decode_reference(**args), atol=1e-5, rtol=1e-5)


def test_kernel_rejects_bad_inputs():
    args = make_case(2, 9, 64, 32, 20, torch.float32, "cpu", paged=False)
    with pytest.raises(ValueError, match="share a dtype"):
        mla_decode(**dict(args, kv=args["kv"].half()))
    with pytest.raises(ValueError, match="k_rope"):
        mla_decode(**dict(args, k_rope=args["k_rope"][..., :16]))
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode(**dict(args, seq_lens=args["seq_lens"][:1]))


def test_kernel_detects_a_wrong_length():
    """The comparison has teeth: attending to one row too many changes the answer."""
    args = make_case(2, 9, 64, 32, 40, torch.float32, DEVICES[-1], paged=False, seed=3)
    args["seq_lens"] = torch.tensor([20, 39], dtype=torch.int32, device=args["kv"].device)
    out = mla_decode(**args, num_splits=2)
    longer = dict(args, seq_lens=args["seq_lens"] + 1)
    assert (out.float() - mla_decode_reference(**longer).float()).abs().max() > 1e-3
    torch.testing.assert_close(out, mla_decode_reference(**args), atol=1e-5, rtol=1e-5)


def test_num_splits_heuristic():
    # batch 1 fills the GPU by splitting; a big batch barely splits; never more splits than rows allow
    assert default_num_splits(1, 32, 8192, num_sms=132) >= 16
    assert default_num_splits(64, 32, 8192, num_sms=132) <= 8
    assert default_num_splits(1, 32, 100, num_sms=132) == 1
    assert 1 <= default_num_splits(512, 128, 1 << 20, num_sms=132) <= 64


def test_dispatcher_env_switch(monkeypatch):
    args = make_case(2, 9, 64, 32, 30, torch.float32, "cpu", paged=True, seed=4)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert decode_backend(torch.device("cpu")) == "reference"
    torch.testing.assert_close(mla_decode_auto(**args), mla_decode_reference(**args), atol=0, rtol=0)
    monkeypatch.setenv(ENV_VAR, "triton")  # forced: the interpreter runs the kernel on CPU
    assert decode_backend(torch.device("cpu")) == "triton"
    out, lse = mla_decode_auto(**args, return_lse=True)
    want_out, want_lse = mla_decode_reference(**args, return_lse=True)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv(ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match=ENV_VAR):
        mla_decode_auto(**args)


def test_kernel_compiles_for_h100_without_a_gpu():
    """The real compiler (not the interpreter) lowers it to tensor-core code that fits in registers."""
    root = Path(__file__).resolve().parents[1]
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build ships no ptxas")
    code = ("import json, torch; from xecomla_cli.kernels.mla_decode import compile_for_gpu as c; "
            "print(json.dumps([c(90), c(90, paged=True), c(90, torch.float16, 72, 8, H=9), "
            "c(80, torch.bfloat16, 48, 16, H=1, paged=True)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**env, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr[-3000:]
    for report in json.loads(res.stdout):
        assert report["tensor_cores"] in ("mma", "wgmma") and report["cp_async"], report
        assert report["shared_bytes"] <= 100 * 1024 and report.get("local_bytes", 0) == 0, report


def test_benchmark_quick_smoke():
    """bench/decode_kernel.py --quick prints one JSON object with the ratios filled in."""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "bench" / "decode_kernel.py"), "--quick"],
                         capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["shapes"] and all(s["max_abs_err"] < 0.05 and s["speedup_vs_sdpa"] > 0 for s in report["shapes"])
