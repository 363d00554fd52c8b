"""``mtnlg plan``: will a model fit, and how fast will it train, on N GPUs in a given 3D layout?

Three modes:

* ``mtnlg plan --model M --gpus N --gpu G --tp T --pp P --global-batch B --micro-batch b``:
  parameters, FLOPs, memory per GPU with its breakdown, communication, bubble and iteration time;
* ``mtnlg plan --search --model M --gpus N --gpu G --global-batch B``: the top-k valid layouts;
* ``mtnlg plan --timeline --schedule 1f1b --pp P --microbatches M --output FILE.png``: a picture of
  the pipeline schedule with its bubble;
* ``mtnlg plan --calibrate [--model M] [--output PROFILE.json]``: measure this machine into a profile
  that ``--profile PROFILE.json`` then prices layouts with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from mtnlg.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mtnlg.plan.gpus import GPUS
    from mtnlg.plan.presets import PRESETS
    from mtnlg.plan.schedule import SCHEDULES

    parser.add_argument("--model", metavar="PRESET|YAML",
                        help=f"a preset ({', '.join(PRESETS)}) or a YAML with num_layers, hidden_size, num_heads, "
                             "vocab_size, seq_len[, ffn_hidden_size]")
    parser.add_argument("--gpus", type=int, help="number of GPUs (world size)")
    parser.add_argument("--gpu", default="a100-80gb", choices=list(GPUS), help="accelerator (default a100-80gb)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=1, help="virtual stages per pipeline rank (interleaved 1F1B)")
    parser.add_argument("--global-batch", type=int, help="sequences per iteration")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per microbatch (default 1)")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: the model's)")
    parser.add_argument("--recompute", default="full", choices=["full", "selective", "none"],
                        help="activation recomputation (default full, as eq. 3 assumes)")
    parser.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3], help="ZeRO stage (default 1)")
    parser.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES),
                        help="pipeline schedule (default 1f1b; with --vpp > 1: interleaved)")
    parser.add_argument("--no-sequence-parallel", action="store_true", help="TP without sequence parallelism")
    parser.add_argument("--iteration-time", type=float, metavar="SECONDS",
                        help="measured seconds per iteration: report the achieved TFLOP/s per GPU")
    parser.add_argument("--profile", metavar="PROFILE.json",
                        help="machine profile to price time with: a file from --calibrate, or a shipped one "
                             "(a100-80gb, h100-80gb); default: the shipped profile of --gpu")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure this machine (matmuls at --model's shapes, element-wise bandwidth, gloo "
                             "collectives) and write a profile to --output (default: print it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank for --calibrate (default 1)")
    parser.add_argument("--peak-tflops", type=float, help="override the GPU's peak (TFLOP/s), e.g. a measured one")
    parser.add_argument("--memory-gb", type=float, help="override the GPU's memory (GB)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs joined by NVLink (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--search", action="store_true", help="rank every valid layout for --gpus and --global-batch")
    parser.add_argument("--top", type=int, default=10, help="rows of --search (default 10)")
    parser.add_argument("--max-tp", type=int, help="largest TP for --search (default: --gpus-per-node)")
    parser.add_argument("--timeline", action="store_true", help="draw a pipeline schedule to --output")
    parser.add_argument("--microbatches", type=int, help="microbatches for --timeline")
    parser.add_argument("--output", metavar="FILE", help="where --timeline writes its PNG, --calibrate its JSON")


def _model(args: argparse.Namespace):
    from mtnlg.plan.presets import load_model

    if not args.model:
        raise ConfigError("--model is required (a preset such as mtnlg-530b, or a YAML file)")
    model = load_model(args.model)
    if args.seq_len is not None:
        if args.seq_len < 1:
            raise ConfigError(f"--seq-len must be >= 1, got {args.seq_len}")
        cfg = dataclasses.replace(model.cfg, max_seq_len=max(model.cfg.max_seq_len, args.seq_len))
        model = dataclasses.replace(model, cfg=cfg, seq_len=args.seq_len)
    return model


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required here")


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f} GiB"


def _human(d: dict) -> str:
    lo = d["layout"]
    rows = [
        ("model", f"{d['model']}  (seq {lo['seq_len']})"),
        ("layout", f"{lo['gpus']} x {d['gpu']}: tp={lo['tp']} pp={lo['pp']} vpp={lo['vpp']} dp={lo['dp']}, "
                   f"{lo['schedule']}, recompute={lo['recompute']}, zero={lo['zero']}, "
                   f"sp={'on' if lo['sequence_parallel'] else 'off'}"),
        ("batch", f"global {lo['global_batch']} = micro {lo['micro_batch']} x {lo['microbatches']} microbatches "
                  f"x dp {lo['dp']}"),
        ("parameters", f"{d['params']:,} exact   ({d['params_eq2']:,.0f} by eq. 2)"),
        ("FLOPs / iteration", f"{d['flops_per_iteration']:.4e}"),
        ("memory / GPU", f"{_gib(d['memory_per_gpu_bytes'])} of {_gib(d['gpu_memory_bytes'])}  -> "
                         f"{'fits' if d['fits'] else 'DOES NOT FIT'}"),
    ]
    rows += [(f"  {k}", _gib(v)) for k, v in d["memory_breakdown"].items()]
    c = d["communication_per_iteration"]
    rows += [("communication / GPU", "")]
    rows += [(f"  {dim}", f"{c[dim + '_bytes'] / 1e9:,.2f} GB  ({c[dim + '_s']:.3f} s)") for dim in ("tp", "pp", "dp")]
    rows += [("bubble fraction", f"{d['bubble_fraction']:.4f}"),
             ("est. iteration time", f"{d['est_iteration_time_s']:.3f} s")]
    rows += [(f"  {k}", f"{v:.4g} s") for k, v in d["time_breakdown_s"].items()]
    rows += [("limited by", f"{d['limiting_term']}  (largest loss: {d['largest_loss']})"), ("profile", d["profile"])]
    rows += [("est. TFLOP/s / GPU", f"{d['est_tflops_per_gpu']:.1f}"),
             ("est. tokens / s", f"{d['est_tokens_per_s']:,.0f}")]
    if "tflops_per_gpu" in d:
        rows.append(("achieved TFLOP/s / GPU", f"{d['tflops_per_gpu']:.1f}  (at the given iteration time)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _search_table(plans: list) -> str:
    head = ("#", "tp", "pp", "vpp", "dp", "mbs", "recompute", "zero", "mem/GPU GiB", "bubble", "iter s",
            "TFLOP/s/GPU", "tokens/s", "limited by", "largest loss")
    rows = [head]
    for i, p in enumerate(plans, 1):
        lo = p.layout
        rows.append((str(i), str(lo.tp), str(lo.pp), str(lo.vpp), str(lo.dp), str(lo.micro_batch), lo.recompute,
                     str(lo.zero), f"{p.memory.total / 2**30:.1f}", f"{p.bubble_fraction:.3f}",
                     f"{p.est_iteration_time_s:.3f}", f"{p.est_tflops_per_gpu:.1f}", f"{p.tokens_per_s:,.0f}",
                     p.limiting_term, p.largest_loss))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def _run_timeline(args: argparse.Namespace) -> int:
    from mtnlg.plan.timeline import closed_form_label, draw_schedule

    _require(args, "microbatches", "output")
    vpp = 2 if args.schedule == "zb" and args.vpp == 1 else args.vpp
    tl = draw_schedule(args.schedule, args.pp, args.microbatches, vpp, args.output)
    if args.json:
        print(json.dumps({"schedule": args.schedule, "pp": args.pp, "microbatches": args.microbatches, "vpp": vpp,
                          "bubble_fraction": tl.bubble_fraction, "makespan": tl.makespan, "output": args.output}))
    else:
        print(f"{args.schedule}: p={args.pp} m={args.microbatches} v={vpp}: bubble {tl.bubble_fraction:.4f} "
              f"(closed form: {closed_form_label(args.schedule, args.pp, args.microbatches, vpp)}) -> {args.output}")
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    import sys

    from mtnlg.plan.calibrate import calibrate
    from mtnlg.plan.estimate import Layout, plan
    from mtnlg.plan.gpus import get_gpu
    from mtnlg.plan.timemodel import lookup_shapes

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    gemms: set = set()
    atts: set = set()
    if args.model:  # measure the shapes this model's layouts look up (tp 1, 2, 4 where they divide)
        model = _model(args)
        for tp in (1, 2, 4):
            if model.cfg.num_heads % tp or model.cfg.ffn_hidden_size % tp:
                continue
            lo = Layout(tp, tp, 1, 1, args.micro_batch * tp, args.micro_batch, args.recompute, args.zero)
            p = plan(model, lo, get_gpu("cpu"))
            g, a = lookup_shapes(p.shape)
            gemms |= g
            atts |= a
    prof = calibrate(gemms, atts, threads=args.threads, progress=lambda msg: print(msg, file=sys.stderr))
    if args.output:
        prof.save(args.output)
        print(f"profile {prof.name}: peak matmul {prof.peak_flops / 1e9:.1f} GFLOP/s, element-wise "
              f"{prof.elementwise_bw / 1e9:.1f} GB/s, op overhead {prof.op_overhead_s * 1e6:.1f} us -> {args.output}")
    else:
        print(json.dumps(prof.as_dict(), indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    from mtnlg.plan.estimate import Layout, plan
    from mtnlg.plan.gpus import get_gpu
    from mtnlg.plan.profile import resolve_profile
    from mtnlg.plan.search import search

    if args.timeline:
        return _run_timeline(args)
    if args.calibrate:
        return _run_calibrate(args)
    model = _model(args)
    _require(args, "gpus", "global_batch")
    gpu = get_gpu(args.gpu, args.peak_tflops, args.memory_gb)
    profile = resolve_profile(args.profile, gpu.name) if args.profile else None
    if args.search:
        if args.top < 1:
            raise ConfigError(f"--top must be >= 1, got {args.top}")
        plans = search(model, args.gpus, gpu, args.global_batch, top=args.top, gpus_per_node=args.gpus_per_node,
                       max_tp=args.max_tp, profile=profile)
        if args.json:
            print(json.dumps({"model": model.name, "gpus": args.gpus, "gpu": gpu.name,
                              "layouts": [p.as_dict() for p in plans]}, indent=2))
        elif not plans:
            print(f"no layout of {model.name} fits {args.gpus} x {gpu.name} at global batch {args.global_batch}")
        else:
            print(f"{model.name} on {args.gpus} x {gpu.name}, global batch {args.global_batch}: "
                  f"top {len(plans)} layouts by estimated throughput (profile {plans[0].profile_name})")
            print(_search_table(plans))
        return 0
    layout = Layout(args.gpus, args.tp, args.pp, args.vpp, args.global_batch, args.micro_batch, args.recompute,
                    args.zero, args.schedule, not args.no_sequence_parallel)
    result = plan(model, layout, gpu, profile=profile, gpus_per_node=args.gpus_per_node,
                  iteration_time=args.iteration_time)
    print(json.dumps(result.as_dict(), indent=2) if args.json else _human(result.as_dict()))
    return 0
