"""The ``esper-ray`` command.

    esper-ray train [--config configs/quickstart.yaml] [--out DIR] [--controller KIND|PATH]
                    [--resume RUN_DIR] [KEY=VALUE ...]
    esper-ray lineage verify RUN_DIR [--key PATH]
    esper-ray lineage show RUN_DIR

Bad input of any kind ends with one line on stderr, ``esper-ray: error: ...``, and
exit status 2; nothing already written in a run folder is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from esper_ray.contracts import EsperError

DEFAULT_CONFIG = Path("configs/quickstart.yaml")
BASELINES = ("static", "random", "heuristic")


def _train(args: argparse.Namespace) -> int:
    from esper_ray.config import RunConfig, load_config
    from esper_ray.tolaria.run import run_training

    overrides = list(args.overrides)
    if args.controller:
        if args.controller in BASELINES:
            overrides.append(f"controller.kind={args.controller}")
        else:
            overrides += ["controller.kind=policy", f"controller.path={args.controller}"]
    if args.resume:
        if overrides or args.config:
            raise EsperError("--resume continues a run with its own config; drop --config and overrides")
        result = run_training(RunConfig(), resume=args.resume, progress=not args.no_progress)
    else:
        path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        cfg = load_config(path, overrides)
        result = run_training(cfg, out=args.out, progress=not args.no_progress)
    s = result.summary
    print(
        f"run folder: {result.run_dir}\n"
        f"final test accuracy {s['final_test_acc']:.4f} (val {s['final_val_acc']:.4f}); "
        f"{s['germinations']} germinations, {s['fossilizations']} fossilized, {s['culls']} culled, "
        f"{s['rollbacks']} rollbacks; params host {s['host_params']:,} + seeds {s['seeds_params']:,}"
    )
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from esper_ray import lineage

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise EsperError(f"no run folder at {run_dir}")
    if args.lineage_cmd == "show":
        print(lineage.format_timeline(run_dir))
        return 0
    report = lineage.verify_run(run_dir, Path(args.key) if args.key else None)
    print(report.message if report.ok else f"TAMPERED: {report.message}")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper-ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a host while a controller grows seeds in it")
    train.add_argument("--config", type=Path, help=f"YAML config (default {DEFAULT_CONFIG})")
    train.add_argument("--out", type=Path, help="run folder (default <out_dir>/<name>-<time>)")
    train.add_argument("--controller", help=f"{', '.join(BASELINES)} or an exported Tamiyo policy folder")
    train.add_argument("--resume", type=Path, help="continue the run in this folder from its checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. training.epochs=10")
    train.set_defaults(func=_train)

    lin = sub.add_parser("lineage", help="verify or show a run's signed lineage")
    lin_sub = lin.add_subparsers(dest="lineage_cmd", required=True)
    verify = lin_sub.add_parser("verify", help="check chain, signature and final checkpoint")
    verify.add_argument("run_dir")
    verify.add_argument("--key", help="the Ed25519 key the run was signed with")
    show = lin_sub.add_parser("show", help="the host's biography as a timeline")
    show.add_argument("run_dir")
    lin.set_defaults(func=_lineage)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EsperError as err:
        print(f"esper-ray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esper-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
