"""The base class of every recipe section: unknown keys are refused, assignments are validated."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # every float finite

    def updated(self, **changes):
        """A copy with `changes` (those not None) applied and validated like the recipe, e.g. command-line
        options over the recipe's `eval:` section."""
        given = {key: value for key, value in changes.items() if value is not None}
        return self.model_validate({**self.model_dump(), **given}) if given else self
