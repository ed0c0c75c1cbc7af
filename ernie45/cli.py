"""`ernie45 <verb>`: each verb is one library call."""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_info(args: argparse.Namespace) -> int:
    if args.backend or args.calibrate:
        return _info_backend(args)
    if args.model is None:
        print("ernie45 info: name a model (checkpoint folder, 'demo' or a preset), or pass --backend", file=sys.stderr)
        return 2
    from ernie45.resolve import model_config

    cfg = model_config(args.model)
    layers = cfg.moe_layers
    info = {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv x {cfg.head_dim}",
        "moe_layers": f"{layers[0]}..{layers[-1]} ({len(layers)})" if layers else "none",
        "experts": f"{cfg.moe_num_experts} routed, top-{cfg.moe_k}, {cfg.moe_num_shared_experts} shared"
        if cfg.is_moe else "dense",
        "params_total": cfg.num_params(),
        "params_active": cfg.num_active_params(),
        "kv_bytes_per_token_bf16": cfg.kv_bytes_per_token(2),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>26}: {v:,}" if isinstance(v, int) else f"{k:>26}: {v}")
    return 0


def _info_backend(args: argparse.Namespace) -> int:
    from ernie45.accel.backend import describe

    info = describe(measure=args.calibrate)
    if args.json:
        info.pop("choice_table", None)
        print(json.dumps(info, indent=2))
        return 0
    print(f"cpu: {info['cpu']} ({info['threads']} threads), torch {info['torch']}")
    print("features: " + " ".join(f for f, on in info["features"].items() if on))
    for name, why in info["backends"].items():
        print(f"backend {name}: {why}")
    print(f"native kernels: {info['native_kernels']}"
          + (f", the {info['active_isa']} build active" if info.get("active_isa") else ""))
    for isa, why in info["kernel_builds"].items():
        print(f"  {isa} build: {why}")
    print(f"torch's bf16 matmul (the torch side of the choice; AMX comes through it): oneDNN "
          f"{info['onednn_bf16_matmul']}")
    if "choice" in info:
        c = info["choice"]
        print(f"kernel choice per family and rows (N native, t torch), {c['source']}"
              + (f" ({c['file']})" if c["file"] else "") + ":")
        print("\n".join(info["choice_table"]))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from ernie45.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tp * args.ep > 1:  # several ranks under torchrun (started here when needed)
        from ernie45.serve.launch import serve_cli

        return serve_cli(args)
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("ERNIE45_API_KEY"),
          served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes, dtype=args.dtype,
          quant=args.quant, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
          kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len, max_waiting=args.max_waiting,
          block_size=args.block_size, enable_prefix_caching=False if args.no_prefix_caching else None,
          speculative_tokens=args.speculative_tokens or None, **_spec_options(args), **_placement_kwargs(args))
    return 0


def add_serve_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, chat page)")
    s.add_argument("model", nargs="?", default="demo", help="checkpoint folder, HF-style name, or 'demo' (default)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(or set ERNIE45_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="model name clients send (default: MODEL as given)")
    s.add_argument("--dtype", default="bfloat16", help="weights dtype: bfloat16, float16, float32")
    s.add_argument("--quant", default=None, help="quantize on load (e.g. int8, int4)")
    s.add_argument("--max-num-seqs", type=int, default=None, help="requests in the running batch at most")
    s.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per engine step at most")
    s.add_argument("--kv-cache-memory", default=None, help="KV cache budget, bytes or '2GB' (default: share of RAM)")
    s.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    s.add_argument("--max-waiting", type=int, default=256, help="waiting requests at most; more get HTTP 429")
    s.add_argument("--block-size", type=int, default=None, help="tokens per paged-KV block")
    s.add_argument("--no-prefix-caching", action="store_true", help="turn off prefix-cache block reuse")
    s.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="draft K tokens a step with the checkpoint's MTP block and verify them in one forward "
                        "(0 = off; output unchanged)")
    _add_spec_flags(s)
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body limit (HTTP 413)")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (torchrun; started for you if needed)")
    s.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (MoE models)")
    s.add_argument("--device", default=None, help="where the weights and KV cache live: cpu (default), cuda, cuda:N")
    _add_placement_flags(s)
    s.set_defaults(func=cmd_serve)


def _add_placement_flags(s: argparse.ArgumentParser) -> None:
    """Hybrid placement (ernie45.offload): routed experts in host RAM, the rest on --device."""
    s.add_argument("--experts-on", choices=("gpu", "cpu", "auto"), default=None,
                   help="where the routed experts live: cpu = host RAM, computed by the CPU kernels (the rest on "
                   "--device); auto = as many MoE layers' experts on the device as fit its free memory")
    s.add_argument("--gpu-experts", type=int, default=None, metavar="N",
                   help="keep the first N MoE layers' routed experts on --device, the rest in host RAM")


def _placement_kwargs(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in ("experts_on", "gpu_experts", "device") if getattr(args, k, None) is not None}
    if ("experts_on" in out or "gpu_experts" in out) and "device" not in out:
        raise ValueError("--experts-on / --gpu-experts place the routed experts apart from --device: give --device "
                         "cuda (or cuda:N) too")
    return out


# ----------------------------------------------------------------------------- generate / chat
def _add_generation_flags(s: argparse.ArgumentParser) -> None:
    """Sampling flags (SamplingParams fields) and engine passthrough shared by `generate` and `chat`."""
    g = s.add_argument_group("sampling (defaults: the checkpoint's generation_config.json, else SamplingParams)")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, help="1 = off")
    g.add_argument("--seed", type=int, help="same seed, same output")
    g.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    e = s.add_argument_group("engine")
    e.add_argument("--dtype", default="bfloat16", help="weights and compute dtype (bfloat16, float16, float32)")
    e.add_argument("--kv-cache-memory", help="KV cache budget, bytes or '2GB' (default: a share of free memory)")
    e.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    e.add_argument("--quant", help="quantize on load (passed to load_model)")
    e.add_argument("--device", default="cpu", help="where the weights and KV cache live: cpu, cuda, cuda:1, ...")
    e.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="draft K tokens a step with the checkpoint's MTP block (0 = off; output unchanged)")
    _add_spec_flags(e)
    _add_placement_flags(e)


def _add_spec_flags(parser) -> None:  # noqa: ANN001 - a parser or an argument group
    parser.add_argument("--speculative-draft-quant", choices=["int8", "int4"], default=None,
                        help="quantize only the MTP block that drafts (faster drafts; output unchanged); needs "
                             "--speculative-tokens")
    parser.add_argument("--speculative-adaptive", action="store_true",
                        help="draft only while it is measured to be faster than plain decoding (output unchanged); "
                             "needs --speculative-tokens")


def _spec_options(args: argparse.Namespace) -> dict:
    """``speculative_draft_quant`` and ``speculative_adaptive`` for the engine; refused without drafting (one line,
    not a deep error)."""
    out = {}
    q = getattr(args, "speculative_draft_quant", None)
    if q is not None:
        if not args.speculative_tokens:
            raise ValueError("--speculative-draft-quant quantizes the MTP block that drafts; add "
                             "--speculative-tokens K")
        out["speculative_draft_quant"] = q
    if getattr(args, "speculative_adaptive", False):
        if not args.speculative_tokens:
            raise ValueError("--speculative-adaptive switches drafting on and off; add --speculative-tokens K")
        out["speculative_adaptive"] = True
    return out


def _make_engine(args: argparse.Namespace, verb: str):
    import os

    import torch

    from ernie45.engine.llm import LLMEngine

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device (use --device cpu)")
    from ernie45.model.checkpoint import resolve_model_path

    path = resolve_model_path(args.model)  # a .gguf file carries its tokenizer in its metadata
    if not path.endswith(".gguf") and not os.path.isfile(os.path.join(path, "tokenizer.model")):  # before loading
        raise ValueError(f"{args.model}: no tokenizer.model in the checkpoint folder; {verb} needs one (copy the "
                         f"checkpoint's tokenizer.model and tokenizer_config.json there)")
    kv = args.kv_cache_memory
    kwargs = {"quant": args.quant} if args.quant else {}
    if device.type != "cpu":
        kwargs["device"] = device
    if args.speculative_tokens:
        kwargs["speculative_tokens"] = args.speculative_tokens
    kwargs.update(_spec_options(args))
    kwargs.update({k: v for k, v in _placement_kwargs(args).items() if k != "device"})
    if ("experts_on" in kwargs or "gpu_experts" in kwargs) and "device" not in kwargs:
        kwargs["device"] = device
    return LLMEngine(args.model, dtype=args.dtype, max_num_seqs=1, max_model_len=args.max_model_len,
                     kv_cache_memory=int(kv) if kv and kv.isdigit() else kv, **kwargs)


def _spec_summary(engine) -> str:  # noqa: ANN001
    """'; speculative: 62% of 120 drafts accepted, 2.9 tokens a step' when drafting ran, else ''."""
    st = engine.stats()
    if not st.get("spec_draft_tokens"):
        return ""
    line = (f"; speculative: {100 * st['spec_acceptance_rate']:.0f}% of {st['spec_draft_tokens']} drafts accepted, "
            f"{st['spec_mean_accepted_length']:.2f} tokens a step")
    if "spec_drafting" in st:  # adaptive
        steps = st["spec_steps_drafting"] + st["spec_steps_plain"]
        line += f" (drafting in {st['spec_steps_drafting']} of {steps} steps)"
    return line


def _sampling_params(args: argparse.Namespace, stop_token_ids: list[int] | None = None):
    """Flags over the checkpoint's generation_config.json (ERNIE: temperature 0.8, top_p 0.8)."""
    import os

    from ernie45.engine.sampling_params import SamplingParams
    from ernie45.model.checkpoint import resolve_model_path

    fields = {}
    path = os.path.join(resolve_model_path(args.model), "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
        fields = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                  if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)}
        if gen.get("do_sample") is False:  # HF: greedy whatever the temperature says
            fields["temperature"] = 0.0
    for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop"):
        if getattr(args, k) is not None:
            fields[k] = getattr(args, k)
    return SamplingParams(max_tokens=args.max_tokens, stop_token_ids=stop_token_ids, **fields)


def _stream(engine, request_id: str, prompt, params) -> tuple[str, str | None, object]:
    """Run one request to the end, writing each step's new text to stdout.

    Returns (text, finish_reason, the last RequestOutput or None)."""
    engine.add_request(request_id, prompt, params)
    text, finish, last = "", None, None
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:  # e.g. the final output of a reply aborted earlier
                    continue
                c = out.outputs[0]
                if c.delta_text:
                    sys.stdout.write(c.delta_text)
                    sys.stdout.flush()
                text, finish, last = c.text, c.finish_reason, out
    except KeyboardInterrupt:  # Ctrl-C stops this reply, frees its KV blocks
        engine.abort(request_id)
        finish = "abort"
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text, finish, last


def cmd_generate(args: argparse.Namespace) -> int:
    # '-' reads stdin, without the newline that `echo` and editors put at the end
    prompt = sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt
    params = _sampling_params(args)  # validated before the model is loaded
    engine = _make_engine(args, "generate")
    _, finish, last = _stream(engine, "generate-0", prompt, params)
    if last is not None:  # timings from the engine's own metrics (time.monotonic())
        m, n = last.metrics, len(last.outputs[0].token_ids)
        start, first, end = m.get("arrival_time"), m.get("first_token_time"), m.get("finished_time")
        ttft = f"first token after {first - start:.2f} s" if first and start else "no token"
        rate = f", then {(n - 1) / (end - first):.1f} tok/s" if n > 1 and first and end and end > first else ""
        print(f"[{len(last.prompt_token_ids)} prompt + {n} generated tokens; {ttft}{rate}{_spec_summary(engine)}; "
              f"finish={finish}; backend={engine.backend}]", file=sys.stderr)
    return 130 if finish == "abort" else 0


def _read_line(interactive: bool) -> str | None:
    """One line of user input without its newline; None at end of input (or Ctrl-C/Ctrl-D at the prompt)."""
    if not interactive:
        line = sys.stdin.readline()
        return line.removesuffix("\n") if line else None
    try:
        return input("you> ")
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    import contextlib

    engine = _make_engine(args, "chat")
    tok = engine.tokenizer
    params = _sampling_params(args, stop_token_ids=tok.stop_token_ids)  # stop on </s> and <|end_of_sentence|>
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
        print("chat: /reset starts over, /exit quits, Ctrl-C stops a reply", file=sys.stderr)
    turn = 0
    while True:
        line = _read_line(interactive)
        if line is None or line.strip() == "/exit":  # end of input
            print(f"[{turn} replies; backend={engine.backend}]", file=sys.stderr)
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = tok.encode_chat(messages)
            reply, finish, _ = _stream(engine, f"chat-{turn}", ids, params)
        except ValueError as e:  # e.g. the conversation outgrew the context: keep the session alive
            messages.pop()
            print(f"ernie45 chat: error: {e} (type /reset to start over)", file=sys.stderr)
            continue
        if finish == "length":
            print(f"(reply cut at --max-tokens {args.max_tokens})", file=sys.stderr)
        turn += 1
        messages.append({"role": "assistant", "content": reply})


def add_generate_parsers(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    s = sub.add_parser("generate", help="complete a prompt, streaming tokens as they are produced")
    s.add_argument("model", nargs="?", default="demo", help="checkpoint folder or 'demo' (default)")
    s.add_argument("prompt", help="text to complete ('-' reads it from stdin)")
    _add_generation_flags(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat on stdin with the ERNIE chat template (/reset, /exit)")
    s.add_argument("model", nargs="?", default="demo", help="checkpoint folder or 'demo' (default)")
    s.add_argument("--system", help="system message at the start of the conversation")
    _add_generation_flags(s)
    s.set_defaults(func=cmd_chat)


def cmd_quantize(args: argparse.Namespace) -> int:
    import logging
    import os

    from ernie45 import resolve
    from ernie45.loading import load_model, save_model
    from ernie45.model.checkpoint import resolve_model_path
    from ernie45.quant.quantize import quantized_nbytes

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = resolve_model_path(args.model)
    group = None if args.group_size in (0, -1) else args.group_size
    opts = {} if args.group_size is None else {"group_size": group}
    if args.dense_bits is not None:
        opts["dense_bits"] = args.dense_bits
    if args.head_bits is not None:
        opts["head_bits"] = args.head_bits or None
    model = load_model(src, dtype=args.dtype, quant=f"int{args.bits}", method=args.method, progress=True, **opts)
    save_model(model, args.out, max_shard_size=args.max_shard_size)  # the tokenizer and generation files travel along
    resolve.copy_files(src, args.out, resolve.DOC_FILES)  # same weights in another format: card and license too
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out) if f.endswith(".safetensors"))
    print(f"{model.quant_config.describe()}\n{quantized_nbytes(model) / 2**30:.2f} GiB in memory, "
          f"{size / 2**30:.2f} GiB on disk -> {args.out}")
    return 0


def add_quantize_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    s = sub.add_parser("quantize", help="write a quantized checkpoint (int8 / int4 / 2-bit), streaming the source")
    s.add_argument("model", help="full-precision checkpoint folder (or 'demo')")
    s.add_argument("out", help="output folder; load it with ernie45.load_model(out)")
    s.add_argument("--bits", type=int, default=4, choices=[8, 4, 2], help="bits of the expert weights")
    s.add_argument("--group-size", type=int, default=None,
                   help="columns per scale (32/64/128; 0 = per channel); default per --bits: 8->channel, 4->128, 2->64")
    s.add_argument("--method", choices=["rtn", "mse", "hqq"], default=None,
                   help="rtn: round to nearest; mse: optimised scales/offsets (default for 2-bit); hqq: HQQ zeros")
    s.add_argument("--dense-bits", type=int, choices=[8, 6, 4, 2], help="bits of attention/dense/shared linears")
    s.add_argument("--head-bits", type=int, choices=[0, 8, 6, 4, 2],
                   help="bits of the LM head (0 = keep bf16; default 8; 6 = llama.cpp's Q6_K size)")
    s.add_argument("--dtype", default="bfloat16", help="compute dtype of the quantized model")
    s.add_argument("--max-shard-size", default="5GB", help="largest safetensors file")
    s.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45", description="ERNIE 4.5 text models in plain PyTorch")
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("info", help="architecture and parameter counts of a preset or checkpoint folder")
    s.add_argument("model", nargs="?", help="checkpoint folder, 'demo' or preset name (ernie-4.5-21b-a3b, ...)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--backend", action="store_true",
                   help="the CPU, its features, the backends and the measured choice of kernel per row count")
    s.add_argument("--calibrate", action="store_true", help="with --backend: measure the kernel choice again")
    s.set_defaults(func=cmd_info)
    add_serve_parser(sub)
    add_generate_parsers(sub)
    add_quantize_parser(sub)
    from ernie45.tools.convert_cli import add_convert_parsers  # convert / export-gguf (GGUF, Paddle)

    add_convert_parsers(sub)
    from ernie45.train.cli import add_train_parser

    add_train_parser(sub)
    from ernie45.tools.plan_cli import add_plan_parser

    add_plan_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one readable line, no traceback
        print(f"ernie45 {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
