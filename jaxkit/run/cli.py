"""Command line: `jaxkit train`, `jaxkit eval`, `jaxkit export`, `jaxkit quantize`,
`jaxkit generate`, `jaxkit convert`, `jaxkit data prepare`, `jaxkit sweep`,
`jaxkit report`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import yaml

from jaxkit.config import ConfigError, GenerateConfig, check_ranges, load_config, to_dict
from jaxkit.run.sweep import add_sweep_commands

# Everything that imports jax is imported inside the command that needs it:
# parsing, --print-config and config errors run without starting jax.


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-process runs")
    g.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="auto: join a multi-process run when the flags below are given or "
                        "srun/mpirun started several processes; on: always call "
                        "jax.distributed.initialize() (e.g. on a TPU pod slice); off: never")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0's coordination service")
    g.add_argument("--num-processes", type=int, metavar="N", help="total number of processes")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index in [0, N)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.d_model=512 (repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")


# `jaxkit generate` flags that set generate.<key> (after --set)
GENERATE_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "kv_cache",
                  "paged", "page_size")


def _load(args):
    cfg = load_config(args.config, args.overrides)
    given = {k: getattr(args, k) for k in GENERATE_FLAGS if getattr(args, k, None) is not None}
    if given:
        given["stop"] = tuple(given.get("stop", cfg.generate.stop))
        cfg = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, **given))
        check_ranges(cfg.generate, "generate.")
    if getattr(args, "data", None) is not None:  # jaxkit eval --data
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=args.data))
    if getattr(args, "batches", None) is not None:  # jaxkit eval --batches
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                 eval_batches=args.batches))
        check_ranges(cfg.train, "train.")
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        sys.exit(0)
    return cfg


def _run_dir(cfg, args) -> Path:
    """--run-dir, or the run directory training used for this config."""
    from jaxkit.run.trainer import run_dir_for
    return Path(args.run_dir) if args.run_dir else run_dir_for(cfg, args.config)


def _join(args) -> None:
    """Joins the multi-process run, if any, before anything touches a device."""
    from jaxkit.distributed import initialize
    try:
        initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        raise SystemExit(f"distributed: {e}") from None


def _is_logger() -> bool:
    import jax
    return jax.process_index() == 0


def cmd_train(args) -> None:
    cfg = _load(args)
    _join(args)
    from jaxkit.run.trainer import train
    from jaxkit.train.step import NonFiniteLoss
    try:
        result = train(cfg, config_path=args.config, resume=args.resume, restart=args.restart,
                       run_dir=args.run_dir, profile=args.profile)
    except NonFiniteLoss as e:
        if args.debug:
            raise
        raise SystemExit(f"training stopped: {e}") from None
    if _is_logger():
        print(json.dumps({k: v for k, v in result.items() if k in ("step", "stopped_early")}
                         | {"eval": result.get("eval", {}).get("ce")}))


def cmd_eval(args) -> None:
    cfg = _load(args)
    _join(args)
    from jaxkit.run.evaluate import evaluate_params, evaluate_run
    if args.params is None:
        step, metrics = evaluate_run(cfg, _run_dir(cfg, args))
        source = {"step": step}
    else:
        metrics, source = evaluate_params(cfg, args.params), {"params": args.params}
    if _is_logger():
        print(json.dumps(source | {"loss": float(metrics["ce"]),
                                   "perplexity": float(metrics["perplexity"]),
                                   "accuracy": float(metrics["accuracy"])}))


def cmd_export(args) -> None:
    cfg = _load(args)
    _join(args)
    from jaxkit.run.export import export_run
    step = export_run(cfg, _run_dir(cfg, args), args.out, step=args.step)
    if _is_logger():
        print(json.dumps({"step": step, "out": str(Path(args.out).absolute())}))


def cmd_quantize(args) -> None:
    cfg = _load(args)
    from jaxkit.run.quantize import quantize_run
    print(json.dumps(quantize_run(cfg, _run_dir(cfg, args), out=args.out)))


def cmd_generate(args) -> None:
    if args.prompt is not None and not args.prompt:
        raise SystemExit("generate: --prompt is empty")
    cfg = _load(args)
    from jaxkit.generate import GenerationError
    from jaxkit.run.generate import read_prompts, run_generate
    try:
        run_generate(cfg, config_path=args.config, run_dir=args.run_dir, params=args.params,
                     prompts=read_prompts(args.prompt, args.prompts))
    except GenerationError as e:
        if args.debug:
            raise
        raise SystemExit(f"generate: {e}") from None


def cmd_convert(args) -> None:
    cfg = _load(args) if args.convert_command == "jaxkit-to-hf" else None
    from jaxkit.interop import ConversionError
    from jaxkit.run.convert import convert_hf_to_jaxkit, convert_jaxkit_to_hf
    try:
        if cfg is None:
            result = convert_hf_to_jaxkit(args.hf_dir, args.out)
        else:
            run_dir = None if args.params else _run_dir(cfg, args)
            result = convert_jaxkit_to_hf(cfg, args.out, run_dir=run_dir, params=args.params)
    except ConversionError as e:
        if args.debug:
            raise
        raise SystemExit(f"convert: {e}") from None
    print(json.dumps(result))


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="convert_command", required=True)
    c = sub.add_parser("hf-to-jaxkit", help="a Hugging Face model directory to OUT/config.yaml, "
                       "OUT/params (as jaxkit export writes) and OUT/tokenizer.json")
    c.add_argument("hf_dir", help="directory with config.json, model.safetensors (or its index "
                   "and shards) and optionally tokenizer.json")
    c.add_argument("--out", required=True, help="new directory to write")
    c.set_defaults(func=cmd_convert)
    c = sub.add_parser("jaxkit-to-hf", help="a run's latest intact checkpoint or exported "
                       "parameters to a Hugging Face model directory")
    _add_config_args(c)
    source = c.add_mutually_exclusive_group()
    source.add_argument("--run-dir", help="run directory (default: train.out_dir/<config name>)")
    source.add_argument("--params", metavar="DIR", help="a `jaxkit export` directory")
    c.add_argument("--out", required=True, help="new directory to write")
    c.set_defaults(func=cmd_convert)


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--run-dir", help="run directory whose latest intact checkpoint to use "
                        "(default: train.out_dir/<config name>)")
    source.add_argument("--params", metavar="DIR",
                        help="a `jaxkit export` directory, or with model.quant.mode ptq/int (as "
                        "given to jaxkit quantize) a `jaxkit quantize --out` directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="one prompt; its continuation streams")
    prompt.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one a line, "
                        "generated as one batch; prints a JSON line per prompt")
    g = p.add_argument_group("generation (override the config's generate section)")
    g.add_argument("--max-new-tokens", type=int, metavar="N")
    g.add_argument("--temperature", type=float, help="0: greedy")
    g.add_argument("--top-k", type=int, metavar="K", help="0: off")
    g.add_argument("--top-p", type=float, metavar="P", help="in (0, 1]; 1: off")
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", metavar="S",
                   help="end a sequence's text before this string (repeatable)")
    kv_caches = typing.get_args(typing.get_type_hints(GenerateConfig)["kv_cache"])
    g.add_argument("--kv-cache", choices=kv_caches,
                   help="KV cache storage: the compute dtype, a float dtype, or int8/fp8 codes "
                   "with per-token, per-head scales")
    g.add_argument("--paged", action=argparse.BooleanOptionalAction, default=None,
                   help="paged KV cache (pages from one pool per layer)")
    g.add_argument("--page-size", type=int, metavar="N", help="tokens per page")


def build_parser(data_tools: bool = True) -> argparse.ArgumentParser:
    """data_tools=False leaves out the flags of `jaxkit data` (defining them
    imports jaxkit.data, and with it jax)."""
    parser = argparse.ArgumentParser(prog="jaxkit", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an anticipated error (config, data, "
                        "arguments, missing files) instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    _add_config_args(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the newest intact checkpoint (none yet: start)")
    start.add_argument("--restart", action="store_true",
                       help="delete the run directory's checkpoints and metrics, then start over "
                       "(without --resume or --restart, a run directory holding a run is refused)")
    p.add_argument("--profile", action="store_true",
                   help="after 10 warm steps, trace 3 steps and write where the time goes "
                   "(RUN_DIR/profile.json, and a table on the console)")
    p.add_argument("--run-dir", help="run directory (default: train.out_dir/<config name>)")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss and perplexity of the latest checkpoint of a run, or "
                       "of exported or converted parameters, on the validation split")
    _add_config_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--run-dir", help="run directory (default: train.out_dir/<config name>)")
    source.add_argument("--params", metavar="DIR", help="a `jaxkit export` directory or a "
                        "converted model's params (evaluated on one device)")
    p.add_argument("--data", metavar="DIR", help="prepared token files to evaluate on (sets "
                   "data.path; their val split is used)")
    p.add_argument("--batches", type=int, metavar="N",
                   help="number of eval batches (sets train.eval_batches)")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run's parameters alone, for inference")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="directory to write the parameters to")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--run-dir", help="run directory (default: train.out_dir/<config name>)")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="post-training quantisation of a run's latest checkpoint "
                       "with the config's model.quant (mode ptq or int): calibrate, convert, "
                       "report eval loss before and after")
    _add_config_args(p)
    p.add_argument("--run-dir", help="run directory (default: train.out_dir/<config name>)")
    p.add_argument("--out", help="directory to write the quantised model state to")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("generate", help="generate text from a run's latest checkpoint, exported "
                       "parameters or a quantised model; prints prefill and decode tokens/s")
    _add_config_args(p)
    _add_generate_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert between Hugging Face model directories (Llama, "
                       "Mistral, Mixtral) and jaxkit configs and parameters")
    _add_convert_args(p)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="tokenize text, JSONL or parquet files into "
                               "train/val token files, optionally packed into rows")
    if data_tools:
        from jaxkit.data.prepare import add_prepare_args, run_prepare  # imports jax
        add_prepare_args(prep)
        prep.set_defaults(func=run_prepare)
    add_sweep_commands(sub)
    return parser


def _is_data_error(error: BaseException) -> bool:
    """Whether error is jaxkit.data's DataError. jaxkit.data imports jax, so
    its error class is looked up only once loaded, the only time it can have
    been raised."""
    errors = sys.modules.get("jaxkit.data.errors")
    return errors is not None and isinstance(error, errors.DataError)


def main(argv: list[str] | None = None) -> None:
    """Runs a command; an anticipated error exits non-zero with one line on
    stderr (its traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(data_tools=command == "data").parse_args(argv)
    if args.debug:
        args.func(args)
        return
    try:
        args.func(args)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    # no such run, checkpoint or input files; an output that exists
    except (FileNotFoundError, FileExistsError) as e:
        raise SystemExit(str(e)) from None
    except ValueError as e:  # other ValueErrors are bugs: their traceback stays
        if not _is_data_error(e):
            raise
        raise SystemExit(f"data error: {e}") from None
