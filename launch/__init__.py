"""launch: starts and supervises the distributed stages; imports none of the project's other packages but the
config leaf (configs/), and no torch: what it must know about a stage or a node it asks in a subprocess.

config.py (typed launch config), nodes.py (hostfiles, Slurm node lists, the layout), stage.py (what the stage says
about itself: `python -m <stage> --validate-only --json`), devices.py (what torch sees on this node), command.py
(deepspeed / torchrun command lines, .deepspeed_env), preflight.py, supervisor.py (auto-resume, launch ids), slurm/
(batch template), demo.py (the quickstart), __main__.py (the CLI).
"""
