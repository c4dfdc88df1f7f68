"""Typed request options for /infer and /train: the only client values that reach the bundle.

MONAI's ConfigParser runs strings that start with ``$`` as Python, resolves ``@``/``%`` references
and instantiates ``_target_`` dicts, and MONAI Label copies request options into bundle config
overrides: a client string could run code on the server. So each task declares its options here
(type, bounds, choices); a request is parsed into plain ints, floats, bools and chosen strings before
any override is built, anything else is refused naming the option, and a last check refuses any
string the parser would treat as an expression.

Written here rather than with pydantic: the same rules run in the project's environment (tests,
no MONAI Label) and in the server's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

EXPRESSION_PREFIXES = ("$", "@", "%")
TARGET_KEY = "_target_"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_INTEGER = re.compile(r"[+-]?\d{1,20}")
_SLICE_RANGE = re.compile(r"([0-9]{1,9}) *[-,] *([0-9]{1,9})")  # "z0-z1" or "z0,z1"
_NOT_GIVEN = ("", "none", "null")

# The bundle's formats (scripts.io.volume.SUPPORTED_SUFFIXES), and NRRD, which some clients always
# ask for and which is answered in the study's own format.
RESULT_EXTENSIONS = (".mrc", ".rec", ".st", ".map", ".mrcs", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".seg.nrrd")

# The dtypes of a returned probability map (the bundle's ``probability`` setting).
PROBABILITY_DTYPES = ("uint8", "float16")

# Keys MONAI Label clients add to every request (3D Slicer, OHIF, the Python client) that this app
# does not use: accepted and dropped, so they never reach MONAI Label's own request handling.
INFER_IGNORED = ("client_id", "label_info", "result_dtype", "result_compress", "largest_cc", "restore_label_idx")
# Stock training options this app hides from /info (no MLflow here): dropped if an old client sends them.
TRAIN_IGNORED = ("client_id", "tracking", "tracking_uri", "tracking_experiment_name", "tracking_run_name")


class OptionError(ValueError):
    """A request option that is unknown or whose value does not parse; ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"option {option!r}: {message}")


class Spec(Protocol):
    def parse(self, name: str, value: Any) -> Any: ...
    def describe(self) -> str: ...


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Int:
    low: int
    high: int

    def parse(self, name: str, value: Any) -> int:
        if isinstance(value, bool):
            number = None
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            number = int(value.strip())
        else:
            number = None
        if number is None:
            raise OptionError(name, f"expected an integer, got {_shown(value)}")
        if not self.low <= number <= self.high:
            raise OptionError(name, f"{number} is outside {self.describe()}")
        return number

    def describe(self) -> str:
        return f"integer {self.low}..{self.high}"


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    low_open: bool = False  # e.g. a learning rate: > 0, not >= 0

    def parse(self, name: str, value: Any) -> float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise OptionError(name, f"expected a number, got {_shown(value)}")
        if not (self.low < number if self.low_open else self.low <= number) or number > self.high:
            raise OptionError(name, f"{number} is outside {self.describe()}")
        return number

    def describe(self) -> str:
        return f"number {'(' if self.low_open else '['}{self.low}, {self.high}]"


@dataclass(frozen=True)
class Bool:
    def parse(self, name: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise OptionError(name, f"expected true or false, got {_shown(value)}")

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Choice:
    """One of ``choices`` (given as a string, or as a list whose first entry counts, as /info shows
    the choices). With ``optional``, None or "" means "not given" (an empty Slicer combo box)."""

    choices: tuple[str, ...]
    normalise: Callable[[str], str] | None = None
    optional: bool = False

    def parse(self, name: str, value: Any) -> str | None:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if self.optional and value in (None, ""):
            return None
        if isinstance(value, str):
            chosen = self.normalise(value) if self.normalise else value
            if chosen in self.choices:
                return chosen
        raise OptionError(name, f"{_shown(value)} is not one of {self.describe()}")

    def describe(self) -> str:
        return ", ".join(self.choices) if self.choices else "(none available)"


@dataclass(frozen=True)
class Pattern:
    regex: str
    description: str

    def parse(self, name: str, value: Any) -> str:
        if isinstance(value, str) and re.fullmatch(self.regex, value.strip()):
            return value.strip()
        raise OptionError(name, f"expected {self.description}, got {_shown(value)}")

    def describe(self) -> str:
        return self.description


@dataclass(frozen=True)
class SliceRange:
    """``[z0, z1)`` as two non-negative ints: a list of two, or the text "z0-z1" / "z0,z1". None or
    "" means all slices. Whether the range fits the tomogram is the segmenter's check (it knows the
    depth)."""

    def parse(self, name: str, value: Any) -> list[int] | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NOT_GIVEN):
            return None
        if isinstance(value, str) and (match := _SLICE_RANGE.fullmatch(value.strip())):
            return [int(match[1]), int(match[2])]
        if (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**9 for v in value)
        ):
            return [int(value[0]), int(value[1])]
        raise OptionError(name, f"expected {self.describe()}, got {_shown(value)}")

    def describe(self) -> str:
        return "slices z0-z1 (two non-negative integers, z1 excluded) or empty for all"


@dataclass(frozen=True)
class Probability:
    """What /infer returns: None (the mask) or the membrane probability as "uint8" (0-255) or
    "float16" (0-1), the bundle's ``probability`` values. A 3D Slicer checkbox sends true/false (true:
    "uint8"); a combo box sends a list, whose first entry counts."""

    def parse(self, name: str, value: Any) -> str | None:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is None or value is False:
            return None
        if value is True:
            return "uint8"
        text = value.strip().lower() if isinstance(value, str) else None
        if text in _NOT_GIVEN or text == "false":
            return None
        if text == "true":
            return "uint8"
        if text in PROBABILITY_DTYPES:
            return text
        raise OptionError(name, f"{_shown(value)} is not one of {self.describe()}")

    def describe(self) -> str:
        return "null (the mask), " + ", ".join(PROBABILITY_DTYPES) + " (or true: uint8, false: null)"


def normalise_extension(value: str) -> str:
    """``nii.gz``, ``.NII.GZ`` -> ``.nii.gz``."""
    return "." + value.strip().lower().lstrip(".")


def device_choices(gpu_names: Sequence[str], cuda_count: int) -> tuple[str, ...]:
    """What a client may send as ``device``: "cpu", "cuda", "cuda:N" and the names MONAI Label lists."""
    cuda = ("cuda", *(f"cuda:{i}" for i in range(cuda_count))) if cuda_count else ()
    return tuple(dict.fromkeys(["cpu", *cuda, *gpu_names]))


# The /infer options that set how a tomogram is segmented (the infer task parses them again from
# its request, where MONAI Label has filled in the defaults /info lists).
SEGMENTATION_OPTIONS: dict[str, Spec] = {
    "tta": Bool(),
    "tta_polarity": Bool(),  # also average over the negated slice: either contrast, one mask
    "threshold": Float(-1.0, 1.0),  # the network's output is a tanh
    "batch_size": Int(1, 256),
    "slice_range": SliceRange(),
    "probability": Probability(),
}


def infer_options(models: Sequence[str], devices: Sequence[str]) -> dict[str, Spec]:
    """The /infer options; all but ``result_extension`` are in /info's config, so 3D Slicer shows them."""
    return {
        **SEGMENTATION_OPTIONS,
        "model_filename": Choice(tuple(models), optional=True),
        "result_extension": Choice(RESULT_EXTENSIONS, normalise=normalise_extension, optional=True),
        "device": Choice(tuple(devices), optional=True),
    }


def train_options(models: Sequence[str], devices: Sequence[str]) -> dict[str, Spec]:
    """The /train options: MONAI Label's stock ones, then the bundle's (train.json keys)."""
    return {
        "device": Choice(tuple(devices), optional=True),
        "pretrained": Bool(),
        "max_epochs": Int(1, 100_000),
        "val_split": Float(-1.0, 0.9),  # < 0: the bundle's val_fraction
        "multi_gpu": Bool(),
        "gpus": Pattern(r"all|\d{1,3}(,\d{1,3}){0,63}", "'all' or GPU indices such as '0,1'"),
        "model_filename": Choice(tuple(models), optional=True),
        "semi_supervised": Bool(),
        "patch_size": Int(16, 4096),
        "batch_size": Int(1, 1024),
        "learning_rate": Float(0.0, 1.0, low_open=True),
        "labeled_repeats": Int(1, 1000),
        "unlabeled_steps_per_epoch": Int(0, 10_000_000),  # 0: every unlabeled slice
        "num_workers": Int(0, 64),
        "early_stop_patience": Int(0, 100_000),  # <= 0: no early stop
        "seed": Int(0, 2**32 - 1),
    }


def parse_options(
    request: Mapping[str, Any], schema: Mapping[str, Spec], ignored: Collection[str] = ()
) -> dict[str, Any]:
    """Typed values of the options in ``request``; OptionError for an unknown option or a bad value.

    Keys in ``ignored`` are dropped; options given as None (or "" for an optional choice) are left out.
    """
    unknown = sorted(str(k) for k in request if k not in schema and k not in ignored)
    if unknown:
        raise OptionError(
            ", ".join(unknown), f"unknown option{'s' if len(unknown) > 1 else ''}; accepted: {', '.join(schema)}"
        )
    typed: dict[str, Any] = {}
    for name, spec in schema.items():
        if name in request and request[name] is not None:
            value = spec.parse(name, request[name])
            if value is not None:
                typed[name] = value
    refuse_expressions(typed)
    return typed


def refuse_expressions(values: Any, name: str = "") -> None:
    """OptionError if any string (or key) in ``values`` is one MONAI's config parser would evaluate,
    resolve or instantiate. Typed parsing makes this hold; this is the last check before the parser."""
    if isinstance(values, str):
        if values.startswith(EXPRESSION_PREFIXES) or TARGET_KEY in values:
            raise OptionError(name or "?", f"{_shown(values)} looks like a config expression; refused")
    elif isinstance(values, Mapping):
        for key, value in values.items():
            refuse_expressions(str(key), name or str(key))
            refuse_expressions(value, name or str(key))
    elif isinstance(values, (list, tuple, set)):
        for value in values:
            refuse_expressions(value, name)
