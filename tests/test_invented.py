"""The local catalogue with Karn-invented blueprints: reproducible, valid, shuffled and reversed on request."""

from __future__ import annotations

import pytest

from esper_ray.blueprints import build_seed
from esper_ray.blueprints.library import STANDARD_BLUEPRINTS
from esper_ray.config import BlueprintsConfig, load_config
from esper_ray.contracts import EsperError
from esper_ray.karn.invented import invented_specs, local_catalogue


def _names(cfg: BlueprintsConfig) -> list[str]:
    return [e.name for e in local_catalogue(cfg).poll()]


def test_default_is_the_standard_library_in_order():
    assert _names(BlueprintsConfig()) == list(STANDARD_BLUEPRINTS)
    assert _names(BlueprintsConfig(names=["norm", "conv1d"])) == ["norm", "conv1d"]


def test_karn_inventions_are_new_reproducible_and_build():
    cfg = BlueprintsConfig(karn_invented=3, karn_seed=5)
    first, again = local_catalogue(cfg).poll(), local_catalogue(cfg).poll()
    assert [e.content_hash for e in first] == [e.content_hash for e in again]
    invented = first[len(STANDARD_BLUEPRINTS) :]
    assert len(invented) == 3 and all(e.spec.origin == "karn" for e in invented)
    standard = {s.content_hash for s in STANDARD_BLUEPRINTS.values()}
    assert not standard & {e.content_hash for e in invented}
    other = local_catalogue(BlueprintsConfig(karn_invented=3, karn_seed=6)).poll()[len(STANDARD_BLUEPRINTS) :]
    assert {e.content_hash for e in other} != {e.content_hash for e in invented}
    shapes = {"vector": (32,), "seq": (8, 40), "image": (4, 8, 8)}
    for e in invented:
        build_seed(e.spec, shapes[e.spec.kind], generator_seed=0)  # raises if it does not build


def test_shuffle_and_reverse_permute_the_same_entries():
    base = _names(BlueprintsConfig(karn_invented=2))
    shuffled = _names(BlueprintsConfig(karn_invented=2, shuffle_seed=3))
    assert sorted(shuffled) == sorted(base) and shuffled != base
    assert _names(BlueprintsConfig(karn_invented=2, shuffle_seed=3, reverse=True)) == shuffled[::-1]


def test_an_unknown_name_or_too_many_inventions_is_one_error():
    with pytest.raises(EsperError, match="nope"):
        local_catalogue(BlueprintsConfig(names=["nope"]))
    with pytest.raises(EsperError, match="karn_invented"):
        load_config(overrides=["blueprints.karn_invented=65"])
    assert invented_specs([], 0, seed=0) == []


def test_a_gated_name_serves_the_gated_variant():
    from esper_ray.blueprints import named_blueprint
    from esper_ray.kasmina.gate import gated_blueprint

    (entry,) = local_catalogue(BlueprintsConfig(names=["residual_mlp.gated"])).poll()
    assert entry.spec == gated_blueprint(named_blueprint("residual_mlp")) and entry.spec.blend == "gated"
    with pytest.raises(EsperError, match="vector"):
        local_catalogue(BlueprintsConfig(names=["conv1d.gated"]))
