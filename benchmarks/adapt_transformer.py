"""Parameter efficiency on a transformer: adapting a pretrained byte-level host to a shifted text domain,
full fine-tuning against seeds only (host frozen).

Run from the repository root::

    .venv/bin/python benchmarks/adapt_transformer.py [--seeds 2] [--epochs 4] [--pretrain 5] [--json PATH]
    .venv/bin/python benchmarks/adapt_transformer.py --quick     # 1 seed, a tiny host, two arms

The design's target: for the same gain, 10-100x fewer trainable weights with seeds than with full
fine-tuning; low-rank adapters are known to get there on transformers. Protocol, per seed ``s``:

1. Pretraining: the host of ``configs/distill_transformer.yaml``'s student (a 2-block d_model 64
   byte-level transformer, 137k weights, slots ``hidden0``-``hidden2`` dormant) trains ``--pretrain``
   epochs on the ``docs`` text task (English prose, every training window, seed ``s``).
2. The shifted domain: the ``code`` text task (Python source, CPython's ``argparse.py``; seed ``s``).
   ``before`` = the pretrained host's test bits per byte on it.
3. Every arm starts from the pretrained weights and trains ``--epochs`` epochs on the code task's
   training split (batch 32, the same data order), Adam with a learning rate picked per arm and
   seed from ``--lrs`` by the code task's *validation* bits per byte at the end (the test split is
   only reported). Arms: ``full`` (every host weight trains), and seeds only: the host frozen
   (``training.freeze_host``) and a seed in each of the three slots from the start, fossilized (no
   lifecycle: the arm measures what the seeds can carry, not a controller): ``tok_norm`` (LayerNorm
   over d_model), ``adapter r`` (a rank-r residual adapter, ``h + gamma * W2 W1 h``, r = 8, 32),
   ``mlp_expand`` (a pre-norm 128-wide GELU MLP).
4. Gain = before - after, in test bits per byte. Trainable weights are counted from the optimizer
   (every parameter in a param group with a learning rate > 0). "Same gain": the smallest seed
   configuration whose mean *validation* gain is at least 90% of full fine-tuning's; the ratio is
   full fine-tuning's trainable weights over its; its test gain and the per-seed ratio to full's
   are reported with 95% CIs (Student t).

Printed: the table (mean ± 95% CI over seeds), the curve of gain against trainable weights, and a
SUMMARY line; ``--json PATH`` writes the figures (for benchmarks/run_all.py); ``--plot PATH`` draws
the curve. Measured figures are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch
from common import write_result

from esper_ray.blueprints import TRANSFORMER_BLUEPRINTS, BlueprintSpec, Node
from esper_ray.config import RunConfig
from esper_ray.simic.evaluate import mean_ci
from esper_ray.tamiyo.controllers import StaticController
from esper_ray.tasks import load_task
from esper_ray.tolaria.trainer import Trainer

LN2 = math.log(2.0)
SLOTS = ("hidden0", "hidden1", "hidden2")
HOST = {"kind": "transformer", "hidden": [64, 64], "heads": 4, "context": 64}


def adapter(rank: int) -> BlueprintSpec:
    """A rank-``rank`` residual adapter (the library's ``adapter8`` with another rank)."""
    nodes = (
        Node(id="n0", op="linear", inputs=("input",), args={"width": rank}),
        Node(id="n1", op="linear", inputs=("n0",), args={"width": None}),
    )
    return BlueprintSpec(name=f"adapter{rank}", kind="vector", nodes=nodes)


def arms() -> dict[str, list[tuple[str, BlueprintSpec]]]:
    """Arm name -> the seeds it puts in which slots (``full``: none, every host weight trains)."""
    every = {
        "tok_norm": TRANSFORMER_BLUEPRINTS["tok_norm"],
        "adapter8": TRANSFORMER_BLUEPRINTS["adapter8"],
        "adapter32": adapter(32),
        "mlp_expand": TRANSFORMER_BLUEPRINTS["mlp_expand"],
    }
    out: dict[str, list[tuple[str, BlueprintSpec]]] = {"full": []}
    for name, spec in every.items():
        out[f"{name} @all"] = [(slot, spec) for slot in SLOTS]
    return out


def _cfg(domain: str, seed: int, epochs: int, lr: float, frozen: bool, host: dict, context: int, n_train) -> RunConfig:
    return RunConfig(
        task={"family": "text", "seed": seed, "n_train": n_train, "params": {"domain": domain, "context": context}},
        host=host,
        training={
            "epochs": epochs,
            "batch_size": 32,
            "lr": lr,
            "seed_lr": lr,
            "seed": seed,
            "threads": 1,
            "probe_size": 32,
            "freeze_host": frozen,
            "eval_test": False,
        },
        controller={"kind": "static"},
        blueprints={"source": "local", "names": ["adapter8"], "max_seed_params": 1_000_000},
        lineage={"enabled": False},
    )


def _play(trainer: Trainer) -> Trainer:
    controller = StaticController()
    while not trainer.done:
        trainer.train_epoch()
        trainer.end_epoch(trainer.apply_decision(controller))
    return trainer


def _bpb(trainer: Trainer, split: str) -> float:
    return trainer.evaluate(getattr(trainer.data, f"x_{split}"), getattr(trainer.data, f"y_{split}"))[0] / LN2


def pretrain(seed: int, epochs: int, host: dict, context: int, n_train) -> tuple[dict[str, torch.Tensor], float]:
    """The host trained on English prose; its weights and its test bits per byte there."""
    cfg = _cfg("docs", seed, epochs, 2e-3, False, host, context, n_train)
    trainer = _play(Trainer(cfg, load_task(cfg.task)))
    return trainer.host.host_state_dict(), _bpb(trainer, "test")


def adapt(
    arm: list[tuple[str, BlueprintSpec]], lr: float, seed: int, state, data, args, host: dict
) -> dict[str, float]:
    """One arm at one learning rate: validation and test bits per byte after, trainable weights."""
    cfg = _cfg("code", seed, args.epochs, lr, bool(arm), host, args.context, args.n_train_code)
    trainer = Trainer(cfg, data)
    trainer.host.load_host_state_dict(state)
    trainer.remember_good()
    for slot, spec in arm:
        trainer.graft_fossilized(slot, spec)
    _play(trainer)
    trainable = sum(p.numel() for g in trainer.opt.param_groups if g["lr"] > 0 for p in g["params"])
    return {"val_bpb": _bpb(trainer, "val"), "test_bpb": _bpb(trainer, "test"), "trainable": trainable}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--pretrain", type=int, default=5, help="epochs of pretraining on the docs task")
    p.add_argument("--epochs", type=int, default=4, help="epochs of adaptation on the code task")
    p.add_argument("--lrs", default="5e-4,2e-3,8e-3", help="learning rates tried per arm (chosen on val)")
    p.add_argument("--quick", action="store_true", help="1 seed, a tiny host, two arms, two learning rates")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--plot", help="draw gain against trainable weights to this PNG")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    host, args.context, n_train_docs, args.n_train_code = dict(HOST), 64, None, None
    chosen_arms = arms()
    lrs = [float(v) for v in args.lrs.split(",")]
    if args.quick:
        host = {"kind": "transformer", "hidden": [32, 32], "heads": 4, "context": 32}
        args.context, n_train_docs, args.n_train_code = 32, 200, 100
        args.seeds, args.pretrain, args.epochs = 1, 2, 2
        chosen_arms = {k: v for k, v in chosen_arms.items() if k in ("full", "adapter8 @all")}
        lrs = [1e-3, 1e-2]
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen_arms}
    befores, docs_bpb = [], []
    for seed in range(args.seeds):
        state, docs = pretrain(seed, args.pretrain, host, args.context, n_train_docs)
        docs_bpb.append(docs)
        data = load_task(_cfg("code", seed, 1, 1e-3, False, host, args.context, args.n_train_code).task)
        probe = Trainer(_cfg("code", seed, 1, 1e-3, False, host, args.context, args.n_train_code), data)
        probe.host.load_host_state_dict(state)
        before = {"val": _bpb(probe, "val"), "test": _bpb(probe, "test")}
        befores.append(before)
        print(f"seed {seed}: pretrained on docs {docs:.4f} bits/byte; on code before adapting {before['test']:.4f}")
        for name, arm in chosen_arms.items():
            tried = {lr: adapt(arm, lr, seed, state, data, args, host) for lr in lrs}
            lr = min(tried, key=lambda k: tried[k]["val_bpb"])
            r = tried[lr]
            results[name].append(
                {
                    "seed": seed,
                    "lr": lr,
                    "trainable": r["trainable"],
                    "val_gain": before["val"] - r["val_bpb"],
                    "test_gain": before["test"] - r["test_bpb"],
                    "test_bpb": r["test_bpb"],
                    "tried": {str(k): v["val_bpb"] for k, v in tried.items()},
                }
            )
            print(
                f"  {name:18s} lr {lr:g}: test {r['test_bpb']:.4f} bits/byte ({r['trainable']:,} trainable)", flush=True
            )
    full = results["full"]
    table = []
    for name, rs in results.items():
        gain, val_gain = mean_ci([r["test_gain"] for r in rs]), mean_ci([r["val_gain"] for r in rs])
        share = mean_ci([r["test_gain"] / f["test_gain"] for r, f in zip(rs, full, strict=True) if f["test_gain"] > 0])
        table.append(
            {
                "arm": name,
                "trainable": rs[0]["trainable"],
                "fewer": full[0]["trainable"] / rs[0]["trainable"],
                "test_bpb": mean_ci([r["test_bpb"] for r in rs]).mean,
                "gain": gain.mean,
                "gain_ci95": gain.half_width,
                "val_gain": val_gain.mean,
                "share_of_full": share.mean,
                "share_ci95": share.half_width,
                "lrs": [r["lr"] for r in rs],
            }
        )
    before_test = mean_ci([b["test"] for b in befores]).mean
    print(
        f"\npretrained on docs: {mean_ci(docs_bpb).mean:.4f} bits/byte; code before adapting {before_test:.4f}; "
        f"{args.epochs} epochs of adaptation; mean ± 95% CI over {args.seeds} seeds\n"
    )
    print(
        f"{'arm':<20}{'trainable':>10}{'x fewer':>9}  {'test bits/byte':>14}  {'gain':>17}  {'share of full':>15}  lr"
    )
    for r in table:
        print(
            f"{r['arm']:<20}{r['trainable']:>10,}{r['fewer']:>9.1f}  {r['test_bpb']:>14.4f}  "
            f"{r['gain']:+.4f} ± {r['gain_ci95']:.4f}  {r['share_of_full']:>6.2f} ± {r['share_ci95']:.2f}  "
            f"{','.join(f'{v:g}' for v in r['lrs'])}"
        )
    full_row = table[0]
    seeded = sorted((r for r in table[1:]), key=lambda r: r["trainable"])
    matched = next((r for r in seeded if r["val_gain"] >= 0.9 * full_row["val_gain"]), None)
    if matched is None:
        best = max(seeded, key=lambda r: r["gain"]) if seeded else None
        verdict = (
            f"no seed configuration reaches 90% of full fine-tuning's validation gain; best "
            f"{best['arm']} at {best['share_of_full']:.2f} of it with {best['fewer']:.0f}x fewer trainable weights"
            if best
            else "no seed arms"
        )
    else:
        met = matched["fewer"] >= 10
        verdict = (
            f"{matched['arm']} reaches >= 90% of full fine-tuning's validation gain with {matched['fewer']:.0f}x fewer "
            f"trainable weights (test gain {matched['gain']:+.4f} vs {full_row['gain']:+.4f}, per-seed share "
            f"{matched['share_of_full']:.2f} ± {matched['share_ci95']:.2f}): "
            f"target (10-100x) {'met' if met else 'missed'}"
        )
    seconds = round(time.perf_counter() - started, 1)
    print(f"\nSUMMARY: {verdict} ({seconds:.0f} s)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in table:
            ax.errorbar(r["trainable"], r["gain"], yerr=r["gain_ci95"], fmt="o", color="C3" if r is full_row else "C0")
            ax.annotate(r["arm"], (r["trainable"], r["gain"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable weights")
        ax.set_ylabel("gain on code (test bits per byte)")
        ax.set_title("adapting a prose-pretrained byte transformer to Python source")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    if args.json:
        write_result(
            args.json,
            __file__,
            {
                "seeds": args.seeds,
                "quick": args.quick,
                "pretrain_epochs": args.pretrain,
                "epochs": args.epochs,
                "docs_bpb": mean_ci(docs_bpb).mean,
                "before_test_bpb": before_test,
                "table": table,
                "matched": matched,
                "verdict": verdict,
                "runs": results,
                "seconds": seconds,
            },
            started,
            argv,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
