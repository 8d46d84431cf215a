"""The Reverb server process: tables (`tables`), serving (`server`),
checkpoints (`checkpoints`) and the `--task=auto` actor indices' server side
(`actor_indices`); by default it serves the variables' tables too."""
