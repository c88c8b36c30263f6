"""launch: starts and supervises the distributed stages; imports none of the project's other packages.

config.py (typed launch config), nodes.py (hostfiles, Slurm node lists, the layout), stage.py (what the launcher
reads from a stage's config, and the stage's own --validate-only check), command.py (deepspeed / torchrun command
lines, .deepspeed_env), preflight.py, supervisor.py (auto-resume, launch ids), slurm/ (batch template), demo.py
(the quickstart), __main__.py (the CLI).
"""
