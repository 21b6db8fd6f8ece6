"""Every bad input to the ``esper-ray`` command is one ``esper-ray: error:`` line and exit 2, and
nothing already on disk changes.

First the cases found by hand (malformed YAML in overrides, seeds past their range, non-finite
rates, names that are paths, ``--out`` naming a file, unreadable configs, damaged checkpoints and
policy folders); then property tests that drive ``esper_ray.cli.main`` in-process with hundreds of
generated malformed overrides, config files, checkpoints and policy folders.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper_ray.cli import main

PREFIX = "esper-ray: error:"
# Property tests share folders across examples (hypothesis runs them all in one test call).
PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_RAY_LINEAGE_KEY", str(tmp_path / "key" / "lineage_ed25519.pem"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _fails_in_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, f"{argv}: exit {rc}, stderr {captured.err!r}"
    assert len(lines) == 1 and lines[0].startswith(PREFIX), f"{argv}: stderr {captured.err!r}"
    assert "Traceback" not in captured.err
    return lines[0]


# ---- the cases found by hand -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("training.epochs=[1,", "not a valid YAML value"),
        ("training.epochs=!!python/object/apply:os.system [echo]", "not a valid YAML value"),
        ("training.epochs=*undefined", "undefined alias"),
        ("training.seed=10**30", "training.seed"),
        ("training.seed=1000000000000000000000000000000", "out of range for a seed"),
        ("training.seed=-1", "training.seed"),
        ("task.seed=99999999999", "out of range for a seed"),
        ("training.epochs=100000000000000000000000", "out of range for an integer"),
        ("training.lr=inf", "not a finite number"),
        ("training.lr=.inf", "not a finite number"),
        ("training.seed_lr=.nan", "not a finite number"),
        ("governor.explosion_factor=Infinity", "not a finite number"),
        ("name=../../escape", "not a plain file name"),
        ("name=a/b", "not a plain file name"),
        ("name=.hidden", "not a plain file name"),
        ("name=", "name"),
        ("training..epochs=3", "empty part"),
        ("training.epochs.deeper=3", "training.epochs"),
    ],
)
def test_bad_override_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, says: str) -> None:
    out = tmp_path / "run"
    line = _fails_in_one_line(capsys, ["train", "--no-progress", "--out", str(out), override])
    assert says in line, line
    assert not out.exists()
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "many"])
def test_simic_episodes_per_runner_below_one_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    out = tmp_path / "simic"
    line = _fails_in_one_line(capsys, ["simic", "--no-progress", "--out", str(out), f"num_envs_per_env_runner={value}"])
    assert "num_envs_per_env_runner" in line, line
    assert not out.exists()


@pytest.mark.parametrize("text", [">\n", "0\n", "false\n", "''\n", "[]\n"])
def test_a_config_whose_value_is_empty_but_not_a_mapping_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """Found by the property test below: '>' (an empty folded string) trained with every default, as
    0, false, '' and [] did; only an empty file means that."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    line = _fails_in_one_line(capsys, ["train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert "expected a mapping at the top level" in line, line
    assert not (tmp_path / "r").exists()


def test_an_empty_config_file_means_every_default(tmp_path: Path) -> None:
    from esper_ray.config import RunConfig, load_config

    for text in ("", "# only a comment\n"):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        assert load_config(cfg, [], model=RunConfig) == RunConfig()


def test_config_that_is_binary_latin1_or_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("training: !!python/object/apply:os.system [echo hi]\n")
    for path, says in [(binary, "UTF-8"), (latin, "UTF-8"), (folder, "folder"), (tagged, "not valid YAML")]:
        line = _fails_in_one_line(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "r")])
        assert str(path) in line and says in line, line
    assert not (tmp_path / "r").exists()


def test_out_naming_a_file_or_below_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    before = existing.read_bytes()
    line = _fails_in_one_line(capsys, ["train", "--no-progress", "--out", str(existing), "training.epochs=1"])
    assert "is a file" in line
    line = _fails_in_one_line(capsys, ["train", "--no-progress", "--out", str(existing / "run"), "training.epochs=1"])
    assert "is a file" in line
    assert existing.read_bytes() == before


def test_override_replaces_lists_and_mappings(tmp_path: Path) -> None:
    from esper_ray.config import load_config
    from esper_ray.simic.config import SweepConfig

    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(
        "search:\n  ppo.lr: [0.0001, 0.0003]\n  env.reward.param_cost: [0.0, 0.02]\n"
        "base:\n  iterations: 10\n  ppo: {train_batch_size: 256, minibatch_size: 64}\n"
    )
    cfg = load_config(cfg_file, ["search={ppo.lr: [0.001, 0.002]}", "base.iterations=2"], model=SweepConfig)
    assert cfg.search == {"ppo.lr": [0.001, 0.002]}  # replaced, not merged into the file's grid
    assert cfg.base.iterations == 2  # a dotted key still sets one value inside the section
    assert cfg.base.ppo.train_batch_size == 256
    cfg = load_config(cfg_file, ["base.ppo={minibatch_size: 32}"], model=SweepConfig)
    assert cfg.base.ppo.minibatch_size == 32
    assert cfg.base.ppo.train_batch_size == SweepConfig().base.ppo.train_batch_size  # the file's 256 is gone
    run = load_config(None, ["host.slots=[hidden0]", "host.slots=[hidden1]"])
    assert list(run.host.slots) == ["hidden1"]


# ---- a real run folder to damage ------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-epoch run with its checkpoint (made once for this module)."""
    base = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    mp.setenv("ESPER_RAY_LINEAGE_KEY", str(base / "key.pem"))
    try:
        assert main(["train", "--no-progress", "--out", str(base / "run"), "training.epochs=2"]) == 0
    finally:
        mp.undo()
    return base / "run"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    from esper_ray.tamiyo.encoding import SetLayout
    from esper_ray.tamiyo.policy import export_net, load_policy
    from esper_ray.tamiyo.setnet import SetPolicyNet

    path = export_net(SetPolicyNet(SetLayout(3, 8), 16), tmp_path / "policy")
    load_policy(path)  # valid as made
    return path


def test_state_json_that_is_a_list(tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoint" / "state.json").write_text("[1, 2, 3]")
    before = _tree(run)
    line = _fails_in_one_line(capsys, ["train", "--no-progress", "--resume", str(run)])
    assert "state.json" in line and "list" in line
    assert _tree(run) == before


@pytest.mark.parametrize("value", ["3", 0, -2, [3], None, 2.5, True])
def test_policy_json_with_bad_sizes(
    tmp_path: Path, policy_dir: Path, capsys: pytest.CaptureFixture[str], value: object
) -> None:
    meta = json.loads((policy_dir / "policy.json").read_text())
    meta["hidden"] = value
    (policy_dir / "policy.json").write_text(json.dumps(meta))
    before = _tree(policy_dir)
    out = tmp_path / "run"
    line = _fails_in_one_line(capsys, ["train", "--no-progress", "--out", str(out), "--controller", str(policy_dir)])
    assert "hidden" in line
    assert not out.exists()
    assert _tree(policy_dir) == before


def test_failed_start_leaves_no_folder_and_a_retry_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A controller path that fails only when the run starts: the folder goes, the retry runs."""
    out = tmp_path / "run"
    # A host deeper than the shipped policy's max_slots: refused at the first decision, after the start.
    deep = ["controller.kind=policy", "host.hidden=[8,8,8,8,8,8,8]", "blueprints.source=local"]
    _fails_in_one_line(capsys, ["train", "--no-progress", "--out", str(out), *deep])
    assert not out.exists()
    # A start killed before its first checkpoint leaves config.yaml and a ledger: the retry replaces them.
    out.mkdir()
    (out / "config.yaml").write_text("name: stale\n")
    (out / ".lineage.parquet.123.tmp").write_bytes(b"x")
    assert main(["train", "--no-progress", "--out", str(out), "training.epochs=1"]) == 0
    assert (out / "summary.json").exists() and not (out / ".lineage.parquet.123.tmp").exists()
    # A folder holding a checkpoint is not replaced: the message says how to continue it.
    capsys.readouterr()
    line = _fails_in_one_line(capsys, ["train", "--no-progress", "--out", str(out), "training.epochs=1"])
    assert f"--resume {out}" in line


def test_lineage_verify_ledger_only_flag(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoint")
    key = str(finished_run.parent / "key.pem")
    assert main(["lineage", "verify", str(run), "--key", key]) == 1
    assert "missing" in capsys.readouterr().out
    assert main(["lineage", "verify", str(run), "--key", key, "--ledger-only"]) == 0
    assert "chain and signature valid" in capsys.readouterr().out


# ---- property tests ---------------------------------------------------------------------------------
KEYS = [
    "name",
    "training.epochs",
    "training.lr",
    "training.seed",
    "training.batch_size",
    "task.seed",
    "host.kind",
    "host.slots",
    "governor.explosion_factor",
    "controller.kind",
    "lifecycle.alpha.steps",
    "blueprints.max_seed_params",
]


def _yaml_fails(text: str) -> bool:
    """Whether ``text`` is not a YAML value (a random tail can close the quote or bracket it opened)."""
    import yaml

    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return True
    return False


_YAML_HEADS = ["[1,", "{a: 1", "*alias", "&a [*b]", "!!python/object:os.system x", "!!python/name:os.system"]
_YAML_HEADS += ["'open", '"open']
MALFORMED_YAML = (
    st.sampled_from(_YAML_HEADS)
    .flatmap(lambda head: st.text(max_size=8).map(lambda tail: head + tail))
    .filter(_yaml_fails)
)
NON_FINITE = st.sampled_from([".inf", "-.inf", ".nan", ".NaN", "inf", "-inf", "nan", "Infinity", "1e999", "-1e999"])
BIG_INT = st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)).map(str)
BAD_SEED = st.one_of(st.integers(min_value=2**32), st.integers(max_value=-1)).map(str)
BAD_NAME = st.one_of(
    st.text(min_size=1, max_size=6).map(lambda s: f"../{s}"),
    st.text(min_size=1, max_size=6).map(lambda s: f"a/{s}"),
    st.sampled_from(["..", ".", "/abs", "-dash", "a b", "x\\y", "~home"]),
)


@st.composite
def bad_overrides(draw: st.DrawFn) -> list[str]:
    """One override that must be refused, after up to two harmless ones (a later override of the
    same key wins, so the bad one comes last)."""
    kind = draw(st.sampled_from(["yaml", "finite", "int", "seed", "name", "unknown", "noequals", "type"]))
    if kind == "yaml":
        bad = f"{draw(st.sampled_from(KEYS))}={draw(MALFORMED_YAML)}"
    elif kind == "finite":
        key = draw(st.sampled_from(["training.lr", "training.seed_lr", "governor.explosion_factor"]))
        bad = f"{key}={draw(NON_FINITE)}"
    elif kind == "int":
        key = draw(st.sampled_from(["training.epochs", "training.batch_size", "training.probe_size"]))
        bad = f"{key}={draw(BIG_INT)}"
    elif kind == "seed":
        bad = f"{draw(st.sampled_from(['training.seed', 'task.seed']))}={draw(BAD_SEED)}"
    elif kind == "name":
        bad = f"name={json.dumps(draw(BAD_NAME))}"
    elif kind == "unknown":
        section = draw(st.sampled_from(["", "training.", "host.", "governor."]))
        ident = draw(st.from_regex(r"[a-z]{3,10}", fullmatch=True).filter(lambda s: s not in {"name", "task"}))
        bad = f"{section}zz_{ident}={draw(st.integers())}"
    elif kind == "noequals":
        bad = draw(st.text(alphabet=st.characters(blacklist_characters="="), max_size=20))
    else:
        key = draw(st.sampled_from(["training.epochs", "training.lr", "training.batch_size"]))
        bad = f"{key}={draw(st.sampled_from(['[1, 2]', '{a: 1}', 'fast', 'null', '2020-01-01']))}"
    harmless = draw(st.lists(st.sampled_from(["training.epochs=1", "training.eval_test=false"]), max_size=2))
    return harmless + [bad]


@PROPERTY
@given(overrides=bad_overrides())
def test_property_malformed_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str]) -> None:
    out = tmp_path / "prop-run"
    _fails_in_one_line(capsys, ["train", "--no-progress", "--out", str(out), *overrides])
    assert not out.exists()


CONFIG_BYTES = st.one_of(
    st.binary(min_size=1, max_size=200).filter(lambda b: not _is_mapping_yaml(b)),
    st.sampled_from(["- 1\n- 2\n", "42\n", "just text\n", "training: [\n", "training:\n  epochs: 0\n"]).map(str.encode),
    bad_overrides().map(lambda items: "\n".join(_as_yaml_line(i) for i in items).encode()),
)


def _is_mapping_yaml(data: bytes) -> bool:
    """Whether ``data`` happens to be a valid config (then it is not a malformed one)."""
    import yaml

    try:
        value = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return False
    return value is None or (isinstance(value, dict) and not value)


def _as_yaml_line(item: str) -> str:
    key, sep, value = item.partition("=")
    if not sep or not key or "." in key or not value:
        return "zz_not_a_key: 1"  # still malformed: an unknown top-level key
    return f"{key}: {value}"


@PROPERTY
@given(data=CONFIG_BYTES)
def test_property_malformed_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes) -> None:
    cfg = tmp_path / "prop.yaml"
    cfg.write_bytes(data)
    out = tmp_path / f"prop-run-{uuid.uuid4().hex}"  # per example: a failing one's folder must not fail the next
    _fails_in_one_line(capsys, ["train", "--no-progress", "--config", str(cfg), "--out", str(out)])
    assert not out.exists()
    assert cfg.read_bytes() == data


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
STATE_KEYS = ["run_id", "config", "epoch", "step", "slots", "history", "param_groups", "governor", "format"]


@st.composite
def damaged_checkpoint(draw: st.DrawFn) -> tuple[str, str, object]:
    """(file, how, value): a state.json field dropped or of the wrong type, a whole state.json
    that is not an object, or bytes in place of a safetensors or JSON file."""
    how = draw(st.sampled_from(["drop", "retype", "whole", "garble"]))
    if how == "garble":
        name = draw(
            st.sampled_from(["state.json", "model.safetensors", "optimizer.safetensors", "trainer.safetensors"])
        )
        return name, how, draw(st.binary(max_size=64))
    if how == "whole":
        return "state.json", how, draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
    key = draw(st.sampled_from(STATE_KEYS))
    if how == "drop":
        return "state.json", how, key
    value = draw(JSON_VALUES.filter(lambda v, k=key: not _right_type(k, v)))
    return "state.json", how, (key, value)


def _right_type(key: str, value: object) -> bool:
    want = {
        "run_id": str,
        "config": dict,
        "epoch": int,
        "step": int,
        "slots": dict,
        "history": list,
        "param_groups": list,
        "governor": dict,
    }.get(key)
    if key == "format":
        return value == "esper-ray-checkpoint/1"
    return isinstance(value, want) and not isinstance(value, bool)


@PROPERTY
@given(damage=damaged_checkpoint())
def test_property_damaged_checkpoints(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str], damage: tuple[str, str, object]
) -> None:
    run = tmp_path / "prop-resume"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(finished_run, run)
    name, how, value = damage
    target = run / "checkpoint" / name
    if how == "garble":
        target.write_bytes(value)
    elif how == "whole":
        target.write_text(json.dumps(value))
    else:
        state = json.loads(target.read_text())
        if how == "drop":
            del state[value]
        else:
            state[value[0]] = value[1]
        target.write_text(json.dumps(state))
    before = _tree(run)
    _fails_in_one_line(capsys, ["train", "--no-progress", "--resume", str(run)])
    assert _tree(run) == before


@st.composite
def damaged_policy(draw: st.DrawFn) -> tuple[str, object]:
    how = draw(st.sampled_from(["field", "whole", "garble-json", "garble-weights", "missing"]))
    if how == "field":
        key = draw(st.sampled_from(["max_slots", "k", "hidden", "format"]))
        value = draw(
            st.one_of(
                st.integers(max_value=0),
                st.text(max_size=4),
                st.lists(st.integers(1, 4), max_size=2),
                st.none(),
                st.floats(allow_nan=False),
                st.booleans(),
            )
        )
        return how, (key, value)
    if how == "whole":
        return how, draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
    if how == "missing":
        return how, draw(st.sampled_from(["policy.json", "policy.safetensors"]))
    return how, draw(st.binary(max_size=64))


@PROPERTY
@given(damage=damaged_policy())
def test_property_damaged_policy_folders(
    tmp_path: Path, policy_dir: Path, capsys: pytest.CaptureFixture[str], damage: tuple[str, object]
) -> None:
    policy = tmp_path / "prop-policy"
    shutil.rmtree(policy, ignore_errors=True)
    shutil.copytree(policy_dir, policy)
    how, value = damage
    if how == "field":
        meta = json.loads((policy / "policy.json").read_text())
        meta[value[0]] = value[1]
        (policy / "policy.json").write_text(json.dumps(meta))
    elif how == "whole":
        (policy / "policy.json").write_text(json.dumps(value))
    elif how == "missing":
        (policy / value).unlink()
    elif how == "garble-json":
        (policy / "policy.json").write_bytes(value)
    else:
        (policy / "policy.safetensors").write_bytes(value)
    before = _tree(policy)
    out = tmp_path / "prop-run"
    _fails_in_one_line(capsys, ["train", "--no-progress", "--out", str(out), "--controller", str(policy)])
    assert not out.exists()
    assert _tree(policy) == before
