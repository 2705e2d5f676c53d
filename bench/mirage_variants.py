"""bench/mirage.py with experimental ROME variants registered (issue #34, part 4: edits that
hold in generation), so they run through the same loop and land in the same row format.

    OMP_NUM_THREADS=1 python bench/mirage_variants.py --methods rome-true-down \\
        --datasets counterfact-rome --n 10 --out bench/results/mirage-part4-true-down \\
        --set rome-true-down.v_true_factor=2.0

rome-true-down: ROME whose target value v* is also asked to push the old answer down: the
value optimisation's `true_factor` (linalg.values: an unlikelihood term -log(1 - p) on
target_true's first token at every template's first answer position). Teacher-forced
efficacy asks only p(new) > p(true); greedy text asks the new answer to be the argmax, also
on paraphrases, where an old answer still strong wins. The registered `rome` is unchanged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from mirage import main

from factedit.methods.base import ConfigError, register_method
from factedit.methods.locate.rome import RomeConfig, RomeEditor


@dataclass
class RomeTrueDownConfig(RomeConfig):
    """ROME's fields plus v_true_factor, the weight of the unlikelihood term on target_true."""

    v_true_factor: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.v_true_factor < 0:
            raise ConfigError(f"RomeTrueDownConfig.v_true_factor must be >= 0, got "
                              f"{self.v_true_factor}")


class RomeTrueDownEditor(RomeEditor):
    """ROME with `true_factor` passed to the target-value optimisation."""

    config_cls = RomeTrueDownConfig

    def _value_options(self) -> dict[str, Any]:
        return {**super()._value_options(), "true_factor": self.config.v_true_factor}


register_method("rome-true-down", RomeTrueDownConfig, RomeTrueDownEditor,
                "ROME with an unlikelihood term on target_true in v* (bench only)")

if __name__ == "__main__":
    sys.exit(main())
