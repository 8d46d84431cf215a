"""The policy weights and the one-value tables, client and server side.

`client.VariableContainerClient` pushes and pulls the weights through the
`variables` table; `one_value` holds the one-item tables (`train_step`,
`max_priority`, the run contract's storage) and `status` each role's latest
status; `tables` defines the tables a server serves for them. `python -m
variable_container` serves them alone, when replay and variables live on
separate machines.
"""
