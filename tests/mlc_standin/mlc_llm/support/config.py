"""Config base classes, shaped like ``mlc_llm.support.config`` in the real package.

Difference from the real one: the real ``ConfigBase`` keeps unknown keys in a ``kwargs`` field
(which ``asdict()`` leaves out again). The stand-in has no ``kwargs`` field and simply drops
unknown keys, so ``from_dict(d).asdict()`` has the same shape in both.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT", bound="ConfigBase")


@dataclasses.dataclass
class ConfigBase:
    """Base of the model config dataclasses: every field has a default."""

    @classmethod
    def from_dict(cls: type[ConfigT], source: dict[str, Any]) -> ConfigT:
        """Build a config from ``source``: unknown keys are dropped, missing ones defaulted.

        ``__post_init__`` of the subclass may then normalize values (as the real ones do),
        and raises ``ValueError`` for values no model could have.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in source.items() if key in names})

    def asdict(self) -> dict[str, Any]:
        """The fields and their values, in field order."""
        return dataclasses.asdict(self)


class ConfigOverrideBase:
    """Base of override dataclasses: ``apply`` sets each non-None field the config has."""

    def apply(self, config: ConfigT) -> ConfigT:
        """Return a new config with the overrides applied (fields the config lacks are
        skipped with a warning on stderr, as the real one logs)."""
        updated = config.asdict()
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if value is None:
                continue
            if field.name not in updated:
                print(
                    f"Warning: Cannot override {field.name}, because "
                    f"{type(config).__name__} does not have this field",
                    file=sys.stderr,
                )
                continue
            print(f"Overriding {field.name} from {updated[field.name]} to {value}")
            updated[field.name] = value
        return type(config).from_dict(updated)
