"""The ``esper-ray`` command.

    esper-ray train [--config configs/quickstart.yaml] [--out DIR] [--controller KIND|PATH]
                    [--resume RUN_DIR] [--device DEVICE] [KEY=VALUE ...]
    esper-ray distill [--config configs/distill.yaml] [--out DIR] [KEY=VALUE ...]
    esper-ray simic [--config configs/controller_ppo.yaml] [--out DIR] [--resume CKPT] [KEY=VALUE ...]
    esper-ray evaluate [--config configs/controller_ppo.yaml] [--policy DIR ...] [--seeds N] [--out DIR]
    esper-ray record [--config configs/controller_ppo.yaml] [--controller KIND|DIR ...] [--seeds N] [--out DIR]
    esper-ray sweep [--config configs/sweep_ppo.yaml]
    esper-ray lineage verify RUN_DIR [--key PATH] [--ledger-only]
    esper-ray lineage show RUN_DIR

Bad input of any kind ends with one line on stderr, ``esper-ray: error: ...``, and
exit status 2; nothing already written in a run folder is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from esper_ray.contracts import ControllerKind, EsperError

DEFAULT_CONFIG = Path("configs/quickstart.yaml")
SIMIC_CONFIG = Path("configs/controller_ppo.yaml")
SWEEP_CONFIG = Path("configs/sweep_ppo.yaml")
BASELINES = (ControllerKind.STATIC, ControllerKind.RANDOM, ControllerKind.HEURISTIC, ControllerKind.TRIAL)


def _run_folder(path: Path) -> Path:
    """A run folder named on the command line: as a Ray job, one an earlier job wrote under the
    persistent place (``persistent_path``) when it is there, else the path as given."""
    from esper_ray.cluster import persistent_path

    kept = persistent_path(path)
    return kept if kept.is_dir() else path


def _config_path(args: argparse.Namespace, default: Path) -> Path | None:
    """``--config``, else the command's default file when run from the repository, else None (defaults)."""
    return args.config or (default if default.exists() else None)


def _pipeline_catalogue(cfg, address: str | None, progress: bool):
    """With ``blueprints.source: urza``: join or start Ray, start or find the actors, and
    return the trainer's non-blocking client. ``None`` (the local catalogue) otherwise."""
    if cfg.blueprints.source != "urza":
        return None
    from actors.launch import start_pipeline, wait_until_ready
    from esper_ray.cluster import ensure_ray

    ensure_ray(address)
    pipeline = start_pipeline(cfg.actors, seed=cfg.training.seed, max_seed_params=cfg.blueprints.max_seed_params)
    want = cfg.blueprints.startup_ready
    if want:
        if progress:
            print(f"waiting for {want} ready blueprints from the pipeline (startup only)...", flush=True)
        wait_until_ready(pipeline, want, timeout=cfg.blueprints.startup_timeout_s)
    return pipeline.client


def _train(args: argparse.Namespace) -> int:
    from esper_ray.cluster import persistent_path
    from esper_ray.config import load_config
    from esper_ray.tolaria.run import run_training

    overrides = list(args.overrides)
    if args.controller:
        if args.controller == "tamiyo":  # the shipped policy
            overrides.append("controller.kind=policy")
        elif args.controller in BASELINES:
            overrides.append(f"controller.kind={args.controller}")
        else:
            overrides += ["controller.kind=policy", f"controller.path={args.controller}"]
    if args.resume:
        if overrides or args.config:
            raise EsperError("--resume continues a run with its own config; drop --config and overrides")
        from esper_ray.tolaria.checkpoint import read_config

        args.resume = _run_folder(args.resume)
        cfg = read_config(args.resume / "checkpoint")
        catalogue = _pipeline_catalogue(cfg, args.address, progress=not args.no_progress)
        result = run_training(
            cfg, resume=args.resume, device=args.device, catalogue=catalogue, progress=not args.no_progress
        )
    else:
        if args.device:
            overrides.append(f"training.device={args.device}")
        path = _config_path(args, DEFAULT_CONFIG)
        cfg = load_config(path, overrides)
        if cfg.controller.kind == ControllerKind.POLICY:
            from esper_ray.tamiyo.policy import load_policy

            load_policy(cfg.controller.path)  # a bad policy folder fails before Ray or the run folder
        cfg = cfg.model_copy(update={"out_dir": str(persistent_path(cfg.out_dir))})
        out = persistent_path(args.out) if args.out else None
        catalogue = _pipeline_catalogue(cfg, args.address, progress=not args.no_progress)
        result = run_training(cfg, out=out, catalogue=catalogue, progress=not args.no_progress)
    s = result.summary
    print(
        f"run folder: {Path(result.run_dir).absolute()}\n"
        f"final test accuracy {s['final_test_acc']:.4f} (val {s['final_val_acc']:.4f}); "
        f"{s['germinations']} germinations, {s['fossilizations']} fossilized, {s['culls']} culled, "
        f"{s['rollbacks']} rollbacks; params host {s['host_params']:,} + seeds {s['seeds_params']:,}"
    )
    return 0


def _distill(args: argparse.Namespace) -> int:
    from esper_ray.cluster import persistent_path
    from esper_ray.tolaria.distill import load_distill_config, run_distillation

    default = Path("configs/distill.yaml")
    path = _config_path(args, default)
    run_cfg, distill_cfg = load_distill_config(path, args.overrides)
    run_cfg = run_cfg.model_copy(update={"out_dir": str(persistent_path(run_cfg.out_dir))})
    out = persistent_path(args.out) if args.out else None
    result, loss = run_distillation(run_cfg, distill_cfg, out=out, progress=not args.no_progress)
    s, teacher = result.summary, loss.teacher
    print(
        f"run folder: {Path(result.run_dir).absolute()}\n"
        f"teacher ({teacher.source}) test accuracy {teacher.test_acc:.4f}; student final test accuracy "
        f"{s['final_test_acc']:.4f} ({s['final_test_acc'] / max(teacher.test_acc, 1e-9):.1%} of the teacher); "
        f"{s['germinations']} germinations, {s['fossilizations']} fossilized, {s['culls']} culled; "
        f"params teacher {teacher.host.param_count()['host']:,}, student {s['host_params']:,} "
        f"+ seeds {s['seeds_params']:,}"
    )
    return 0


def _simic(args: argparse.Namespace) -> int:
    from esper_ray.cluster import ensure_ray, persistent_path
    from esper_ray.config import load_config
    from esper_ray.simic.config import SimicConfig
    from esper_ray.simic.ppo import train_simic

    path = _config_path(args, SIMIC_CONFIG)
    cfg = load_config(path, args.overrides, model=SimicConfig)
    if args.offline:
        from esper_ray.simic.offline import train_offline
        from esper_ray.simic.record import read_recording

        read_recording(args.offline)  # a bad path fails in one line before Ray starts
        ensure_ray(args.address)
        out = train_offline(
            cfg,
            args.offline,
            persistent_path(args.out or Path(cfg.out_dir) / f"{cfg.name}-offline"),
            progress=not args.no_progress,
        )
        print(f"offline policy: {out}")
        return 0
    if args.resume is not None and not (args.resume / "rllib_checkpoint.json").exists():
        raise EsperError(f"no RLlib checkpoint at {args.resume} (rllib_checkpoint.json missing)")
    ensure_ray(args.address)
    if cfg.fit_to_cluster:
        from esper_ray.cluster import fit_cpus, free_cpus

        per = fit_cpus(
            cfg.num_cpus_per_env_runner,
            cfg.num_env_runners,
            free_cpus(),
            "simic's env runners",
            hint="lower num_env_runners or free CPUs",
        )
        cfg = cfg.model_copy(update={"num_cpus_per_env_runner": per})
    out = persistent_path(args.out or Path(cfg.out_dir) / cfg.name)
    checkpoint = train_simic(cfg, out, resume=args.resume, warm_start=args.warm_start, progress=not args.no_progress)
    print(f"checkpoint: {checkpoint}\nexported policy: {Path(out) / 'policy'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from esper_ray.config import load_config
    from esper_ray.simic.config import SimicConfig
    from esper_ray.simic.evaluate import episodes_ran, format_table, run_evaluation
    from esper_ray.tamiyo.controllers import Controller, policy_label
    from esper_ray.tamiyo.policy import load_policy
    from esper_ray.tasks import cache_dir

    path = _config_path(args, SIMIC_CONFIG)
    cfg = load_config(path, args.overrides, model=SimicConfig)
    policies: dict[str, Controller] = {}
    for policy_path in args.policy or []:
        # Loaded now (one line if it is unreadable), not after the baselines have played.
        policies[f"policy:{policy_label(policy_path)}"] = load_policy(policy_path)
    seeds = range(args.seeds)
    ran = episodes_ran(cfg.env, seeds)
    if not args.no_progress:
        names = ", ".join(f"{t['family']}/s{t['seed']}" for t in ran["heldout_tasks"])
        print(f"held-out tasks ({len(ran['heldout_tasks'])}): {names}; seeds {list(seeds)}", flush=True)
    rows, table, out = run_evaluation(
        cfg.env,
        [name for name in args.baselines.split(",") if name],
        policies,
        seeds,
        args.out or Path(cfg.out_dir) / "evaluation",
        progress=None if args.no_progress else print,
        cache=cache_dir() / "best_fixed",
    )
    print(format_table(table))
    extra = ", best_fixed.json" if (out / "best_fixed.json").exists() else ""
    print(f"written: {out}/summary.csv, summary.parquet, episodes.parquet, summary.png, ran.json{extra}")
    return 0


def _record(args: argparse.Namespace) -> int:
    from esper_ray.config import load_config
    from esper_ray.simic.config import SimicConfig
    from esper_ray.simic.record import record_episodes

    path = _config_path(args, SIMIC_CONFIG)
    cfg = load_config(path, args.overrides, model=SimicConfig)
    out = args.out or Path(cfg.out_dir) / "decisions"
    file = record_episodes(
        args.controller or ["heuristic"],
        cfg.env,
        range(args.seeds),
        out,
        tasks=_task_slice(args.tasks),
        progress=None if args.no_progress else print,
    )
    print(f"recorded decisions: {file}\ntrain on them: esper-ray simic --offline {out}")
    return 0


def _task_slice(text: str | None) -> slice | None:
    """``--tasks START:STOP[:STEP]`` as a slice of the training tasks (None: every task)."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        bounds = [int(p) if p.strip() else None for p in parts]
        if len(bounds) == 3 and bounds[2] is not None and bounds[2] < 1:
            raise ValueError
    except ValueError:
        raise EsperError(f"--tasks {text!r} is not START:STOP[:STEP] with STEP >= 1 (e.g. 0:96:3)") from None
    return slice(*bounds)


def _sweep(args: argparse.Namespace) -> int:
    from esper_ray.cluster import ensure_ray, persistent_path
    from esper_ray.config import load_config
    from esper_ray.simic.config import SweepConfig
    from esper_ray.simic.sweep import run_sweep

    path = _config_path(args, SWEEP_CONFIG)
    cfg = load_config(path, args.overrides, model=SweepConfig)
    cfg = cfg.model_copy(update={"storage_path": str(persistent_path(cfg.storage_path))})
    ensure_ray(args.address)
    result = run_sweep(cfg, progress=not args.no_progress)
    for row in result["trials"]:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    print(
        f"trials: {result['summary_csv']}\nbest checkpoint: {result['best_checkpoint']} "
        f"({cfg.metric}={result['best_metric']})"
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
    report = lineage.verify_run(run_dir, Path(args.key) if args.key else None, check_checkpoint=not args.ledger_only)
    print(report.message if report.ok else f"TAMPERED: {report.message}")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper-ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a host while a controller grows seeds in it")
    train.add_argument("--config", type=Path, help=f"YAML config (default {DEFAULT_CONFIG})")
    train.add_argument("--out", type=Path, help="run folder (default <out_dir>/<name>-<time>)")
    train.add_argument(
        "--controller", help=f"tamiyo (the shipped policy), {', '.join(BASELINES)}, or an exported policy folder"
    )
    train.add_argument("--resume", type=Path, help="continue the run in this folder from its checkpoint")
    train.add_argument(
        "--device",
        help="cpu, cuda, cuda:N or auto (training.device); with --resume, continue a run on another device",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    train.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. training.epochs=10")
    train.set_defaults(func=_train)

    distill = sub.add_parser("distill", help="distil a teacher into a student that grows seeds")
    distill.add_argument("--config", type=Path, help="YAML: a run config plus distill: (default configs/distill.yaml)")
    distill.add_argument("--out", type=Path, help="run folder (default <out_dir>/<name>-<time>)")
    distill.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    distill.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. distill.temperature=2")
    distill.set_defaults(func=_distill)

    simic = sub.add_parser("simic", help="train Tamiyo with RLlib PPO on the Morphogenesis env")
    simic.add_argument("--config", type=Path, help=f"YAML SimicConfig (default {SIMIC_CONFIG})")
    simic.add_argument("--out", type=Path, help="output folder (default <out_dir>/<name>)")
    simic.add_argument("--resume", type=Path, help="an RLlib checkpoint folder to continue from")
    simic.add_argument("--offline", type=Path, help="train from recorded episodes (Parquet) instead")
    simic.add_argument("--warm-start", type=Path, help="an offline checkpoint whose weights start PPO")
    simic.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS or a local Ray)")
    simic.add_argument("--no-progress", action="store_true")
    simic.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    simic.set_defaults(func=_simic)

    ev = sub.add_parser("evaluate", help="controllers on held-out tasks: mean ± 95%% CI table")
    ev.add_argument("--config", type=Path, help=f"YAML SimicConfig whose env is used (default {SIMIC_CONFIG})")
    ev.add_argument(
        "--baselines",
        default="static,random,heuristic",
        help="comma-separated: static, random, heuristic, trial, fixed, best-fixed, replay "
        "(settings: env.run.controller)",
    )
    ev.add_argument("--policy", action="append", help="an exported policy folder (repeatable)")
    ev.add_argument("--seeds", type=int, default=3, help="training seeds per held-out task")
    ev.add_argument("--out", type=Path, help="output folder (default <out_dir>/evaluation)")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ev.set_defaults(func=_evaluate)

    rec = sub.add_parser("record", help="record controllers' decisions on the training tasks (Parquet)")
    rec.add_argument("--config", type=Path, help=f"YAML SimicConfig whose env is used (default {SIMIC_CONFIG})")
    rec.add_argument("--controller", action="append", help=f"{', '.join(BASELINES)} or a policy folder (repeatable)")
    rec.add_argument("--seeds", type=int, default=3, help="training seeds per training task")
    rec.add_argument("--tasks", help="training tasks to play, START:STOP[:STEP] of their indices (default all)")
    rec.add_argument("--out", type=Path, help="a new folder for the recording (default <out_dir>/decisions)")
    rec.add_argument("--no-progress", action="store_true")
    rec.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    rec.set_defaults(func=_record)

    sweep = sub.add_parser("sweep", help="a Ray Tune sweep over PPO and reward settings")
    sweep.add_argument("--config", type=Path, help=f"YAML SweepConfig (default {SWEEP_CONFIG})")
    sweep.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS or a local Ray)")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    sweep.set_defaults(func=_sweep)

    lin = sub.add_parser("lineage", help="verify or show a run's signed lineage")
    lin_sub = lin.add_subparsers(dest="lineage_cmd", required=True)
    verify = lin_sub.add_parser("verify", help="check chain, signature and final checkpoint")
    verify.add_argument("run_dir")
    verify.add_argument("--key", help="the Ed25519 key the run was signed with")
    verify.add_argument(
        "--ledger-only",
        action="store_true",
        help="check chain and signature only, not the checkpoint folder (e.g. a ledger copied without it)",
    )
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
