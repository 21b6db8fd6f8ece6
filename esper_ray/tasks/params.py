"""The generator settings of each task family (``TaskConfig.params``) and which hosts fit a task.

Each family with settings of its own has a pydantic model here, strict (an unknown name is an
error) and range-checked; ``TaskConfig`` validates its ``params`` against the model of its
family, so a typo or an out-of-range value fails when the config is read, in one line. The
families describe their settings in their own modules; the defaults of ``mnist1d`` and
``digits`` reproduce those families as they were before they took settings.

The bottleneck family keeps its settings as top-level ``TaskConfig`` fields (``input_dim``,
``hidden``, ``bottleneck_slot``, ...) and ``cifar10`` has none: for them ``params`` must be empty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from esper_ray.tasks.base import TaskConfig


class FamilyParams(BaseModel):
    """Base of the per-family settings: strict and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(FamilyParams):
    """A family without settings of its own in ``params``."""


class Mnist1dParams(FamilyParams):
    """MNIST-1D generator settings (``mnist1d.data.get_dataset_args``); the defaults are the package's."""

    num_samples: int = Field(5000, ge=500, le=50_000, description="signals generated; 80 % train pool, 20 % test")
    scale_coeff: float = Field(0.4, ge=0.0, le=1.5, description="random amplitude scaling of each signal")
    max_translation: int = Field(48, ge=0, le=60, description="largest random shift of the pattern (in steps)")
    corr_noise_scale: float = Field(0.25, ge=0.0, le=2.0, description="correlated (smooth) background noise")
    iid_noise_scale: float = Field(0.02, ge=0.0, le=1.0, description="white noise added everywhere")
    shear_scale: float = Field(0.75, ge=0.0, le=2.0, description="random linear shear of the signal")
    final_seq_length: int = Field(40, ge=16, le=160, description="length of the signal the host sees")
    shuffle_seq: bool = Field(False, description="one fixed random permutation of positions: destroys locality")


class DigitsParams(FamilyParams):
    """Settings of the 8x8 digits (defaults: the images as shipped)."""

    max_shift: int = Field(0, ge=0, le=3, description="each image moved by up to this many pixels (zero-filled)")
    noise: float = Field(0.0, ge=0.0, le=1.0, description="std of Gaussian pixel noise (pixels are in [0, 1])")


class SyntheticParams(FamilyParams):
    """Shape of a synthetic vector task: inputs, classes and how many examples are drawn."""

    input_dim: int = Field(32, ge=2, le=1024)
    num_classes: int = Field(10, ge=2, le=100)
    n_samples: int = Field(2500, ge=100, le=200_000, description="examples drawn; 20 % test, val from the rest")


class ScaleShiftParams(SyntheticParams):
    """Settings of the covariate scale / shift family (:mod:`esper_ray.tasks.scaleshift_task`)."""

    gain_decades: float = Field(3.0, ge=0.0, le=6.0, description="log10 span of the per-example input gains")
    shift: float = Field(3.0, ge=0.0, le=100.0, description="std of the per-example offset, in units of its gain")
    teacher_width: int = Field(64, ge=1, le=4096, description="hidden width of the random teacher")


class InteractionParams(SyntheticParams):
    """Settings of the low-rank interaction family (:mod:`esper_ray.tasks.interaction_task`)."""

    rank: int = Field(
        8, ge=1, le=64, description="products of projections the labels depend on (classes balance from ~6 up)"
    )
    linear_share: float = Field(0.0, ge=0.0, le=1.0, description="weight of a linear term mixed into the scores")


class SaturatedParams(SyntheticParams):
    """Settings of the saturated family (:mod:`esper_ray.tasks.saturated_task`)."""

    separation: float = Field(6.0, ge=0.5, le=100.0, description="distance between class centres, in noise stds")


class TextParams(FamilyParams):
    """Settings of the byte-level text family (:mod:`esper_ray.tasks.text_task`)."""

    domain: Literal["docs", "code"] = Field("docs", description="docs: English prose; code: Python source")
    context: int = Field(64, ge=4, le=4096, description="bytes per sequence (the host's context must cover it)")
    tokenizer: Literal["byte"] = Field("byte", description="byte: one token per UTF-8 byte, 256 classes")


FAMILY_PARAMS: dict[str, type[FamilyParams]] = {
    "mnist1d": Mnist1dParams,
    "digits": DigitsParams,
    "bottleneck": NoParams,
    "cifar10": NoParams,
    "scaleshift": ScaleShiftParams,
    "interaction": InteractionParams,
    "saturated": SaturatedParams,
    "text": TextParams,
}
"""The settings model of each family (``TaskConfig.params`` is validated against it; a family
missing here takes none)."""

IMAGE_FAMILIES = frozenset({"digits", "cifar10"})
"""Families whose inputs are images ``(C, H, W)``: a cnn2d host fits them, a cnn1d host does not."""


def parse_params(family: str, params: dict[str, Any]) -> FamilyParams:
    """``params`` validated against ``family``'s model (defaults filled in).

    Raises ValueError with one line naming the setting: an unknown name (listing the known
    ones) or a value out of range.
    """
    model = FAMILY_PARAMS.get(family, NoParams)  # a family without a model here takes no settings
    try:
        return model.model_validate(params)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        known = ", ".join(model.model_fields) or "none"
        if first["type"] == "extra_forbidden":
            raise ValueError(f"params.{name}: unknown setting of family {family!r} (known: {known})") from None
        raise ValueError(f"params.{name}: {first['msg']} (family {family!r})") from None


def settings_tag(stem: str, params: FamilyParams) -> str:
    """``stem`` plus the settings that differ from their defaults, for task names:
    ``mnist1d[max_translation=30,shuffle_seq=True]`` (floats to 3 significant digits)."""
    changed = params.model_dump(exclude_defaults=True)
    if not changed:
        return stem
    parts = (f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(changed.items()))
    return f"{stem}[{','.join(parts)}]"


def check_host(cfg: TaskConfig) -> None:
    """ValueError (one line) when ``cfg.host`` cannot play ``cfg``'s task.

    A cnn2d host needs image inputs and a cnn1d host vector ones; a bottleneck task's host is
    the teacher's MLP (its weights are the task's ``host_init``), so its widths must be
    ``cfg.hidden``.
    """
    host = cfg.host
    assert host is not None
    image = cfg.family in IMAGE_FAMILIES
    if host.kind == "cnn2d" and not image:
        raise ValueError(f"host.kind 'cnn2d' needs image inputs; family {cfg.family!r} gives vectors")
    if host.kind == "cnn1d" and image:
        raise ValueError(f"host.kind 'cnn1d' cannot take the images of family {cfg.family!r} (use mlp or cnn2d)")
    if cfg.family == "bottleneck" and (host.kind != "mlp" or list(host.hidden) != list(cfg.hidden)):
        raise ValueError(
            f"a bottleneck task is played with the teacher's MLP: host must be kind 'mlp' with "
            f"hidden={list(cfg.hidden)}, got kind {host.kind!r} with hidden={list(host.hidden)}"
        )
