"""Pushing and pulling policy variables through a Reverb `variables` table.

`VariableContainerClient` is what the learner and the actors use; `python -m
variable_container` serves a variables-only table when replay and variables
live on separate machines.
"""

from variable_container.client import VariableContainerClient  # pylint: disable=unused-import
