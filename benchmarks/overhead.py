"""Overhead of dormant seed slots, and drift of the host upstream of a seed during its lifecycle.

Run:

    .venv/bin/python benchmarks/overhead.py [--steps N] [--blocks B]

``--steps`` is the number of training steps per timed block (default 200), ``--blocks`` the
number of alternating blocks per host (default 20); ``--pretrain`` and ``--epoch-steps`` size
part (b). Single-threaded torch on the CPU; about 1.5 minutes in all. ``--quick`` times
50 steps x 8 blocks; ``--json PATH`` also writes the summary figures (for run_all.py).

What it measures, all in one run:

(a) Step time. One training step (forward, backward, Adam step; batch 100 of MNIST-1D-sized
    random data: 40 features, 10 classes) of a host with all three slots dormant against the
    same host built with ``slots=[]`` and the same weights. The two run interleaved in
    alternating blocks (ABBA order after a warm-up) so that machine noise hits both alike; the
    script prints the median per-step time of each and the ratio dormant / plain, for the MLP
    40-64-64-10 host and the 1-D CNN host, and for the byte-level transformer (2 blocks, d_model 64,
    3 dormant slots on its residual stream, batch 32 of 64 tokens, 256 classes, against
    ``hosts.transformer.PlainTransformer`` with the same weights; a tenth of the steps per block,
    each step being far costlier than the MLP's), by process CPU time (robust when other processes
    share the cores; the summary uses it) and by wall clock, plus the median of per-block ratios.
    The ratio should be 1 up to noise (dormant slots are not even called); target <= 1.02. On a busy machine
    single ratios wander by a few percent either way; the paired ratio is the steadier one.

(b) Drift. An MLP host is trained a few hundred steps on a synthetic teacher task. Then two
    runs continue from that exact state with the same data order: the *seeded* run grows a
    seed at ``hidden1`` and takes it through its whole lifecycle (GERMINATED -> TRAINING ->
    BLENDING until alpha 1 -> HOLDING -> FOSSILIZED), the seed's parameters in their own Adam
    param group; the *twin* run has no seed. The host keeps training in both, so the upstream
    section (the output of block 0, i.e. the activation at slot ``hidden0``, and the output of
    block 1, which the seed reads) drifts from ordinary training anyway. For each phase the
    script prints the drift of each run from the pre-seed activations, and the cosine drift
    between the two runs (``1 - mean cosine similarity per example`` on a fixed probe batch).
    Expect: exactly 0 between the runs through TRAINING (gradient isolation: identical
    gradients, identical Adam updates; the script says "bitwise equal"); small once blending
    starts (upstream then gets the (1 - alpha)-scaled host gradient, none at all in HOLDING,
    and the downstream layers see the seed), target < 0.05 at the end; the ordinary
    training drift of the twin over the same steps is printed alongside for scale.

The last line is a one-line summary.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from common import write_result

from esper_ray.contracts import SeedStage
from esper_ray.hosts import HostConfig, MorphoHost, build_host
from esper_ray.hosts.transformer import PlainTransformer
from esper_ray.kasmina import AlphaSchedule, LifecycleConfig

BATCH = 100
FEATURES = 40
CLASSES = 10
TOKENS = HostConfig(kind="transformer", hidden=[64, 64], heads=4, context=64)  # the transformer row's host
SEQ, SEQ_BATCH = 64, 32


# ---- (a) step time ---------------------------------------------------------------------------------
def _twins(kind: str) -> tuple[MorphoHost, torch.nn.Module]:
    torch.manual_seed(0)
    if kind == "transformer":
        dormant = build_host(TOKENS, (SEQ,), 256)
        plain = PlainTransformer(TOKENS, (SEQ,), 256)
        plain.load_state_dict(dormant.host_state_dict(), strict=True)
        assert len(dormant.slots) == 3
        return dormant, plain
    dormant = build_host(HostConfig(kind=kind, slots="all"), (FEATURES,), CLASSES)
    plain = build_host(HostConfig(kind=kind, slots=[]), (FEATURES,), CLASSES)
    plain.load_state_dict(dormant.host_state_dict(), strict=True)
    assert len(dormant.slots) == 3 and len(plain.slots) == 0
    assert all(s.stage is SeedStage.DORMANT for s in dormant.iter_slots())
    return dormant, plain


def _stepper(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {"i": 0}

    def run(steps: int) -> tuple[float, float]:
        """Run ``steps`` training steps; return wall and CPU seconds per step."""
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            x, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            out = model(x)
            F.cross_entropy(out.flatten(0, -2), y.flatten()).backward()  # also (B, T, classes) logits
            opt.step()
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps

    return run


def step_time(kind: str, steps: int, blocks: int) -> dict[str, float]:
    dormant, plain = _twins(kind)
    gen = torch.Generator().manual_seed(1)
    if kind == "transformer":
        steps = max(4, steps // 10)
        batches = [
            (torch.randint(0, 256, (SEQ_BATCH, SEQ), generator=gen).float(), torch.randint(0, 256, (SEQ_BATCH, SEQ)))
            for _ in range(8)
        ]
    else:
        batches = [
            (torch.randn(BATCH, FEATURES, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen))
            for _ in range(32)
        ]
    run = {"dormant": _stepper(dormant, batches), "plain": _stepper(plain, batches)}
    for fn in run.values():  # warm-up
        fn(max(20, steps // 4))
    per_step: dict[str, list[tuple[float, float]]] = {"dormant": [], "plain": []}
    for b in range(blocks):
        order = ("dormant", "plain") if b % 2 == 0 else ("plain", "dormant")
        for name in order:
            per_step[name].append(run[name](steps))
    # Same data, same weights, same optimizer: both ran the same computation.
    for p_d, p_p in zip(dormant.host_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p_d, p_p), "dormant and plain hosts diverged"
    out = {}
    for clock, i in (("wall", 0), ("cpu", 1)):
        d = [t[i] for t in per_step["dormant"]]
        p = [t[i] for t in per_step["plain"]]
        out[clock] = {
            "dormant": statistics.median(d),
            "plain": statistics.median(p),
            "ratio": statistics.median(d) / statistics.median(p),
            "paired": statistics.median(a / b for a, b in zip(d, p, strict=True)),
        }
    return out


# ---- (b) drift ---------------------------------------------------------------------------------------
def cosine_drift(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - mean cosine similarity per example (activations flattened per example)."""
    return 1.0 - float(F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12).mean())


class SyntheticTask:
    """Labels from a fixed random teacher network on Gaussian inputs; a fixed data order."""

    def __init__(self, seed: int = 0, pool: int = 40):
        gen = torch.Generator().manual_seed(seed)
        w1 = torch.randn(FEATURES, 32, generator=gen) / FEATURES**0.5
        w2 = torch.randn(32, CLASSES, generator=gen) / 32**0.5
        self.batches = []
        for _ in range(pool):
            x = torch.randn(BATCH, FEATURES, generator=gen)
            self.batches.append((x, (torch.tanh(x @ w1) @ w2).argmax(1)))
        self.order = torch.randint(0, pool, (100_000,), generator=gen).tolist()
        self.probe = torch.randn(256, FEATURES, generator=gen)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[self.order[step]]


def _upstream(host: MorphoHost, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        _, acts = host.forward_with_activations(probe)
    return {
        "block0 out (slot hidden0)": acts["hidden0"].clone(),
        "block1 out (read by the seed)": acts["hidden1"].clone(),
    }


def _train_step(host, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(host(x), y).backward()


def drift_experiment(pretrain: int, epoch_steps: int) -> tuple[list[dict], dict]:
    task = SyntheticTask()
    lifecycle = LifecycleConfig(
        min_training_epochs=2,
        min_holding_epochs=1,
        min_improvement=0.0,
        embargo_epochs=1,
        alpha=AlphaSchedule(kind="sigmoid", steps=2 * epoch_steps),
    )
    cfg = HostConfig(kind="mlp", slots="all")
    torch.manual_seed(0)
    base = build_host(cfg, (FEATURES,), CLASSES, lifecycle)
    base_opt = torch.optim.Adam(base.parameters(), lr=1e-3)
    for step in range(pretrain):
        _train_step(base, base_opt, *task.batch(step))
        base_opt.step()

    def fork() -> tuple[MorphoHost, torch.optim.Optimizer]:
        host = build_host(cfg, (FEATURES,), CLASSES, lifecycle)
        host.load_host_state_dict(base.host_state_dict())
        opt = torch.optim.Adam(host.parameters(), lr=1e-3)
        # A deep copy: Optimizer.load_state_dict keeps the given tensors, so two forks loading
        # the same state dict would share (and both update) one set of Adam moments.
        opt.load_state_dict(copy.deepcopy(base_opt.state_dict()))
        return host, opt

    seeded, seeded_opt = fork()
    twin, twin_opt = fork()
    start = _upstream(base, task.probe)
    slot = seeded.germinate("hidden1", "residual_mlp", generator_seed=0, reason="benchmark")
    if slot.advance() is not SeedStage.TRAINING:  # GERMINATED -> TRAINING has no gate
        raise RuntimeError(f"seed did not start training: {slot.stage.name}")
    seeded_opt.add_param_group({"params": list(slot.seed.parameters()), "lr": 1e-3, "name": "seed"})

    rows: list[dict] = []
    phase_start, phase = pretrain, slot.stage
    step = pretrain
    max_steps = pretrain + 40 * epoch_steps

    def record(name: str, steps: int, alpha: float) -> None:
        a, b = _upstream(seeded, task.probe), _upstream(twin, task.probe)
        rows.append(
            {
                "phase": name,
                "steps": steps,
                "alpha": alpha,
                **{f"seeded:{k}": cosine_drift(a[k], start[k]) for k in start},
                **{f"twin:{k}": cosine_drift(b[k], start[k]) for k in start},
                **{f"between:{k}": cosine_drift(a[k], b[k]) for k in start},
                "between_exact": all(torch.equal(a[k], b[k]) for k in start),
            }
        )

    while step < max_steps and slot.stage is not SeedStage.FOSSILIZED:
        x, y = task.batch(step)
        _train_step(seeded, seeded_opt, x, y)
        if slot.seed is not None:
            grads = [p.grad for p in slot.seed.parameters() if p.grad is not None]
            slot.seed_grad_norm = (
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
                if grads
                else 0.0
            )
        seeded_opt.step()
        slot.on_step()
        _train_step(twin, twin_opt, x, y)
        twin_opt.step()
        step += 1
        alpha = slot.alpha  # the alpha this phase reached, before any transition
        if (step - pretrain) % epoch_steps == 0:
            slot.on_epoch_end()
            if slot.stage is SeedStage.HOLDING and not slot.gate(SeedStage.FOSSILIZED):
                slot.fossilize("benchmark: end of lifecycle")
            else:
                slot.advance()
        if slot.stage is not phase:
            record(phase.name, step - phase_start, alpha)
            phase_start, phase = step, slot.stage
    # A little training after fossilizing: the seed is part of the host now.
    for _ in range(epoch_steps):
        x, y = task.batch(step)
        _train_step(seeded, seeded_opt, x, y)
        seeded_opt.step()
        _train_step(twin, twin_opt, x, y)
        twin_opt.step()
        step += 1
    record(f"{phase.name} (+{epoch_steps} steps)", step - phase_start, slot.alpha)
    accuracy = {}
    for name, host in (("seeded", seeded), ("twin", twin)):
        with torch.no_grad():
            correct = sum(int((host(x).argmax(1) == y).sum()) for x, y in task.batches)
        accuracy[name] = correct / (len(task.batches) * BATCH)
    return rows, {
        "pretrain": pretrain,
        "lifecycle_steps": step - pretrain,
        "accuracy": accuracy,
        "stage": slot.stage.name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per timed block")
    parser.add_argument("--blocks", type=int, default=20, help="alternating blocks per host")
    parser.add_argument("--pretrain", type=int, default=300, help="host steps before the seed")
    parser.add_argument("--epoch-steps", type=int, default=50, help="steps per lifecycle epoch")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (--steps 50 --blocks 8)")
    parser.add_argument("--json", help="also write the summary figures to this JSON file")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick:
        args.steps, args.blocks = 50, 8
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, CPU")

    print(
        f"\n(a) training step time, batch {BATCH}, Adam; {args.blocks} alternating blocks x "
        f"{args.steps} steps after warm-up; median per-step time"
    )
    print(f"{'host':6s} {'clock':5s} {'dormant (3 slots)':>18s} {'plain (slots=[])':>17s} {'ratio':>6s} {'paired':>7s}")
    ratios, timings = {}, {}
    for kind in ("mlp", "cnn1d", "transformer"):
        r = step_time(kind, args.steps, args.blocks)
        ratios[kind], timings[kind] = r["cpu"]["ratio"], r
        for clock in ("cpu", "wall"):
            c = r[clock]
            print(
                f"{kind[:6]:6s} {clock:5s} {c['dormant'] * 1e3:15.4f} ms {c['plain'] * 1e3:14.4f} ms "
                f"{c['ratio']:6.3f} {c['paired']:7.3f}"
            )
    print(
        "ratio = median dormant / median plain per-step time; paired = median over blocks of the "
        "per-block ratio.\ncpu = process CPU time (robust on a shared machine), wall = wall clock. "
        "Target <= 1.02."
    )

    print(
        f"\n(b) cosine drift of the host upstream of a seed at hidden1 (MLP 40-64-64-10, "
        f"{args.pretrain} pretraining steps, 1 epoch = {args.epoch_steps} steps)"
    )
    print("drift = 1 - mean per-example cosine similarity on a fixed 256-example probe batch.")
    print("  seeded: seeded run vs. the pre-seed activations;  twin: seedless twin vs. the same;")
    print("  between: seeded run vs. twin at the same step (same data order, same start).")
    rows, info = drift_experiment(args.pretrain, args.epoch_steps)
    keys = [k.split(":", 1)[1] for k in rows[0] if k.startswith("between:")]
    for key in keys:
        print(f"\n  section: {key}")
        print(f"  {'phase ended':28s} {'steps':>5s} {'alpha':>6s} {'seeded':>10s} {'twin':>10s} {'between':>10s}")
        for row in rows:
            exact = "  (bitwise equal)" if row["between_exact"] else ""
            print(
                f"  {row['phase']:28s} {row['steps']:5d} {row['alpha']:6.3f} "
                f"{row['seeded:' + key]:10.2e} {row['twin:' + key]:10.2e} "
                f"{row['between:' + key]:10.2e}{exact}"
            )
    print(
        f"\n  final stage {info['stage']} after {info['lifecycle_steps']} steps; train accuracy "
        f"seeded {info['accuracy']['seeded']:.3f}, twin {info['accuracy']['twin']:.3f}"
    )
    training = next(r for r in rows if r["phase"] == "TRAINING")
    final = rows[-1]
    final_between = max(final[f"between:{k}"] for k in keys)
    final_twin = max(final[f"twin:{k}"] for k in keys)
    print(
        f"\nSUMMARY: dormant/plain step time (cpu) mlp {ratios['mlp']:.3f}, cnn1d {ratios['cnn1d']:.3f}, "
        f"transformer {ratios['transformer']:.3f} "
        f"(target <= 1.02); upstream seeded-vs-twin cosine drift: end of TRAINING "
        f"{max(training[f'between:{k}'] for k in keys):.1e}"
        f"{' (bitwise equal)' if training['between_exact'] else ''}, final {final_between:.1e} "
        f"(target < 0.05; ordinary training drift {final_twin:.1e})"
    )
    if args.json:
        write_result(
            args.json,
            __file__,
            {
                "steps": args.steps,
                "blocks": args.blocks,
                "pretrain": args.pretrain,
                "epoch_steps": args.epoch_steps,
                "step_time": timings,  # per host and clock: dormant, plain (s/step), ratio, paired
                "dormant_ratio_cpu": ratios,
                "dormant_target": 1.02,
                "drift_training_between": max(training[f"between:{k}"] for k in keys),
                "drift_training_bitwise_equal": training["between_exact"],
                "drift_final_between": final_between,
                "drift_final_twin": final_twin,
                "drift_target": 0.05,
                "drift_rows": rows,
                "final_stage": info["stage"],
                "lifecycle_steps": info["lifecycle_steps"],
                "accuracy": info["accuracy"],
            },
            started,
        )


if __name__ == "__main__":
    main()
