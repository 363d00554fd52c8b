"""``mtnlg generate``: continue a prompt, streaming the text to the terminal as it is produced.

Also the shared pieces of the inference commands (``poem``, ``chat``): the sampling flags, and
loading a model (optionally int8-quantized, with a tuned soft prompt, or tensor-parallel under
torchrun with ``--parallel.tp=N``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mtnlg.cli import add_config_arguments, load_config


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run directory, a checkpoint directory or a save_pretrained directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the model")
    parser.add_argument("--quantize", action="store_true", help="int8 weight-only Linear layers (less memory)")
    parser.add_argument("--prompt-tuning", metavar="FILE", help="a soft prompt saved by `mtnlg tune-prompt`")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.0,
                           max_new_tokens: int = 64) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most (default %(default)s)")
    g.add_argument("--max-length", type=int, help="prompt + new tokens at most")
    g.add_argument("--min-new-tokens", type=int, default=0, help="no stop token before this many tokens (default 0)")
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy (default %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (default 0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default %(default)s = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's presence penalty (default 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's frequency penalty (default 0)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (no streaming; default 1 = off)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length^this")
    g.add_argument("--seed", type=int, help="seed of the sampler (same seed, same text)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop at this token id (repeatable; end-of-text always stops)")
    g.add_argument("--compile", action="store_true", help="decode steps through torch.compile (faster for long "
                   "outputs at batch 1; the first step compiles, ~10-30 s on a CPU)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="text to continue ('-' reads standard input)")
    add_sampling_arguments(parser)
    parser.add_argument("--logprobs", type=int, metavar="K", help="with --json: per-token logprobs (+ top K)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def sampling_params(args: argparse.Namespace, tokenizer, extra_stop_ids: list[int] | None = None):
    from mtnlg.infer.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, max_length=args.max_length, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams,
        length_penalty=args.length_penalty, seed=args.seed, stop=list(args.stop),
        stop_token_ids=[tokenizer.eod_id, *args.stop_token_id, *(extra_stop_ids or [])],
        logprobs=getattr(args, "logprobs", None), vocab_limit=tokenizer.vocab_size,
        compile_decode=getattr(args, "compile", False), min_new_tokens=args.min_new_tokens).validate()


def load_model(args: argparse.Namespace):
    """The model of ``--checkpoint`` (via ``MegatronLmModel.from_pretrained``) ready for inference.

    Under torchrun with ``--parallel.tp=N`` the model is sharded over N ranks (no sequence
    parallelism, replicated logits), so every rank runs the same decode loop and picks the same tokens.
    Returns ``(lm, rank)``.
    """
    from mtnlg.api import MegatronLmModel
    from mtnlg.device import compute_dtype, decode_threads, pick_device

    cfg = load_config(args)
    device = pick_device(args.device, "--device")
    rank = 0
    tp = cfg.parallel.tp
    if args.quantize and tp > 1:
        from mtnlg.errors import ConfigError

        raise ConfigError("--quantize cannot be combined with --parallel.tp > 1; drop one of them")
    # --quantize loads straight into int8, one Linear at a time (the fp32 model never exists)
    lm = MegatronLmModel.from_pretrained(args.checkpoint, device=device, dtype=compute_dtype(device),
                                         quantize=True if args.quantize else None)
    if tp > 1:
        from mtnlg.infer.tp import shard_for_inference

        rank = shard_for_inference(lm, cfg.parallel, device)
    if args.prompt_tuning:
        from mtnlg.model.prompt_tuning import load_soft_prompt

        load_soft_prompt(lm, args.prompt_tuning)
    lm.model.eval()
    decode_threads(lm.model)  # one thread for a small model: as fast, and never held up by a busy core
    return lm, rank


def run(args: argparse.Namespace) -> int:
    from mtnlg.errors import ConfigError
    from mtnlg.infer.generate import generate, stream

    if args.logprobs is not None and not args.json:
        raise ConfigError("--logprobs goes with --json (the streamed text has no place for them); add --json")
    if args.compile and args.num_beams > 1:
        raise ConfigError("--compile compiles the one-sequence decode step; beam search (--num-beams > 1) does not "
                          "use it: drop one of them")
    lm, rank = load_model(args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt, soft = lm.encode_prompt(text)
    params = sampling_params(args, lm.tokenizer)
    t0 = time.perf_counter()
    if args.json or params.num_beams > 1:
        c = generate(lm.model, [prompt], params, lm.tokenizer, soft_prompt=soft)[0]
        dt = time.perf_counter() - t0
        if rank == 0:
            if args.json:
                out = {"prompt": text, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                       "prompt_tokens": len(prompt), "completion_tokens": len(c.token_ids),
                       "seconds": round(dt, 4), "tokens_per_s": round(len(c.token_ids) / max(dt, 1e-9), 2)}
                if params.logprobs is not None:
                    out["logprobs"] = c.logprobs
                    if c.top_logprobs is not None:
                        out["top_logprobs"] = [[{"token_id": t, "logprob": lp} for t, lp in row]
                                               for row in c.top_logprobs]
                print(json.dumps(out, ensure_ascii=False))
            else:
                print(text + c.text)
        return 0
    s = stream(lm.model, lm.tokenizer, prompt, params, soft_prompt=soft)
    if rank == 0:
        sys.stdout.write(text)
        sys.stdout.flush()
    for delta in s:
        if rank == 0:
            sys.stdout.write(delta)
            sys.stdout.flush()
    if rank == 0:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
