"""BOFT Triton's memory plan at SDXL widths (no GPU needed): scratch, chunk buffers, dR partials and
program counts of the forward and backward at 8,192 rows on a 132-SM GPU (H100/H200), for the block size
and stage count the module picks at lora_dim 32, beside the pre-phase kernel's (issue 11, point 5).

    python -m benchmarks.boft_working_set [--rows 8192] [--lora-dim 32]
"""
from __future__ import annotations

import argparse

import torch
import triton

from lyfast.kernels import _common
from lyfast.kernels import boft as kb
from lyfast.modules.boft import butterfly_factor

SMS = 132
MIB = 2**20


def old(rows, n, b, m):
    """The single-launch kernel before the phases: BR = 32 rows × O fp32 slots per program (2 forward,
    m + 1 backward), programs min(SMs, tiles, 256 MiB // slot bytes), dR partials per program."""
    O, tiles = n * b, triton.cdiv(rows, 32)
    fp = max(1, min(SMS, tiles, 256 * MIB // (2 * 32 * O * 4)))
    bp = max(1, min(SMS, tiles, 256 * MIB // ((m + 1) * 32 * O * 4)))
    return dict(f_progs=fp, f_scratch=fp * 2 * 32 * O * 4, b_progs=bp, b_scratch=bp * (m + 1) * 32 * O * 4,
                partials=bp * (m * n * b * b + O) * 4)


def new(rows, n, b, m):
    dev = torch.device("cuda")
    p = kb.plan(dev, rows, n, b, m)
    O, k, OL = n * b, len(p.phases), p.width(b)
    sets = [n >> (ms - 1) for _, ms in p.phases]
    fp = kb._fwd_programs(dev, p, n)
    f_launch = [min(fp, triton.cdiv(p.chunk_rows, kb.BR_FWD) * s) for s in sets]
    bp = _common.persistent_programs(dev, p.groups * max(sets), per_sm=1)
    b_launch = [min(bp, p.groups * s) for s in sets]
    ms_max = max(ms for _, ms in p.phases)
    return dict(phases=[ms for _, ms in p.phases], chunk=p.chunk_rows, chunks=triton.cdiv(rows, p.chunk_rows),
                groups=p.groups, f_progs=f_launch, f_scratch=fp * 2 * kb.BR_FWD * OL * 4,
                f_chunk=min(k - 1, 2) * p.chunk_rows * O * 4, b_progs=b_launch,
                b_scratch=max(bp * (ms_max + 1) * kb.BR_BWD, (fp if k > 1 else 0) * 2 * kb.BR_FWD) * OL * 4,
                b_chunk=(k - 1) * p.chunk_rows * O * 4, partials=p.groups * (m * n * b * b + O) * 4,
                launches_f=k * triton.cdiv(rows, p.chunk_rows), launches_b=(2 * k - 1) * triton.cdiv(rows, p.chunk_rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--lora-dim", type=int, default=32)
    ap.add_argument("--widths", type=int, nargs="+", default=[1280, 5120, 10240])
    args = ap.parse_args(argv)
    saved = _common.launch_sms, kb.launch_sms
    _common.launch_sms = kb.launch_sms = lambda device: SMS
    try:
        for O in args.widths:
            b, n = butterfly_factor(O, args.lora_dim)
            m = n.bit_length()
            io = 2 * args.rows * O * 2  # bf16 z in, y out
            o, w = old(args.rows, n, b, m), new(args.rows, n, b, m)
            print(f"O={O} b={b} n={n} m={m} rows={args.rows}: bf16 in+out {io / MIB:.1f} MiB")
            print(f"  before: fwd {o['f_progs']} programs, scratch {o['f_scratch'] / MIB:.1f} MiB; bwd {o['b_progs']} "
                  f"programs, scratch {o['b_scratch'] / MIB:.1f} MiB, dR partials {o['partials'] / MIB:.1f} MiB")
            print(f"  after:  phases {w['phases']}, chunk {w['chunk']} rows x{w['chunks']}, launches fwd "
                  f"{w['launches_f']} bwd {w['launches_b']}")
            print(f"          fwd programs per phase {w['f_progs']}, program scratch {w['f_scratch'] / MIB:.2f} MiB "
                  f"+ chunk buffers {w['f_chunk'] / MIB:.1f} MiB")
            print(f"          bwd programs per phase {w['b_progs']} ({w['groups']} row groups), program scratch "
                  f"{w['b_scratch'] / MIB:.2f} MiB + chunk buffers {w['b_chunk'] / MIB:.1f} MiB, dR partials "
                  f"{w['partials'] / MIB:.1f} MiB")
    finally:
        _common.launch_sms, kb.launch_sms = saved


if __name__ == "__main__":
    main()
